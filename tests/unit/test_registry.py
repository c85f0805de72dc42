"""The registry of routers: every router class under one name, the harnesses and the eval CLI
taking their names from it, and every router it saves loading back to the same predictions."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import typer

from routing import baselines, bert_router, embedding_baselines, pool_baselines, routet2i
from routing.encoder import FrozenTextEncoder
from routing.encodings import SharedEncoding
from routing.evaluate import router_factories
from routing.pool_evaluate import pool_router_factories
from routing.registry import (
    MANIFEST,
    PAIR_ROUTERS,
    POOL_ROUTERS,
    REGISTRY,
    BuildContext,
    Interface,
    RouterEntry,
    build_pool_router,
    build_router,
    load_pair_router,
    load_router,
    router_entry,
    save_router,
)
from routing.routet2i import RouteT2IConfig
from routing.types import PersistentPoolRouter, PersistentRouter, PoolRouter, Router
from tests.unit.test_baselines import word_table
from tests.unit.test_pool_routers import TIERS, word_pool
from tests.unit.tiny_text_encoder import build_tiny_encoder
from workers.entrypoints.cli.eval import eval_app

ROUTER_MODULES: tuple[ModuleType, ...] = (
    baselines,
    pool_baselines,
    embedding_baselines,
    bert_router,
    routet2i,
)
TINY_T2I = RouteT2IConfig(epochs=2, rank=8, score_dim=8, ensemble=1)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> SharedEncoding:
    torch.set_num_threads(1)
    return SharedEncoding(FrozenTextEncoder(build_tiny_encoder(tmp_path_factory.mktemp("enc"))))


def context(shared: SharedEncoding, interface: Interface) -> BuildContext:
    test = word_table() if interface == "pair" else word_pool()
    return BuildContext(seed=3, shared=shared, routet2i_config=TINY_T2I, test=test)


def build(name: str, interface: Interface, shared: SharedEncoding) -> Router | PoolRouter:
    if interface == "pair":
        return build_router(name, context(shared, interface))
    return build_pool_router(name, context(shared, interface))


def router_classes() -> set[type]:
    """Every concrete class of the routing modules that routes a pair or a pool."""
    return {
        cls
        for module in ROUTER_MODULES
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if cls.__module__ == module.__name__
        and not inspect.isabstract(cls)
        and (hasattr(cls, "predict_prs") or hasattr(cls, "predict_quality"))
    }


def test_the_registry_lists_every_router_class_under_one_name(shared: SharedEncoding) -> None:
    built: dict[type, set[str]] = {}
    for name, entry in REGISTRY.items():
        assert entry.name == name
        for interface in entry.interfaces:
            router = build(name, interface, shared)
            assert isinstance(router, Router if interface == "pair" else PoolRouter)
            built.setdefault(type(router), set()).add(name)
    assert set(built) == router_classes()
    assert all(len(names) == 1 for names in built.values()), built
    assert tuple(n for n, e in REGISTRY.items() if "pair" in e.interfaces) == PAIR_ROUTERS
    assert tuple(n for n, e in REGISTRY.items() if "pool" in e.interfaces) == POOL_ROUTERS


def option(command: str, name: str) -> tuple[str, str]:
    """Default and help of one option of a ``t2iroute eval`` command."""
    group = typer.main.get_group(eval_app)
    [param] = [p for p in group.commands[command].params if p.name == name]
    return str(param.default), str(getattr(param, "help", ""))


def test_harnesses_and_cli_take_their_names_from_the_registry() -> None:
    assert tuple(router_factories()) == PAIR_ROUTERS
    assert tuple(pool_router_factories()) == POOL_ROUTERS
    for command, names in (("genai-bench", PAIR_ROUTERS), ("table", PAIR_ROUTERS)):
        default, help_text = option(command, "routers")
        assert default == ",".join(names) and ", ".join(names) in help_text
    default, help_text = option("pool", "routers")
    assert default == ",".join(POOL_ROUTERS) and ", ".join(POOL_ROUTERS) in help_text
    # A name that routes only the other kind of table is refused, not silently built.
    with pytest.raises(ValueError, match="unknown routers"):
        router_factories(["knn"])
    with pytest.raises(ValueError, match="unknown pool routers"):
        pool_router_factories(["zooter"])
    with pytest.raises(ValueError, match="routes pools only"):
        build_router("ridge")
    with pytest.raises(ValueError, match="routes pairs only"):
        build_pool_router("noun_count")
    with pytest.raises(ValueError, match="unknown router 'nope'"):
        router_entry("nope")


SAVED = [(name, i) for name, e in REGISTRY.items() for i in e.artefacts]


@pytest.mark.parametrize(("name", "interface"), SAVED, ids=[f"{n}-{i}" for n, i in SAVED])
def test_saved_routers_load_back_to_the_same_predictions(
    name: str, interface: Interface, shared: SharedEncoding, tmp_path: Path
) -> None:
    router = build(name, interface, shared)
    assert isinstance(router, PersistentRouter | PersistentPoolRouter)
    table = word_table() if interface == "pair" else word_pool()
    router.fit(table)  # type: ignore[arg-type]
    prompts = [*table.prompts[:30], "a dragon nobody trained on", ""]
    save_router(router, tmp_path / name)
    manifest = json.loads((tmp_path / name / MANIFEST).read_text())
    assert manifest["kind"] == name
    loaded = load_router(tmp_path / name)
    assert type(loaded) is type(router)
    if interface == "pair":
        assert isinstance(router, Router) and isinstance(loaded, Router)
        np.testing.assert_array_equal(loaded.predict_prs(prompts), router.predict_prs(prompts))
        assert isinstance(loaded, PersistentRouter) and loaded.kind == name
    else:
        assert isinstance(router, PoolRouter) and isinstance(loaded, PoolRouter)
        expected = router.predict_quality(prompts)
        if hasattr(router, "embeddings"):
            # A pooled embedding depends in its last bits on the batch the prompt was encoded
            # in (the padding), and the loaded router's memo batches the unseen prompts anew.
            np.testing.assert_allclose(loaded.predict_quality(prompts), expected, rtol=1e-9)
        else:
            np.testing.assert_array_equal(loaded.predict_quality(prompts), expected)
        assert getattr(loaded, "tiers") == TIERS  # noqa: B009 (not on the protocol)


def test_evaluation_only_routers_are_built_but_never_saved(
    shared: SharedEncoding, tmp_path: Path
) -> None:
    for name, entry in REGISTRY.items():
        offline = set(entry.interfaces) - set(entry.artefacts)
        assert not offline or entry.evaluation_only, name
    assert set(REGISTRY["oracle"].artefacts) == set()
    with pytest.raises(ValueError, match="oracle reads the labels"):
        build_router("oracle")
    with pytest.raises(ValueError, match="needs a PoolTable"):
        build_pool_router("oracle", BuildContext(test=word_table()))
    random = build_pool_router("random", context(shared, "pool"))
    random.fit(word_pool())
    with pytest.raises(ValueError, match="RandomPoolRouter is evaluation only"):
        save_router(random, tmp_path / "random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="say why"):
        RouterEntry("unsaved", pool=REGISTRY["knn"].pool)
    with pytest.raises(ValueError, match="does not build"):
        RouterEntry("odd", pool=REGISTRY["knn"].pool, artefacts={"pair": "routing.x:Y"})


def test_pair_versions_without_an_interface_still_load(tmp_path: Path) -> None:
    """Versions saved before pools existed have a manifest without ``interface``."""
    router = build_router("prompt_length")
    router.fit(word_table())
    assert isinstance(router, PersistentRouter)
    save_router(router, tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"kind": "prompt_length", "name": router.name}))
    loaded = load_pair_router(tmp_path)
    assert isinstance(loaded, baselines.PromptLengthRouter)
    assert loaded.predict_prs(["a cat"])[0] == router.predict_prs(["a cat"])[0]


def test_load_pair_router_refuses_a_pool_router(tmp_path: Path) -> None:
    router = build_pool_router("prompt_length")
    router.fit(word_pool())
    save_router(router, tmp_path)  # type: ignore[arg-type]
    assert isinstance(load_router(tmp_path), pool_baselines.PromptLengthPoolRouter)
    with pytest.raises(ValueError, match="routes a pool, not a pair"):
        load_pair_router(tmp_path)
