"""Report writers of the pair evaluation (``routing.evaluate``) and the pool evaluation
(``routing.pool_evaluate``): summary.md, CSV tables and one PNG of curves per experiment. Pure
file output; the CLI (``t2iroute eval``) and the benchmarks call them."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from routing.evaluate import (
    GAIN_TARGETS,
    SHARES,
    FoldScore,
    PairedDifference,
    Summary,
    paired_differences,
)
from routing.pool_evaluate import PoolFoldScore, PoolReference, PoolSummary, single_frontier

# The router the paired comparisons of a report are taken against: the method itself.
REFERENCE_ROUTER = "routet2i"


def fmt(mean_std: tuple[float, float], digits: int) -> str:
    mean, std = mean_std
    return "n/a" if not np.isfinite(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


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


def rounded(row: Sequence[object]) -> list[object]:
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
            writer.writerow(rounded([*row, s.edge_quality, s.cloud_quality]))


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
            writer.writerow(rounded([*row, r.edge_quality, r.cloud_quality]))


def _write_paired_csv(path: Path, paired: Sequence[PairedDifference]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        header = ["experiment", "router", "against", "runs", "delta_p50_diff", "delta_p50_se"]
        writer.writerow([*header, "apgr_diff", "apgr_se", "wins"])
        for d in paired:
            row = [d.experiment, d.router, d.against, d.runs, *d.delta_p50, *d.apgr, d.wins]
            writer.writerow(rounded(row))


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

        lines.extend(markdown_grid(title, "router", routers, experiments, cell))

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


def markdown_grid(
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
    return markdown_grid(title, "against", against, experiments, cell, intro)


def _cell(s: Summary, kind: str) -> str:
    if kind == "apgr":
        return fmt(s.apgr, 3)
    if kind == "delta_p50":
        return fmt(s.delta_p50, 1)
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


def write_pool_reports(
    out: Path,
    scores: Sequence[PoolFoldScore],
    summaries: Sequence[PoolSummary],
    references: Mapping[str, PoolReference],
    run: dict[str, object],
    extra_budgets: Sequence[float] = (),
) -> None:
    """summary.md, summary.csv, singles.csv, curves.csv, folds.csv, run.json and one
    curves_<pool>.png per pool."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    budgets = list(extra_budgets)
    with (out / "summary.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        header = ["experiment", "router", "runs", "reference_cost"]
        header += ["quality_at_reference_cost_mean", "quality_at_reference_cost_std"]
        header += ["cost_to_match_reference", "best_cost", "best_quality"]
        for b in budgets:
            header += [f"quality_at_{b:g}_mean", f"quality_at_{b:g}_std"]
        writer.writerow(header)
        for s in summaries:
            ref = references[s.experiment]
            row: list[object] = [s.experiment, s.router, s.runs, float(ref.costs[ref.best])]
            row += [*s.at_reference, s.match_cost, *s.best]
            for b in budgets:
                row += list(s.at_budget.get(b, (float("nan"), float("nan"))))
            writer.writerow(rounded(row))
    with (out / "singles.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["experiment", "tier", "cost", "quality", "on_frontier"])
        for ref in references.values():
            frontier_costs = set(single_frontier(ref.costs, ref.quality)[0].tolist())
            for tier, cost, quality in zip(ref.tiers, ref.costs, ref.quality, strict=True):
                on = float(cost) in frontier_costs and ref.frontier(cost) == quality
                writer.writerow(rounded([ref.experiment, tier, float(cost), float(quality), on]))
    with (out / "curves.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["experiment", "router", "budget", "cost", "quality", "frontier_quality"])
        for s in summaries:
            ref = references[s.experiment]
            for b, c, q in zip(s.budgets, s.cost, s.quality, strict=True):
                writer.writerow(
                    [
                        s.experiment,
                        s.router,
                        f"{b:.4g}",
                        f"{c:.4f}",
                        f"{q:.4f}",
                        f"{ref.frontier(float(b)):.4f}",
                    ]
                )
    with (out / "folds.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["experiment", "router", "seed", "fold", "quality_at_reference_cost"])
        for f in scores:
            ref = references[f.experiment]
            at = int(np.flatnonzero(np.isclose(f.budgets, ref.costs[ref.best]))[0])
            writer.writerow(rounded([f.experiment, f.router, f.seed, f.fold, float(f.quality[at])]))
    (out / "summary.md").write_text(pool_markdown(summaries, references, run, budgets))
    for experiment, ref in references.items():
        plot_pool_curves(
            [s for s in summaries if s.experiment == experiment],
            ref,
            out / f"curves_{slug(experiment)}.png",
        )


def _quality(value: float) -> str:
    return "never" if not np.isfinite(value) else f"{value:.2f}"


def pool_markdown(
    summaries: Sequence[PoolSummary],
    references: Mapping[str, PoolReference],
    run: dict[str, object],
    extra_budgets: Sequence[float] = (),
) -> str:
    """Per pool: the single models and the routers' headline figures against them."""
    lines = [
        "# Routing a pool of models",
        "",
        f"Command: `{run['command']}`  ",
        f"Wall time: {run['wall_seconds']} s; {run['seeds']} seeds x {run['folds']} folds; "
        "mean ± std over every (seed, fold) test fold, or read off the mean curve.",
        "",
    ]
    for experiment, ref in references.items():
        best_tier, best_cost = ref.tiers[ref.best], float(ref.costs[ref.best])
        best_quality = float(ref.quality[ref.best])
        lines += [f"## Pool `{experiment}`", "", "| model | cost | mean quality |"]
        lines.append("|---|---:|---:|")
        for tier, cost, quality in zip(ref.tiers, ref.costs, ref.quality, strict=True):
            lines.append(f"| {tier} | {cost:g} | {quality:.3f} |")
        budget_columns = [f"quality at cost {b:g}" for b in extra_budgets]
        lines += [
            "",
            f"Reference: the best single model, {best_tier} ({best_quality:.3f} at cost "
            f"{best_cost:g}). Frontier: mixing single models at random (their concave hull).",
            "",
            f"| router | quality at cost {best_cost:g} | cost to reach {best_quality:.2f} | "
            + "".join(f"{c} | " for c in budget_columns)
            + "λ = 0: cost, quality |",
            "|---|---:|---:|" + "---:|" * len(budget_columns) + "---:|",
        ]
        frontier_cells = [f"{ref.frontier(b):.3f}" for b in extra_budgets]
        lines.append(
            f"| single-model frontier | {ref.frontier(best_cost):.3f} | {best_cost:g} | "
            + "".join(f"{c} | " for c in frontier_cells)
            + f"{best_cost:g}, {best_quality:.3f} |"
        )
        for s in (s for s in summaries if s.experiment == experiment):
            cells = [fmt(s.at_budget[b], 3) if b in s.at_budget else "" for b in extra_budgets]
            match = "never" if not np.isfinite(s.match_cost) else f"{s.match_cost:.1f}"
            lines.append(
                f"| {s.router} | {fmt(s.at_reference, 3)} | {match} | "
                + "".join(f"{c} | " for c in cells)
                + f"{s.best[0]:.1f}, {s.best[1]:.3f} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def plot_pool_curves(
    summaries: Sequence[PoolSummary], reference: PoolReference, path: Path
) -> None:
    """Mean quality against mean cost per request: one line per router, a point per single
    model and the single-model frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.0, 4.6), dpi=90)
    hull_c, hull_q = single_frontier(reference.costs, reference.quality)
    ax.plot(hull_c, hull_q, color="0.5", ls=":", label="single-model frontier")
    ax.scatter(reference.costs, reference.quality, color="black", zorder=3, s=18)
    for tier, c, q in zip(reference.tiers, reference.costs, reference.quality, strict=True):
        ax.annotate(tier, (c, q), fontsize=7, xytext=(3, -9), textcoords="offset points")
    for s in summaries:
        style = "--" if s.router == "oracle" else "-"
        ax.plot(s.cost, s.quality, style, lw=1.4, label=s.router)
    ax.set_xlabel("mean cost per request")
    ax.set_ylabel("mean quality of the routed mix")
    ax.set_title(f"pool {reference.experiment}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
