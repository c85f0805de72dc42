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
from dataclasses import replace
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

from routing.data import default_ratings_path
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
from routing.learning_curve import DEFAULT_SIZES, LEARNING_PAIR_ROUTERS, LEARNING_POOL_ROUTERS
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


def ratings_file(data: Path | None) -> Path:
    """The GenAI-Bench ratings file, or exit 2 with one line saying where to get it: the data
    is never copied into the repository (routing/data.py)."""
    path = data if data is not None else default_ratings_path()
    if not path.is_file():
        typer.echo(
            f"no GenAI-Bench ratings at {path}: get genai_image.json from the root of the "
            "public GitHub repository linzhiqiu/t2v_metrics and pass it with --data FILE",
            err=True,
        )
        raise typer.Exit(2)
    return path


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
    data = ratings_file(data)
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

    data = ratings_file(data)
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


@eval_app.command("learning-curve")
def learning_curve(
    pairs: Annotated[
        str, typer.Option(help="Comma-separated EDGE:CLOUD model pairs; empty for none.")
    ] = GENAI_PAIRS[0],
    pools: Annotated[
        str,
        typer.Option(
            help=f"Comma-separated pools: {', '.join(GENAI_POOLS)}, or NAME=MODEL+MODEL+...; "
            "empty for none."
        ),
    ] = "three",
    costs: Annotated[
        str, typer.Option(help="MODEL=COST,... replacing entries of the relative cost table.")
    ] = "",
    sizes: Annotated[
        str, typer.Option(help="Comma-separated numbers n of labelled training prompts.")
    ] = ",".join(str(n) for n in DEFAULT_SIZES),
    routers: Annotated[
        str, typer.Option(help=f"Comma-separated pair routers; known: {', '.join(PAIR_ROUTERS)}.")
    ] = ",".join(LEARNING_PAIR_ROUTERS),
    pool_routers: Annotated[
        str, typer.Option(help=f"Comma-separated pool routers; known: {', '.join(POOL_ROUTERS)}.")
    ] = ",".join(LEARNING_POOL_ROUTERS),
    cold_start: Annotated[
        str, typer.Option(help="The policy every router is compared against, paired by seed.")
    ] = "prompt_length",
    seeds: Annotated[
        int, typer.Option(min=2, help="Random draws of the training prompts per n.")
    ] = 5,
    data: Annotated[
        Path | None, typer.Option(help="Ratings JSON; default ../shared/data beside the repo.")
    ] = None,
    out: OutOption = Path("reports/learning_curve"),
    threads: ThreadsOption = 1,
    encoder: EncoderOption = None,
    encoder_layer: EncoderLayerOption = None,
) -> None:
    """Sample efficiency on GenAI-Bench: every router trained on n random prompts per seed and
    scored on all the others (held-out APGR of pairs, quality at cost of pools); headline, the
    smallest n from which on each beats the cold-start policy beyond noise."""
    import torch

    from routing.evaluate import router_factories
    from routing.learning_curve import (
        check_plan,
        headlines,
        pair_learning_curve,
        pool_learning_curve,
        summarise_curve,
        write_learning_curve,
    )
    from routing.pool_evaluate import pool_router_factories

    data = ratings_file(data)
    torch.set_num_threads(threads)
    pair_names, pool_names = split_list(routers), split_list(pool_routers)
    try:
        ns = sorted({int(n) for n in split_list(sizes)})
        experiments = genai_bench_experiments(pairs, "", data) if split_list(pairs) else []
        pooled = parse_pools(pools) if split_list(pools) else {}
        pool_experiments = genai_bench_pool_experiments(pooled, parse_costs(costs), data)
        if not experiments and not pool_experiments:
            raise ValueError("no pair and no pool given")
        for e in experiments:
            check_plan(ns, len(e.test), pair_names, cold_start)
        for p in pool_experiments:
            check_plan(ns, len(p.table), pool_names, cold_start)
        shared, routet2i_config = encodings(encoder, encoder_layer, [*pair_names, *pool_names])
        pair_factories = (
            router_factories(pair_names, shared, routet2i_config) if experiments else {}
        )
        pool_factories = (
            pool_router_factories(pool_names, shared, routet2i_config) if pool_experiments else {}
        )
        if "bert_classifier" in pair_factories:
            shared.top_layer.top_layer()  # it fine-tunes a BERT layer: fail now, not mid-run
    except (ValueError, OSError, TypeError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    fits = len(experiments) * len(pair_factories) + len(pool_experiments) * len(pool_factories)
    started = time.perf_counter()
    with _progress(len(ns) * seeds * fits) as advance:
        points = pair_learning_curve(experiments, pair_factories, ns, range(seeds), advance)
        points += pool_learning_curve(pool_experiments, pool_factories, ns, range(seeds), advance)
    wall = time.perf_counter() - started
    names = [e.name for e in experiments] + [e.name for e in pool_experiments]
    layer = routet2i_config.encoder_layer
    record = _run_record(wall, seeds, 0, [], names, encoder, layer, threads)
    run = {k: v for k, v in record.items() if k != "folds"}  # one held-out split per (seed, n)
    run |= {"sizes": ns, "cold_start": cold_start}
    run["routers"] = {"pair": list(pair_factories), "pool": list(pool_factories)}
    run["costs"] = {
        e.name: dict(zip(e.table.tiers, e.costs, strict=True)) for e in pool_experiments
    }
    write_learning_curve(out, points, run, cold_start)
    means = {(s.kind, s.experiment, s.router, s.size): s for s in summarise_curve(points)}
    for h in headlines(points, cold_start):
        shown = " ".join(f"{means[(h.kind, h.experiment, h.router, n)].mean:.3f}" for n in ns)
        first = "never" if h.size is None else f"from n={h.size}"
        console.print(f"{h.kind} {h.experiment} {h.router}: {shown}; beats {cold_start}: {first}")
    console.print(f"[green]{len(points)} fits in {wall:.0f} s; reports in {out}[/green]")


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


def _command_line() -> str:
    """The command that made a report, as a user would type it."""
    if "eval" not in sys.argv:
        return shlex.join(sys.argv)
    return shlex.join(["t2iroute", "eval", *sys.argv[sys.argv.index("eval") + 1 :]])


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
        "command": _command_line(),
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


@eval_app.command("replay")
def replay(
    models: Annotated[
        str, typer.Option(help="Comma-separated GenAI-Bench models of the pool, cheapest first.")
    ] = "SDXL_2_1,DALLE_3",
    seeds: Annotated[str, typer.Option(help="Comma-separated stream seeds.")] = "0,1,2",
    orders: Annotated[
        str,
        typer.Option(
            help="Comma-separated stream orders: shuffle (by seed), length (short to long "
            "prompts: drift), switch (plain prompts, then counting/negation/comparison ones)."
        ),
    ] = "shuffle",
    strategies: Annotated[
        str, typer.Option(help="Comma-separated exploration strategies: uniform, margin.")
    ] = "uniform,margin",
    static: Annotated[
        str, typer.Option(help="Static policies replayed on the same streams and budget.")
    ] = "random,prompt_length,noun_count",
    cloud_ratio: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.3,
    exploration_rate: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.1,
    cold_start: Annotated[str, typer.Option(help="The loop's default policy.")] = "prompt_length",
    retrain_every: Annotated[int, typer.Option(min=1, help="Requests between beat ticks.")] = 100,
    passes: Annotated[
        int, typer.Option(min=1, help="Times the data set is streamed, each pass reordered.")
    ] = 3,
    retrain_min_pairs: Annotated[int, typer.Option(min=4)] = 100,
    gate_min_z: Annotated[float, typer.Option(min=0.0)] = 1.0,
    window: Annotated[int, typer.Option(min=5, help="Requests per reporting window.")] = 100,
    limit: Annotated[int | None, typer.Option(min=10, help="Only the first N prompts.")] = None,
    data: Annotated[
        Path | None, typer.Option(help="Ratings JSON; default ../shared/data beside the repo.")
    ] = None,
    out: OutOption = Path("reports/replay"),
    threads: ThreadsOption = 1,
) -> None:
    """Stream GenAI-Bench through the real learning loop (routing stage, budget keeper,
    exploration, retraining, promotion gate, hot swap), in process on SQLite, beside static
    policies at the same budget. Generation is replaced by recorded ratings: generating a
    (prompt, tier) reveals that model's recorded human rating as its quality."""
    import torch

    from routing.data import load_genai_bench_pool
    from workers.offline.replay import ReplayConfig, run_replay
    from workers.offline.replay_report import NOTE, markdown, plot, summarise_run, write_csv

    torch.set_num_threads(threads)

    path = data if data is not None else default_ratings_path()
    if not path.exists():
        console.print(
            f"[red]no ratings file at {path}[/red]: get genai_image.json (GenAI-Bench's image "
            "ratings) from the public repository linzhiqiu/t2v_metrics and pass it with --data"
        )
        raise typer.Exit(2)
    chosen = split_list(models)
    try:
        table = load_genai_bench_pool(chosen, path)
    except (ValueError, KeyError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    base = ReplayConfig(
        models=tuple(chosen),
        cloud_ratio=cloud_ratio,
        exploration_rate=exploration_rate,
        default_policy=cold_start,
        retrain_every=retrain_every,
        retrain_min_pairs=retrain_min_pairs,
        gate_min_z=gate_min_z,
        passes=passes,
        limit=limit,
    )
    configs = [
        variant
        for order in split_list(orders)
        for seed in (int(s) for s in split_list(seeds))
        for variant in (
            *(
                replace(base, order=order, seed=seed, exploration_strategy=s)
                for s in split_list(strategies)
            ),
            *(replace(base, order=order, seed=seed).static(p) for p in split_list(static)),
        )
    ]
    console.print(NOTE)
    started = time.perf_counter()
    runs = []
    with _progress(len(configs)) as advance:
        for config in configs:
            runs.append(run_replay(config, table))
            advance(f"{config.name} {config.order} seed {config.seed}")
    wall = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    write_csv(runs, window, out)
    summaries = [summarise_run(run, window) for run in runs]
    report = markdown(summaries, _command_line())
    (out / "replay.md").write_text(report + f"\nWall time {wall:.0f} s.\n")
    plot(runs, window, out / "replay.png")
    shown = Table(title="replay (means over seeds)")
    for column in ("order", "policy", "quality", "spend", "extra/budget", "refusals", "labels"):
        shown.add_column(column)
    for key in dict.fromkeys((s.order, s.policy) for s in summaries):
        group = [s for s in summaries if (s.order, s.policy) == key]
        shown.add_row(
            *key,
            f"{sum(s.quality for s in group) / len(group):.3f}",
            f"{sum(s.spend for s in group) / len(group):.2f}",
            f"{sum(s.budget_use for s in group) / len(group):.2f}",
            f"{sum(s.keeper_refusals for s in group) / len(group):.3f}",
            f"{sum(s.labels for s in group) / len(group):.0f}",
        )
    console.print(shown)
    console.print(f"[green]{len(runs)} replays in {wall:.0f} s; reports in {out}[/green]")
