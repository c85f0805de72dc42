"""The compose stack against the compose specification and against the code it runs: every
queue has a consumer, every T2IROUTE_ variable is a setting, GPU workers are set up the way
DESIGN.md's reliability rules ask."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from workers.settings import Settings

COMPOSE = Path(__file__).resolve().parents[2] / "compose"
FILES = ("compose.yml", "compose.override.yml")
APP_IMAGE = "t2iroute:latest"
VARIABLE = re.compile(r"\bT2IROUTE_[A-Z0-9_]+")


def load(name: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((COMPOSE / name).read_text())
    return document


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = load("compose.yml")["services"]
    return found


def option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def workers(services: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    return {
        name: service["command"]
        for name, service in services.items()
        if service.get("command", [])[:2] == ["t2iroute", "worker"]
    }


@pytest.mark.parametrize("name", FILES)
def test_valid_against_the_compose_spec(name: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE / name),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_queue_has_a_consumer(services: dict[str, dict[str, Any]]) -> None:
    queues = Settings().queues
    consumed = {
        queue
        for command in workers(services).values()
        for queue in option(command, "--queues").split(",")
    }
    assert consumed == set(queues), "the CLI maps these keys to the configured queue names"


@pytest.mark.parametrize("name", ["edge-worker", "cloud-worker"])
def test_gpu_workers_run_one_solo_process_on_a_reserved_gpu(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    service = services[name]
    assert option(service["command"], "--pool") == "solo"
    assert option(service["command"], "--concurrency") == "1"
    assert service["environment"]["T2IROUTE_DEVICE"] == "cuda"
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_every_t2iroute_variable_is_a_setting() -> None:
    texts = [(COMPOSE / name).read_text() for name in (*FILES, ".env.example", "Dockerfile")]
    used = {match for text in texts for match in VARIABLE.findall(text)}
    assert "T2IROUTE_DATABASE_URL" in used
    unknown = sorted(
        v for v in used if v.removeprefix("T2IROUTE_").lower() not in Settings.model_fields
    )
    assert not unknown


def test_app_services_wait_for_servers_and_migrations(
    services: dict[str, dict[str, Any]],
) -> None:
    app = {name: s for name, s in services.items() if s.get("image") == APP_IMAGE}
    assert set(workers(services)) < set(app)
    for name, service in app.items():
        conditions = {dep: spec["condition"] for dep, spec in service["depends_on"].items()}
        assert conditions["postgres"] == "service_healthy", name
        if name != "migrate":
            assert conditions["redis"] == "service_healthy", name
            assert conditions["migrate"] == "service_completed_successfully", name
    assert services["migrate"]["command"] == ["t2iroute", "migrate"]
    assert services["beat"]["command"] == ["t2iroute", "beat"]


def test_long_running_services_have_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    checked = {"redis", "postgres", "api", "flower", *workers(services)}
    for name in checked:
        assert services[name]["healthcheck"]["test"], name


def test_flower_is_authenticated_and_local_by_default(
    services: dict[str, dict[str, Any]],
) -> None:
    flower = services["flower"]
    assert "--basic-auth=" in " ".join(flower["command"])
    assert "T2IROUTE_FLOWER_BASIC_AUTH" in flower["environment"]
    assert flower["ports"] == ["${FLOWER_BIND:-127.0.0.1}:5555:5555"]


def test_override_only_adds_to_services_of_the_stack() -> None:
    base, override = load("compose.yml")["services"], load("compose.override.yml")["services"]
    assert set(override) - set(base) == {"tiny-models"}
    assert override["tiny-models"]["command"] == ["t2iroute", "models", "make-tiny", "/models"]
