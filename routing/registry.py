"""Save and load persistent routers by kind, so a worker can load whatever version is active."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from routing.types import PersistentRouter

MANIFEST = "router.json"

# kind -> "module:Class"; imported lazily so that loading one kind needs only its own deps.
KINDS: dict[str, str] = {
    "routet2i": "routing.routet2i:RouteT2IRouter",
    "noun_count": "routing.baselines:NounCountRouter",
    "prompt_length": "routing.baselines:PromptLengthRouter",
    "random": "routing.baselines:RandomRouter",
}


def router_class(kind: str) -> type[PersistentRouter]:
    try:
        module_name, class_name = KINDS[kind].split(":")
    except KeyError:
        raise ValueError(f"unknown router kind {kind!r}; known: {sorted(KINDS)}") from None
    cls: type[PersistentRouter] = getattr(importlib.import_module(module_name), class_name)
    return cls


def build_router(kind: str, **options: Any) -> PersistentRouter:
    """A fresh, untrained router of the given kind."""
    return router_class(kind)(**options)


def save_router(router: PersistentRouter, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    router.save(path)
    manifest = {"kind": router.kind, "name": router.name}
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2))


def load_router(path: Path) -> PersistentRouter:
    manifest = json.loads((path / MANIFEST).read_text())
    return router_class(manifest["kind"]).load(path)
