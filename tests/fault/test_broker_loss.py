"""Broker loss: a private Redis killed with -9 under a kombu connection and under a worker
holding a task, the guard of workers/app/broker.py against kombu's reconnect crash, the
liveness check, and the broker password kept out of what a worker prints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kombu import Connection, Exchange, Queue
from kombu.common import ignore_errors

from tests.fault.hold_worker import TASK_HOLD
from tests.fault.servers import RedisServer, free_port
from workers.app.broker import TRANSPORT
from workers.app.liveness import busy_marker

pytestmark = pytest.mark.fault

QUEUE = "hold"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", appendonly=True)
    server.start()
    yield server
    server.stop()


def _consume_one_and_poll(connection: Connection) -> list[object]:
    """Leave ``connection`` as a worker's event loop keeps it between two messages: one
    message delivered and unacknowledged, a BRPOP in flight on the default channel, and a
    second channel consuming a fanout queue (Celery's remote control)."""
    work = Queue(QUEUE, Exchange(QUEUE, "direct"), QUEUE)
    with Connection(connection.as_uri(include_password=True)) as publisher:
        publisher.SimpleQueue(work).put({"n": 1})
    delivered: list[object] = []
    channel: Any = connection.default_channel  # a kombu Redis channel, untyped
    channel.basic_qos(0, 1, False)
    connection.Consumer(
        work, channel=channel, callbacks=[lambda _, m: delivered.append(m)]
    ).consume()
    connection.drain_events(timeout=5)
    control = Queue("control", Exchange("control", "fanout"), auto_delete=True)
    connection.Consumer(control, channel=connection.channel(), callbacks=[]).consume()
    # The event loop starts the next BRPOP as soon as a message is handed over (private API).
    channel._brpop_start()
    return delivered


def _lose_and_close(connection: Connection) -> None:
    """What Celery's consumer does on a connection error (on_connection_error_after_connected)."""
    connection.collect(socket_timeout=1)
    ignore_errors(connection, connection.close)


def test_kombu_alone_crashes_when_it_closes_after_losing_redis(
    redis_server: RedisServer,
) -> None:
    """The upstream bug this guard exists for; when this fails, kombu has fixed it."""
    connection = Connection(redis_server.url(0))
    assert len(_consume_one_and_poll(connection)) == 1
    redis_server.kill()
    with pytest.raises(AttributeError, match="hostname"):
        _lose_and_close(connection)


def test_the_guarded_transport_closes_quietly_and_restores_once_redis_is_back(
    redis_server: RedisServer,
) -> None:
    connection = Connection(redis_server.url(0), transport=TRANSPORT)
    assert len(_consume_one_and_poll(connection)) == 1
    assert redis_server.client().hlen("unacked") == 1
    redis_server.kill()
    connection.collect(socket_timeout=1)
    redis_server.start()  # the append-only file brings the unacknowledged message back
    ignore_errors(connection, connection.close)
    broker = redis_server.client()
    assert broker.hlen("unacked") == 0
    assert broker.llen(QUEUE) == 1, "restored to its queue at close, not left to time out"


def _worker(
    hostname: str, env: dict[str, str], log: Path, pool: str, concurrency: int = 1
) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "celery", "-A", "tests.fault.hold_worker", "worker"]
    argv += [f"--hostname={hostname}", f"--queues={QUEUE}", f"--pool={pool}"]
    argv += [f"--concurrency={concurrency}"]
    with log.open("wb") as out:
        return subprocess.Popen([*argv, "--loglevel=INFO"], stdout=out, stderr=out, env=env)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _health(hostname: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable,
        "-m",
        "workers.entrypoints.cli.main",
        "worker-health",
        "--hostname",
        hostname,
    ]
    return subprocess.run(
        [*argv, "--timeout", "2"], capture_output=True, text=True, env=env, check=False
    )


def _wait(condition: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


def _reconnected(log: Path) -> bool:
    _, lost, after = log.read_text().partition("Connection to broker lost")
    return bool(lost) and "Connected to" in after


@pytest.fixture
def worker_env(redis_server: RedisServer) -> dict[str, str]:
    return {
        **os.environ,
        "T2IROUTE_BROKER_URL": redis_server.url(0),
        "T2IROUTE_REDIS_URL": redis_server.url(1),
        "T2IROUTE_TASK_TIME_LIMIT": "60",
        "T2IROUTE_TASK_SOFT_TIME_LIMIT": "50",
        "T2IROUTE_VISIBILITY_TIMEOUT": "90",
    }


def test_a_worker_holding_a_task_survives_a_broker_restart(
    redis_server: RedisServer, worker_env: dict[str, str], tmp_path: Path
) -> None:
    hostname = f"hold-{os.getpid()}@test"
    log = tmp_path / "worker.log"
    probe = Celery(broker=redis_server.url(0))
    first, second = tmp_path / "first", tmp_path / "second"
    # With a free process the worker keeps a BRPOP in flight while the task runs, the state
    # in which kombu's close after a connection loss crashes.
    process = _worker(hostname, worker_env, log, pool="prefork", concurrency=2)
    try:
        _wait(lambda: _health(hostname, worker_env).returncode == 0, 60, "not ready", log)
        probe.send_task(TASK_HOLD, args=[str(first), 8], queue=QUEUE)
        _wait(first.exists, 30, "the task did not start", log)
        redis_server.kill()
        time.sleep(1)
        redis_server.start()
        _wait(lambda: process.poll() is not None or _reconnected(log), 60, "no reconnect", log)
        assert process.poll() is None, log.read_text()[-4000:]
        assert "Unrecoverable error" not in log.read_text()
        probe.send_task(TASK_HOLD, args=[str(second), 0], queue=QUEUE)
        _wait(second.exists, 30, "no task consumed after the restart", log)
        checked = _health(hostname, worker_env)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        # The cancelled task's message survived in the append-only file: redelivered, or
        # held unacknowledged until the visibility timeout gives it back.
        redelivered = len(first.read_text().splitlines()) - 1
        assert redelivered + redis_server.client().hlen("unacked") == 1
    finally:
        _stop(process)
    gone = _health(hostname, worker_env)
    assert gone.returncode == 1 and "no answer" in gone.stdout


def test_the_liveness_check_tells_a_busy_solo_worker_from_a_wedged_one(
    redis_server: RedisServer, worker_env: dict[str, str], tmp_path: Path
) -> None:
    hostname = f"solo-{os.getpid()}@test"
    log = tmp_path / "worker.log"
    started = tmp_path / "started"
    process = _worker(hostname, worker_env, log, pool="solo")
    try:
        _wait(lambda: _health(hostname, worker_env).returncode == 0, 60, "not ready", log)
        Celery(broker=redis_server.url(0)).send_task(
            TASK_HOLD, args=[str(started), 30], queue=QUEUE
        )
        _wait(started.exists, 30, "the task did not start", log)
        busy = _health(hostname, worker_env)
        assert busy.returncode == 0 and "busy with one task" in busy.stdout, busy.stdout
        # The same task, started longer ago than the task time limit: a hung generation.
        busy_marker(hostname).write_text(f"{time.time() - 61}")
        wedged = _health(hostname, worker_env)
        assert wedged.returncode == 1 and "limit 60 s" in wedged.stdout, wedged.stdout
    finally:
        # A warm shutdown would wait for the held task.
        process.kill()
        process.wait()
        busy_marker(hostname).unlink(missing_ok=True)


def test_neither_a_worker_nor_its_liveness_check_prints_the_broker_password(tmp_path: Path) -> None:
    secret = "pw-" + os.urandom(6).hex()
    url = f"redis://:{secret}@127.0.0.1:{free_port()}/0"  # nothing listens there
    env = {**os.environ, "T2IROUTE_BROKER_URL": url, "T2IROUTE_RESULT_BACKEND": url}
    log = tmp_path / "worker.log"
    process = _worker(f"secret-{os.getpid()}@test", env, log, pool="solo")
    try:
        _wait(lambda: "Cannot connect to" in log.read_text(), 60, "no connection error", log)
    finally:
        _stop(process)
    text = log.read_text()
    assert secret not in text
    assert text.count("redis://:**@127.0.0.1") >= 3, "banner (broker, results), error"
    checked = _health(f"secret-{os.getpid()}@test", env)
    assert checked.returncode == 1 and "broker unreachable" in checked.stdout
    assert secret not in checked.stdout + checked.stderr
