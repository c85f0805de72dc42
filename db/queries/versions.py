"""Router versions: the registered ones, the active one, promotion and deactivation, and
each version's history of events."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.models import RouterEventRow, RouterVersion

__all__ = [
    "active_router_version",
    "deactivate_router_versions",
    "promote_router_version",
    "record_router_event",
    "router_events",
    "router_version",
    "router_versions",
]


def router_versions(session: Session, *, lock: bool = False) -> list[RouterVersion]:
    """Every registered router version, oldest first. ``lock`` takes their row locks until
    the transaction ends, so that two promotions or rollbacks (or one and the retraining
    job's promotion) read the serving history one after the other, never both before
    either writes."""
    query = select(RouterVersion).order_by(RouterVersion.id)
    if lock:
        query = query.with_for_update()
    return list(session.scalars(query))


def router_version(session: Session, version: str) -> RouterVersion | None:
    return session.scalar(select(RouterVersion).where(RouterVersion.version == version))


def active_router_version(session: Session) -> RouterVersion | None:
    return session.scalar(select(RouterVersion).where(RouterVersion.is_active.is_(True)))


def promote_router_version(session: Session, version_id: int) -> None:
    """Make one version the only active one, in one transaction."""
    deactivate_router_versions(session)
    session.execute(
        update(RouterVersion)
        .where(RouterVersion.id == version_id)
        .values(is_active=True, promoted_at=func.now())
    )


def deactivate_router_versions(session: Session) -> None:
    """No version active: the default policy serves (a rollback past the first version)."""
    session.execute(
        update(RouterVersion).where(RouterVersion.is_active.is_(True)).values(is_active=False)
    )
    session.flush()


def record_router_event(
    session: Session,
    version: str,
    event: str,
    *,
    actor: str,
    reason: str,
    details: dict[str, Any] | None = None,
) -> None:
    """Append one event to a router version's history (``db.models.RouterEvent``)."""
    session.add(
        RouterEventRow(
            version=version, event=event, actor=actor, reason=reason, details=details or {}
        )
    )
    session.flush()


def router_events(session: Session, version: str | None = None) -> list[RouterEventRow]:
    """The history of one version, or of all of them, oldest first."""
    query = select(RouterEventRow).order_by(RouterEventRow.id)
    if version is not None:
        query = query.where(RouterEventRow.version == version)
    return list(session.scalars(query))
