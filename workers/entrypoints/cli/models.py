"""``t2iroute models list|show|promote|rollback`` and ``t2iroute retrain``: the router
versions an operator inspects, promotes and rolls back, drawn with rich. What a version is,
and how it is promoted or rolled back, is ``workers.services.router_versions``'; this module
opens the session, renders, and turns a refusal into exit 2. The database and the router
registry are imported by the command that runs, not by ``t2iroute --help``."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table

from workers.entrypoints.cli.output import console, log_at
from workers.settings import get_settings

if TYPE_CHECKING:
    from workers.services.router_versions import (
        Change,
        EventView,
        Listing,
        VersionDetail,
        VersionView,
    )

models_app = typer.Typer(
    help="Router versions: list, show, promote, roll back.", no_args_is_help=True
)


def _when(at: datetime | None) -> str:
    return "-" if at is None else at.strftime("%Y-%m-%d %H:%M:%S")


def _value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def evaluation_items(evaluation: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Whatever keys the evaluation holds, nested ones as ``outer.inner``, in stored order:
    the retraining job decides what it measures, this only shows it."""
    items: list[tuple[str, str]] = []
    for key, value in evaluation.items():
        if isinstance(value, Mapping):
            items += evaluation_items(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", _value(value)))
    return items


def _clip(text: str, limit: int = 40) -> str:
    """A long entry (the gate's sentence) cut short in the table; ``models show`` has it all."""
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _minute(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M")


def _intervals(view: VersionView, when: Callable[[datetime], str] = _when, gap: str = " ") -> str:
    open_end = "now" if view.active else "unrecorded"
    return "\n".join(
        f"{when(i.start)}{gap}-> {when(i.end) if i.end else open_end}" for i in view.served
    )


def _version_cell(view: VersionView) -> str:
    name = f"[bold green]* {view.version}[/]" if view.active else f"[bold]{view.version}[/]"
    missing = "" if view.files_present else "\n[red]files missing[/]"
    return (
        f"{name}\n[dim]{view.kind}\n{view.n_train_pairs} pairs\n"
        f"created\n{_minute(view.created_at)}[/]{missing}"
    )


def _gate_cell(gate: EventView | None) -> str:
    from db.models import RouterEvent

    if gate is None:
        return "-"
    colour = "green" if gate.event == RouterEvent.PROMOTED else "yellow"
    return f"[{colour}]{gate.event}[/]\n[dim]{gate.at:%Y-%m-%d}\n{gate.at:%H:%M}[/]"


def _evaluation_grid(evaluation: Mapping[str, Any]) -> Table | str:
    items = evaluation_items(evaluation)
    if not items:
        return "-"
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column(overflow="fold")
    for key, value in items:
        grid.add_row(key, _clip(value))
    return grid


def render_listing(listing: Listing, console: Console) -> None:
    """One row per version, oldest first; ``*`` marks the one serving. Long evaluation
    entries are cut short here and shown whole by ``models show``."""
    table = Table(title="router versions", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("version", overflow="fold", min_width=16)
    table.add_column("held-out evaluation", min_width=24)
    table.add_column("served (UTC)", min_width=16)
    table.add_column("gate", min_width=10)
    for view in listing.versions:
        table.add_row(
            _version_cell(view),
            _evaluation_grid(view.evaluation),
            _intervals(view, _minute, "\n") or "never",
            _gate_cell(view.gate),
            end_section=True,
        )
    console.print(table if listing.versions else "no router versions registered")
    console.print(f"serving now: [bold]{listing.serving}[/]")


def render_detail(detail: VersionDetail, console: Console) -> None:
    from routing.registry import MANIFEST

    view = detail.version
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column(overflow="fold")
    files = "present" if view.files_present else f"[red]missing ({MANIFEST})[/]"
    for name, value in (
        ("kind", view.kind),
        ("path", f"{view.path} [dim]({files})[/]"),
        ("trained on", f"{view.n_train_pairs} pairs"),
        ("created", _when(view.created_at)),
        ("last promoted", _when(view.promoted_at)),
        ("serving now", "[bold green]yes[/]" if view.active else "no"),
        ("served (UTC)", _intervals(view) or "never"),
    ):
        facts.add_row(name, value)
    evaluation = Table(title="held-out evaluation", title_justify="left")
    evaluation.add_column("measure")
    evaluation.add_column("value", justify="right", overflow="fold")
    for key, value in evaluation_items(view.evaluation):
        evaluation.add_row(key, value)
    events = Table(title="history", title_justify="left")
    for column in ("at (UTC)", "event", "actor", "reason", "details"):
        events.add_column(column, overflow="fold")
    for event in detail.events:
        events.add_row(
            _when(event.at),
            event.event,
            event.actor,
            event.reason,
            json.dumps(event.details) if event.details else "",
        )
    console.print(
        Panel(
            Group(facts, "", evaluation, "", events if detail.events else "no events recorded"),
            title=f"router version {view.version}",
            title_align="left",
        )
    )


def render_change(change: Change, action: str, console: Console, reload_seconds: float) -> None:
    if not change.changed:
        console.print(f"{change.serving} already serves: nothing changed")
        return
    console.print(
        f"{action} {change.left} -> {change.serving}: [bold]{change.serving}[/] now serves "
        f"(router workers load it within {reload_seconds:g} s)"
    )


# Commands: one session each, committed in one place.

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
ReasonOption = Annotated[str, typer.Option(help="Why: recorded in the version's history.")]


@contextmanager
def _refusals() -> Iterator[None]:
    from workers.services.router_versions import VersionError

    try:
        yield
    except VersionError as exc:
        # Plain text on stderr: the message, neither markup nor wrapping.
        typer.secho(str(exc), err=True, fg="red")
        raise typer.Exit(2) from None


@models_app.command("list")
def list_(as_json: JsonOption = False) -> None:
    """Every router version: held-out evaluation, when it served, the gate's last verdict."""
    from db.session import session_scope
    from workers.services.router_versions import baseline_version, list_versions

    settings = get_settings()
    with session_scope(settings.database_url) as session:
        listing = list_versions(session, baseline_version(settings.default_policy))
    if as_json:
        typer.echo(json.dumps(listing.as_dict(), indent=2))
    else:
        render_listing(listing, console)


@models_app.command("show")
def show(version: str, as_json: JsonOption = False) -> None:
    """One router version: its files, evaluation, served intervals and event history."""
    from db.session import session_scope
    from workers.services.router_versions import show_version

    with _refusals(), session_scope(get_settings().database_url) as session:
        detail = show_version(session, version)
    if as_json:
        typer.echo(json.dumps(detail.as_dict(), indent=2))
    else:
        render_detail(detail, console)


@models_app.command("promote")
def promote(version: str, reason: ReasonOption = "promoted by an operator") -> None:
    """Make VERSION the router that serves; router workers load it without a restart."""
    from db.session import session_scope
    from workers.services.router_versions import baseline_version, operator, promote_version

    settings = get_settings()
    with _refusals(), session_scope(settings.database_url) as session:
        change = promote_version(
            session,
            version,
            actor=operator(),
            reason=reason,
            baseline=baseline_version(settings.default_policy),
        )
    render_change(change, "promoted", console, settings.router_reload_seconds)


@models_app.command("rollback")
def rollback(reason: ReasonOption = "rolled back by an operator") -> None:
    """Go back to the version that served before the active one, or to the default policy."""
    from db.session import session_scope
    from workers.services.router_versions import baseline_version, operator, rollback_version

    settings = get_settings()
    with _refusals(), session_scope(settings.database_url) as session:
        change = rollback_version(
            session,
            actor=operator(),
            reason=reason,
            baseline=baseline_version(settings.default_policy),
        )
    render_change(change, "rolled back", console, settings.router_reload_seconds)


def retrain() -> None:
    """Train a candidate router on the stored pairs now, and promote it if the gate finds it
    better; waits for nobody: exits 1 when another retraining run holds the lock."""
    from workers.services.retraining import retrain_lock, retrain_router

    log_at("INFO")
    settings = get_settings()
    with retrain_lock(settings) as held:
        if not held:
            typer.echo("another retraining run holds the lock", err=True)
            raise typer.Exit(1)
        typer.echo(json.dumps(retrain_router(settings).as_dict(), indent=2))
