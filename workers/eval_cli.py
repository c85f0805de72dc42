"""``t2iroute eval``: cross-validate routers on labelled tables and write the reports. The
harnesses are ``routing.evaluate`` (pairs) and ``routing.pool_evaluate`` (pools), the
experiments ``routing.experiments`` and the writers ``routing.reports``; this module only
parses options and shows progress."""

from __future__ import annotations

import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from routing.evaluate import GAIN_TARGETS, Experiment, Summary
from routing.experiments import (
    GENAI_COSTS,
    GENAI_CROSS,
    GENAI_PAIRS,
    GENAI_POOLS,
    encodings,
    genai_bench_experiments,
    genai_bench_pool_experiments,
    parse_costs,
    parse_pools,
    split_list,
)
from routing.registry import PAIR_ROUTERS, POOL_ROUTERS
from routing.reports import fmt, write_reports

eval_app = typer.Typer(
    help="Offline evaluation of routers (cross-validated).", no_args_is_help=True
)
console = Console()

RoutersOption = Annotated[
    str, typer.Option(help=f"Comma-separated routers; known: {', '.join(PAIR_ROUTERS)}.")
]
SeedsOption = Annotated[int, typer.Option(min=1, help="Repetitions of the k-fold split.")]
FoldsOption = Annotated[int, typer.Option(min=2, help="Folds per split.")]
OutOption = Annotated[Path, typer.Option(help="Folder for the reports.")]
EncoderOption = Annotated[
    str | None,
    typer.Option(
        help="Frozen text encoder of every learned router: a folder or hub id (an encoder, a "
        "whole CLIP checkpoint, a diffusers pipeline or its text_encoder folder). Default: "
        "the shipped MiniLM."
    ),
]
EncoderLayerOption = Annotated[
    int | None,
    typer.Option(
        help="Hidden state RouteT2I reads, -1 the last layer. Default: RouteT2I's own (-3, "
        "chosen for MiniLM)."
    ),
]
ThreadsOption = Annotated[
    int,
    typer.Option(
        min=1,
        help="torch intra-op threads. The models are small, so per-op overhead dominates, "
        "and on shared cores more threads were 10 to 80 times slower.",
    ),
]


@eval_app.command("genai-bench")
def genai_bench(
    pairs: Annotated[str, typer.Option(help="Comma-separated EDGE:CLOUD model pairs.")] = ",".join(
        GENAI_PAIRS
    ),
    cross: Annotated[
        str,
        typer.Option(
            help="Comma-separated cross-pair runs TRAIN_EDGE:TRAIN_CLOUD/TEST_EDGE:"
            "TEST_CLOUD (same folds, so test prompts stay unseen); empty for none."
        ),
    ] = ",".join(GENAI_CROSS),
    routers: RoutersOption = ",".join(PAIR_ROUTERS),
    seeds: SeedsOption = 5,
    folds: FoldsOption = 5,
    data: Annotated[
        Path | None, typer.Option(help="Ratings JSON; default ../shared/data beside the repo.")
    ] = None,
    out: OutOption = Path("reports/genai_bench"),
    threads: ThreadsOption = 1,
    encoder: EncoderOption = None,
    encoder_layer: EncoderLayerOption = None,
) -> None:
    """GenAI-Bench human ratings (one score per image): every pair, plus the cross-pair runs."""
    try:
        experiments = genai_bench_experiments(pairs, cross, data)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    _run(experiments, split_list(routers), seeds, folds, out, threads, encoder, encoder_layer)


@eval_app.command("table")
def table(
    file: Annotated[Path, typer.Argument(help="CSV or JSON: prompt, edge_<m>, cloud_<m>.")],
    test_file: Annotated[
        Path | None,
        typer.Option(help="Cross-pair: test on this table's labels (same prompts, same order)."),
    ] = None,
    routers: RoutersOption = ",".join(PAIR_ROUTERS),
    seeds: SeedsOption = 5,
    folds: FoldsOption = 5,
    out: OutOption = Path("reports/table"),
    threads: ThreadsOption = 1,
    encoder: EncoderOption = None,
    encoder_layer: EncoderLayerOption = None,
) -> None:
    """Any labelled table: one score per tier, or one column per metric and tier."""
    from routing.data import load_metric_table

    train = load_metric_table(file)
    experiments = [Experiment.same_pair(file.stem, train)]
    if test_file is not None:
        test = load_metric_table(test_file)
        experiments.append(Experiment(f"{file.stem} => {test_file.stem}", train, test))
    _run(experiments, split_list(routers), seeds, folds, out, threads, encoder, encoder_layer)


@eval_app.command("pool")
def pool(
    pools: Annotated[
        str,
        typer.Option(
            help=f"Comma-separated pools: {', '.join(GENAI_POOLS)}, or NAME=MODEL+MODEL+... "
            "for another."
        ),
    ] = ",".join(GENAI_POOLS),
    costs: Annotated[
        str,
        typer.Option(
            help="MODEL=COST,... replacing entries of the relative cost table (SD 2.1 = 1; "
            "docs/evaluation.md gives the sources). Default: "
            + ", ".join(f"{m}={c:g}" for m, c in GENAI_COSTS.items())
        ),
    ] = "",
    at: Annotated[
        str, typer.Option(help="Comma-separated mean costs at which to report the quality.")
    ] = "10,17.5",
    routers: Annotated[
        str, typer.Option(help=f"Comma-separated routers; known: {', '.join(POOL_ROUTERS)}.")
    ] = ",".join(POOL_ROUTERS),
    seeds: SeedsOption = 5,
    folds: FoldsOption = 5,
    data: Annotated[
        Path | None, typer.Option(help="Ratings JSON; default ../shared/data beside the repo.")
    ] = None,
    out: OutOption = Path("reports/genai_bench_pool"),
    threads: ThreadsOption = 1,
    encoder: EncoderOption = None,
    encoder_layer: EncoderLayerOption = None,
) -> None:
    """GenAI-Bench's models as pools of tiers with a cost each: quality against mean cost per
    request for every router, beside every single model and their frontier."""
    import torch

    from routing.pool_evaluate import (
        cross_validate_pool,
        pool_references,
        pool_router_factories,
        summarise_pool,
    )
    from routing.reports import write_pool_reports

    torch.set_num_threads(threads)
    names = split_list(routers)
    try:
        budgets = [float(b) for b in split_list(at)]
        experiments = genai_bench_pool_experiments(parse_pools(pools), parse_costs(costs), data)
        shared, routet2i_config = encodings(encoder, encoder_layer, names)
        factories = pool_router_factories(names, shared, routet2i_config)
    except (ValueError, OSError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    steps = len(experiments) * seeds * folds * len(factories)
    started = time.perf_counter()
    with _progress(steps) as advance:
        scores = cross_validate_pool(
            experiments,
            factories,
            folds=folds,
            seeds=range(seeds),
            extra_budgets=budgets,
            on_step=advance,
        )
    wall = time.perf_counter() - started
    references = pool_references(experiments, scores)
    summaries = summarise_pool(scores, references, budgets)
    layer = routet2i_config.encoder_layer
    run = _run_record(
        wall, seeds, folds, list(factories), list(references), encoder, layer, threads
    )
    run["costs"] = {e.name: dict(zip(e.table.tiers, e.costs, strict=True)) for e in experiments}
    write_pool_reports(out, scores, summaries, references, run, budgets)
    for experiment, ref in references.items():
        shown = Table(title=f"pool {experiment}")
        best = f"{ref.tiers[ref.best]} {ref.quality[ref.best]:.2f}@{ref.costs[ref.best]:g}"
        for column in ("router", f"quality at cost of {best}", "cost to match", "λ=0"):
            shown.add_column(column, justify="left" if column == "router" else "right")
        for s in (s for s in summaries if s.experiment == experiment):
            match = "never" if s.match_cost != s.match_cost else f"{s.match_cost:.1f}"
            best_point = f"{s.best[1]:.2f}@{s.best[0]:.1f}"
            shown.add_row(s.router, fmt(s.at_reference, 3), match, best_point)
        console.print(shown)
    console.print(f"[green]{steps} fits in {wall:.0f} s; reports in {out}[/green]")


@contextmanager
def _progress(steps: int) -> Iterator[Callable[[str], None]]:
    """A rich progress bar over ``steps`` fits; yields the hook that advances it."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("evaluating", total=steps)

        def advance(description: str) -> None:
            progress.update(task, advance=1, description=description)

        yield advance


def _run_record(
    wall: float,
    seeds: int,
    folds: int,
    routers: Sequence[str],
    experiments: Sequence[str],
    encoder: str | None,
    encoder_layer: int,
    threads: int,
) -> dict[str, object]:
    return {
        "command": shlex.join(["t2iroute", "eval", *sys.argv[sys.argv.index("eval") + 1 :]])
        if "eval" in sys.argv
        else shlex.join(sys.argv),
        "wall_seconds": round(wall, 1),
        "seeds": seeds,
        "folds": folds,
        "routers": list(routers),
        "experiments": list(experiments),
        "encoder": encoder or "MiniLM (all-MiniLM-L6-v2, shipped)",
        "routet2i_encoder_layer": encoder_layer,
        "torch_threads": threads,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def _run(
    experiments: Sequence[Experiment],
    routers: Sequence[str],
    seeds: int,
    folds: int,
    out: Path,
    threads: int,
    encoder: str | None = None,
    encoder_layer: int | None = None,
) -> None:
    import torch

    from routing.evaluate import cross_validate, router_factories, summarise

    torch.set_num_threads(threads)
    try:
        shared, routet2i_config = encodings(encoder, encoder_layer, routers)
        factories = router_factories(routers, shared, routet2i_config)
        if "bert_classifier" in factories:
            shared.top_layer.top_layer()  # it fine-tunes a BERT layer: fail now, not mid-run
    except (ValueError, OSError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    except TypeError as exc:
        raise typer.BadParameter(f"{exc}; leave bert_classifier out with --routers") from exc
    steps = len(experiments) * seeds * folds * len(factories)
    started = time.perf_counter()
    with _progress(steps) as advance:
        scores = cross_validate(
            experiments, factories, folds=folds, seeds=range(seeds), on_step=advance
        )
    wall = time.perf_counter() - started
    summaries = summarise(scores)
    names = [e.name for e in experiments]
    layer = routet2i_config.encoder_layer
    run = _run_record(wall, seeds, folds, list(factories), names, encoder, layer, threads)
    write_reports(out, scores, summaries, run)
    _print_table(summaries)
    console.print(f"[green]{steps} fits in {wall:.0f} s; reports in {out}[/green]")


def _print_table(summaries: Sequence[Summary]) -> None:
    for experiment in dict.fromkeys(s.experiment for s in summaries):
        shown = Table(title=experiment)
        for column in ("router", "APGR", "ΔP@50% (%)", *(f"p@{t:.0%}" for t in GAIN_TARGETS)):
            shown.add_column(column, justify="left" if column == "router" else "right")
        for s in (s for s in summaries if s.experiment == experiment):
            shares = (fmt(s.share_at[t], 2) for t in GAIN_TARGETS)
            shown.add_row(s.router, fmt(s.apgr, 3), fmt(s.delta_p50, 1), *shares)
        console.print(shown)
