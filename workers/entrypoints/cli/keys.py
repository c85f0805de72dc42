"""``t2iroute keys``: make, list and revoke the HTTP API's keys (``workers.services.keys``),
which each command imports, with the database, when it runs."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from workers.settings import get_settings

keys_app = typer.Typer(help="API keys of the HTTP API.", no_args_is_help=True)
console = Console()
notices = Console(stderr=True)


@keys_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="A name for the key, unique (e.g. the service).")],
    admin: Annotated[
        bool, typer.Option("--admin", help="The key reads and cancels every request.")
    ] = False,
) -> None:
    """Make a key. It is printed once, with its callback secret: only its hash is kept."""
    from db.session import session_scope
    from workers.services import keys

    try:
        with session_scope(get_settings().database_url) as session:
            made = keys.create_key(session, name, admin=admin)
    except (keys.KeyExists, ValueError) as exc:
        typer.secho(str(exc), err=True, fg="red")
        raise typer.Exit(2) from None
    # Plain lines on stdout, so that a script can take them: key, then callback secret.
    typer.echo(f"key: {made.key}")
    typer.echo(f"callback secret: {made.callback_secret}")
    notices.print(
        f"[yellow]{made.name}{' (admin)' if admin else ''}: store both now; "
        "neither can be shown again[/yellow]"
    )


@keys_app.command("list")
def list_() -> None:
    """Every key: name, the start of the key, admin or not, made, revoked."""
    from db.session import session_scope
    from workers.services import keys

    with session_scope(get_settings().database_url) as session:
        rows = keys.list_keys(session)
    table = Table("name", "key", "admin", "created", "revoked")
    for row in rows:
        table.add_row(
            row.name,
            f"{row.key_prefix}…",
            "yes" if row.is_admin else "",
            f"{row.created_at:%Y-%m-%d %H:%M}",
            "" if row.revoked_at is None else f"{row.revoked_at:%Y-%m-%d %H:%M}",
        )
    console.print(table)


@keys_app.command("revoke")
def revoke(name: Annotated[str, typer.Argument(help="The key's name.")]) -> None:
    """Revoke a key: from now on every request with it is refused (401)."""
    from db.session import session_scope
    from workers.services import keys

    with session_scope(get_settings().database_url) as session:
        revoked = keys.revoke_key(session, name)
    if not revoked:
        typer.secho(f"no live key named {name!r}", err=True, fg="red")
        raise typer.Exit(1)
    console.print(f"revoked {name}")
