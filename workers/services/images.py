"""The image store: server-made file names, atomic writes, and every path checked to lie
inside the store after symlinks are resolved. A store that cannot take a file (full, over
quota, read-only, denied) raises ``StoreUnavailable``: an outage of the store, not a fault of
the request (workers/engine/runner.py retries it as it retries a database outage)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import tempfile
import uuid
from pathlib import Path

from PIL import Image

from workers.pool import TIER_NAME

log = logging.getLogger(__name__)

__all__ = ["OUTAGES", "ImageStore", "StoreUnavailable"]

# Tier names are checked by the pool; checked again here, as they become file names.
TIER_FILE = re.compile(TIER_NAME.strip("^$"))

#: The errors of a store that cannot take a file, whatever is written: what each one means.
OUTAGES = {
    errno.ENOSPC: "full",
    errno.EDQUOT: "quota",
    errno.EROFS: "read_only",
    errno.EACCES: "denied",
    errno.EPERM: "denied",
}


class StoreUnavailable(OSError):
    """The image store cannot take a file (``OUTAGES``); ``reason`` says why."""

    @property
    def reason(self) -> str:
        return OUTAGES[self.errno] if self.errno is not None else "unknown"

    @classmethod
    def raise_for(cls, exc: OSError) -> None:
        """Raise ``exc`` as an outage of the store if it is one."""
        if exc.errno in OUTAGES:
            raise cls(exc.errno, f"the image store cannot take a file: {exc.strerror}") from exc


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def save(self, request_id: str, tier: str, image: Image.Image) -> str:
        """Write the PNG atomically and return its path relative to the store. A write that
        fails leaves neither a partial file nor an empty request folder behind."""
        if not TIER_FILE.fullmatch(tier):
            raise ValueError(f"not a tier name: {tier!r}")
        name = f"{uuid.UUID(request_id)}/{tier}.png"
        target = self.resolve(name)
        try:
            self._write(target, image)
        except BaseException as exc:
            # Only an empty folder goes: another tier's image of the request stays.
            with contextlib.suppress(OSError):
                target.parent.rmdir()
            if isinstance(exc, OSError):
                StoreUnavailable.raise_for(exc)
            raise
        return name

    @staticmethod
    def _write(target: Path, image: Image.Image) -> None:
        for _ in range(3):
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".png.part")
                break
            except FileNotFoundError:
                # Another tier's failed write removed the empty folder meanwhile: again.
                continue
        else:
            raise FileNotFoundError(errno.ENOENT, "the request's folder keeps vanishing", target)
        try:
            with os.fdopen(fd, "wb") as handle:
                image.save(handle, format="PNG")
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def remove(self, relative: str) -> None:
        """Delete an image that no row names (written before its batch failed), and its
        request's folder if that leaves it empty. A store that refuses is logged: the file is
        written again, under the same name, when the step is retried."""
        path = self.resolve(relative)
        try:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                path.parent.rmdir()
        except OSError as exc:
            log.warning("image %s could not be removed: %s", relative, exc)

    def check_writable(self) -> None:
        """Write a small file into the store and remove it; raises ``StoreUnavailable`` when
        the store cannot take it (``/readyz`` asks this)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".ready-")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(b"ready\n")
                    handle.flush()
                    # A file system that allocates late reports a full disk only here.
                    os.fsync(handle.fileno())
            finally:
                Path(tmp).unlink(missing_ok=True)
        except OSError as exc:
            StoreUnavailable.raise_for(exc)
            raise

    def resolve(self, relative: str) -> Path:
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"image path {relative!r} lies outside the image store")
        return path

    def open(self, relative: str) -> Image.Image:
        with Image.open(self.resolve(relative)) as image:
            return image.convert("RGB")
