"""The compose stack against the compose specification and against the code it runs: every
queue has a consumer, every T2IROUTE_ variable is a setting, GPU workers are set up the way
DESIGN.md's reliability rules ask, every long-running service restarts and is health-checked,
and the security defaults of docs/operations.md hold."""

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
# Jobs that run once and exit; every other service runs until stopped.
ONE_SHOT = {"migrate", "tiny-models"}
REDIS_PASSWORD = "${REDIS_PASSWORD:?set REDIS_PASSWORD in compose/.env}"


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


def test_long_running_services_restart_and_have_healthchecks(
    services: dict[str, dict[str, Any]],
) -> None:
    long_running = set(services) - ONE_SHOT
    assert {"redis", "postgres", "api", "flower", "beat", *workers(services)} <= long_running
    for name in long_running:
        assert services[name]["restart"] in ("unless-stopped", "always"), name
        assert services[name]["healthcheck"]["test"], name
    for name in ONE_SHOT & set(services):
        assert services[name]["restart"] == "no", name


def test_a_worker_is_checked_by_the_liveness_command_on_its_own_node_name(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, command in workers(services).items():
        node = services[name]["environment"]["NODE"]
        assert option(command, "--hostname") == f"{node}@%h", name
        test = services[name]["healthcheck"]["test"]
        assert test[0] == "CMD-SHELL" and test[1].startswith("t2iroute worker-health "), name
        assert '--hostname "$${NODE}@%h"' in test[1], name


def test_redis_requires_a_password_and_keeps_an_append_only_file(
    services: dict[str, dict[str, Any]],
) -> None:
    redis = services["redis"]
    command = redis["command"]
    assert option(command, "--requirepass") == REDIS_PASSWORD
    assert option(command, "--appendonly") == "yes"
    assert option(command, "--appendfsync") == "everysec"
    assert "redis:/data" in redis["volumes"]
    assert redis["environment"]["REDISCLI_AUTH"] == REDIS_PASSWORD


def test_every_redis_url_carries_the_password(services: dict[str, dict[str, Any]]) -> None:
    urls = {
        f"{name}.{key}": value
        for name, service in services.items()
        for key, value in (service.get("environment") or {}).items()
        if str(value).startswith("redis")
    }
    assert {"api.T2IROUTE_BROKER_URL", "api.T2IROUTE_REDIS_URL"} <= set(urls)
    for where, url in urls.items():
        assert url.startswith(f"redis://:{REDIS_PASSWORD}@redis:6379/"), where


@pytest.mark.parametrize("name", FILES)
def test_every_published_port_is_on_the_loopback_interface(name: str) -> None:
    for service, spec in load(name)["services"].items():
        for port in spec.get("ports", []):
            assert port.startswith("127.0.0.1:"), (service, port)


def test_flower_is_authenticated_and_flower_and_the_api_are_loopback_only(
    services: dict[str, dict[str, Any]],
) -> None:
    flower = services["flower"]
    assert "--basic-auth=" in " ".join(flower["command"])
    assert flower["environment"]["T2IROUTE_FLOWER_BASIC_AUTH"].startswith(
        "${T2IROUTE_FLOWER_BASIC_AUTH:?"
    ), "a required variable: compose refuses to start Flower without it"
    assert flower["ports"] == ["127.0.0.1:5555:5555"]
    assert services["api"]["ports"] == ["127.0.0.1:8000:8000"]


def test_override_only_adds_to_services_of_the_stack() -> None:
    base, override = load("compose.yml")["services"], load("compose.override.yml")["services"]
    assert set(override) - set(base) == {"tiny-models"}
    assert override["tiny-models"]["command"] == ["t2iroute", "models", "make-tiny", "/models"]
