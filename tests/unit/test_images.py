"""The image store makes its own names and never reads or writes outside its root."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from PIL import Image

from workers.images import ImageStore


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
