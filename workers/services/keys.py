"""API keys of the HTTP API: made, listed, revoked and checked.

A key is 32 random bytes (256 bits) from ``secrets``, shown once when it is made; the
database keeps its SHA-256. A slow password hash (bcrypt, argon2) exists to make guessing a
low-entropy password from its hash expensive; a 256-bit random key cannot be guessed either
way, so one SHA-256 is as safe and lets a request find its key by an index lookup on the
hash instead of trying every key's salt. Whoever reads the table learns no key.

Each key also has a callback secret, shown with it, with which the callbacks to the URLs of
its requests are signed (HMAC); the receiver checks them with it."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db import queries
from db.models import ApiKey

__all__ = [
    "KEY_PREFIX",
    "Caller",
    "KeyExists",
    "NewKey",
    "authenticate",
    "create_key",
    "hash_key",
    "list_keys",
    "revoke_key",
]

#: Every key starts with this, so that a key pasted into the wrong place is recognisable
#: (secret scanners match such prefixes).
KEY_PREFIX = "t2i_"
#: The characters of a key kept in clear, to name it in listings and logs.
SHOWN_CHARS = 8
MAX_NAME_CHARS = 100


class KeyExists(ValueError):
    """A key of that name exists already (revoked or not: names are never reused)."""


@dataclass(frozen=True)
class NewKey:
    """A key as made: the only time the key and its callback secret are seen in clear."""

    name: str
    key: str
    callback_secret: str
    is_admin: bool


@dataclass(frozen=True)
class Caller:
    """Who makes an HTTP request: an API key (its id), or nobody where auth is off.
    ``sees_all``: it may read every request, not only its own (an admin key, or anyone
    where auth is off)."""

    key_id: int | None
    name: str | None
    sees_all: bool

    def may_see(self, owner: int | None) -> bool:
        return self.sees_all or (self.key_id is not None and owner == self.key_id)


def hash_key(key: str) -> str:
    """The SHA-256 of a key, hex; what the database stores and looks keys up by."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def _check_name(name: str) -> str:
    if not 1 <= len(name) <= MAX_NAME_CHARS or not name.isprintable() or name != name.strip():
        raise ValueError(
            f"a key's name has 1 to {MAX_NAME_CHARS} printable characters, "
            "without surrounding spaces"
        )
    return name


def create_key(session: Session, name: str, *, admin: bool = False) -> NewKey:
    """Make a key named ``name``; KeyExists if the name is taken."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    made = NewKey(
        name=_check_name(name),
        key=key,
        callback_secret=secrets.token_urlsafe(32),
        is_admin=admin,
    )
    row = ApiKey(
        name=made.name,
        key_prefix=key[:SHOWN_CHARS],
        key_hash=hash_key(key),
        is_admin=admin,
        callback_secret=made.callback_secret,
    )
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:
        raise KeyExists(f"a key named {name!r} exists already") from None
    return made


def list_keys(session: Session) -> list[ApiKey]:
    """Every key, revoked ones included, oldest first."""
    return queries.api_keys(session)


def revoke_key(session: Session, name: str) -> bool:
    """Revoke the key named ``name`` from now on. False if there is none, or it was revoked
    already (the first revocation's time stands)."""
    return queries.revoke_api_key(session, name)


def authenticate(session: Session, key: str) -> ApiKey | None:
    """The live key ``key`` is, or None (unknown or revoked). The lookup compares hashes, so
    whatever its timing tells is about the hash of a guess, which says nothing of any key."""
    row = queries.api_key_by_hash(session, hash_key(key))
    return None if row is None or row.revoked_at is not None else row
