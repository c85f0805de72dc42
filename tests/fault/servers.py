"""Private Redis and PostgreSQL servers for fault tests: each on its own loopback port and
folder, so a test may kill, stop and restart them without touching the machine's servers."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import psycopg
import redis

__all__ = ["PostgresServer", "RedisServer", "free_port", "postgres_bindir"]

# PostgreSQL's initdb and postgres refuse to run as root; the cluster belongs to this user.
POSTGRES_USER = "nobody"
POSTGRES_GROUP = "nogroup"
DATABASE = "t2iroute"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait(
    check: Callable[[], object], what: str, process: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited at start:\n{log.read_text()[-3000:]}")
        try:
            if check():
                return
        except (redis.exceptions.RedisError, psycopg.OperationalError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not start:\n{log.read_text()[-3000:]}")


class RedisServer:
    """``redis-server`` on a free port. ``kill`` is ``kill -9``; ``start`` again reuses the
    port and folder, so with ``appendonly`` the restarted server reloads its AOF."""

    def __init__(self, directory: Path, *, appendonly: bool) -> None:
        self.directory = directory
        self.appendonly = appendonly
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log = directory / "redis.log"
        directory.mkdir(parents=True, exist_ok=True)

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis.from_url(self.url(db), socket_timeout=5)

    def start(self) -> None:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.appendonly
            else ["--appendonly", "no"]
        )
        argv = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            *persistence,
            "--dir",
            str(self.directory),
            "--logfile",
            str(self.log),
        ]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.log.touch()
        client = self.client()
        try:
            _wait(client.ping, "redis-server", self.process, self.log)
        finally:
            client.close()

    def kill(self) -> None:
        """``kill -9``: no shutdown save, no goodbye to clients."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def postgres_bindir() -> Path:
    configured = subprocess.run(
        ["pg_config", "--bindir"], capture_output=True, text=True, check=False
    ).stdout.strip()
    candidates = [Path(configured)] if configured else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for candidate in candidates:
        if (candidate / "initdb").exists() and (candidate / "postgres").exists():
            return candidate
    raise FileNotFoundError("no PostgreSQL server binaries (initdb, postgres) found")


def _nobody_folder(prefix: str) -> Path:
    # A folder of its own under the system temp dir: the session's SCRATCH is root's (0700),
    # which the unprivileged server user cannot enter.
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    shutil.chown(folder, POSTGRES_USER, POSTGRES_GROUP)
    return folder


class PostgresServer:
    """A PostgreSQL cluster run as ``nobody`` on a free port, trust auth, its socket in its
    own folder. ``stop`` is a fast shutdown (SIGINT); ``start`` again reuses port and data."""

    def __init__(self, root: Path, server_settings: Mapping[str, str] | None = None) -> None:
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log = root / "postgres.log"
        # Extra ``-c name=value`` settings at start, beside the fixed ones below (a benchmark
        # loads pg_stat_statements with shared_preload_libraries, say).
        self.server_settings = dict(server_settings or {})

    @classmethod
    def initialise(
        cls, prefix: str = "t2iroute-pg-", server_settings: Mapping[str, str] | None = None
    ) -> PostgresServer:
        """A new, empty cluster with superuser ``postgres``."""
        server = cls(_nobody_folder(prefix), server_settings)
        subprocess.run(
            [
                str(postgres_bindir() / "initdb"),
                "--auth=trust",
                "--username=postgres",
                "--encoding=UTF8",
                "--no-sync",
                "-D",
                str(server.data),
            ],
            check=True,
            capture_output=True,
            cwd=server.root,
            user=POSTGRES_USER,
            group=POSTGRES_GROUP,
            extra_groups=[],
        )
        return server

    def copy(self, prefix: str = "t2iroute-pg-") -> PostgresServer:
        """A stopped copy of this (stopped) cluster, on a port of its own."""
        target = _nobody_folder(prefix)
        # cp -a keeps the owner and the 0700 mode the server insists on.
        subprocess.run(["cp", "-a", str(self.data), str(target / "data")], check=True)
        return PostgresServer(target, self.server_settings)

    def url(self, driver: str = "postgresql+psycopg", database: str = DATABASE) -> str:
        return f"{driver}://postgres@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = DATABASE) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.url("postgresql", database), autocommit=True, connect_timeout=3)

    def _ready(self) -> bool:
        with self.connect("postgres"):
            return True

    def start(self) -> None:
        argv = [
            str(postgres_bindir() / "postgres"),
            "-D",
            str(self.data),
            "-p",
            str(self.port),
            "-k",
            str(self.root),
            "-c",
            "listen_addresses=127.0.0.1",
            # The tests stop the server cleanly, never crash it, so syncing to disk buys
            # nothing here but time on a small machine.
            "-c",
            "fsync=off",
            "-c",
            "max_connections=200",
        ]
        for name, value in self.server_settings.items():
            argv += ["-c", f"{name}={value}"]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                user=POSTGRES_USER,
                group=POSTGRES_GROUP,
                extra_groups=[],
            )
        _wait(self._ready, "postgres", self.process, self.log)

    def stop(self) -> None:
        """Fast shutdown: open sessions are cut, committed data stays."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None
