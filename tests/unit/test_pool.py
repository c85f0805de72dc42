"""The pool of tiers from the settings: the default two tiers, JSON and TOML pools, and the
clear errors of a pool that cannot work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from workers.pool import Pool, PoolError, TierSpec
from workers.settings import Settings

THREE = [
    {"name": "turbo", "model": "var/models/edge", "cost": 0.5, "steps": 1},
    {"name": "sd21", "model": "var/models/edge", "cost": 1, "steps": 4},
    {"name": "big", "model": "var/models/cloud", "cost": 20, "queue": "gpu-big"},
]


def test_the_default_pool_is_edge_and_cloud_from_the_existing_settings() -> None:
    settings = Settings(edge_model="e", cloud_model="c", edge_cost=1, cloud_cost=4)
    pool = settings.pool
    assert pool.names == ("edge", "cloud")
    assert (pool["edge"].model, pool["cloud"].model) == ("e", "c")
    assert (pool["edge"].queue_name, pool["cloud"].queue_name) == ("edge", "cloud")
    assert pool.cheapest.name == "edge"
    assert pool.extra_cost("cloud") == 3


def test_a_json_pool_is_ordered_by_cost_with_queues_defaulting_to_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("T2IROUTE_TIERS", json.dumps(list(reversed(THREE))))
    pool = Settings().pool
    assert pool.names == ("turbo", "sd21", "big")
    assert [t.queue_name for t in pool] == ["turbo", "sd21", "gpu-big"]
    assert pool["sd21"].steps == 4
    assert pool.extra_cost("big") == 19.5
    assert [t.name for t in pool.select("big, turbo")] == ["big", "turbo"]


def test_a_toml_pool(tmp_path: Path) -> None:
    path = tmp_path / "tiers.toml"
    path.write_text(
        "\n".join(
            f'[[tiers]]\nname = "{t["name"]}"\nmodel = "{t["model"]}"\ncost = {t["cost"]}\n'
            for t in THREE
        )
    )
    assert Settings(tiers_file=path).pool.names == ("turbo", "sd21", "big")


@pytest.mark.parametrize(
    ("tiers", "message"),
    [
        ([], "at least one tier"),
        ([THREE[0], {**THREE[1], "name": "turbo"}], "tier name used twice: turbo"),
        ([THREE[0], {**THREE[1], "queue": "turbo"}], "queue used twice: turbo"),
        ([{**THREE[0], "queue": "route"}], "queue used twice: route"),
        ([{**THREE[0], "cost": -1}], "tier turbo: cost: Input should be greater than or equal"),
        ([{**THREE[0], "cost": "nan"}], "tier turbo: cost"),
        ([{**THREE[0], "name": "Big Tier"}], "tier Big Tier: name: String should match"),
        ([{"name": "x", "cost": 1}], "tier x: model: Field required"),
        ([{**THREE[0], "colour": "red"}], "tier turbo: colour: Extra inputs are not permitted"),
        ("not a list", "tiers\n  Input should be a valid list"),
    ],
)
def test_an_unusable_pool_is_refused_with_a_clear_message(tiers: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(tiers=tiers)  # type: ignore[arg-type]


def test_the_tiers_file_and_variable_are_exclusive_and_files_must_parse(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[[tiers]\n")
    with pytest.raises(ValidationError, match="not valid TOML"):
        Settings(tiers_file=bad)
    with pytest.raises(ValidationError, match="cannot read the tiers file"):
        Settings(tiers_file=tmp_path / "missing.toml")
    with pytest.raises(ValidationError, match="not both"):
        Settings(tiers=THREE, tiers_file=bad)


def test_an_unknown_tier_is_named_with_the_pool() -> None:
    pool = Pool([TierSpec(name="a", model="m", cost=1)])
    with pytest.raises(PoolError, match="unknown tier 'b'; the pool has a"):
        pool["b"]
    with pytest.raises(PoolError, match="no tier named"):
        pool.select(" , ")
