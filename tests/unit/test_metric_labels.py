"""The label values of workers/services/telemetry.py stay in their fixed sets: the budget keeper's
real
reasons, real exceptions of each kind, and callback outcomes map to the buckets the dashboard
and alerts are written against."""

from __future__ import annotations

import pytest
import redis.exceptions
import sqlalchemy.exc
import torch
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from kombu.exceptions import OperationalError as BrokerError
from prometheus_client import Counter

from workers.services.budget import BudgetLimits, LocalBudgetKeeper, RedisBudgetKeeper, budget_redis
from workers.services.telemetry import (
    CALLBACKS,
    DECISIONS,
    EXPLORATIONS,
    STATE_FAMILIES,
    WORKER_METRICS,
    decision_outcome,
    exported_series,
    failure_reason,
    outage,
    record_callback,
    record_decisions,
)

COSTS = {"edge": 1.0, "cloud": 10.0}


def value(metric: Counter, **labels: str) -> float:
    """A counter's value for these labels, read through the collector interface."""
    return sum(
        sample.value
        for family in metric.collect()
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels == labels
    )


def test_the_budget_keepers_reasons_map_to_their_outcomes() -> None:
    generous = LocalBudgetKeeper(BudgetLimits(COSTS, budget_per_request=9.0, burst=9.0))
    broke = LocalBudgetKeeper(BudgetLimits(COSTS, budget_per_request=0.0, burst=9.0))
    slow = LocalBudgetKeeper(
        BudgetLimits(COSTS, budget_per_request=9.0, burst=9.0, rate_per_second=1e-6, rate_burst=9.0)
    )
    unreachable = RedisBudgetKeeper(
        budget_redis("redis://127.0.0.1:1/0", 0.2), BudgetLimits(COSTS, 9.0, 9.0)
    )
    cases = {
        generous: "granted",
        broke: "budget_exhausted",
        slow: "rate_exhausted",
        unreachable: "keeper_unavailable",
    }
    for keeper, outcome in cases.items():
        reason = keeper.decide("r1", preference=["cloud", "edge"]).reason
        assert decision_outcome(reason) == outcome, reason
    assert decision_outcome("something new") == "other"


def test_exceptions_map_to_failure_reasons_and_outages() -> None:
    assert failure_reason(SoftTimeLimitExceeded()) == "time_limit"
    assert failure_reason(TimeLimitExceeded(60)) == "time_limit"
    assert failure_reason(torch.cuda.OutOfMemoryError("CUDA out of memory")) == "out_of_memory"
    assert failure_reason(MemoryError()) == "out_of_memory"
    assert failure_reason(FileNotFoundError("no model_index.json")) == "io"
    assert failure_reason(ValueError("bad")) == "error"

    assert outage(sqlalchemy.exc.OperationalError("SELECT 1", None, OSError())) == "database"
    assert outage(sqlalchemy.exc.InterfaceError("SELECT 1", None, OSError())) == "database"
    assert outage(redis.exceptions.ConnectionError()) == "redis"
    assert outage(redis.exceptions.TimeoutError()) == "redis"
    assert outage(BrokerError("gone")) == "broker"
    assert outage(ConnectionResetError()) == "connection"


def test_decisions_are_counted_by_tier_wanted_outcome_and_explorations() -> None:
    before = value(DECISIONS, tier="edge", wanted="cloud", outcome="budget_exhausted")
    explored_before = value(EXPLORATIONS, tier="cloud")
    record_decisions(
        [
            {
                "tier": "edge",
                "wanted_tier": "cloud",
                "budget_reason": "wanted cloud: budget exhausted",
                "explored": ["cloud"],
            }
        ]
    )
    assert value(DECISIONS, tier="edge", wanted="cloud", outcome="budget_exhausted") == before + 1
    assert value(EXPLORATIONS, tier="cloud") == explored_before + 1


def test_a_callback_outcome_outside_the_set_is_refused() -> None:
    before = value(CALLBACKS, outcome="delivered")
    record_callback("delivered")
    assert value(CALLBACKS, outcome="delivered") == before + 1
    with pytest.raises(ValueError, match="lost in the post"):
        record_callback("lost in the post")  # type: ignore[arg-type]


def test_exported_series_name_every_sample_once_per_family() -> None:
    series = exported_series()
    assert {
        "t2iroute_decisions_total",
        "t2iroute_generation_seconds_bucket",
        "t2iroute_generation_seconds_count",
        "t2iroute_quality_score_sum",
        "t2iroute_callbacks_total",
        "t2iroute_requests_refused_total",
        "t2iroute_router_info",
        "t2iroute_budget_spent_units_total",
        "t2iroute_queue_messages",
    } <= series
    assert "t2iroute_decisions" not in series, "a counter's samples end in _total"
    families = [m.name for metric in WORKER_METRICS for m in metric.describe()]
    families += [family.name for family in STATE_FAMILIES]
    assert len(families) == len(set(families)), "no family is defined twice"
