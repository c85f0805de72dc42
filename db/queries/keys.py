"""API keys: every key listed, one revoked, and the key a hash belongs to. Making a key, and
hashing one, is ``workers.services.keys``'s: these statements only read and change rows."""

from __future__ import annotations

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.models import ApiKey

__all__ = [
    "api_key_by_hash",
    "api_keys",
    "revoke_api_key",
]


def api_keys(session: Session) -> list[ApiKey]:
    """Every key, revoked ones included, oldest first."""
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def revoke_api_key(session: Session, name: str) -> bool:
    """Revoke the live key named ``name`` from now on. False if there is none, or it was
    revoked already (the first revocation's time stands)."""
    result = session.execute(
        update(ApiKey)
        .where(ApiKey.name == name, ApiKey.revoked_at.is_(None))
        .values(revoked_at=func.now())
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def api_key_by_hash(session: Session, key_hash: str) -> ApiKey | None:
    """The key whose hash is ``key_hash``, revoked or not (an index lookup on the hash)."""
    return session.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash))
