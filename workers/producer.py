"""The producer: validate at the edge, write the request, enqueue its id.

Bad input is refused here with a clear message and never enqueued. An accepted request
is durable in the database before anything is sent: if the broker is down at that moment
the request stays ``queued`` and the sweeper sends it later, so nothing is lost."""

from __future__ import annotations

import logging
import secrets
import unicodedata
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from sqlalchemy import select

from db import queries
from db.models import GenerationRequest, Status
from db.session import session_scope
from workers.settings import Settings, get_settings

log = logging.getLogger(__name__)

MAX_SEED = 2**31 - 1


class InvalidRequest(ValueError):
    """The request was refused before anything was written or enqueued."""


def _settings(info: ValidationInfo) -> Settings:
    """The settings the caller validates against, passed as validation context."""
    if not isinstance(info.context, dict) or "settings" not in info.context:
        raise RuntimeError("RequestSpec is validated through parse_request(settings, ...)")
    settings: Settings = info.context["settings"]
    return settings


class RequestSpec(BaseModel):
    """A request as a client states it; limits come from the settings (validation context)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=50.0)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, prompt: str, info: ValidationInfo) -> str:
        settings = _settings(info)
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("prompt is not valid UTF-8 text") from None
        prompt = prompt.strip()
        if not prompt:
            raise ValueError("prompt is empty")
        if len(prompt) > settings.max_prompt_chars:
            raise ValueError(
                f"prompt has {len(prompt)} characters; the limit is {settings.max_prompt_chars}"
            )
        if any(unicodedata.category(c) == "Cc" and c not in "\n\t" for c in prompt):
            raise ValueError("prompt contains control characters")
        return prompt

    @field_validator("width", "height")
    @classmethod
    def _side(cls, side: int | None, info: ValidationInfo) -> int | None:
        settings = _settings(info)
        if side is None:
            return None
        if not settings.min_side <= side <= settings.max_side or side % 8:
            raise ValueError(
                f"must be a multiple of 8 between {settings.min_side} and {settings.max_side}"
            )
        return side

    @field_validator("steps")
    @classmethod
    def _steps(cls, steps: int | None, info: ValidationInfo) -> int | None:
        settings = _settings(info)
        if steps is not None and not 1 <= steps <= settings.max_steps:
            raise ValueError(f"must be between 1 and {settings.max_steps}")
        return steps

    @field_validator("idempotency_key")
    @classmethod
    def _key(cls, key: str | None) -> str | None:
        if key is not None and not key.isprintable():
            raise ValueError("must be printable text")
        return key


def parse_request(settings: Settings, **fields: Any) -> RequestSpec:
    try:
        return RequestSpec.model_validate(fields, context={"settings": settings})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'request'}: {err['msg']}"
            for err in exc.errors()
        )
        raise InvalidRequest(f"invalid request: {problems}") from None


@dataclass(frozen=True)
class Submitted:
    request_id: str
    created: bool
    enqueued: bool


def _row_values(spec: RequestSpec, settings: Settings) -> dict[str, Any]:
    return {
        "prompt": spec.prompt,
        "width": spec.width or settings.default_width,
        "height": spec.height or settings.default_height,
        "steps": spec.steps or settings.default_steps,
        "seed": spec.seed if spec.seed is not None else secrets.randbelow(MAX_SEED),
        "guidance_scale": spec.guidance_scale,
    }


def submit(prompt: str, *, settings: Settings | None = None, **options: Any) -> Submitted:
    """Accept one request and enqueue it. The same idempotency key twice gives the same
    request and one job; the same key with other parameters is refused."""
    settings = settings or get_settings()
    spec = parse_request(settings, prompt=prompt, **options)
    values = _row_values(spec, settings)
    with session_scope(settings.database_url) as session:
        request_id = None
        if spec.idempotency_key is not None:
            created = queries.insert_ignore(
                session,
                GenerationRequest,
                {
                    **values,
                    "id": _new_request_id(),
                    "idempotency_key": spec.idempotency_key,
                    "status": Status.QUEUED,
                },
            )
            row = session.scalar(
                select(GenerationRequest).where(
                    GenerationRequest.idempotency_key == spec.idempotency_key
                )
            )
            assert row is not None
            if not created:
                _check_same(row, spec)
            request_id = row.id
        else:
            row = GenerationRequest(**values, id=_new_request_id(), status=Status.QUEUED)
            session.add(row)
            created = True
            request_id = row.id
    enqueued = created and _enqueue(request_id)
    return Submitted(request_id=request_id, created=created, enqueued=enqueued)


def _new_request_id() -> str:
    return str(uuid.uuid4())


def _check_same(row: GenerationRequest, spec: RequestSpec) -> None:
    stated = {k: v for k, v in spec.model_dump().items() if v is not None}
    stated.pop("idempotency_key", None)
    differing = [k for k, v in stated.items() if getattr(row, k) != v]
    if differing:
        raise InvalidRequest(
            f"idempotency key {row.idempotency_key!r} was used before with other "
            f"{', '.join(differing)}"
        )


def _enqueue(request_id: str) -> bool:
    from workers.celery_app import TASK_ROUTE, app

    try:
        app.send_task(TASK_ROUTE, args=[request_id])
    except Exception:
        log.warning(
            "broker unavailable; request %s stays queued for the sweeper", request_id, exc_info=True
        )
        return False
    return True


def describe(request_id: str, *, settings: Settings | None = None) -> dict[str, Any] | None:
    """Where a request stands: status, reason, routing decision, images and mean quality."""
    settings = settings or get_settings()
    with session_scope(settings.database_url) as session:
        request = queries.get_request(session, request_id)
        if request is None:
            return None
        decision = queries.get_decision(session, request_id)
        generations = queries.generations_of(session, request_id)
        quality = queries.mean_quality_of(session, request_id)
        return {
            "id": request.id,
            "status": request.status.value,
            "failure_reason": request.failure_reason,
            "attempts": request.attempts,
            "created_at": request.created_at.isoformat(),
            "updated_at": request.updated_at.isoformat(),
            "decision": None
            if decision is None
            else {
                "tier": decision.tier.value,
                "explore": decision.explore,
                "predicted_prs": decision.predicted_prs,
                "alpha": decision.alpha,
                "wants_cloud": decision.wants_cloud,
                "router_version": decision.router_version,
                "budget_reason": decision.budget_reason,
            },
            "images": {g.tier.value: g.image_path for g in generations},
            "quality": {tier.value: score for tier, score in quality.items()},
        }
