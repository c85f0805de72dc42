"""The compose stack against the compose specification and against the code it runs: every
queue has a consumer, every T2IROUTE_ variable is a setting, GPU workers are set up the way
DESIGN.md's reliability rules ask, every worker waits for the migrations and the models,
every long-running service restarts and is health-checked, the security defaults of
docs/operations.md hold, Prometheus scrapes every target, and the Grafana dashboard queries
only series that workers/services/telemetry.py exports."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from workers.services.runtime import missing_models
from workers.services.telemetry import exported_series
from workers.settings import Settings

COMPOSE = Path(__file__).resolve().parents[2] / "compose"
FILES = ("compose.yml", "compose.override.yml")
APP_IMAGE = "t2iroute:latest"
VARIABLE = re.compile(r"\bT2IROUTE_[A-Z0-9_]+")
# Jobs that run once and exit; every other service runs until stopped.
ONE_SHOT = {"migrate", "models"}
MONITORING = {"prometheus", "grafana"}
DASHBOARD = COMPOSE / "grafana" / "dashboards" / "t2iroute.json"
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
        if name == "models":
            assert service["depends_on"] == [], "it needs no server"
            continue
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
    assert set(override) <= set(base)


def test_every_worker_waits_for_the_migrations_and_the_models(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in workers(services):
        conditions = {dep: spec["condition"] for dep, spec in services[name]["depends_on"].items()}
        assert conditions["migrate"] == "service_completed_successfully", name
        assert conditions["models"] == "service_completed_successfully", name


def test_the_models_service_provisions_what_the_workers_look_for(
    services: dict[str, dict[str, Any]],
) -> None:
    """It writes the volume the workers read (read-only), builds the tiny models there, and
    leaves the volume alone when the files a worker checks at start are all there."""
    models = services["models"]
    assert "models:/models" in models["volumes"]
    script = models["command"][-1]
    assert "exec t2iroute pipelines make-tiny /models" in script
    environment = {
        key: value.split(":-")[-1].rstrip("}")
        for key, value in models["environment"].items()
        if key.endswith("_MODEL")
    }
    settings = Settings(
        edge_model=environment["T2IROUTE_EDGE_MODEL"],
        cloud_model=environment["T2IROUTE_CLOUD_MODEL"],
        clip_model=environment["T2IROUTE_CLIP_MODEL"],
    )
    checked = missing_models(settings, list(settings.queues.values()))
    assert {f"-f {model.path}/{model.marker}" for model in checked} == set(
        re.findall(r"-f \S+", script)
    ), "the guard checks the very files the worker start-up check asks for"
    for name in workers(services):
        assert "models:/models:ro" in services[name]["volumes"], name


def test_monitoring_is_a_profile_with_prometheus_and_grafana(
    services: dict[str, dict[str, Any]],
) -> None:
    profiled = {name for name, service in services.items() if service.get("profiles")}
    assert profiled == MONITORING
    for name in MONITORING:
        assert services[name]["profiles"] == ["monitoring"]
    password = services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert password.startswith("${GRAFANA_ADMIN_PASSWORD:?"), "no default admin password"
    assert "GRAFANA_ADMIN_PASSWORD=" in (COMPOSE / ".env.example").read_text()


def test_prometheus_scrapes_the_api_and_every_worker_on_its_metrics_port(
    services: dict[str, dict[str, Any]],
) -> None:
    config = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    api_port = option(services["api"]["command"], "--port")
    assert jobs["t2iroute-api"]["static_configs"] == [{"targets": [f"api:{api_port}"]}]
    assert jobs["t2iroute-api"]["metrics_path"] == "/metrics"
    [discovery] = jobs["t2iroute-workers"]["dns_sd_configs"]
    assert set(discovery["names"]) == set(workers(services))
    for name in workers(services):
        environment = services[name]["environment"]
        assert int(environment["T2IROUTE_METRICS_PORT"]) == discovery["port"], name
        assert environment["T2IROUTE_METRICS_HOST"] == "0.0.0.0", "reachable in the network"
        assert "ports" not in services[name], "a worker's metrics stay inside the network"
    mounted = {v.split(":")[0] for v in services["prometheus"]["volumes"]}
    assert "./prometheus.yml" in mounted


def test_grafana_is_provisioned_with_the_data_source_and_dashboard_it_uses(
    services: dict[str, dict[str, Any]],
) -> None:
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    provisioning = COMPOSE / "grafana" / "provisioning"
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    [source] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["url"] == "http://prometheus:9090"
    [provider] = yaml.safe_load((provisioning / "dashboards" / "t2iroute.yml").read_text())[
        "providers"
    ]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    dashboard = json.loads(DASHBOARD.read_text())
    used = {
        target["datasource"]["uid"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    }
    assert used == {source["uid"]}


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard, Grafana's interval variables filled in."""
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        # label_values(METRIC, LABEL): a selector with the label, as Grafana queries it.
        found = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["query"]["query"])
        assert found is not None, variable["query"]
        metric, label = found.groups()
        expressions.append(f"{metric}{{{label}!=''}}")
    return [e.replace("$__rate_interval", "5m") for e in expressions]


def selected_series(expression: str) -> set[str]:
    """The metric names an expression selects, from its syntax tree."""
    names: set[str] = set()

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"a selector without a metric name in {expression}"
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expression), visit)
    return names


def test_the_dashboard_queries_only_series_that_are_exported() -> None:
    queries = dashboard_queries()
    assert len(queries) > 20
    used = set().union(*(selected_series(query) for query in queries))
    assert used - exported_series() == set()


def test_the_dashboard_shows_routing_budget_latency_quality_queues_and_failures() -> None:
    used = set().union(*(selected_series(query) for query in dashboard_queries()))
    assert {
        "t2iroute_requests_in_flight",
        "t2iroute_recent_requests",
        "t2iroute_decisions_total",
        "t2iroute_budget_spent_units_total",
        "t2iroute_budget_per_request_units",
        "t2iroute_budget_tokens",
        "t2iroute_router_tradeoff",
        "t2iroute_router_info",
        "t2iroute_decision_seconds_bucket",
        "t2iroute_generation_seconds_bucket",
        "t2iroute_quality_score_sum",
        "t2iroute_queue_messages",
        "t2iroute_step_failures_total",
        "t2iroute_retries_total",
        "t2iroute_callbacks_total",
    } <= used


def test_selected_series_reads_names_from_the_syntax_tree() -> None:
    """The check above would pass vacuously if the parse found no names, or a misspelt name
    were read as exported."""
    expression = "sum by (tier) (rate(t2iroute_decisons_total[5m])) / on() t2iroute_x"
    assert selected_series(expression) == {"t2iroute_decisons_total", "t2iroute_x"}
    assert "t2iroute_decisons_total" not in exported_series()
