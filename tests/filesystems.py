"""Small file systems for the tests of a full or read-only image store: a tmpfs of a few
kilobytes mounted on a folder of the test's own (the tests run as root in CI), filled to the
last byte, given space back, or remounted read-only. Only what these helpers mounted is ever
unmounted."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["FILLER", "can_mount", "fill", "remount", "tmpfs"]

#: The file that takes a small store's last bytes; its removal gives the space back.
FILLER = ".filler"


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, check=False)


def can_mount() -> bool:
    """Whether this process may mount a tmpfs (root, with the capability)."""
    if os.geteuid() != 0:
        return False
    with tempfile.TemporaryDirectory() as folder:
        if _mount("-t", "tmpfs", "-o", "size=64k", "tmpfs", folder).returncode != 0:
            return False
        subprocess.run(["umount", folder], check=True)
    return True


@contextlib.contextmanager
def tmpfs(folder: Path, size: str = "200k") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``folder`` (made if absent) for the block; unmounted
    after it, lazily if a process still holds a file there."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = _mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder))
    if mounted.returncode != 0:
        raise OSError(f"mount -t tmpfs on {folder} failed: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=True)


def remount(folder: Path, options: str) -> None:
    """``mount -o remount,OPTIONS`` of a tmpfs mounted by ``tmpfs``: ``ro``, ``rw``,
    ``size=16m``."""
    done = _mount("-o", f"remount,{options}", str(folder))
    if done.returncode != 0:
        raise OSError(f"remount,{options} of {folder} failed: {done.stderr.strip()}")


def fill(folder: Path) -> int:
    """Write ``FILLER`` in ``folder`` until its file system has no byte left; its size."""
    written = 0
    with (folder / FILLER).open("ab", buffering=0) as handle:
        for chunk in (65536, 4096, 1):
            while True:
                try:
                    written += handle.write(b"\0" * chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return written
