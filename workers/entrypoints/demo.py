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
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from db import migrate
from db.session import session_scope
from workers.entrypoints.cli.report import spend_table
from workers.pool import Pool
from workers.services.traffic import BatchOutcome, batch_outcome
from workers.settings import Settings, get_settings

SERVER_VARIABLES = ("T2IROUTE_DATABASE_URL", "T2IROUTE_BROKER_URL")
# (queues, tiers, name): the CPU worker, and one worker for every tier of the pool ("*").
WORKER_GROUPS = (("route,quality,maintenance,callbacks", "", "router"), ("", "*", "gpu"))


@dataclass(frozen=True)
class DemoSummary:
    mode: str
    workdir: Path
    prompts: list[str]
    seconds: float
    outcome: BatchOutcome
    pool: Pool
    image_store: Path

    def print(self, console: Console) -> None:
        outcome = self.outcome
        overview = Table(title=f"t2iroute demo ({self.mode})")
        overview.add_column("what")
        overview.add_column("value", justify="right")
        overview.add_row("requests", str(len(self.prompts)))
        overview.add_row(
            "done / failed / unfinished",
            f"{outcome.states.get('done', 0)} / {outcome.states.get('failed', 0)} / "
            f"{outcome.unfinished}",
        )
        overview.add_row("images written", str(sum(outcome.images.values())))
        overview.add_row("of which exploration and escalation", str(outcome.extra_images))
        overview.add_row("wall time", f"{self.seconds:.1f} s")
        overview.add_row("files", str(self.workdir))
        console.print(overview)
        # Spend is what the tiers generated, explorations included, not the answers' shares.
        console.print(spend_table("spend per tier", outcome, self.pool))
        answers = Table(title=f"prompt -> tier -> image (in {self.image_store})")
        answers.add_column("prompt", ratio=1, no_wrap=True, overflow="ellipsis")
        answers.add_column("tier")
        answers.add_column("image", no_wrap=True)
        for text, request in zip(self.prompts, outcome.requests, strict=True):
            # Text, not markup: a prompt or a failure may hold square brackets.
            shown = request.image or request.failure_reason or request.status
            answers.add_row(Text(text), request.tier or "-", Text(shown))
        console.print(answers)
        for request in outcome.requests:
            if request.status == "failed":
                reason = escape(str(request.failure_reason))
                console.print(f"[red]failed:[/red] {request.request_id}: {reason}")


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
        "workers.entrypoints.cli.main",
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
    from workers.app.celery_app import app, celery_config

    app.conf.update(celery_config(settings))
    return settings


#: What the demo is doing, how far, out of how many: the progress bars of the command.
Progress = Callable[[str, int, int], None]


def run_demo(
    *,
    prompts: Path | None = None,
    workdir: Path | None = None,
    embedded: bool | None = None,
    three_tiers: bool = False,
    timeout: float = 300.0,
    progress: Progress = lambda stage, done, total: None,
) -> DemoSummary:
    from workers.offline.tiny_models import make_tiny
    from workers.services.producer import submit

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
        progress("building tiny models", 0, 1)
        make_tiny(tiny)
        progress("building tiny models", 1, 1)
    migrate.upgrade(settings.database_url)

    texts = demo_prompts(prompts)
    workers = _start_workers(workdir, settings.pool)
    try:
        ids = []
        for i, text in enumerate(texts):
            ids.append(submit(text, seed=i).request_id)
            progress("submitted", i + 1, len(texts))
        deadline = time.monotonic() + timeout
        while True:
            with session_scope(settings.database_url) as session:
                outcome = batch_outcome(session, ids)
            progress("finished", len(ids) - outcome.unfinished, len(ids))
            if outcome.unfinished == 0 or time.monotonic() > deadline:
                break
            if any(w.poll() is not None for w in workers):
                raise RuntimeError(f"a demo worker exited; see {workdir}/worker-*.log")
            time.sleep(0.5)
    finally:
        _stop_workers(workers)
    return DemoSummary(
        mode="embedded: SQLite, filesystem broker" if embedded else "servers",
        workdir=workdir,
        prompts=texts,
        seconds=time.monotonic() - started,
        outcome=outcome,
        pool=settings.pool,
        image_store=settings.image_store,
    )
