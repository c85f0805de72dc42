"""What operators read about the traffic: the requests of a time window (``t2iroute
report``), the outcome of a batch (``t2iroute submit --file``, the demo), and tier shares and
quality over time for a chart; ``workers.entrypoints.cli.report`` draws them.

Every tier name comes from the pool (or, for a tier since removed from it, from the rows
themselves); costs from the pool, the budget from ``BudgetLimits.from_settings``. The numbers
are read from the database only, so a report works on the embedded demo's SQLite as on
Postgres: aggregates that SQL states portably are computed there, percentiles and time bins
here."""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
from sqlalchemy.orm import Session

from db import queries
from db.models import FINAL_STATUSES
from workers.pool import Pool
from workers.services.budget import BudgetLimits
from workers.settings import Settings

__all__ = [
    "UNDECIDED",
    "BatchOutcome",
    "RequestOutcome",
    "Series",
    "TierStats",
    "VersionStats",
    "WindowReport",
    "batch_outcome",
    "parse_window",
    "read_series",
    "read_window",
    "tier_order",
]

_WINDOW = re.compile(r"(\d+(?:\.\d+)?)\s*([mhd])")
_UNITS = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1)}
#: The column of requests that have no routing decision yet.
UNDECIDED = "(not routed)"


def parse_window(text: str) -> timedelta:
    """``30m``, ``24h``, ``7d`` (minutes, hours, days; a fraction such as ``1.5h`` too)."""
    match = _WINDOW.fullmatch(text.strip().lower())
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a time span; write a number and m, h or d: 30m, 24h, 7d")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _utc(moment: datetime) -> datetime:
    """SQLite hands timestamps back naive; they are UTC (``CURRENT_TIMESTAMP``)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def tier_order(pool: Pool, seen: Iterable[str]) -> list[str]:
    """The pool's tiers, cheapest first, then any tier the rows name that the pool no longer
    has (a pool changed since), so that nothing read is left out."""
    names = list(pool.names)
    return names + sorted(set(seen) - set(names))


# --- a batch of requests (submit --file, the demo) --------------------------------------------


@dataclass(frozen=True)
class RequestOutcome:
    """One request of a batch: where it stands and, once answered, its tier and image."""

    request_id: str
    status: str
    tier: str | None
    #: The answer's image, relative to the image store; None until it is generated.
    image: str | None
    #: Mean quality of the answer's image over the metrics; None until it is scored.
    quality: float | None
    failure_reason: str | None


@dataclass(frozen=True)
class BatchOutcome:
    """A batch as the summary shows it: states, and per tier the answers, the images made
    (explorations and escalations included: what was spent) and their mean quality."""

    states: Counter[str]
    answers: Counter[str]
    images: Counter[str]
    quality: dict[str, float]
    requests: list[RequestOutcome]

    @property
    def unfinished(self) -> int:
        final = {s.value for s in FINAL_STATUSES}
        return sum(n for state, n in self.states.items() if state not in final)

    @property
    def extra_images(self) -> int:
        """Images beyond the answers: the exploration labels and escalations paid for."""
        return sum(self.images.values()) - sum(
            1 for r in self.requests if r.tier is not None and r.image is not None
        )


def batch_outcome(session: Session, request_ids: Sequence[str]) -> BatchOutcome:
    """The outcome of these requests, in their order, in four statements."""
    ids = list(request_ids)
    rows = queries.batch_rows(session, ids)
    images: dict[tuple[str, str], str] = {}
    made: Counter[str] = Counter()
    for request_id, tier, path in rows.images:
        images[(request_id, tier)] = path
        made[tier] += 1
    scores: dict[tuple[str, str], float] = {}
    by_tier: defaultdict[str, list[float]] = defaultdict(list)
    for request_id, tier, score in rows.scores:
        scores[(request_id, tier)] = score
        by_tier[tier].append(score)
    outcomes = []
    for request_id in ids:
        state, reason = rows.requests.get(request_id, (None, None))
        answer = rows.answers.get(request_id)
        outcomes.append(
            RequestOutcome(
                request_id=request_id,
                status=state.value if state is not None else "unknown",
                tier=answer,
                image=images.get((request_id, answer)) if answer else None,
                quality=scores.get((request_id, answer)) if answer else None,
                failure_reason=reason,
            )
        )
    return BatchOutcome(
        states=Counter(o.status for o in outcomes),
        answers=Counter(o.tier for o in outcomes if o.tier is not None),
        images=made,
        quality={tier: float(np.mean(values)) for tier, values in by_tier.items()},
        requests=outcomes,
    )


# --- a time window (t2iroute report) ----------------------------------------------------------


@dataclass(frozen=True)
class TierStats:
    tier: str
    answers: int
    images: int
    cost: float | None
    quality_mean: float | None
    quality_n: int
    #: Generation latency (ms) of the tier's images, and end-to-end seconds (created to done)
    #: of the requests it answered.
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    end_to_end_p50_s: float | None
    end_to_end_p95_s: float | None

    @property
    def spend(self) -> float | None:
        return None if self.cost is None else self.images * self.cost


@dataclass(frozen=True)
class VersionStats:
    version: str
    decisions: int
    first: datetime
    last: datetime
    tradeoff_mean: float


@dataclass(frozen=True)
class WindowReport:
    """The requests created in ``[since, until]`` and everything about them."""

    since: datetime
    until: datetime
    #: state -> tier answering (UNDECIDED before routing) -> requests.
    states: dict[str, Counter[str]]
    tiers: list[TierStats]
    decisions: int
    #: Extra cost above the cheapest tier that the budget keeper charged (explorations
    #: included), and what it allows over those decisions: B per decision plus burst C.
    charged: float
    budget_per_request: float
    burst: float
    #: Lambda of the policy: the latest decision's, and the range over the window.
    tradeoff_latest: float | None
    tradeoff_range: tuple[float, float] | None
    versions: list[VersionStats]
    #: Units left in the budget keeper's spend bucket now; None where it cannot be read.
    tokens_left: float | None

    @property
    def allowance(self) -> float:
        return self.budget_per_request * self.decisions + self.burst

    @property
    def requests(self) -> int:
        return sum(sum(c.values()) for c in self.states.values())


def read_window(session: Session, settings: Settings, span: timedelta) -> WindowReport:
    """Gather the report of the requests created in the last ``span`` (database clock)."""
    until = queries.database_now(session)
    since = until - span
    states: dict[str, Counter[str]] = defaultdict(Counter)
    for status, tier, n in queries.requests_by_state_and_tier(session, created_since=since):
        states[status.value][tier or UNDECIDED] += n
    decisions = queries.window_decisions(session, since)
    limits = BudgetLimits.from_settings(settings)
    tradeoffs = [d.tradeoff for d in decisions]
    return WindowReport(
        since=_utc(since),
        until=_utc(until),
        states=dict(states),
        tiers=_tier_stats(session, settings.pool, since),
        decisions=len(decisions),
        charged=float(sum(d.spent for d in decisions)),
        budget_per_request=limits.budget_per_request,
        burst=limits.burst,
        tradeoff_latest=tradeoffs[-1] if tradeoffs else None,
        tradeoff_range=(min(tradeoffs), max(tradeoffs)) if tradeoffs else None,
        versions=_versions(decisions),
        tokens_left=_tokens_left(settings),
    )


def _tier_stats(session: Session, pool: Pool, since: datetime) -> list[TierStats]:
    answers = Counter(queries.window_answers(session, since))
    latencies: defaultdict[str, list[float]] = defaultdict(list)
    for tier, latency in queries.window_latencies(session, since):
        latencies[tier].append(latency)
    quality = queries.window_quality(session, since)
    end_to_end: defaultdict[str, list[float]] = defaultdict(list)
    for tier, created, updated in queries.window_done(session, since):
        end_to_end[tier].append((_utc(updated) - _utc(created)).total_seconds())
    costs = pool.costs()
    return [
        TierStats(
            tier=tier,
            answers=answers.get(tier, 0),
            images=len(latencies.get(tier, ())),
            cost=costs.get(tier),
            quality_mean=quality[tier][0] if tier in quality else None,
            quality_n=quality[tier][1] if tier in quality else 0,
            latency_p50_ms=_percentile(latencies.get(tier, []), 50),
            latency_p95_ms=_percentile(latencies.get(tier, []), 95),
            end_to_end_p50_s=_percentile(end_to_end.get(tier, []), 50),
            end_to_end_p95_s=_percentile(end_to_end.get(tier, []), 95),
        )
        for tier in tier_order(pool, [*answers, *latencies, *quality])
    ]


def _versions(decisions: Sequence[tuple[str, datetime, float, float]]) -> list[VersionStats]:
    grouped: defaultdict[str, list[tuple[datetime, float]]] = defaultdict(list)
    for version, at, tradeoff, _ in decisions:
        grouped[version].append((_utc(at), tradeoff))
    return sorted(
        (
            VersionStats(
                version=version,
                decisions=len(rows),
                first=min(at for at, _ in rows),
                last=max(at for at, _ in rows),
                tradeoff_mean=float(np.mean([t for _, t in rows])),
            )
            for version, rows in grouped.items()
        ),
        key=lambda v: v.first,
    )


def _tokens_left(settings: Settings) -> float | None:
    """The shared spend bucket now, read from the budget Redis; None with the in-process
    keeper (each process has its own) or when Redis cannot be reached (a report must not
    fail for it)."""
    if settings.budget_backend != "redis":
        return None
    from workers.services.budget import budget_keeper_from_settings

    try:
        return budget_keeper_from_settings(settings).stats()["spend_tokens"]
    except Exception:
        return None


# --- the chart --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    """Per time bin: each tier's share of the answers and its mean quality (NaN: none)."""

    starts: list[datetime]
    width: timedelta
    shares: dict[str, list[float]]
    quality: dict[str, list[float]]


def read_series(session: Session, pool: Pool, report: WindowReport, bins: int) -> Series:
    """Bins of equal width over the report's window, by the request's creation time."""
    width = (report.until - report.since) / bins
    starts = [report.since + i * width for i in range(bins)]

    def bin_of(moment: datetime) -> int:
        return min(int((_utc(moment) - report.since) / width), bins - 1)

    answers: defaultdict[str, list[int]] = defaultdict(lambda: [0] * bins)
    for tier, created in queries.window_answer_times(session, report.since):
        answers[tier][bin_of(created)] += 1
    sums: defaultdict[str, list[list[float]]] = defaultdict(lambda: [[] for _ in range(bins)])
    for tier, created, score in queries.window_score_times(session, report.since):
        sums[tier][bin_of(created)].append(score)
    tiers = tier_order(pool, [*answers, *sums])
    totals = [sum(answers[t][i] for t in answers) for i in range(bins)]
    return Series(
        starts=starts,
        width=width,
        shares={
            t: [answers[t][i] / totals[i] if totals[i] else 0.0 for i in range(bins)] for t in tiers
        },
        quality={t: [float(np.mean(v)) if v else math.nan for v in sums[t]] for t in tiers},
    )
