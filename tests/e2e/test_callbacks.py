"""Callbacks from the whole flow: requests submitted with a callback URL go through real
router, generation and quality workers on the tiny models, and the receiver on 127.0.0.1
gets one signed POST when each ends, done or failed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from db import queries
from db.models import CallbackState
from db.session import session_scope
from tests.receiver import Received, Receiver, receiver
from tests.services import celery_worker, wait_until_final
from workers.services.producer import submit
from workers.stages.callbacks import verify_signature

pytestmark = pytest.mark.e2e

SECRET = "e2e-callback-secret"
ENV = {"T2IROUTE_CALLBACK_SECRET": SECRET}


@pytest.fixture
def hooks() -> Iterator[Receiver]:
    with receiver() as running:
        yield running


def _verified(call: Received) -> dict[str, object]:
    assert verify_signature(
        SECRET,
        call.headers["x-t2iroute-timestamp"],
        call.body,
        call.headers["x-t2iroute-signature"],
    )
    body: dict[str, object] = json.loads(call.body)
    return body


def _delivered(url: str, request_id: str) -> None:
    with session_scope(url) as session:
        delivery = queries.callback_delivery(session, request_id)
        assert delivery is not None
        assert delivery.state is CallbackState.DELIVERED
        assert delivery.attempts == 1


def test_requests_done_by_the_pipeline_are_called_back_with_their_answer(
    tiny_models: dict[str, Path],
    database: str,
    clean_db: str,
    clean_redis: redis.Redis,
    hooks: Receiver,
) -> None:
    prompts = ("a red bicycle leaning on a wall", "three dogs in the snow")
    with (
        celery_worker("route,quality,maintenance,callbacks", "router-callbacks", env=ENV),
        celery_worker("edge,cloud", "gpu-callbacks", env=ENV),
    ):
        ids = [
            submit(
                prompt,
                seed=i,
                callback_url=hooks.url(f"/done/{i}"),
                metadata={"n": i, "batch": "e2e"},
            ).request_id
            for i, prompt in enumerate(prompts)
        ]
        states = wait_until_final(ids, timeout=240)
        calls = [hooks.wait_for(f"/done/{i}", 1, timeout=60) for i in range(len(ids))]
    assert set(states.values()) == {"done"}
    with session_scope(clean_db) as session:
        for i, (request_id, [call]) in enumerate(zip(ids, calls, strict=True)):
            body = _verified(call)
            decision = queries.get_decision(session, request_id)
            assert decision is not None
            assert body["request_id"] == request_id
            assert body["state"] == "done"
            assert body["tier"] == decision.tier
            assert body["image_url"] == f"/v1/requests/{request_id}/image"
            assert body["metadata"] == {"n": i, "batch": "e2e"}
    for request_id in ids:
        _delivered(clean_db, request_id)


def test_a_request_no_tier_can_serve_is_called_back_failed_with_the_reason(
    tiny_models: dict[str, Path],
    database: str,
    clean_db: str,
    clean_redis: redis.Redis,
    hooks: Receiver,
    tmp_path: Path,
) -> None:
    """Both tiers' models are folders that cannot be loaded: every generation raises, the
    request fails after its attempts, and its callback says so."""
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    env = {
        **ENV,
        "T2IROUTE_MAX_ATTEMPTS": "2",
        "T2IROUTE_EXPLORATION_RATE": "0",
        "T2IROUTE_EDGE_MODEL": str(broken),
        "T2IROUTE_CLOUD_MODEL": str(broken),
    }
    with (
        celery_worker("route,quality,maintenance,callbacks", "router-failing", env=env),
        celery_worker("edge,cloud", "gpu-failing", env=env),
    ):
        request_id = submit("a cactus in a pot", callback_url=hooks.url("/failed")).request_id
        states = wait_until_final([request_id], timeout=180)
        [call] = hooks.wait_for("/failed", 1, timeout=60)
    assert states[request_id] == "failed"
    body = _verified(call)
    assert body["state"] == "failed"
    assert body["tier"] is None and body["image_url"] is None
    with session_scope(clean_db) as session:
        request = queries.get_request(session, request_id)
        assert request is not None
        assert body["reason"] == request.failure_reason
        assert "gave up after 2 failed attempts" in str(body["reason"])
    _delivered(clean_db, request_id)
