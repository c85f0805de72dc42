"""What the queries of every subject share: the dialect's INSERT (which knows ON CONFLICT),
inserts that a unique constraint makes idempotent, the database's clock, and a ping.
``dialect_insert`` and ``as_datetime`` serve the subject modules of this package only: the
package does not re-export them."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, inspect, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import Base

__all__ = [
    "database_now",
    "insert_ignore",
    "insert_ignore_many",
    "ping",
]


def dialect_insert(session: Session, model: type[Base]) -> postgresql.Insert | sqlite.Insert:
    """The dialect's INSERT, which knows ON CONFLICT."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(model)
    if dialect == "sqlite":
        return sqlite.insert(model)
    raise RuntimeError(f"unsupported database dialect {dialect!r}")


def insert_ignore(session: Session, model: type[Base], values: dict[str, Any]) -> bool:
    """Insert one row unless a unique constraint already holds it. True if inserted.
    RETURNING, not rowcount: drivers disagree on rowcount for ON CONFLICT DO NOTHING."""
    statement = dialect_insert(session, model).values(**values).on_conflict_do_nothing()
    key = inspect(model).primary_key[0]
    return session.execute(statement.returning(key)).first() is not None


def insert_ignore_many(session: Session, model: type[Base], rows: Sequence[dict[str, Any]]) -> int:
    """Insert the rows no unique constraint already holds; the number inserted."""
    if not rows:
        return 0
    key = inspect(model).primary_key[0]
    statement = dialect_insert(session, model).values(list(rows)).on_conflict_do_nothing()
    return len(session.execute(statement.returning(key)).all())


def ping(session: Session) -> None:
    """Ask the database a trivial question (``SELECT 1``): it raises unless the database
    answers (the readiness probe)."""
    session.execute(text("SELECT 1"))


def database_now(session: Session) -> datetime:
    """The database's clock, the one every worker shares (not this host's)."""
    return as_datetime(session.scalar(select(func.now())))


def as_datetime(value: object) -> datetime:
    """An aware UTC timestamp; SQLite hands back naive ones, or text for an expression."""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    if not isinstance(moment, datetime):
        raise TypeError(f"not a timestamp: {value!r}")
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
