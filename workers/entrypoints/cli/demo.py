"""``t2iroute demo``: the whole flow on tiny models, with progress while it runs
(``workers.entrypoints.demo`` does the work)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from workers.entrypoints.cli.output import console, log_at, progress_bars


def demo(
    prompts: Annotated[Path | None, typer.Option(help="One prompt per line.")] = None,
    workdir: Annotated[Path | None, typer.Option(help="Where the demo keeps its files.")] = None,
    embedded: Annotated[
        bool | None,
        typer.Option(
            "--embedded/--servers",
            help=(
                "Run with no servers (SQLite, filesystem broker); default: embedded "
                "unless T2IROUTE_DATABASE_URL or T2IROUTE_BROKER_URL is set."
            ),
        ),
    ] = None,
    three_tiers: Annotated[
        bool,
        typer.Option(help="A pool of three tiers: the small model at 1 and 3 steps, the large."),
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for every request.")] = 300.0,
) -> None:
    """Run the whole flow on tiny models: progress while it runs, then each prompt's tier and
    image, and what each tier really generated and cost (explorations included)."""
    from rich.progress import TaskID

    from workers.entrypoints.demo import run_demo

    log_at("WARNING")
    logging.getLogger("kombu.connection").setLevel(logging.ERROR)
    with progress_bars() as progress:
        tasks: dict[str, TaskID] = {}

        def show(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done, total=total)

        summary = run_demo(
            prompts=prompts,
            workdir=workdir,
            embedded=embedded,
            three_tiers=three_tiers,
            timeout=timeout,
            progress=show,
        )
    summary.print(console)
    if summary.outcome.unfinished:
        raise typer.Exit(1)
