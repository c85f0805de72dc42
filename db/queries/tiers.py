"""Tier health, the circuit breaker's state: each tier's failures in a row, and until when
its breaker is open."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.models import TierHealth
from db.queries.common import database_now, dialect_insert

__all__ = [
    "record_tier_failure",
    "record_tier_success",
    "tier_failure_counts",
    "unavailable_tiers",
]


def record_tier_failure(
    session: Session, tier: str, error: str, *, threshold: int, cooldown_seconds: float
) -> bool:
    """Count a failed generation on a tier; open its breaker at ``threshold`` failures in a
    row. True when this failure opened it (or kept it open)."""
    failures = session.scalar(
        dialect_insert(session, TierHealth)
        .values(tier=tier, consecutive_failures=1, last_error=error[:4000])
        .on_conflict_do_update(
            index_elements=[TierHealth.tier],
            set_={
                "consecutive_failures": TierHealth.consecutive_failures + 1,
                "last_error": error[:4000],
                "updated_at": func.now(),
            },
        )
        .returning(TierHealth.consecutive_failures)
    )
    if failures is None or failures < threshold:
        return False
    session.execute(
        update(TierHealth)
        .where(TierHealth.tier == tier)
        .values(open_until=database_now(session) + timedelta(seconds=cooldown_seconds))
    )
    return True


def record_tier_success(session: Session, tier: str) -> None:
    session.execute(
        update(TierHealth)
        .where(TierHealth.tier == tier, TierHealth.consecutive_failures > 0)
        .values(consecutive_failures=0, open_until=None, updated_at=func.now())
    )


def tier_failure_counts(session: Session) -> dict[str, int]:
    rows = session.execute(select(TierHealth.tier, TierHealth.consecutive_failures))
    return {tier: int(count) for tier, count in rows}


def unavailable_tiers(session: Session) -> dict[str, str]:
    """Tiers whose breaker is open now, with their last error."""
    rows = session.execute(
        select(TierHealth.tier, TierHealth.last_error).where(
            TierHealth.open_until > database_now(session)
        )
    )
    return {tier: error or "" for tier, error in rows}
