"""What a replay shows: served quality and spend over the stream, in windows and in all;
labels, exploration's share of the spend, the gate's verdicts; the serving router's APGR on
the prompts not yet seen after each retraining; and how closely the calibrated trade-off
kept the budget (tracking error, and how often the budget keeper had to refuse). Written as
CSV, a markdown summary and a PNG of the curves."""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workers.offline.replay import ReplayRun

NOTE = (
    "Generation is replaced by recorded ratings: generating a (prompt, tier) reveals that "
    "model's recorded human rating (GenAI-Bench, mean of three, 1-5) as its quality. "
    "Routing, the budget keeper, exploration, retraining, the promotion gate and the router "
    "hot swap are the serving code."
)


@dataclass(frozen=True)
class RunSummary:
    order: str
    policy: str
    seed: int
    requests: int
    quality: float
    spend: float
    #: Extra spend per request above the cheapest tier, over the budget's (1 = on budget).
    budget_use: float
    #: Mean |window extra spend / budget - 1| over the windows.
    tracking_error: float
    keeper_refusals: float
    labels: int
    exploration_share: float
    promotions: int
    gate_refusals: int
    final_unseen_apgr: float


def windows(n: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def summarise_run(run: ReplayRun, window: int) -> RunSummary:
    budget = run.budget_per_request
    extra = run.extra_spend
    ratios = [extra[w].mean() / budget - 1 for w in windows(len(extra), window)] if budget else []
    apgrs = [r.unseen_apgr for r in run.retrainings if np.isfinite(r.unseen_apgr)]
    return RunSummary(
        order=run.config.order,
        policy=run.config.name,
        seed=run.config.seed,
        requests=len(run.quality),
        quality=float(run.quality.mean()),
        spend=float(run.spend.mean()),
        budget_use=float(extra.mean() / budget) if budget else float("nan"),
        tracking_error=float(np.mean(np.abs(ratios))) if ratios else float("nan"),
        keeper_refusals=float(run.refused.mean()),
        labels=run.labels,
        exploration_share=run.exploration_spend() / float(run.spend.sum()),
        promotions=sum(r.status == "promoted" for r in run.retrainings),
        gate_refusals=sum(r.status == "refused" for r in run.retrainings),
        final_unseen_apgr=apgrs[-1] if apgrs else float("nan"),
    )


def write_csv(runs: Sequence[ReplayRun], window: int, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "windows.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["order", "policy", "seed", "start", "end", "quality", "spend", "extra_per_budget",
             "keeper_refusals", "labels_so_far", "tradeoff", "cloud_share"]
        )  # fmt: skip
        for run in runs:
            budget = run.budget_per_request
            dearest = run.tiers[-1]
            labels = np.cumsum([bool(e) for e in run.explored])
            for w in windows(len(run.quality), window):
                extra = run.extra_spend[w]
                writer.writerow(
                    [
                        run.config.order,
                        run.config.name,
                        run.config.seed,
                        w.start,
                        w.stop,
                        f"{run.quality[w].mean():.4f}",
                        f"{run.spend[w].mean():.4f}",
                        f"{extra.mean() / budget:.4f}" if budget else "",
                        f"{run.refused[w].mean():.4f}",
                        int(labels[w.stop - 1]),
                        f"{run.tradeoff[w].mean():.6f}",
                        f"{np.mean([t == dearest for t in run.served[w]]):.4f}",
                    ]
                )
    with (out / "retrainings.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["order", "policy", "seed", "after", "labels", "status", "serving", "unseen_apgr",
             "reason"]
        )  # fmt: skip
        for run in runs:
            for r in run.retrainings:
                writer.writerow(
                    [run.config.order, run.config.name, run.config.seed, r.after, r.labels,
                     r.status, r.serving, f"{r.unseen_apgr:.4f}", r.reason]
                )  # fmt: skip


def _mean_std(values: Sequence[float]) -> str:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if v.size == 0:
        return "n/a"
    return f"{v.mean():.3f} ± {v.std(ddof=1) if v.size > 1 else 0.0:.3f}"


def markdown(summaries: Sequence[RunSummary], command: str) -> str:
    groups: dict[tuple[str, str], list[RunSummary]] = defaultdict(list)
    for s in summaries:
        groups[(s.order, s.policy)].append(s)
    seeds = sorted({s.seed for s in summaries})
    lines = [
        "# Replay of the learning loop",
        "",
        NOTE,
        "",
        f"Command: `{command}`. Seeds {', '.join(map(str, seeds))}; mean ± std over seeds.",
        "",
        "| order | policy | served quality | spend / request | extra spend / budget | "
        "tracking error | keeper refusals | labels | exploration share of spend | "
        "promotions | gate refusals | serving APGR on never-labelled prompts, last tick |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (order, policy), group in groups.items():
        lines.append(
            f"| {order} | {policy} | {_mean_std([s.quality for s in group])} | "
            f"{_mean_std([s.spend for s in group])} | {_mean_std([s.budget_use for s in group])} | "
            f"{_mean_std([s.tracking_error for s in group])} | "
            f"{_mean_std([s.keeper_refusals for s in group])} | "
            f"{np.mean([s.labels for s in group]):.0f} | "
            f"{_mean_std([s.exploration_share for s in group])} | "
            f"{sum(s.promotions for s in group)} | {sum(s.gate_refusals for s in group)} | "
            f"{_mean_std([s.final_unseen_apgr for s in group])} |"
        )
    lines += [
        "",
        "Extra spend is the spend above the cheapest tier, explorations included; 1.00 is "
        "exactly the budget. Tracking error is the mean |window extra spend / budget - 1| over "
        "windows. Keeper refusals: the share of requests whose wanted tier the budget keeper "
        "refused (the hard guarantee at work). Promotions and gate refusals are summed over "
        "seeds.",
        "",
    ]
    return "\n".join(lines)


def plot(runs: Sequence[ReplayRun], window: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    by_policy: dict[tuple[str, str], list[ReplayRun]] = defaultdict(list)
    for run in runs:
        by_policy[(run.config.order, run.config.name)].append(run)
    for (order, policy), group in by_policy.items():
        label = f"{policy} ({order})"
        n = min(len(r.quality) for r in group)
        cumulative = np.mean([np.cumsum(r.quality[:n]) / np.arange(1, n + 1) for r in group], 0)
        axes[0].plot(np.arange(1, n + 1), cumulative, label=label)
        spans = windows(n, window)
        ratio = np.mean(
            [[r.extra_spend[w].mean() / r.budget_per_request for w in spans] for r in group],
            0,
        )
        axes[1].plot([w.stop for w in spans], ratio, marker=".", label=label)
        ticks = [
            (t.after, t.unseen_apgr)
            for r in group
            for t in r.retrainings
            if np.isfinite(t.unseen_apgr)
        ]
        if ticks:
            xs = sorted({a for a, _ in ticks})
            ys = [np.mean([v for a, v in ticks if a == x]) for x in xs]
            axes[2].plot(xs, ys, marker="o", label=label)
    axes[0].set(title="Served quality, cumulative mean", xlabel="requests", ylabel="rating")
    axes[1].axhline(1.0, color="black", linewidth=0.8)
    axes[1].set(
        title=f"Extra spend / budget, windows of {window}", xlabel="requests", ylabel="ratio"
    )
    axes[2].set(
        title="Serving router's APGR, never-labelled prompts", xlabel="requests", ylabel="APGR"
    )
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle("Replay on GenAI-Bench (generation replaced by recorded ratings)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
