"""``GET /v1/requests/{id}/image``: the answer's PNG, or an explored tier's, with an ETag."""

from __future__ import annotations

import hashlib
import logging
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from sqlalchemy.orm import Session

from db import queries
from db.models import GenerationRequest, Status
from workers.entrypoints.http.deps import CallerDep, SessionDep, SettingsDep, visible
from workers.entrypoints.http.problems import Problem, not_found, problem_responses
from workers.services.images import ImageStore
from workers.settings import Settings

__all__ = ["router"]

log = logging.getLogger(__name__)

#: Images never change once written: a client or its private cache may keep one for a year.
IMAGE_CACHE = "private, max-age=31536000, immutable"

router = APIRouter()


def _image_of(
    session: Session, row: GenerationRequest, tier: str | None, settings: Settings
) -> str:
    """The store path of the request's image on ``tier`` (the answer's when None), or the
    problem that says why there is none: 404 while it may still come, 409 when it never
    will, 404 for a tier the request was not generated on."""
    ended = row.status in (Status.FAILED, Status.CANCELLED)
    decision = queries.get_decision(session, row.id)
    if tier is None:
        if ended:
            raise Problem(409, "no-image", "No image", f"the request is {row.status}: no image")
        if row.status is not Status.DONE or decision is None:
            raise Problem(
                404,
                "not-ready",
                "Not there yet",
                f"the request is {row.status}: its answer is not there yet "
                "(it is served once the request is done)",
            )
        tier = decision.tier
    elif tier not in settings.pool.names:
        raise not_found(f"no tier {tier!a} in the pool ({', '.join(settings.pool.names)})")
    generation = queries.get_generation(session, row.id, tier)
    if generation is not None:
        return generation.image_path
    wanted = decision is not None and tier in queries.wanted_tiers(decision)
    if decision is not None and not wanted:
        raise not_found(f"the request was not generated on tier {tier}")
    if ended:
        raise Problem(409, "no-image", "No image", f"the request is {row.status}: no image")
    raise Problem(
        404, "not-ready", "Not there yet", f"the request is {row.status}: no image yet on {tier}"
    )


def _matches(if_none_match: str | None, etag: str) -> bool:
    if if_none_match is None:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


@router.get(
    "/v1/requests/{request_id}/image",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
        304: {"description": "Not modified: the image the client holds"},
        **problem_responses(401, 404, 409, 422, 503),
    },
)
def read_image(
    request_id: str,
    who: CallerDep,
    settings: SettingsDep,
    session: SessionDep,
    tier: Annotated[
        str | None, Query(max_length=64, description="An explored tier's image instead")
    ] = None,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """The answer's PNG, once the request is done; with ``tier``, that tier's, once made.
    An image never changes: it carries an ETag and may be cached for good."""
    path = _image_of(session, visible(session, request_id, who), tier, settings)
    try:
        data = ImageStore(settings.image_store).resolve(path).read_bytes()
    except (OSError, ValueError):
        log.exception("image %s of request %s cannot be read", path, request_id)
        raise not_found("the image is recorded but missing from the image store") from None
    etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
    headers = {"ETag": etag, "Cache-Control": IMAGE_CACHE}
    if _matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    return Response(data, media_type="image/png", headers=headers)
