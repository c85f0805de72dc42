"""Fault-suite fixtures: a migrated PostgreSQL cluster built once per session and copied
per test, a private Redis per test, and the stack of t2iroute processes on top of them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from tests import environment
from tests.fault.servers import DATABASE, PostgresServer, RedisServer
from tests.fault.stack import Stack


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[FAILED] = report.failed
    return report


FAILED = pytest.StashKey[bool]()


@pytest.fixture(scope="session")
def postgres_template() -> Iterator[PostgresServer]:
    """A stopped cluster holding the migrated, empty t2iroute database."""
    server = PostgresServer.initialise(prefix="t2iroute-pg-template-")
    server.start()
    try:
        with server.connect("postgres") as conn:
            conn.execute(f'CREATE DATABASE "{DATABASE}"')
        subprocess.run(
            [sys.executable, "-m", "workers.entrypoints.cli.main", "migrate"],
            check=True,
            capture_output=True,
            env={**os.environ, "T2IROUTE_DATABASE_URL": server.url()},
        )
    finally:
        server.stop()
    yield server
    server.remove()


@pytest.fixture
def show(capsys: pytest.CaptureFixture[str]) -> Callable[[str], None]:
    """Print past pytest's capture, so the figures show in CI output."""

    def write(text: str) -> None:
        with capsys.disabled():
            print(text, flush=True)

    return write


StackFactory = Callable[..., Stack]


@pytest.fixture
def make_stack(
    request: pytest.FixtureRequest,
    tiny_models: dict[str, Path],
    postgres_template: PostgresServer,
    show: Callable[[str], None],
) -> Iterator[StackFactory]:
    """Build a stack on fresh private servers: ``make_stack(appendonly=..., **env)``;
    processes are added by the test. Everything is stopped afterwards, and the logs are
    printed when the test failed."""
    stacks: list[Stack] = []
    servers: list[tuple[RedisServer, PostgresServer]] = []
    root = environment.SCRATCH / "fault" / request.node.name

    def build(*, appendonly: bool = False, **env: str) -> Stack:
        folder = root / str(len(stacks))
        redis_server = RedisServer(folder / "redis", appendonly=appendonly)
        redis_server.start()
        postgres = postgres_template.copy()
        servers.append((redis_server, postgres))
        postgres.start()
        stack = Stack(folder, redis_server, postgres, overrides=env)
        stacks.append(stack)
        return stack

    yield build
    for stack in stacks:
        stack.close()
        if request.node.stash.get(FAILED, True):
            show(f"\n===== logs of {request.node.name} =====\n{stack.logs()}")
    for redis_server, postgres in servers:
        redis_server.stop()
        postgres.remove()
