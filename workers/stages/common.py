"""What every stage shares: a request that has nothing more to do (``RequestGone``), the
outcome of a request in a batch, and the handing on of a finished step to those it needs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sqlalchemy.orm import Session

from db import queries
from db.models import GenerationRequest, Status
from workers.app.flow import Step

__all__ = ["GONE", "Key", "Outcome", "RequestGone", "hand_on", "live_requests"]


class RequestGone(LookupError):
    """The request does not exist, has failed or was cancelled, or no longer needs this
    step: the message has nothing to do."""


#: A request in these states has nothing more to do.
GONE = (Status.FAILED, Status.CANCELLED)

#: A request's (or a request's tier's) outcome in a batch: the steps it now needs, or why it
#: has nothing to do.
Outcome = list[Step] | RequestGone
#: A (request id, tier) pair: what a generation or a score works on.
Key = tuple[str, str]


def live_requests(
    requests: Mapping[str, GenerationRequest], request_ids: Sequence[str]
) -> tuple[list[str], dict[str, Outcome]]:
    """The ids whose request exists and has neither failed nor been cancelled, and the gone
    ones' outcomes."""
    gone: dict[str, Outcome] = {}
    live = []
    for rid in dict.fromkeys(request_ids):
        request = requests.get(rid)
        if request is None or request.status in GONE:
            gone[rid] = RequestGone(rid)
        else:
            live.append(rid)
    return live, gone


def hand_on(
    session: Session, handed: Mapping[tuple[str, Step], list[Step]]
) -> dict[tuple[str, Step], list[Step]]:
    """Close each (request, step) and record the steps that follow it: one insert for every
    step that follows, one update per kind of step closed. Each entry gets back the steps it
    recorded first (to send)."""
    recorded = queries.record_steps_many(
        session, [(rid, step.key) for (rid, _), needed in handed.items() for step in needed]
    )
    closing: dict[str, list[str]] = {}
    for rid, done in handed:
        closing.setdefault(done.key, []).append(rid)
    for key, rids in closing.items():
        queries.finish_steps(session, rids, key)
    return {
        (rid, done): [step for step in needed if (rid, step.key) in recorded]
        for (rid, done), needed in handed.items()
    }
