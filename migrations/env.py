"""Alembic environment: the URL comes from the caller's config or from the settings object."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from db.models import Base
from db.session import get_engine
from workers.settings import get_settings

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    return config.get_main_option("sqlalchemy.url") or get_settings().database_url


def _configure(connection: Connection | None = None, url: str | None = None) -> None:
    context.configure(
        connection=connection,
        url=url,
        target_metadata=target_metadata,
        render_as_batch=_url().startswith("sqlite"),
        compare_type=True,
        literal_binds=connection is None,
    )


def run_migrations_offline() -> None:
    _configure(url=_url())
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    with get_engine(_url()).connect() as connection:
        if connection.dialect.name == "sqlite":
            # A batch migration rebuilds a table by dropping it, and with foreign keys on, the
            # drop of a parent cascades into its children's rows. (sqlite3 sends a PRAGMA
            # outside any transaction, where it takes effect.)
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()
        if connection.dialect.name == "sqlite":
            connection.exec_driver_sql("PRAGMA foreign_keys=ON")


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
