"""HTTP producer API: other services submit prompts and read where they stand.

Validation is the producer's, so a refused request gets the same clear message here as
from the Python client or the CLI, with status 422, and nothing is enqueued."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI, Header, HTTPException, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from pydantic import BaseModel
from sqlalchemy import text

from db.session import session_scope
from workers.producer import InvalidRequest, describe, submit
from workers.settings import get_settings

ACCEPTED = Counter("t2iroute_requests_accepted_total", "Requests accepted", ["created"])
REFUSED = Counter("t2iroute_requests_refused_total", "Requests refused at validation")

app = FastAPI(title="t2iroute", version="0.1.0")


class SubmitBody(BaseModel):
    prompt: str
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    seed: int | None = None
    guidance_scale: float | None = None


class Accepted(BaseModel):
    id: str
    created: bool
    enqueued: bool


@app.post("/v1/requests", status_code=202, response_model=Accepted)
def create_request(
    body: SubmitBody,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> Accepted:
    try:
        result = submit(
            body.prompt, idempotency_key=idempotency_key, **body.model_dump(exclude={"prompt"})
        )
    except InvalidRequest as exc:
        REFUSED.inc()
        raise HTTPException(status_code=422, detail=str(exc)) from None
    ACCEPTED.labels(created=str(result.created).lower()).inc()
    return Accepted(id=result.request_id, created=result.created, enqueued=result.enqueued)


@app.get("/v1/requests/{request_id}")
def read_request(request_id: str) -> dict[str, Any]:
    info = describe(request_id)
    if info is None:
        raise HTTPException(status_code=404, detail=f"no request {request_id}")
    return info


@app.get("/healthz")
def health() -> dict[str, str]:
    with session_scope(get_settings().database_url) as session:
        session.execute(text("SELECT 1"))
    return {"status": "ok"}


@app.get("/metrics")
def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
