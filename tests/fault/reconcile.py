"""Reconciliation: what the database of a fault run says happened to every request, as
figures to print and invariants to assert."""

from __future__ import annotations

import io
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from tests.fault.stack import Stack

__all__ = ["Reconciliation", "reconcile"]


@dataclass
class Reconciliation:
    submitted: int
    statuses: Counter[str]
    failures: dict[str, str]
    #: Requests whose number of routing decisions is not exactly one.
    decision_count_off: dict[str, int]
    tiers: Counter[str]
    explored: int
    rerouted: Counter[str]
    reroute_reasons: Counter[str]
    generations: Counter[str]
    duplicate_generations: int
    duplicate_scores: int
    #: Done requests whose answer tier has no generation or no score.
    done_without_answer: list[str]
    images_on_disk: int
    decisions: int
    cloud_spends: int
    cloud_bound: float
    budget_counters: dict[str, int] | None
    #: (step, status) -> (rows, sends, max sends, failures).
    dispatches: dict[tuple[str, str], tuple[int, int, int, int]]
    latencies: list[float]
    span_seconds: float
    restarts: dict[str, int]
    notes: list[str] = field(default_factory=list)

    @property
    def done(self) -> int:
        return self.statuses["done"]

    @property
    def failed(self) -> int:
        return self.statuses["failed"]

    @property
    def unfinished(self) -> int:
        return self.submitted - self.done - self.failed

    @property
    def dispatch_failures(self) -> int:
        return sum(f for _, _, _, f in self.dispatches.values())

    @property
    def resends(self) -> int:
        """Sends beyond the first, over every dispatch."""
        return sum(sends - rows for rows, sends, _, _ in self.dispatches.values())

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    def render(self, title: str) -> str:
        table = Table(title=title, show_header=True)
        table.add_column("figure")
        table.add_column("value", justify="right")
        rows: list[tuple[str, Any]] = [
            ("submitted", self.submitted),
            ("done / failed / unfinished", f"{self.done} / {self.failed} / {self.unfinished}"),
            ("requests without exactly one decision", len(self.decision_count_off)),
            ("answer tier edge / cloud", f"{self.tiers['edge']} / {self.tiers['cloud']}"),
            ("explored (both tiers)", self.explored),
            ("rerouted from edge / cloud", f"{self.rerouted['edge']} / {self.rerouted['cloud']}"),
            (
                "generations edge / cloud",
                f"{self.generations['edge']} / {self.generations['cloud']}",
            ),
            (
                "duplicate generations / scores",
                f"{self.duplicate_generations} / {self.duplicate_scores}",
            ),
            ("done without a scored answer", len(self.done_without_answer)),
            ("images on disk", self.images_on_disk),
            (
                "cloud spends / bound (rho*N + C)",
                f"{self.cloud_spends} / {self.cloud_bound:.1f} (N={self.decisions})",
            ),
            (
                "cloud generations / bound",
                f"{self.generations['cloud']} / {self.cloud_bound:.1f}",
            ),
            ("budget keeper counters", self.budget_counters or "unreadable or empty"),
            ("dispatch failures / resends", f"{self.dispatch_failures} / {self.resends}"),
            ("worker restarts", self.restarts or 0),
        ]
        if self.latencies:
            rows += [
                ("throughput (done / s)", f"{self.done / max(self.span_seconds, 1e-9):.2f}"),
                (
                    "latency p50 / p99 (s)",
                    f"{self.percentile(0.5):.2f} / {self.percentile(0.99):.2f}",
                ),
                (
                    "latency mean / max (s)",
                    f"{statistics.fmean(self.latencies):.2f} / {max(self.latencies):.2f}",
                ),
            ]
        for name, value in rows:
            table.add_row(name, str(value))
        for (step, status), (n, sends, most, failures) in sorted(self.dispatches.items()):
            table.add_row(
                f"dispatch {step} {status}",
                f"{n} rows, {sends} sends (max {most}), {failures} failures",
            )
        for reason, n in self.reroute_reasons.most_common(5):
            table.add_row("reroute reason", f"{n} x {reason[:90]}")
        for reason, n in Counter(self.failures.values()).most_common(5):
            table.add_row("failure reason", f"{n} x {reason[:90]}")
        for note in self.notes:
            table.add_row("note", note)
        buffer = io.StringIO()
        # Reasons are data: "generate:cloud:" must not become an emoji, nor [x] markup.
        Console(file=buffer, width=140, markup=False, emoji=False).print(table)
        return buffer.getvalue()

    def check(self, allow_failure: Callable[[str], bool] | None = None) -> None:
        """The invariants of every run: everything final, every failure allowed, one
        decision per routed request, nothing written twice, the budget bound kept."""
        assert self.unfinished == 0, f"{self.unfinished} requests unfinished"
        refused = {
            rid: reason
            for rid, reason in self.failures.items()
            if allow_failure is None or not allow_failure(reason)
        }
        assert not refused, f"requests failed without a reason to: {refused}"
        undecided_ok = {rid for rid in self.failures if self.decision_count_off.get(rid) == 0}
        off = {r: n for r, n in self.decision_count_off.items() if r not in undecided_ok}
        assert not off, f"requests without exactly one decision: {off}"
        assert self.duplicate_generations == 0, "a (request, tier) has two generations"
        assert self.duplicate_scores == 0, "a (request, tier) has two quality scores"
        assert not self.done_without_answer, f"done without an answer: {self.done_without_answer}"
        assert self.images_on_disk == sum(self.generations.values()), (
            f"{self.images_on_disk} image files for {sum(self.generations.values())} generations"
        )
        assert self.cloud_spends <= self.cloud_bound, "the cloud budget bound is broken"
        assert self.generations["cloud"] <= self.cloud_bound, "cloud generations beyond budget"


def _budget_counters(stack: Stack) -> dict[str, int] | None:
    prefix = stack.settings.budget_key_prefix
    client = stack.budget()
    try:
        raw = client.hgetall(f"{prefix}:counters")
    except Exception:
        return None
    finally:
        client.close()
    return {(k if isinstance(k, str) else k.decode()): int(v) for k, v in raw.items()} or None


def reconcile(stack: Stack, ids: Sequence[str]) -> Reconciliation:
    settings = stack.settings
    wanted = list(ids)
    with stack.database() as conn:
        requests = conn.execute(
            "SELECT id, status, failure_reason, created_at, updated_at "
            "FROM generation_requests WHERE id = ANY(%s)",
            (wanted,),
        ).fetchall()
        decisions = conn.execute(
            "SELECT request_id, tier, json_array_length(explored) > 0, rerouted_from,"
            " reroute_reason FROM routing_decisions WHERE request_id = ANY(%s)",
            (wanted,),
        ).fetchall()
        generations = conn.execute(
            "SELECT request_id, tier, count(*) FROM generations WHERE request_id = ANY(%s) "
            "GROUP BY request_id, tier",
            (wanted,),
        ).fetchall()
        scores = conn.execute(
            "SELECT request_id, tier, count(*) FROM quality_scores WHERE request_id = ANY(%s) "
            "GROUP BY request_id, tier",
            (wanted,),
        ).fetchall()
        dispatches = {
            (str(step), str(status)): (int(n), int(sends), int(most), int(failures))
            for step, status, n, sends, most, failures in conn.execute(
                "SELECT step, status, count(*), sum(sends), max(sends), sum(failures) "
                "FROM dispatches WHERE request_id = ANY(%s) GROUP BY step, status",
                (wanted,),
            ).fetchall()
        }

    statuses = Counter(str(status) for _, status, *_ in requests)
    failures = {str(rid): str(reason) for rid, status, reason, *_ in requests if status == "failed"}
    per_request = Counter(str(row[0]) for row in decisions)
    decision_count_off = {rid: per_request[rid] for rid in wanted if per_request[rid] != 1}
    answer = {str(row[0]): str(row[1]) for row in decisions}
    generated = {(str(r), str(t)): int(n) for r, t, n in generations}
    scored = {(str(r), str(t)): int(n) for r, t, n in scores}
    done_ids = [str(rid) for rid, status, *_ in requests if status == "done"]
    rerouted_from = {str(row[0]): row[3] for row in decisions}
    spends = sum(
        1
        for row in decisions
        if row[1] == "cloud" or row[2] or rerouted_from.get(str(row[0])) == "cloud"
    )
    latencies = [
        (updated - created).total_seconds()
        for _, status, _, created, updated in requests
        if status == "done"
    ]
    span = (
        (
            max(u for *_, u in requests if u is not None)
            - min(c for *_, c, _ in requests if c is not None)
        ).total_seconds()
        if requests
        else 0.0
    )
    return Reconciliation(
        submitted=len(wanted),
        statuses=statuses,
        failures=failures,
        decision_count_off=decision_count_off,
        tiers=Counter(answer.values()),
        explored=sum(1 for row in decisions if row[2]),
        rerouted=Counter(str(v) for v in rerouted_from.values() if v is not None),
        reroute_reasons=Counter(str(row[4]) for row in decisions if row[4]),
        generations=Counter(
            {
                tier: sum(n for (_, t), n in generated.items() if t == tier)
                for tier in ("edge", "cloud")
            }
        ),
        duplicate_generations=sum(1 for n in generated.values() if n > 1),
        duplicate_scores=sum(1 for n in scored.values() if n > 1),
        done_without_answer=[
            rid
            for rid in done_ids
            if not generated.get((rid, answer.get(rid, ""))) or not scored.get((rid, answer[rid]))
        ],
        images_on_disk=sum(len(list((stack.image_store / rid).glob("*.png"))) for rid in wanted),
        decisions=len(decisions),
        cloud_spends=spends,
        cloud_bound=settings.cloud_ratio * len(decisions) + settings.cloud_burst,
        budget_counters=_budget_counters(stack),
        dispatches=dispatches,
        latencies=latencies,
        span_seconds=span,
        restarts=dict(stack.restarts),
    )
