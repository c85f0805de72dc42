"""Router versions: list, show, promote and roll back the routers that serve.

``router_versions.is_active`` says which version serves now and ``router_events`` how it
came to (migration 0005); every interval a version served is read back from that history.
Router workers pick a change up at their next refresh
(``workers.services.router.RouterService.refresh``), with no restart.

``promote`` is the one promotion sequence: an operator's ``promote_version`` and the
retraining gate (``workers.services.retraining``) both call it. Every function takes the
caller's ``Session`` and returns data, whose times are all aware and in UTC; the caller
commits, and renders (``t2iroute models``, ``workers.entrypoints.cli.models``)."""

from __future__ import annotations

import getpass
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from db import queries
from db.models import RouterEvent, RouterEventRow, RouterVersion
from routing.registry import MANIFEST

__all__ = [
    "BASELINE_PREFIX",
    "Change",
    "EventView",
    "Interval",
    "Listing",
    "VersionDetail",
    "VersionError",
    "VersionView",
    "baseline_version",
    "list_versions",
    "operator",
    "promote",
    "promote_version",
    "rollback_version",
    "show_version",
]

BASELINE_PREFIX = "baseline:"
# Operators act as ``cli:<user>``; any other actor of a promotion or refusal is the
# retraining job's gate, whose verdicts ``models list`` shows.
OPERATOR_PREFIX = "cli:"
GATE_EVENTS = (RouterEvent.PROMOTED, RouterEvent.REFUSED)
ACTOR_LENGTH = 64  # router_events.actor


class VersionError(Exception):
    """A promotion or rollback refused, or a version that does not exist."""


def baseline_version(policy: str) -> str:
    """The name the default policy serves under when no version is active."""
    return f"{BASELINE_PREFIX}{policy}"


def operator(user: str | None = None) -> str:
    """The actor recorded for a change made from the command line."""
    return f"{OPERATOR_PREFIX}{user or getpass.getuser()}"[:ACTOR_LENGTH]


def _utc(at: datetime) -> datetime:
    # SQLite hands back naive datetimes; Postgres' are aware. Both are UTC.
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _iso(at: datetime | None) -> str | None:
    return None if at is None else _utc(at).isoformat()


@dataclass(frozen=True)
class EventView:
    at: datetime
    event: str
    actor: str
    reason: str
    details: dict[str, Any]

    @classmethod
    def from_row(cls, row: RouterEventRow) -> EventView:
        return cls(_utc(row.at), row.event, row.actor, row.reason, dict(row.details))

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": _iso(self.at),
            "event": self.event,
            "actor": self.actor,
            "reason": self.reason,
            "details": self.details,
        }


@dataclass(frozen=True)
class Interval:
    """A stretch of time a version served; ``end`` None while it still does (or, for a
    version no longer active, when its end was never recorded)."""

    start: datetime
    end: datetime | None

    def as_dict(self) -> dict[str, Any]:
        return {"from": _iso(self.start), "until": _iso(self.end)}


@dataclass(frozen=True)
class VersionView:
    version: str
    kind: str
    path: str
    files_present: bool
    n_train_pairs: int
    evaluation: dict[str, Any]
    created_at: datetime
    promoted_at: datetime | None
    active: bool
    served: tuple[Interval, ...]
    gate: EventView | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "kind": self.kind,
            "path": self.path,
            "files_present": self.files_present,
            "n_train_pairs": self.n_train_pairs,
            "evaluation": self.evaluation,
            "created_at": _iso(self.created_at),
            "promoted_at": _iso(self.promoted_at),
            "active": self.active,
            "served": [interval.as_dict() for interval in self.served],
            "gate": None if self.gate is None else self.gate.as_dict(),
        }


@dataclass(frozen=True)
class Listing:
    serving: str
    versions: list[VersionView]

    def as_dict(self) -> dict[str, Any]:
        return {"serving": self.serving, "versions": [v.as_dict() for v in self.versions]}


@dataclass(frozen=True)
class VersionDetail:
    version: VersionView
    events: list[EventView]

    def as_dict(self) -> dict[str, Any]:
        return {**self.version.as_dict(), "events": [e.as_dict() for e in self.events]}


@dataclass(frozen=True)
class Change:
    """What a promotion or rollback did: ``left`` served before, ``serving`` serves now
    (a version, or ``baseline:<policy>``); ``changed`` False when nothing was to be done."""

    left: str
    serving: str
    changed: bool


# The serving history, replayed from the events.


@dataclass(frozen=True)
class _Switch:
    """From ``at`` on, ``serving`` serves: a promotion of it, or a rollback to it from
    ``rolled_back_from``."""

    at: datetime
    order: int
    serving: str
    rolled_back_from: str | None = None


@dataclass
class _History:
    intervals: dict[str, list[Interval]] = field(default_factory=dict)
    # The promotions still in force, oldest first: a rollback pops the newest, so rolling
    # back twice walks two steps back instead of bouncing between the last two versions.
    stack: list[str] = field(default_factory=list)


def _switches(versions: Sequence[RouterVersion], events: Sequence[RouterEventRow]) -> list[_Switch]:
    switches = [
        _Switch(_utc(e.at), e.id, e.version) for e in events if e.event == RouterEvent.PROMOTED
    ] + [
        _Switch(_utc(e.at), e.id, str(e.details.get("to", "")), rolled_back_from=e.version)
        for e in events
        if e.event == RouterEvent.ROLLED_BACK
    ]
    # A version promoted before router_events existed has only its promoted_at.
    promoted = {e.version for e in events if e.event == RouterEvent.PROMOTED}
    switches += [
        _Switch(_utc(v.promoted_at), 0, v.version)
        for v in versions
        if v.promoted_at is not None and v.version not in promoted
    ]
    return sorted(switches, key=lambda s: (s.at, s.order))


def _replay(versions: Sequence[RouterVersion], events: Sequence[RouterEventRow]) -> _History:
    history = _History()
    current: str | None = None
    for switch in _switches(versions, events):
        serving = switch.serving
        if switch.rolled_back_from is not None:
            while history.stack and history.stack[-1] == switch.rolled_back_from:
                history.stack.pop()
            # A rollback that did not record where it went went where the stack says.
            serving = serving or (history.stack[-1] if history.stack else BASELINE_PREFIX)
            if serving.startswith(BASELINE_PREFIX):
                history.stack.clear()
        if history.stack[-1:] != [serving] and not serving.startswith(BASELINE_PREFIX):
            history.stack.append(serving)
        if serving == current:
            continue
        if current is not None:
            last = history.intervals[current][-1]
            history.intervals[current][-1] = Interval(last.start, switch.at)
        current = serving
        history.intervals.setdefault(current, []).append(Interval(switch.at, None))
    return history


def _files_present(row: RouterVersion) -> bool:
    return (Path(row.path) / MANIFEST).is_file()


def _gate_verdict(events: Sequence[RouterEventRow]) -> EventView | None:
    verdicts = [
        e for e in events if e.event in GATE_EVENTS and not e.actor.startswith(OPERATOR_PREFIX)
    ]
    return EventView.from_row(verdicts[-1]) if verdicts else None


def _view(row: RouterVersion, history: _History, events: Sequence[RouterEventRow]) -> VersionView:
    own = [e for e in events if e.version == row.version]
    return VersionView(
        version=row.version,
        kind=row.kind,
        path=row.path,
        files_present=_files_present(row),
        n_train_pairs=row.n_train_pairs,
        evaluation=dict(row.evaluation),
        created_at=_utc(row.created_at),
        promoted_at=None if row.promoted_at is None else _utc(row.promoted_at),
        active=row.is_active,
        served=tuple(history.intervals.get(row.version, ())),
        gate=_gate_verdict(own),
    )


def _serving(versions: Sequence[RouterVersion], baseline: str) -> str:
    return next((v.version for v in versions if v.is_active), baseline)


def list_versions(session: Session, baseline: str) -> Listing:
    """Every version, oldest first, with what serves now (``baseline`` when none is active)."""
    versions = queries.router_versions(session)
    events = queries.router_events(session)
    history = _replay(versions, events)
    return Listing(_serving(versions, baseline), [_view(v, history, events) for v in versions])


def show_version(session: Session, version: str) -> VersionDetail:
    row = queries.router_version(session, version)
    if row is None:
        raise VersionError(f"no router version {version!r} (see `t2iroute models list`)")
    events = queries.router_events(session)
    history = _replay(queries.router_versions(session), events)
    own = [e for e in events if e.version == version]
    return VersionDetail(_view(row, history, own), [EventView.from_row(e) for e in own])


def promote_version(
    session: Session, version: str, *, actor: str, reason: str, baseline: str
) -> Change:
    """Make ``version`` the one that serves and record who did and why, in the session's
    one transaction. Refused for an unknown version or one whose files are gone: a worker
    would fail to load it at its next refresh."""
    versions = queries.router_versions(session, lock=True)
    row = next((v for v in versions if v.version == version), None)
    if row is None:
        raise VersionError(f"no router version {version!r} (see `t2iroute models list`)")
    if not _files_present(row):
        raise VersionError(
            f"router version {version} has no saved router at {row.path} "
            f"({MANIFEST} is missing): refusing to promote it"
        )
    left = _serving(versions, baseline)
    if row.is_active:
        return Change(left, version, changed=False)
    promote(session, row, actor=actor, reason=reason, details={"from": left})
    return Change(left, version, changed=True)


def promote(
    session: Session, row: RouterVersion, *, actor: str, reason: str, details: dict[str, Any]
) -> None:
    """The promotion sequence, written once: ``row`` becomes the only active version, and a
    ``promoted`` event records who did it and why. The caller has checked that it may."""
    queries.promote_router_version(session, row.id)
    queries.record_router_event(
        session, row.version, RouterEvent.PROMOTED, actor=actor, reason=reason, details=details
    )


def rollback_version(session: Session, *, actor: str, reason: str, baseline: str) -> Change:
    """Go back to the version that served before the active one, or to the default policy
    when none did; the rollback is recorded on the version left, in one transaction."""
    versions = queries.router_versions(session, lock=True)
    active = next((v for v in versions if v.is_active), None)
    if active is None:
        raise VersionError(f"no router version is active: {baseline} serves, nothing to roll back")
    known = {v.version: v for v in versions}
    stack = _replay(versions, queries.router_events(session)).stack
    while stack and (stack[-1] == active.version or stack[-1] not in known):
        stack.pop()
    target = known[stack[-1]] if stack else None
    if target is None:
        queries.deactivate_router_versions(session)
        serving = baseline
    elif not _files_present(target):
        raise VersionError(
            f"the version before {active.version}, {target.version}, has no saved router at "
            f"{target.path}: promote another one with `t2iroute models promote`"
        )
    else:
        queries.promote_router_version(session, target.id)
        serving = target.version
    queries.record_router_event(
        session,
        active.version,
        RouterEvent.ROLLED_BACK,
        actor=actor,
        reason=reason,
        details={"to": serving},
    )
    return Change(active.version, serving, changed=True)
