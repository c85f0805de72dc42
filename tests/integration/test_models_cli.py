"""``t2iroute models list|show|promote|rollback`` through typer's runner, on the real test
Postgres, with real saved routers; and a real ``RouterService`` that follows every promotion
and rollback at its next refresh, back to the default policy past the first version."""

from __future__ import annotations

import getpass
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from db import queries
from db.models import RouterEvent, RouterVersion
from db.session import session_scope
from routing.baselines import PromptLengthRouter
from routing.registry import save_router
from workers.entrypoints.cli import main as cli
from workers.settings import Settings

ACTOR = f"cli:{getpass.getuser()}"
# Six words: a centre of 2 words calls it long (cloud), a centre of 20 short (edge).
PROMPT = "a red cat on a hill"
V1_EVALUATION = {
    "labels": 48,
    "evaluated": 40,
    "apgr": 0.612,
    "cold_start": "baseline:noun_count",
    "cold_start_apgr": 0.431,
    "incumbent": "baseline:noun_count",
    "incumbent_apgr": None,
}
# An older shape: nested measures are shown as outer.inner.
V2_EVALUATION = {"held_out_pairs": 12, "apgr": 0.25, "incumbent": {"name": "v1", "apgr": 0.6}}


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli.app, ["models", *args])


def listing() -> dict[str, Any]:
    result = invoke("list", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def by_version(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["version"]: v for v in data["versions"]}


def register(
    database: str, version: str, path: Path, evaluation: dict[str, Any], *, promote: bool
) -> None:
    """What the retraining job writes: the row, a registration and the gate's verdict."""
    with session_scope(database) as session:
        session.add(
            RouterVersion(
                version=version,
                kind="prompt_length",
                path=str(path),
                n_train_pairs=evaluation.get("labels", 12),
                evaluation=evaluation,
            )
        )
        session.flush()
        queries.record_router_event(
            session, version, RouterEvent.REGISTERED, actor="retrain", reason="trained"
        )
        verdict = RouterEvent.PROMOTED if promote else RouterEvent.REFUSED
        if promote:
            row = queries.router_version(session, version)
            assert row is not None
            queries.promote_router_version(session, row.id)
        queries.record_router_event(
            session, version, verdict, actor="retrain", reason=f"gate: {verdict.value}"
        )


@pytest.fixture
def versions(clean_db: str, tmp_path: Path) -> Iterator[str]:
    """v1 promoted by the gate and serving, v2 refused by it, v3 whose files are gone."""
    with session_scope(clean_db) as session:
        session.execute(text("TRUNCATE router_events"))
    save_router(PromptLengthRouter(centre=2.0), tmp_path / "v1")
    save_router(PromptLengthRouter(centre=20.0), tmp_path / "v2")
    register(clean_db, "v1", tmp_path / "v1", V1_EVALUATION, promote=True)
    register(clean_db, "v2", tmp_path / "v2", V2_EVALUATION, promote=False)
    register(clean_db, "v3", tmp_path / "gone", {}, promote=False)
    yield clean_db


def test_list_shows_evaluation_intervals_and_gate_verdicts(versions: str) -> None:
    data = listing()
    assert data["serving"] == "v1"
    views = by_version(data)
    assert list(views) == ["v1", "v2", "v3"]
    v1, v2, v3 = views["v1"], views["v2"], views["v3"]
    assert v1["active"] and not v2["active"] and not v3["active"]
    assert v1["evaluation"] == V1_EVALUATION and v1["n_train_pairs"] == 48
    assert [i["until"] for i in v1["served"]] == [None]
    assert v1["served"][0]["from"] == v1["promoted_at"]
    assert v2["served"] == [] and v2["promoted_at"] is None
    assert (v1["gate"]["event"], v2["gate"]["event"]) == ("promoted", "refused")
    assert v1["files_present"] and not v3["files_present"]

    table = invoke("list")
    assert table.exit_code == 0, table.output
    for shown in ("* v1", "0.612", "cold_start_apgr", "0.431", "incumbent.apgr", "0.600"):
        assert shown in table.output
    assert "refused" in table.output and "files missing" in table.output
    assert "serving now: v1" in table.output


def test_show_has_everything_about_one_version(versions: str) -> None:
    result = invoke("show", "v1", "--json")
    assert result.exit_code == 0, result.output
    detail = json.loads(result.stdout)
    assert detail["version"] == "v1" and detail["active"]
    assert [(e["event"], e["actor"]) for e in detail["events"]] == [
        ("registered", "retrain"),
        ("promoted", "retrain"),
    ]
    shown = invoke("show", "v2")
    assert shown.exit_code == 0, shown.output
    for text_ in ("router version v2", "incumbent.name", "registered", "gate: refused"):
        assert text_ in shown.output

    unknown = invoke("show", "v9")
    assert unknown.exit_code == 2
    assert "no router version 'v9'" in unknown.output


def test_promote_refuses_unknown_versions_and_missing_files(versions: str) -> None:
    before = listing()
    unknown = invoke("promote", "v9")
    assert unknown.exit_code == 2 and "no router version 'v9'" in unknown.output
    gone = invoke("promote", "v3")
    assert gone.exit_code == 2 and "no saved router" in gone.output
    again = invoke("promote", "v1")
    assert again.exit_code == 0 and "v1 already serves" in again.output
    assert listing() == before
    with session_scope(versions) as session:
        assert len(queries.router_events(session)) == 6


def test_workers_follow_promotion_and_rollback_without_restart(
    versions: str, settings: Settings
) -> None:
    service_settings = settings.model_copy(update={"router_reload_seconds": 0.0})
    # Imported here: the runtime pulls in diffusers, which the other tests do not need.
    from workers.services.router import RouterService

    service = RouterService(service_settings)
    baseline = f"baseline:{settings.default_policy}"

    def serving() -> str:
        with session_scope(versions) as session:
            service.refresh(session)
        return service.version

    def cloud_score() -> float:
        prediction = service.predict_many([PROMPT])[0]
        assert prediction.router_version == service.version
        return prediction.quality[settings.pool.tiers[-1].name]

    assert serving() == "v1"
    v1_score = cloud_score()

    promoted = invoke("promote", "v2", "--reason", "v2 wins on the new prompts")
    assert promoted.exit_code == 0, promoted.output
    assert "v1 -> v2" in promoted.output and "v2 now serves" in promoted.output
    assert serving() == "v2"
    assert cloud_score() < 0.5 < v1_score  # v2 thinks the edge does well on six words

    first = invoke("rollback", "--reason", "v2 routes badly")
    assert first.exit_code == 0, first.output
    assert "v2 -> v1" in first.output and "v1 now serves" in first.output
    assert serving() == "v1"
    assert cloud_score() == v1_score

    # Rolling back again leaves v1 for what served before it, not for v2 it came back from.
    second = invoke("rollback")
    assert second.exit_code == 0, second.output
    assert f"v1 -> {baseline}" in second.output
    assert serving() == baseline

    nothing = invoke("rollback")
    assert nothing.exit_code == 2 and "nothing to roll back" in nothing.output
    assert serving() == baseline

    with session_scope(versions) as session:
        operator = [
            (e.version, e.event, e.actor, e.reason, e.details)
            for e in queries.router_events(session)
            if e.actor == ACTOR
        ]
    assert operator == [
        ("v2", "promoted", ACTOR, "v2 wins on the new prompts", {"from": "v1"}),
        ("v2", "rolled_back", ACTOR, "v2 routes badly", {"to": "v1"}),
        ("v1", "rolled_back", ACTOR, "rolled back by an operator", {"to": baseline}),
    ]
    data = listing()
    assert data["serving"] == baseline
    views = by_version(data)
    v1_served, v2_served = views["v1"]["served"], views["v2"]["served"]
    assert len(v1_served) == 2 and len(v2_served) == 1
    assert v1_served[0]["until"] == v2_served[0]["from"]
    assert v2_served[0]["until"] == v1_served[1]["from"]
    assert all(i["until"] is not None for i in v1_served + v2_served)
    # The gate's verdict stays the gate's: an operator's promotion is not one.
    assert views["v2"]["gate"]["event"] == "refused"


def test_a_version_promoted_before_events_existed_has_served_and_rolls_back(
    versions: str,
) -> None:
    with session_scope(versions) as session:
        session.execute(text("TRUNCATE router_events"))
    served = by_version(listing())["v1"]["served"]
    assert len(served) == 1 and served[0]["until"] is None

    rolled = invoke("rollback")
    assert rolled.exit_code == 0, rolled.output
    assert "baseline:" in rolled.output
    data = listing()
    assert data["serving"].startswith("baseline:")
    assert by_version(data)["v1"]["served"][0]["until"] is not None
