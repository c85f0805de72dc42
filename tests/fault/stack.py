"""A whole t2iroute deployment on private servers: real ``t2iroute`` worker, beat and API
processes, which a test can kill, restart and supervise.

Only processes this module started are ever signalled: the ones it spawned, and the pool
children of those, read from ``/proc/PID/task/PID/children``."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from redis import Redis

from tests.fault.servers import PostgresServer, RedisServer, free_port
from workers.settings import Settings

__all__ = ["FAULT_ENV", "FINAL", "Process", "Stack", "Worker"]

FINAL = ("done", "failed")

# Short enough that a lost or abandoned message comes back within a test's patience. The
# visibility timeout must exceed the hard time limit (the settings refuse otherwise).
FAULT_ENV = {
    "T2IROUTE_TASK_TIME_LIMIT": "20",
    "T2IROUTE_TASK_SOFT_TIME_LIMIT": "15",
    "T2IROUTE_VISIBILITY_TIMEOUT": "25",
    "T2IROUTE_LOST_AFTER_SECONDS": "5",
    "T2IROUTE_SWEEP_INTERVAL_SECONDS": "2",
    "T2IROUTE_MAX_ATTEMPTS": "3",
    "T2IROUTE_TRANSIENT_RETRY_SECONDS": "120",
    "T2IROUTE_ROUTER_RELOAD_SECONDS": "0.5",
    # One torch thread per process: several worker processes share two cores.
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


class Process:
    """One started command, its log in a file, restartable with the same command line."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.log = cwd / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.killed = False

    def start(self) -> None:
        with self.log.open("ab") as log:
            log.write(f"\n=== start {self.starts + 1} at {time.time():.3f} ===\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd
            )
        self.starts += 1
        self.killed = False

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def children(self) -> list[int]:
        """The pool processes of a prefork worker (none for a solo one)."""
        try:
            text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return []
        return [int(pid) for pid in text.split()]

    def kill(self) -> None:
        """``kill -9`` of the process and of its pool children."""
        children = self.children()
        self.killed = True
        assert self.popen is not None
        self.popen.send_signal(signal.SIGKILL)
        for child in children:
            _kill_quietly(child, signal.SIGKILL)
        self.popen.wait()

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, chars: int = 4000) -> str:
        return self.text()[-chars:]


def _kill_quietly(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


@dataclass(frozen=True)
class Worker:
    name: str
    queues: str
    pool: str = "solo"
    concurrency: int = 1


@dataclass
class Stack:
    """Workers, beat and API on a private Redis (broker on db 0, budget on db 1) and a
    private PostgreSQL database; ``env`` holds what every process of the stack shares."""

    root: Path
    redis: RedisServer
    postgres: PostgresServer
    overrides: dict[str, str] = field(default_factory=dict)
    processes: dict[str, Process] = field(default_factory=dict)
    supervised: bool = True
    restarts: dict[str, int] = field(default_factory=dict)
    api_port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            **FAULT_ENV,
            "T2IROUTE_DATABASE_URL": self.postgres.url(),
            "T2IROUTE_BROKER_URL": self.redis.url(0),
            "T2IROUTE_REDIS_URL": self.redis.url(1),
            "T2IROUTE_IMAGE_STORE": str(self.root / "images"),
            "T2IROUTE_MODEL_STORE": str(self.root / "routers"),
            **self.overrides,
        }
        self._app: Any = None

    @property
    def settings(self) -> Settings:
        """The stack's settings as its processes read them."""
        fields = {
            key.removeprefix("T2IROUTE_").lower(): value
            for key, value in self.env.items()
            if key.startswith("T2IROUTE_")
        }
        # Validated as given: the test process's own T2IROUTE_ variables must not leak in.
        return Settings.model_validate(fields)

    @property
    def image_store(self) -> Path:
        return Path(self.env["T2IROUTE_IMAGE_STORE"])

    def broker(self) -> Redis:
        return self.redis.client(0)

    def budget(self) -> Redis:
        return self.redis.client(1)

    def database(self) -> psycopg.Connection[tuple[Any, ...]]:
        return self.postgres.connect()

    # Processes.

    def _command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "workers.entrypoints.cli.main", *args]

    def add_worker(self, worker: Worker, env: dict[str, str] | None = None) -> Process:
        """Start a worker; ``wait_ready`` before relying on it."""
        argv = self._command(
            "worker",
            f"--queues={worker.queues}",
            f"--pool={worker.pool}",
            f"--concurrency={worker.concurrency}",
            f"--hostname={worker.name}@fault",
            "--loglevel=INFO",
        )
        return self._spawn(worker.name, argv, env)

    def add_beat(self) -> Process:
        # Beat keeps its schedule file in the working directory: the stack's folder.
        return self._spawn("beat", self._command("beat", "--loglevel=INFO"))

    def add_api(self) -> Process:
        argv = self._command("api", "--host=127.0.0.1", f"--port={self.api_port}")
        return self._spawn("api", argv)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Process:
        if name in self.processes:
            raise ValueError(f"a process named {name} exists")
        process = Process(name, argv, {**self.env, **(env or {})}, self.root)
        process.start()
        self.processes[name] = process
        return process

    def wait_ready(self, *names: str, timeout: float = 180.0) -> None:
        """Until every named process (default: all) answers: a worker logs ``ready.``, the
        API answers /healthz; beat is ready once started."""
        pending = set(names or self.processes)
        deadline = time.monotonic() + timeout
        while pending:
            for name in sorted(pending):
                process = self.processes[name]
                if not process.alive:
                    raise RuntimeError(f"{name} exited at start:\n{process.tail()}")
                if self._is_ready(process):
                    pending.discard(name)
            if pending and time.monotonic() > deadline:
                logs = "\n".join(f"--- {n}\n{self.processes[n].tail()}" for n in pending)
                raise TimeoutError(f"not ready after {timeout}s: {sorted(pending)}\n{logs}")
            time.sleep(0.2)

    def _is_ready(self, process: Process) -> bool:
        if process.name == "beat":
            return True
        if process.name == "api":
            try:
                return httpx.get(f"{self.api_url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
        marker = f"=== start {process.starts} at"
        return " ready." in process.text().rsplit(marker, 1)[-1]

    def supervise(self) -> None:
        """Restart every process that exited without being told to, as a supervisor would;
        counted in ``restarts``."""
        if not self.supervised:
            return
        for name, process in self.processes.items():
            if not process.alive and not process.killed:
                self.restarts[name] = self.restarts.get(name, 0) + 1
                process.start()

    def kill_child(self, name: str, pid: int) -> None:
        """``kill -9`` of one pool process of the named worker (and of nothing else)."""
        if pid not in self.processes[name].children():
            raise ValueError(f"{pid} is not a pool process of {name}")
        os.kill(pid, signal.SIGKILL)

    def restart(self, name: str) -> None:
        """Start a process again after a test killed or stopped it (counted)."""
        process = self.processes[name]
        self.restarts[name] = self.restarts.get(name, 0) + 1
        process.start()

    def close(self) -> None:
        """Kill every process of the stack: by now the run is reconciled, and a warm
        shutdown would only wait for idle workers."""
        for process in self.processes.values():
            if process.alive:
                process.kill()

    def logs(self, chars: int = 3000) -> str:
        return "\n".join(
            f"----- {name} (log {process.log}) -----\n{process.tail(chars)}"
            for name, process in self.processes.items()
        )

    # Requests.

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def submit(self, prompts: Iterable[str], **params: Any) -> list[str]:
        """POST every prompt to the API (seed i for prompt i unless given); their ids."""
        ids = []
        with httpx.Client(base_url=self.api_url, timeout=30) as client:
            for i, prompt in enumerate(prompts):
                body = {"prompt": prompt, "seed": i, **params}
                response = client.post("/v1/requests", json=body)
                assert response.status_code == 202, response.text
                ids.append(response.json()["id"])
        return ids

    def send(self, task: str, args: Sequence[str]) -> None:
        """Publish a task message straight to the private broker (a duplicate, say)."""
        if self._app is None:
            from workers.app.celery_app import create_app

            self._app = create_app(self.settings)
        self._app.send_task(task, args=list(args))

    def statuses(self, ids: Sequence[str]) -> dict[str, str]:
        with self.database() as conn:
            rows = conn.execute(
                "SELECT id, status FROM generation_requests WHERE id = ANY(%s)", (list(ids),)
            ).fetchall()
        return {str(rid): str(status) for rid, status in rows}

    def wait_final(
        self,
        ids: Sequence[str],
        timeout: float,
        *,
        tick: Callable[[dict[str, str]], None] | None = None,
        interval: float = 0.5,
    ) -> dict[str, str]:
        """Poll the database until every request is done or failed, supervising the
        processes meanwhile; ``tick`` sees the states at every poll. A database that does
        not answer is waited for."""
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while True:
            self.supervise()
            with contextlib.suppress(psycopg.OperationalError):
                states = self.statuses(ids)
            if tick is not None:
                tick(states)
            if len(states) == len(ids) and all(s in FINAL for s in states.values()):
                return states
            if time.monotonic() > deadline:
                counts = {s: list(states.values()).count(s) for s in set(states.values())}
                raise TimeoutError(f"requests not final after {timeout}s: {counts}\n{self.logs()}")
            time.sleep(interval)

    def wait_steps_closed(self, ids: Sequence[str], timeout: float = 60.0) -> None:
        """Until no step of these requests is pending or running: an exploration step goes
        on after its request is done. A schema without the dispatches table finishes a
        request only with its last step, so there is nothing to wait for."""

        def closed() -> bool:
            with self.database() as conn:
                if conn.execute("SELECT to_regclass('dispatches')").fetchone() == (None,):
                    return True
                row = conn.execute(
                    "SELECT count(*) FROM dispatches WHERE request_id = ANY(%s) "
                    "AND status IN ('pending', 'running')",
                    (list(ids),),
                ).fetchone()
            return row is not None and row[0] == 0

        self.wait_for(closed, timeout, "every step closed")

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> float:
        """Poll ``condition`` (supervising meanwhile); the seconds it took."""
        started = time.monotonic()
        while not condition():
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{what}: not within {timeout}s\n{self.logs()}")
            self.supervise()
            time.sleep(0.2)
        return time.monotonic() - started
