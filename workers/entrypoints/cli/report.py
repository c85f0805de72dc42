"""How ``t2iroute report``, ``t2iroute submit`` and the demo show the traffic: rich tables of
a batch (``print_batch``, ``spend_table``) and of a time window (``print_report``), and the
chart of tier shares and quality over time (``plot_window``, drawn with matplotlib). The
numbers come from ``workers.services.traffic``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from db.models import Status as RequestStatus
from workers.pool import Pool
from workers.services.traffic import (
    UNDECIDED,
    BatchOutcome,
    Series,
    TierStats,
    WindowReport,
    tier_order,
)

__all__ = ["plot_window", "print_batch", "print_report", "spend_table"]


# --- a batch of requests (submit --file, the demo) --------------------------------------------


def _share(amount: float, total: float) -> str:
    return f"{amount:g} ({amount / total:.0%})" if total else f"{amount:g}"


def spend_table(title: str, outcome: BatchOutcome, pool: Pool) -> Table:
    """Per tier: the answers (and their share), the images generated (explorations and
    escalations included: what was really spent), cost per image, spend (and its share), and
    mean quality; a total row. A tier the pool no longer has shows its cost as unknown."""
    table = Table(title=title)
    for column in ("tier", "answers", "images generated", "cost / image", "spend", "quality"):
        table.add_column(column, justify="left" if column == "tier" else "right")
    tiers = tier_order(pool, [*outcome.answers, *outcome.images])
    costs = pool.costs()
    spend = {t: outcome.images.get(t, 0) * costs[t] for t in tiers if t in costs}
    answered, total = sum(outcome.answers.values()), sum(spend.values())
    for tier in tiers:
        answers = outcome.answers.get(tier, 0)
        quality = outcome.quality.get(tier)
        table.add_row(
            tier,
            f"{answers} ({answers / answered:.0%})" if answered else "0",
            str(outcome.images.get(tier, 0)),
            f"{costs[tier]:g}" if tier in costs else "?",
            _share(spend[tier], total) if tier in spend else "?",
            "-" if quality is None else f"{quality:.4f}",
        )
    images = sum(outcome.images.values())
    table.add_row("total", str(answered), str(images), "", f"{total:g}", "", end_section=True)
    return table


def print_batch(console: Console, outcome: BatchOutcome, pool: Pool, image_store: Path) -> None:
    """The summary of a batch: states, the spend table, and where the images are."""
    states = ", ".join(f"{state} {n}" for state, n in sorted(outcome.states.items()))
    console.print(f"{len(outcome.requests)} requests: {states}")
    if outcome.answers:
        console.print(spend_table("per tier", outcome, pool))
    console.print(f"images: {image_store}/<request id>/<tier>.png", markup=False, soft_wrap=True)
    for request in outcome.requests:
        if request.status == RequestStatus.FAILED.value:
            console.print(
                f"[red]failed:[/red] {request.request_id}: {escape(str(request.failure_reason))}"
            )


# --- a time window (t2iroute report) ----------------------------------------------------------


def _fmt(value: float | None, spec: str = ".4f", unit: str = "") -> str:
    return "-" if value is None or math.isnan(value) else f"{value:{spec}}{unit}"


def _table(title: str, columns: Sequence[str]) -> Table:
    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    return table


def _spend_by_tier(tiers: Sequence[TierStats]) -> Table:
    table = _table(
        "spend per tier (images include explorations and escalations)",
        ("tier", "answers", "images", "cost/image", "spend"),
    )
    answered = sum(t.answers for t in tiers)
    for t in tiers:
        share = f" ({t.answers / answered:.0%})" if answered else ""
        table.add_row(
            t.tier, f"{t.answers}{share}", str(t.images), _fmt(t.cost, "g"), _fmt(t.spend, "g")
        )
    spend = sum(t.spend or 0.0 for t in tiers)
    images = sum(t.images for t in tiers)
    table.add_row("total", str(answered), str(images), "", f"{spend:g}", end_section=True)
    return table


def _quality_by_tier(tiers: Sequence[TierStats]) -> Table:
    """Quality over every scored image of the tier; generation latency of its images, and
    end-to-end time (created to done) of the requests it answered."""
    table = _table(
        "quality and latency per tier",
        ("tier", "quality", "scored", "gen p50 ms", "gen p95 ms", "e2e p50 s", "e2e p95 s"),
    )
    for t in tiers:
        table.add_row(
            t.tier,
            _fmt(t.quality_mean, ".3f"),
            str(t.quality_n),
            _fmt(t.latency_p50_ms, ".0f"),
            _fmt(t.latency_p95_ms, ".0f"),
            _fmt(t.end_to_end_p50_s, ".1f"),
            _fmt(t.end_to_end_p95_s, ".1f"),
        )
    return table


def print_report(console: Console, report: WindowReport) -> None:
    """The report as rich tables: states by tier, tiers, budget, router versions."""
    stamp = "%Y-%m-%d %H:%M UTC"
    console.print(
        f"[bold]{report.requests} requests created from {report.since:{stamp}} "
        f"to {report.until:{stamp}}[/bold]"
    )
    tiers = [t.tier for t in report.tiers]
    columns = tiers + ([UNDECIDED] if any(UNDECIDED in c for c in report.states.values()) else [])
    states = Table(title="requests by state and answering tier")
    states.add_column("state")
    for column in [*columns, "total"]:
        states.add_column(column, justify="right")
    order = [s.value for s in RequestStatus]
    for state in sorted(report.states, key=lambda s: order.index(s) if s in order else len(order)):
        counts = report.states[state]
        states.add_row(state, *(str(counts.get(c, 0)) for c in columns), str(sum(counts.values())))
    console.print(states)

    console.print(_spend_by_tier(report.tiers))
    console.print(_quality_by_tier(report.tiers))

    budget = Table(title="budget and policy", show_header=False)
    budget.add_column("what")
    budget.add_column("value", justify="right")
    used = report.charged / report.allowance if report.allowance else 0.0
    budget.add_row(
        "charged above the cheapest tier",
        f"{report.charged:g} of {report.allowance:g} allowed ({used:.0%})",
    )
    budget.add_row(
        "allowance",
        f"B {report.budget_per_request:g} x {report.decisions} decisions"
        f" + burst C {report.burst:g}",
    )
    budget.add_row("spend bucket now", _fmt(report.tokens_left, ".2f", " units"))
    latest = report.tradeoff_latest
    low, high = report.tradeoff_range or (None, None)
    budget.add_row(
        "trade-off lambda (latest; range)", f"{_fmt(latest)}; {_fmt(low)} .. {_fmt(high)}"
    )
    console.print(budget)

    versions = Table(title="router versions served")
    versions.add_column("version", no_wrap=True)
    for column in ("decisions", "first", "last", "mean lambda"):
        versions.add_column(column, justify="right")
    for v in report.versions:
        versions.add_row(
            v.version,
            str(v.decisions),
            f"{v.first:%m-%d %H:%M}",
            f"{v.last:%m-%d %H:%M}",
            _fmt(v.tradeoff_mean),
        )
    console.print(versions)


# --- the chart --------------------------------------------------------------------------------


def plot_window(series: Series, path: Path, title: str) -> None:
    """Two panels sharing the time axis: tier shares of the answers (stacked bars) and mean
    quality per tier (lines). Drawn on an Agg canvas, so no display is needed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 6.5), layout="constrained")
    FigureCanvasAgg(figure)
    shares_ax, quality_ax = figure.subplots(2, 1, sharex=True)
    centres = [start + series.width / 2 for start in series.starts]
    bar_width = series.width.total_seconds() / 86400 * 0.9  # matplotlib dates are in days
    bottom = np.zeros(len(centres))
    for tier, shares in series.shares.items():
        shares_ax.bar(centres, shares, width=bar_width, bottom=bottom, label=tier)
        bottom += np.asarray(shares)
    shares_ax.set_ylabel("share of answers")
    shares_ax.set_ylim(0, 1)
    shares_ax.legend(loc="upper left", fontsize="small", ncols=min(len(series.shares), 6))
    shares_ax.set_title(title)
    for tier, quality in series.quality.items():
        quality_ax.plot(centres, quality, marker="o", markersize=3, label=tier)
    quality_ax.set_ylabel("mean quality")
    quality_ax.set_xlabel("request created (UTC)")
    quality_ax.legend(loc="lower left", fontsize="small", ncols=min(len(series.quality), 6))
    locator = AutoDateLocator()
    quality_ax.xaxis.set_major_locator(locator)
    quality_ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
