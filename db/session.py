"""Engine and session. One engine per URL per process; one session per task, committed in
one place (``session_scope``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

_engines: dict[str, Engine] = {}
_sessionmakers: dict[str, sessionmaker[Session]] = {}


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # The embedded demo runs several worker processes on one SQLite file: WAL lets readers
    # run beside the writer, and busy_timeout makes writers wait instead of failing.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


# Pre-ping costs a round trip on every checkout. Worker processes turn it off
# (``skip_pre_ping``): a pooled connection that a database restart broke fails its
# statement instead, the tasks retry sqlalchemy's OperationalError and InterfaceError as
# transient with backoff, and the disconnect error invalidates the whole pool, so the
# retry connects afresh. The API and the CLI keep it: a request that a client made must
# not fail on a connection the database closed an hour ago.
_pre_ping = True

# A database that does not answer (a partition, a host gone without a reset) fails a
# connection attempt after this many seconds, as a refused one fails at once, so that the
# API answers 503 and the tasks retry instead of waiting for the kernel's TCP timeout. A
# ``connect_timeout`` in the URL wins.
CONNECT_TIMEOUT_SECONDS = 10


def skip_pre_ping() -> None:
    """No pre-ping for the engines this process creates from now on (worker processes)."""
    global _pre_ping
    _pre_ping = False


def get_engine(url: str) -> Engine:
    if url not in _engines:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": 30})
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            stated = "connect_timeout" in make_url(url).query
            engine = create_engine(
                url,
                pool_pre_ping=_pre_ping,
                pool_size=5,
                max_overflow=5,
                connect_args={} if stated else {"connect_timeout": CONNECT_TIMEOUT_SECONDS},
            )
        _engines[url] = engine
    return _engines[url]


def get_sessionmaker(url: str) -> sessionmaker[Session]:
    if url not in _sessionmakers:
        _sessionmakers[url] = sessionmaker(get_engine(url), expire_on_commit=False)
    return _sessionmakers[url]


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """Commit on success, roll back on any error."""
    session = get_sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def dispose_engines() -> None:
    """Drop pooled connections inherited across a fork: they are not fork-safe."""
    for engine in _engines.values():
        engine.dispose(close=False)
