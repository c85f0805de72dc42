"""The README's "Running it on servers" section, run as written on a fresh machine.

The shell block is read from README.md, so the test follows the README as it changes. Only
what cannot be the same on a test machine is replaced: the server URLs (a fresh database of
this session and its Redis numbers), T2IROUTE_HOME (a fresh folder) and the ports of the API
and Flower (free ones). Nothing else of the test session's T2IROUTE_ environment is passed
on, and every command runs in a working directory of its own, so that a path resolved against
the working directory instead of T2IROUTE_HOME shows. The long-running commands (workers,
beat, Flower, the API) are started as processes in sessions of their own and stopped by
their process ids."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import string
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import make_url, select

from db.models import Generation
from db.session import session_scope
from tests.environment import TEST_DATABASE
from tests.fault.servers import free_port
from tests.services import drop_database, recreate_database
from workers.settings import Settings

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Running it on servers"
LONG_RUNNING = frozenset({"worker", "beat", "flower", "api"})
# Left to the test: the servers, the installation's folder.
REPLACED = ("T2IROUTE_DATABASE_URL", "T2IROUTE_BROKER_URL", "T2IROUTE_REDIS_URL", "T2IROUTE_HOME")
# What a model library prints when it is not kept quiet (cli._quiet_model_libraries).
NOISE = (
    "Loading weights",
    "Loading pipeline components",
    "requires torchvision",
    "accelerate",
    "it/s]",
)
READY_SECONDS = 240.0
FINISH_SECONDS = 240.0


def server_block() -> list[str]:
    """The lines of the section's first shell block."""
    section = README.read_text(encoding="utf-8").split(SECTION, 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert match is not None, f"no shell block under {SECTION!r} in README.md"
    return [line for line in match.group(1).splitlines() if line.strip()]


@dataclass
class Service:
    argv: list[str]
    process: subprocess.Popen[bytes]
    log: Path


class Machine:
    """A fresh machine as far as t2iroute can tell: an environment with no T2IROUTE_ variable
    but the README's, the installed ``t2iroute`` first on the PATH, and a folder per command."""

    def __init__(self, root: Path, replacements: dict[str, str]) -> None:
        self.root = root
        self.replacements = replacements
        bin_dir = str(Path(sys.executable).parent)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("T2IROUTE_")}
        self.env["PATH"] = os.pathsep.join([bin_dir, self.env.get("PATH", "")])
        self.services: list[Service] = []
        self._count = 0

    def export(self, assignments: list[str]) -> None:
        for assignment in assignments:
            name, _, value = assignment.partition("=")
            self.env[name] = self.replacements.get(
                name, string.Template(value).safe_substitute(self.env)
            )

    def _workdir(self, argv: list[str]) -> tuple[Path, Path]:
        self._count += 1
        name = f"{self._count:02d}-{'-'.join(argv[1:3])}".replace("/", "_")
        workdir = self.root / "cwd" / name
        workdir.mkdir(parents=True)
        return workdir, self.root / "logs" / f"{name}.log"

    def run(self, argv: list[str], timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        workdir, _ = self._workdir(argv)
        return subprocess.run(
            argv,
            cwd=workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self, argv: list[str]) -> Service:
        workdir, log = self._workdir(argv)
        log.parent.mkdir(exist_ok=True)
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv,
                cwd=workdir,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        service = Service(argv, process, log)
        self.services.append(service)
        return service

    def stop(self) -> None:
        """SIGTERM to each process started, then SIGKILL to the session of any that stays
        (a prefork worker's pool children are in it); nothing else is signalled."""
        for service in self.services:
            if service.process.poll() is None:
                service.process.send_signal(signal.SIGTERM)
        for service in self.services:
            try:
                service.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(service.process.pid, signal.SIGKILL)
                service.process.wait()


def _check_alive(machine: Machine) -> None:
    for service in machine.services:
        if service.process.poll() is not None:
            log = service.log.read_text(errors="replace")[-3000:]
            pytest.fail(f"{shlex.join(service.argv)} exited {service.process.returncode}:\n{log}")


def _until(check: Callable[[], str | None], seconds: float, what: str, machine: Machine) -> str:
    """Run ``check`` until it gives a string, with every service still running."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        _check_alive(machine)
        result = check()
        if result is not None:
            return result
        time.sleep(2.0)
    pytest.fail(f"{what}: not within {seconds:.0f} s")


@pytest.fixture
def machine(tmp_path: Path, settings: Settings, clean_redis: redis.Redis) -> Iterator[Machine]:
    database = f"{TEST_DATABASE}_server"
    recreate_database(database)
    url = make_url(settings.database_url).set(database=database)
    machine = Machine(
        tmp_path,
        {
            "T2IROUTE_DATABASE_URL": url.render_as_string(hide_password=False),
            "T2IROUTE_BROKER_URL": settings.broker_url,
            "T2IROUTE_REDIS_URL": settings.redis_url,
            "T2IROUTE_HOME": str(tmp_path / "home"),
        },
    )
    try:
        yield machine
    finally:
        machine.stop()
        drop_database(database)


@pytest.mark.timeout(900)
def test_the_server_section_of_the_readme_works_as_written(machine: Machine) -> None:
    request_id: str | None = None
    final: dict[str, Any] = {}
    api_port = flower_port = None
    for line in server_block():
        argv = shlex.split(line, comments=True)
        if argv[0] == "export":
            machine.export(argv[1:])
            continue
        assert argv[0] == "t2iroute", f"a README line this test cannot run: {line}"
        argv = [arg.replace("REQUEST_ID", request_id or "REQUEST_ID") for arg in argv]
        command = argv[1]
        if command in ("api", "flower"):
            port = free_port()
            argv.append(f"--port={port}")
            api_port, flower_port = (port, flower_port) if command == "api" else (api_port, port)
        if command in LONG_RUNNING:
            machine.start(argv)
        elif command == "worker-health":
            # A liveness probe: it answers once the worker is up, which takes a while.
            def alive(argv: list[str] = argv) -> str | None:
                return "up" if machine.run(argv).returncode == 0 else None

            _until(alive, READY_SECONDS, shlex.join(argv), machine)
        elif command == "status":
            assert request_id is not None, "status before submit"

            def finished(argv: list[str] = argv) -> str | None:
                done = machine.run(argv)
                assert done.returncode == 0, done.stdout + done.stderr
                info = json.loads(done.stdout)
                return info["status"] if info["status"] in ("done", "failed") else None

            state = _until(finished, FINISH_SECONDS, f"request {request_id}", machine)
            final = json.loads(machine.run(argv).stdout)
            assert state == "done", json.dumps(final, indent=2)
        else:
            done = machine.run(argv)
            assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
            if command == "submit":
                request_id = done.stdout.split()[0]
    assert set(REPLACED) <= set(machine.env), "the README no longer sets every server URL"
    assert request_id is not None, "the README submits no request"

    # Every store is under T2IROUTE_HOME, whatever each command's working directory was.
    home = Path(machine.replacements["T2IROUTE_HOME"])
    with session_scope(machine.replacements["T2IROUTE_DATABASE_URL"]) as session:
        images = session.scalars(
            select(Generation.image_path).where(Generation.request_id == request_id)
        ).all()
    assert images, final
    for path in images:
        assert (home / "var" / "images" / path).is_file()
    assert not list((machine.root / "cwd").rglob("*.png"))

    assert api_port is not None and flower_port is not None
    assert httpx.get(f"http://127.0.0.1:{api_port}/healthz", timeout=10).status_code == 200
    assert httpx.get(f"http://127.0.0.1:{flower_port}/", timeout=10).status_code < 500
    _check_alive(machine)
    machine.stop()
    for service in machine.services:
        if service.argv[1] == "worker":
            log = service.log.read_text(errors="replace")
            assert not [n for n in NOISE if n in log], f"library noise in {service.log}"


def test_a_worker_without_its_models_refuses_to_start(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("T2IROUTE_")}
    env["T2IROUTE_HOME"] = str(tmp_path)
    env["T2IROUTE_CLOUD_MODEL"] = "stabilityai/stable-diffusion-3-medium-diffusers"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "workers.entrypoints.cli.main",
            "worker",
            "--queues",
            "route,quality,edge,cloud",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    edge = tmp_path / "var" / "models" / "edge"
    clip = tmp_path / "var" / "models" / "clip"
    assert f"tier edge: no model_index.json in {edge} (set by T2IROUTE_EDGE_MODEL)" in done.stderr
    assert f"quality metrics (CLIP): no config.json in {clip}" in done.stderr
    # A hub id is left to from_pretrained: the cloud tier is not named.
    assert "tier cloud" not in done.stderr
    assert "t2iroute pipelines make-tiny" in done.stderr
