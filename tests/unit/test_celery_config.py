"""The Celery configuration follows DESIGN.md's reliability rules, from the settings."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from pydantic import ValidationError

from workers.app import broker
from workers.app.celery_app import celery_config, create_app, prefetch_multiplier
from workers.app.liveness import node_name
from workers.app.names import (
    TASK_CALLBACK,
    TASK_GENERATE,
    TASK_RETRAIN,
    TASK_ROUTE,
    TASK_SCORE,
    TASK_SWEEP,
)
from workers.settings import Settings


def test_json_only_acks_late() -> None:
    config = celery_config(Settings())
    assert config["task_serializer"] == config["result_serializer"] == "json"
    assert config["accept_content"] == config["result_accept_content"] == ["json"]
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["worker_cancel_long_running_tasks_on_connection_loss"]


def test_prefetch_holds_two_batches_of_the_workers_own_stages() -> None:
    settings = Settings(route_batch_size=16, quality_batch_size=4, generate_batch_size=3)
    assert prefetch_multiplier(settings, ["route"]) == 32
    assert prefetch_multiplier(settings, ["quality", "edge"]) == 8
    assert prefetch_multiplier(settings, ["cloud"]) == 6
    # Unbatched stages prefetch one message at a time beyond the one running, as before.
    unbatched = Settings(route_batch_size=1, quality_batch_size=1, generate_batch_size=1)
    assert prefetch_multiplier(unbatched, ["maintenance"]) == 2
    assert celery_config(settings)["worker_prefetch_multiplier"] == 32


def test_visibility_timeout_outlasts_every_time_limit() -> None:
    settings = Settings(task_time_limit=100, task_soft_time_limit=90, visibility_timeout=150)
    config = celery_config(settings)
    assert config["task_time_limit"] == 100 and config["task_soft_time_limit"] == 90
    assert config["broker_transport_options"]["visibility_timeout"] == 150
    assert config["result_backend_transport_options"]["visibility_timeout"] == 150


def test_time_limits_out_of_order_are_refused() -> None:
    with pytest.raises(ValidationError, match="visibility_timeout must exceed"):
        Settings(task_time_limit=100, task_soft_time_limit=90, visibility_timeout=100)
    with pytest.raises(ValidationError, match="task_soft_time_limit"):
        Settings(task_time_limit=100, task_soft_time_limit=100, visibility_timeout=200)


def test_task_routes_are_configuration_from_the_queue_names() -> None:
    settings = Settings(queue_edge="small-gpu", queue_cloud="big-gpu", queue_quality="clip")
    routes, by_tier = celery_config(settings)["task_routes"]
    assert routes[TASK_ROUTE] == {"queue": "route"}
    assert routes[TASK_SCORE] == {"queue": "clip"}
    assert routes[TASK_SWEEP] == routes[TASK_RETRAIN] == {"queue": "maintenance"}
    # Callback sends wait on receivers: never in front of a sweep or a retraining.
    assert routes[TASK_CALLBACK] == {"queue": "callbacks"}
    assert celery_config(Settings(queue_callbacks="hooks"))["task_routes"][0][TASK_CALLBACK] == {
        "queue": "hooks"
    }
    # A generation goes to the queue of the tier it names.
    assert by_tier(TASK_GENERATE, ["id", "edge"], {}, {}) == {"queue": "small-gpu"}
    assert by_tier(TASK_GENERATE, ["id", "cloud"], {}, {}) == {"queue": "big-gpu"}
    assert by_tier(TASK_GENERATE, ["id", "unknown"], {}, {}) is None
    assert by_tier(TASK_SCORE, ["id", "edge"], {}, {}) is None


def test_a_message_sent_for_a_tier_lands_in_its_queue() -> None:
    tiers = [
        {"name": "turbo", "model": "m", "cost": 1},
        {"name": "big", "model": "m", "cost": 9, "queue": "gpu-big"},
    ]
    app = create_app(Settings(tiers=tiers))
    route = app.amqp.router.route({}, TASK_GENERATE, args=["id", "big"], kwargs={})
    assert route["queue"].name == "gpu-big"


def test_beat_runs_the_sweeper_and_retraining() -> None:
    settings = Settings(sweep_interval_seconds=30, retrain_interval_seconds=600)
    schedule = celery_config(settings)["beat_schedule"]
    assert schedule["sweep"] == {"task": TASK_SWEEP, "schedule": 30}
    assert schedule["retrain"] == {"task": TASK_RETRAIN, "schedule": 600}


def test_every_task_is_registered_on_the_app() -> None:
    app = create_app(Settings())
    app.loader.import_default_modules()
    for name in (TASK_ROUTE, TASK_GENERATE, TASK_SCORE, TASK_SWEEP, TASK_RETRAIN):
        assert name in app.tasks


def test_filesystem_broker_needs_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="BROKER_FOLDER"):
        celery_config(Settings(broker_url="filesystem://"))
    config = celery_config(Settings(broker_url="filesystem://", broker_folder=tmp_path))
    assert config["broker_transport_options"]["data_folder_in"] == str(tmp_path)
    assert config["broker_transport_options"]["control_folder"] == str(tmp_path / "control")
    assert not config["worker_enable_remote_control"]


def test_settings_come_from_prefixed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T2IROUTE_CLOUD_RATIO", "0.2")
    monkeypatch.setenv("T2IROUTE_QUEUE_ROUTE", "routing")
    settings = Settings()
    assert settings.cloud_ratio == 0.2
    assert settings.queues["route"] == "routing"
    monkeypatch.setenv("T2IROUTE_CLOUD_RATIO", "1.5")
    with pytest.raises(ValidationError):
        Settings()


def test_a_redis_broker_gets_the_guarded_transport_and_prints_masked() -> None:
    settings = Settings(broker_url="redis://:s3cret@redis:6379/0")
    assert celery_config(settings)["broker_transport"] == broker.TRANSPORT
    with create_app(settings).connection_for_write() as connection:
        assert isinstance(connection.transport, broker.Transport)
        # What the worker banner, its reconnect logs, beat and Flower print.
        assert connection.as_uri() == "redis://:**@redis:6379/0"


@pytest.mark.parametrize("url", ["rediss://redis:6380/0", "sentinel://redis:26379", "memory://"])
def test_other_brokers_keep_kombus_own_transport(url: str) -> None:
    assert celery_config(Settings(broker_url=url))["broker_transport"] is None


def test_the_liveness_check_names_a_worker_as_the_worker_names_itself() -> None:
    host = socket.gethostname()
    assert node_name("edge@%h") == f"edge@{host}"
    assert node_name(None) == f"celery@{host}"
    assert node_name("router@box") == "router@box"


def test_the_settings_repr_shows_no_credentials() -> None:
    settings = Settings(
        database_url="postgresql+psycopg://app:db-secret@db/t2iroute",
        broker_url="redis://:broker-secret@redis:6379/0",
        redis_url="redis://:budget-secret@redis:6379/1",
        flower_basic_auth="ops:flower-secret",
    )
    assert "secret" not in repr(settings)
