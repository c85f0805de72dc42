"""``t2iroute eval``: cross-validate routers on labelled pair tables and write the reports
(markdown and CSV tables, one PNG of routing curves per experiment). The harness itself is
``routing.evaluate``; this module parses options, shows progress and writes files."""

from __future__ import annotations

import csv
import dataclasses
import json
import platform
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
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

from routing.evaluate import (
    GAIN_TARGETS,
    ROUTERS,
    SHARES,
    Experiment,
    FoldScore,
    PairedDifference,
    SharedEncoding,
    Summary,
    paired_differences,
)

if TYPE_CHECKING:
    from routing.routet2i import RouteT2IConfig

# The router the paired comparisons of a report are taken against: the method itself.
REFERENCE_ROUTER = "routet2i"

eval_app = typer.Typer(
    help="Offline evaluation of routers (cross-validated).", no_args_is_help=True
)
console = Console()

GENAI_PAIRS = (
    "SDXL_2_1:DALLE_3",
    "SDXL_Turbo:DALLE_3",
    "SDXL_2_1:Midjourney_6",
    "SDXL_Turbo:Midjourney_6",
    "SDXL_2_1:SDXL_Base",
)
GENAI_CROSS = ("SDXL_2_1:DALLE_3/SDXL_Turbo:Midjourney_6",)

RoutersOption = Annotated[
    str, typer.Option(help=f"Comma-separated routers; known: {', '.join(ROUTERS)}.")
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


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _pair(text: str) -> tuple[str, str]:
    parts = re.split(r"->|:", text)
    if len(parts) != 2 or not all(parts):
        raise typer.BadParameter(f"expected EDGE:CLOUD, got {text!r}")
    return parts[0], parts[1]


def _pair_name(edge: str, cloud: str) -> str:
    return f"{edge}->{cloud}"


def genai_bench_experiments(pairs: str, cross: str, data: Path | None = None) -> list[Experiment]:
    """Same-pair experiments for ``EDGE:CLOUD,...`` and cross-pair ones for
    ``TRAIN_EDGE:TRAIN_CLOUD/TEST_EDGE:TEST_CLOUD,...``, each table loaded once."""
    from routing.data import load_genai_bench

    tables = {}
    experiments = []
    for edge, cloud in (_pair(p) for p in _split(pairs)):
        tables[(edge, cloud)] = load_genai_bench(edge, cloud, data)
        experiments.append(Experiment.same_pair(_pair_name(edge, cloud), tables[(edge, cloud)]))
    for spec in _split(cross):
        train_text, _, test_text = spec.partition("/")
        train_pair, test_pair = _pair(train_text), _pair(test_text)
        for pair in (train_pair, test_pair):
            if pair not in tables:
                tables[pair] = load_genai_bench(*pair, data)
        name = f"{_pair_name(*train_pair)} => {_pair_name(*test_pair)}"
        experiments.append(Experiment(name, tables[train_pair], tables[test_pair]))
    return experiments


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
    routers: RoutersOption = ",".join(ROUTERS),
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
    experiments = genai_bench_experiments(pairs, cross, data)
    _run(experiments, _split(routers), seeds, folds, out, threads, encoder, encoder_layer)


@eval_app.command("table")
def table(
    file: Annotated[Path, typer.Argument(help="CSV or JSON: prompt, edge_<m>, cloud_<m>.")],
    test_file: Annotated[
        Path | None,
        typer.Option(help="Cross-pair: test on this table's labels (same prompts, same order)."),
    ] = None,
    routers: RoutersOption = ",".join(ROUTERS),
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
    _run(experiments, _split(routers), seeds, folds, out, threads, encoder, encoder_layer)


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

        scores = cross_validate(
            experiments, factories, folds=folds, seeds=range(seeds), on_step=advance
        )
    wall = time.perf_counter() - started
    summaries = summarise(scores)
    run = {
        "command": shlex.join(["t2iroute", "eval", *sys.argv[sys.argv.index("eval") + 1 :]])
        if "eval" in sys.argv
        else shlex.join(sys.argv),
        "wall_seconds": round(wall, 1),
        "seeds": seeds,
        "folds": folds,
        "routers": list(factories),
        "experiments": [e.name for e in experiments],
        "encoder": encoder or "MiniLM (all-MiniLM-L6-v2, shipped)",
        "routet2i_encoder_layer": routet2i_config.encoder_layer,
        "torch_threads": threads,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    write_reports(out, scores, summaries, run)
    _print_table(summaries)
    console.print(f"[green]{steps} fits in {wall:.0f} s; reports in {out}[/green]")


def encodings(
    encoder: str | None, layer: int | None, routers: Sequence[str] = ROUTERS
) -> tuple[SharedEncoding, RouteT2IConfig]:
    """The baselines' shared encoding and RouteT2I's config for a chosen encoder and layer.

    The encoder is loaded here, so a path that does not load fails before any training; so is
    RouteT2I's layer when RouteT2I is among ``routers`` (an out-of-range layer is then a bad
    option, not a crash in the first fold). Both come from ``shared_encoder``'s per-process
    cache, which the routers read again at fit time, so nothing is loaded twice.
    """
    from routing.routet2i import RouteT2IConfig, shared_encoder

    config = RouteT2IConfig(encoder=encoder)
    if layer is not None:
        config = dataclasses.replace(config, encoder_layer=layer)
    pooled = shared_encoder(config.encoder, config.encoder_revision, config.max_length)
    if REFERENCE_ROUTER in routers:
        c = config
        shared_encoder(c.encoder, c.encoder_revision, c.max_length, c.encoder_layer)
    return SharedEncoding(pooled), config


def _fmt(mean_std: tuple[float, float], digits: int) -> str:
    mean, std = mean_std
    return "n/a" if not np.isfinite(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _print_table(summaries: Sequence[Summary]) -> None:
    for experiment in dict.fromkeys(s.experiment for s in summaries):
        shown = Table(title=experiment)
        for column in ("router", "APGR", "ΔP@50% (%)", *(f"p@{t:.0%}" for t in GAIN_TARGETS)):
            shown.add_column(column, justify="left" if column == "router" else "right")
        for s in (s for s in summaries if s.experiment == experiment):
            shares = (_fmt(s.share_at[t], 2) for t in GAIN_TARGETS)
            shown.add_row(s.router, _fmt(s.apgr, 3), _fmt(s.delta_p50, 1), *shares)
        console.print(shown)


def slug(name: str) -> str:
    """A file-name-safe form of an experiment name: "A->B => C->D" becomes "A_to_B_on_C_to_D"."""
    plain = name.replace("=>", "_on_").replace("->", "_to_")
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9_.-]+", "_", plain))


def write_reports(
    out: Path, scores: Sequence[FoldScore], summaries: Sequence[Summary], run: dict[str, object]
) -> None:
    """summary.md, summary.csv, folds.csv, curves.csv, run.json, curves_<experiment>.png and,
    when RouteT2I was run, paired.csv (RouteT2I minus every other router, fold by fold)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    _write_summary_csv(out / "summary.csv", summaries)
    _write_folds_csv(out / "folds.csv", scores)
    _write_curves_csv(out / "curves.csv", summaries)
    paired = paired_differences(scores, REFERENCE_ROUTER)
    if paired:
        _write_paired_csv(out / "paired.csv", paired)
    (out / "summary.md").write_text(summary_markdown(summaries, run, paired))
    for experiment in dict.fromkeys(s.experiment for s in summaries):
        plot_curves(
            [s for s in summaries if s.experiment == experiment],
            out / f"curves_{slug(experiment)}.png",
        )


def _share_column(target: float) -> str:
    return f"share_at_{round(100 * target)}"


def _rounded(row: Sequence[object]) -> list[object]:
    """Floats to six significant digits: the reports stay small and diff well."""
    return [f"{v:.6g}" if isinstance(v, float) else v for v in row]


def _write_summary_csv(path: Path, summaries: Sequence[Summary]) -> None:
    header = ["experiment", "router", "runs", "valid_runs", "apgr_mean", "apgr_std"]
    header += ["delta_p50_mean", "delta_p50_std"]
    for t in GAIN_TARGETS:
        header += [f"{_share_column(t)}_mean", f"{_share_column(t)}_std"]
    header += ["edge_quality", "cloud_quality"]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for s in summaries:
            row: list[object] = [s.experiment, s.router, s.runs, s.valid, *s.apgr, *s.delta_p50]
            for t in GAIN_TARGETS:
                row += list(s.share_at[t])
            writer.writerow(_rounded([*row, s.edge_quality, s.cloud_quality]))


def _write_folds_csv(path: Path, scores: Sequence[FoldScore]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        targets = list(scores[0].share_at) if scores else []
        writer.writerow(
            ["experiment", "router", "seed", "fold", "apgr", "delta_p50"]
            + [_share_column(t) for t in targets]
            + ["edge_quality", "cloud_quality"]
        )
        for r in scores:
            shares = [r.share_at[t] for t in targets]
            row = [r.experiment, r.router, r.seed, r.fold, r.apgr, r.delta_p50, *shares]
            writer.writerow(_rounded([*row, r.edge_quality, r.cloud_quality]))


def _write_paired_csv(path: Path, paired: Sequence[PairedDifference]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        header = ["experiment", "router", "against", "runs", "delta_p50_diff", "delta_p50_se"]
        writer.writerow([*header, "apgr_diff", "apgr_se", "wins"])
        for d in paired:
            row = [d.experiment, d.router, d.against, d.runs, *d.delta_p50, *d.apgr, d.wins]
            writer.writerow(_rounded(row))


def _write_curves_csv(path: Path, summaries: Sequence[Summary]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["experiment", "router", "cloud_share", "quality", "recovered_gain"])
        for s in summaries:
            for p, q, g in zip(SHARES, s.quality, s.recovered, strict=True):
                writer.writerow([s.experiment, s.router, f"{p:.2f}", f"{q:.4f}", f"{g:.4f}"])


def summary_markdown(
    summaries: Sequence[Summary],
    run: dict[str, object],
    paired: Sequence[PairedDifference] = (),
) -> str:
    """Two router x experiment tables (APGR, Delta P@50%) and one with the shares reaching
    40/50/60% of the cloud's gain, mean ± std over all (seed, fold) runs; then, if given, the
    paired differences of the reference router against each other one."""
    experiments = list(dict.fromkeys(s.experiment for s in summaries))
    routers = list(dict.fromkeys(s.router for s in summaries))
    by_key = {(s.experiment, s.router): s for s in summaries}
    lines = [
        "# Routing evaluation",
        "",
        f"Command: `{run['command']}`  ",
        f"Wall time: {run['wall_seconds']} s; {run['seeds']} seeds x {run['folds']} folds; "
        "mean ± std over every (seed, fold) test fold.",
        "",
    ]

    def grid(title: str, kind: str) -> None:
        def cell(router: str, experiment: str) -> str:
            s = by_key.get((experiment, router))
            return "" if s is None else _cell(s, kind)

        lines.extend(_markdown_grid(title, "router", routers, experiments, cell))

    grid("APGR (share of the cloud's gain recovered, averaged over cloud share 0..1)", "apgr")
    grid("ΔP@50% (gain over edge-only at 50% cloud, % of the cloud's gain)", "delta_p50")
    targets = "/".join(f"{t:.0%}" for t in GAIN_TARGETS)
    grid(f"Smallest cloud share reaching {targets} of the cloud's gain (mean)", "shares")
    if paired:
        lines.extend(_paired_markdown(paired, experiments))
    invalid = [s for s in summaries if s.valid < s.runs]
    for s in invalid:
        lines.append(
            f"* {s.experiment}, {s.router}: {s.runs - s.valid} of {s.runs} folds had no cloud "
            "gain to normalise by and are left out of the normalised numbers."
        )
    return "\n".join(lines).rstrip() + "\n"


def _markdown_grid(
    title: str,
    label: str,
    rows: Sequence[str],
    experiments: Sequence[str],
    cell: Callable[[str, str], str],
    intro: Sequence[str] = (),
) -> list[str]:
    """A "## title" section holding a row x experiment table; ``cell(row, experiment)``."""
    lines = [f"## {title}", "", *intro, f"| {label} | " + " | ".join(experiments) + " |"]
    lines.append("|---|" + "---:|" * len(experiments))
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(cell(row, e) for e in experiments) + " |")
    lines.append("")
    return lines


def _paired_markdown(paired: Sequence[PairedDifference], experiments: Sequence[str]) -> list[str]:
    by_key = {(d.experiment, d.against): d for d in paired}

    def cell(against: str, experiment: str) -> str:
        d = by_key.get((experiment, against))
        if d is None or not np.isfinite(d.delta_p50[0]):
            return ""
        return f"{d.delta_p50[0]:+.1f} ± {d.delta_p50[1]:.1f} ({d.wins:.0%})"

    title = (
        f"{paired[0].router} minus each router, paired by fold: ΔP@50% points ± standard error "
        "(share of folds won)"
    )
    intro = (
        "The standard error counts one seed's folds as the independent samples (the seeds "
        "re-split the same prompts); a difference of two standard errors or more is unlikely "
        "to be fold noise.",
        "",
    )
    against = list(dict.fromkeys(d.against for d in paired))
    return _markdown_grid(title, "against", against, experiments, cell, intro)


def _cell(s: Summary, kind: str) -> str:
    if kind == "apgr":
        return _fmt(s.apgr, 3)
    if kind == "delta_p50":
        return _fmt(s.delta_p50, 1)
    return " / ".join(f"{s.share_at[t][0]:.2f}" for t in GAIN_TARGETS)


def plot_curves(summaries: Sequence[Summary], path: Path) -> None:
    """Mean quality of the routed mix against cloud share, one line per router, with the
    straight edge-only to cloud-only line that random routing follows in expectation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.0, 4.2), dpi=90)
    first = summaries[0]
    ax.plot([0, 1], [first.edge_quality, first.cloud_quality], color="0.6", ls=":", label="linear")
    for s in summaries:
        style = "--" if s.router == "oracle" else "-"
        ax.plot(SHARES, s.quality, style, lw=1.4, label=f"{s.router} ({s.apgr[0]:.2f})")
    ax.set_xlabel("cloud share p")
    ax.set_ylabel("mean quality of the routed mix")
    ax.set_title(first.experiment, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(
        fontsize=7,
        title="router (APGR)",
        title_fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
