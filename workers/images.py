"""The image store: server-made file names, atomic writes, and every path checked to lie
inside the store after symlinks are resolved."""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from pathlib import Path

from PIL import Image

from workers.pool import TIER_NAME

# Tier names are checked by the pool; checked again here, as they become file names.
TIER_FILE = re.compile(TIER_NAME.strip("^$"))


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def save(self, request_id: str, tier: str, image: Image.Image) -> str:
        """Write the PNG atomically and return its path relative to the store."""
        if not TIER_FILE.fullmatch(tier):
            raise ValueError(f"not a tier name: {tier!r}")
        name = f"{uuid.UUID(request_id)}/{tier}.png"
        target = self.resolve(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".png.part")
        try:
            with os.fdopen(fd, "wb") as handle:
                image.save(handle, format="PNG")
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return name

    def resolve(self, relative: str) -> Path:
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"image path {relative!r} lies outside the image store")
        return path

    def open(self, relative: str) -> Image.Image:
        with Image.open(self.resolve(relative)) as image:
            return image.convert("RGB")
