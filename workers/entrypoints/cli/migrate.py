"""``t2iroute migrate``: the database schema brought to the newest revision."""

from __future__ import annotations

from typing import Annotated

import typer

from workers.entrypoints.cli.output import console
from workers.settings import get_settings


def migrate(
    check: Annotated[
        bool, typer.Option(help="Only check that models and migrations agree.")
    ] = False,
) -> None:
    """Upgrade the database to the newest schema (alembic upgrade head)."""
    from db import migrate as db_migrate

    url = get_settings().database_url
    db_migrate.upgrade(url)
    if check:
        db_migrate.check(url)
    console.print("[green]database is at the newest revision[/green]")
