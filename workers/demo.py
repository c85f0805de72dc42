"""``t2iroute demo``: the whole flow on tiny models, with real Celery worker processes.

Embedded mode needs no server: SQLite, a filesystem broker and an in-process budget
keeper. With T2IROUTE_DATABASE_URL / T2IROUTE_BROKER_URL set, the same run uses those
servers (and the Redis budget keeper) instead."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from db import migrate, queries
from db.session import session_scope
from workers.pool import Pool
from workers.settings import Settings, get_settings

SERVER_VARIABLES = ("T2IROUTE_DATABASE_URL", "T2IROUTE_BROKER_URL")
# (queues, tiers, name): the CPU worker, and one worker for every tier of the pool ("*").
WORKER_GROUPS = (("route,quality,maintenance", "", "router"), ("", "*", "gpu"))


@dataclass(frozen=True)
class DemoSummary:
    mode: str
    workdir: Path
    requests: int
    seconds: float
    report: queries.BatchReport

    def print(self, console: Console) -> None:
        table = Table(title=f"t2iroute demo ({self.mode})")
        table.add_column("what")
        table.add_column("value", justify="right")
        table.add_row("requests", str(self.requests))
        report = self.report
        table.add_row(
            "done / failed / unfinished", f"{report.done} / {report.failed} / {report.unfinished}"
        )
        answered = sum(report.answers.values()) or 1
        for tier in sorted(set(report.answers) | set(report.generations)):
            table.add_row(
                f"{tier}: answers / images generated",
                f"{report.answers.get(tier, 0) / answered:.0%} / {report.generations.get(tier, 0)}",
            )
        table.add_row("exploration samples (two or more tiers)", str(report.explored))
        for tier, quality in sorted(report.mean_quality.items()):
            table.add_row(f"mean quality, {tier}", f"{quality:.4f}")
        table.add_row("images written", str(report.images))
        table.add_row("wall time", f"{self.seconds:.1f} s")
        table.add_row("files", str(self.workdir))
        console.print(table)
        for failure in report.failures:
            console.print(f"[red]failed:[/red] {failure}")


def demo_prompts(path: Path | None) -> list[str]:
    text = (
        path.read_text(encoding="utf-8")
        if path is not None
        else resources.files("workers").joinpath("data/demo_prompts.txt").read_text("utf-8")
    )
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def demo_environment(workdir: Path, embedded: bool, three_tiers: bool = False) -> dict[str, str]:
    """The T2IROUTE_ variables the demo and its workers share. Model paths and stores the
    caller already set win, so real weights can be put in; embedded mode always brings
    its own database, broker and budget keeper."""
    models = workdir / "models"
    defaults = {
        "T2IROUTE_IMAGE_STORE": str(workdir / "images"),
        "T2IROUTE_MODEL_STORE": str(workdir / "routers"),
        "T2IROUTE_EDGE_MODEL": str(models / "edge"),
        "T2IROUTE_CLOUD_MODEL": str(models / "cloud"),
        "T2IROUTE_CLIP_MODEL": str(models / "clip"),
        "T2IROUTE_EXPLORATION_RATE": "0.25",
    }
    if three_tiers:
        defaults["T2IROUTE_TIERS"] = three_tier_pool(models)
    env = {k: v for k, v in defaults.items() if k not in os.environ}
    if embedded:
        env |= {
            "T2IROUTE_DATABASE_URL": f"sqlite:///{workdir / 't2iroute.db'}",
            "T2IROUTE_BROKER_URL": "filesystem://",
            "T2IROUTE_BROKER_FOLDER": str(workdir / "broker"),
            "T2IROUTE_TASK_EVENTS": "false",
            "T2IROUTE_BUDGET_BACKEND": "local",
        }
    return env


def worker_command(queues: str, *, hostname: str, tiers: str = "", pool: str = "solo") -> list[str]:
    """The command line of one worker process of this installation."""
    return [
        sys.executable,
        "-m",
        "workers.cli",
        "worker",
        f"--queues={queues}",
        f"--tiers={tiers}",
        f"--pool={pool}",
        f"--hostname={hostname}",
        "--loglevel=INFO",
    ]


def three_tier_pool(models: Path) -> str:
    """A pool of the tiny models in three tiers, as T2IROUTE_TIERS: the edge pipeline at one
    step (a "turbo" tier) and at three, and the cloud pipeline; costs as a distilled model, a
    small one and a large one might compare."""
    return json.dumps(
        [
            {"name": "turbo", "model": str(models / "edge"), "cost": 0.5, "steps": 1},
            {"name": "base", "model": str(models / "edge"), "cost": 1.0, "steps": 3},
            {"name": "large", "model": str(models / "cloud"), "cost": 10.0},
        ]
    )


def _start_workers(workdir: Path, pool: Pool) -> list[subprocess.Popen[bytes]]:
    workers = []
    for queues, tiers, name in WORKER_GROUPS:
        log = (workdir / f"worker-{name}.log").open("wb")
        workers.append(
            subprocess.Popen(
                worker_command(
                    queues,
                    tiers=",".join(pool.names) if tiers == "*" else tiers,
                    hostname=f"demo-{name}@%h",
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=os.environ.copy(),
            )
        )
    return workers


def _stop_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    for process in workers:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in workers:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def _configure_process(env: dict[str, str]) -> Settings:
    os.environ.update(env)
    get_settings.cache_clear()
    settings = get_settings()
    from workers.celery_app import app, celery_config

    app.conf.update(celery_config(settings))
    return settings


def run_demo(
    *,
    prompts: Path | None = None,
    workdir: Path | None = None,
    embedded: bool | None = None,
    three_tiers: bool = False,
    timeout: float = 300.0,
) -> DemoSummary:
    from workers.producer import submit
    from workers.tiny_models import make_tiny

    started = time.monotonic()
    if embedded is None:
        embedded = not any(v in os.environ for v in SERVER_VARIABLES)
    workdir = (workdir or Path(tempfile.mkdtemp(prefix="t2iroute-demo-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    settings = _configure_process(demo_environment(workdir, embedded, three_tiers))
    if settings.broker_folder is not None:
        settings.broker_folder.mkdir(parents=True, exist_ok=True)
    tiny = workdir / "models"
    if settings.edge_model == str(tiny / "edge") and not (tiny / "edge").exists():
        make_tiny(tiny)
    migrate.upgrade(settings.database_url)

    texts = demo_prompts(prompts)
    workers = _start_workers(workdir, settings.pool)
    try:
        ids = [submit(text, seed=i).request_id for i, text in enumerate(texts)]
        deadline = time.monotonic() + timeout
        while True:
            with session_scope(settings.database_url) as session:
                report = queries.batch_report(session, ids)
            if report.unfinished == 0 or time.monotonic() > deadline:
                break
            if any(w.poll() is not None for w in workers):
                raise RuntimeError(f"a demo worker exited; see {workdir}/worker-*.log")
            time.sleep(0.5)
    finally:
        _stop_workers(workers)
    return DemoSummary(
        mode="embedded: SQLite, filesystem broker" if embedded else "servers",
        workdir=workdir,
        requests=len(ids),
        seconds=time.monotonic() - started,
        report=report,
    )
