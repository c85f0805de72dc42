"""The image store makes its own names, never reads or writes outside its root, leaves nothing
behind a failed write, and tells a full or read-only store (an outage) from a bad image."""

from __future__ import annotations

import errno
import uuid
from pathlib import Path

import pytest
from PIL import Image

from tests.filesystems import FILLER, can_mount, fill, remount, tmpfs
from workers.services.images import ImageStore, StoreUnavailable


def test_save_names_the_file_and_reads_it_back(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    request_id = str(uuid.uuid4())
    name = store.save(request_id, "edge", Image.new("RGB", (8, 8), "red"))
    assert name == f"{request_id}/edge.png"
    assert not list(tmp_path.rglob("*.part"))
    with store.open(name) as image:
        assert image.size == (8, 8)
        assert image.getpixel((0, 0)) == (255, 0, 0)


def test_a_request_id_that_is_not_a_uuid_cannot_name_a_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        ImageStore(tmp_path).save("../../etc/passwd", "edge", Image.new("RGB", (8, 8)))


@pytest.mark.parametrize("tier", ["../edge", "edge/../../x", "", "Edge", "a b"])
def test_a_tier_that_is_not_a_tier_name_cannot_name_a_file(tmp_path: Path, tier: str) -> None:
    with pytest.raises(ValueError, match="not a tier name"):
        ImageStore(tmp_path).save(str(uuid.uuid4()), tier, Image.new("RGB", (8, 8)))


@pytest.mark.parametrize("name", ["../outside.png", "/etc/passwd", "a/../../outside.png"])
def test_paths_outside_the_store_are_refused(tmp_path: Path, name: str) -> None:
    store = ImageStore(tmp_path / "store")
    with pytest.raises(ValueError, match="outside the image store"):
        store.resolve(name)


def test_a_symlink_out_of_the_store_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    (tmp_path / "secret.png").write_bytes(b"not yours")
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(ValueError, match="outside the image store"):
        ImageStore(root).resolve("link.png")


def test_a_failed_write_leaves_no_partial_file_and_no_empty_folder(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    with pytest.raises(OSError, match="cannot write mode"):
        store.save(str(uuid.uuid4()), "edge", Image.new("CMYK", (8, 8)))
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_keeps_the_other_tiers_image(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    request_id = str(uuid.uuid4())
    name = store.save(request_id, "edge", Image.new("RGB", (8, 8)))
    with pytest.raises(OSError):
        store.save(request_id, "cloud", Image.new("CMYK", (8, 8)))
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")] == [
        request_id,
        name,
    ]


needs_mount = pytest.mark.skipif(not can_mount(), reason="mounting a tmpfs needs root")


@needs_mount
def test_a_full_store_is_an_outage_and_leaves_nothing_behind(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "store", "64k") as root:
        fill(root)
        store = ImageStore(root)
        with pytest.raises(StoreUnavailable) as raised:
            store.save(str(uuid.uuid4()), "edge", Image.new("RGB", (64, 64), "red"))
        assert raised.value.errno == errno.ENOSPC and raised.value.reason == "full"
        with pytest.raises(StoreUnavailable):
            store.check_writable()
        assert sorted(p.name for p in root.iterdir()) == [FILLER]
        (root / FILLER).unlink()
        store.check_writable()
        assert store.save(str(uuid.uuid4()), "edge", Image.new("RGB", (64, 64), "red"))


@needs_mount
def test_a_read_only_store_is_an_outage(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "store", "64k") as root:
        store = ImageStore(root)
        request_id = str(uuid.uuid4())
        name = store.save(request_id, "edge", Image.new("RGB", (8, 8)))
        remount(root, "ro")
        try:
            with pytest.raises(StoreUnavailable) as raised:
                store.save(str(uuid.uuid4()), "cloud", Image.new("RGB", (8, 8)))
            assert raised.value.reason == "read_only"
            with pytest.raises(StoreUnavailable):
                store.check_writable()
            with store.open(name) as image:
                assert image.size == (8, 8)
        finally:
            remount(root, "rw")
        store.check_writable()
