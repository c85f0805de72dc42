"""T2IROUTE_HOME: every relative path of the settings is resolved against it, once, so that
the processes of an installation find the same files whatever their working directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from workers.services.runtime import missing_models
from workers.settings import Settings, resolve_model


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings' own defaults, not the test session's T2IROUTE_ variables."""
    for name in os.environ:
        if name.startswith("T2IROUTE_"):
            monkeypatch.delenv(name)


def test_relative_stores_and_the_tiers_file_are_under_home(tmp_path: Path) -> None:
    (tmp_path / "tiers.toml").write_text(
        '[[tiers]]\nname = "small"\nmodel = "models/small/v1"\ncost = 1\n'
        '[[tiers]]\nname = "large"\nmodel = "org/large"\ncost = 9\n'
    )
    settings = Settings(
        home=tmp_path,
        image_store=Path("var/images"),
        broker_folder=Path("broker"),
        tiers_file=Path("tiers.toml"),
    )
    assert settings.image_store == tmp_path / "var" / "images"
    assert settings.model_store == tmp_path / "var" / "routers"  # the default, too
    assert settings.broker_folder == tmp_path / "broker"
    assert settings.tiers_file == tmp_path / "tiers.toml"
    # A tier's model is a folder under home or, in the hub's form, a hub id.
    assert settings.pool["small"].model == str(tmp_path / "models" / "small" / "v1")
    assert settings.pool["large"].model == "org/large"


def test_absolute_paths_stay_as_they_are(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", image_store=tmp_path / "images")
    assert settings.image_store == tmp_path / "images"


@pytest.mark.parametrize(
    ("setting", "local"),
    [
        ("var/models/edge", True),  # more than one "/": no hub id
        ("./edge", True),
        ("stabilityai/stable-diffusion-2-1-base", False),
        ("gpt2", False),
        ("here", True),  # a folder that exists under home
        ("org/here", True),
    ],
)
def test_a_model_is_a_folder_under_home_or_a_hub_id(
    tmp_path: Path, setting: str, local: bool
) -> None:
    (tmp_path / "here").mkdir()
    (tmp_path / "org" / "here").mkdir(parents=True)
    expected = str((tmp_path / setting).resolve()) if local else setting
    assert resolve_model(setting, tmp_path) == expected


def test_the_model_settings_default_under_home(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    assert settings.edge_model == str(tmp_path / "var" / "models" / "edge")
    assert settings.cloud_model == str(tmp_path / "var" / "models" / "cloud")
    assert settings.clip_model == str(tmp_path / "var" / "models" / "clip")


def test_missing_models_names_each_tier_of_the_queues_and_clip_for_quality(
    tmp_path: Path,
) -> None:
    settings = Settings(
        home=tmp_path,
        tiers=json.loads(
            '[{"name": "a", "model": "m/a/x", "cost": 1},'
            ' {"name": "b", "model": "org/b", "cost": 2, "queue": "gpu-b"},'
            ' {"name": "c", "model": "m/c/x", "cost": 3}]'
        ),
    )
    missing = missing_models(settings, ["route", "quality", "a", "gpu-b"])
    assert [(m.user, m.path, m.marker) for m in missing] == [
        ("tier a", str(tmp_path / "m" / "a" / "x"), "model_index.json"),
        ("quality metrics (CLIP)", str(tmp_path / "var" / "models" / "clip"), "config.json"),
    ]
    assert missing[0].setting == "the tier's model in T2IROUTE_TIERS"
    # An empty folder is no model either; one with its index is.
    (tmp_path / "m" / "a" / "x").mkdir(parents=True)
    assert [m.user for m in missing_models(settings, ["a"])] == ["tier a"]
    (tmp_path / "m" / "a" / "x" / "model_index.json").write_text("{}")
    assert missing_models(settings, ["a", "route"]) == []
