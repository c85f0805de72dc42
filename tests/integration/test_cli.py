"""The ``t2iroute`` commands as a user runs them: through typer's runner (submit from a file
and from standard input, the report and its chart) against the real Postgres, Redis and Celery
workers, and as processes where library output could show (sweep, retrain)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image
from sqlalchemy import select
from typer.testing import CliRunner, Result

from db.models import (
    Generation,
    GenerationRequest,
    QualityScore,
    RoutingDecision,
    Status,
)
from db.session import session_scope
from routing.metrics import METRIC_NAMES, METRICS_VERSION
from tests.labels import seed_training_pairs
from tests.services import celery_worker
from workers.entrypoints.cli import main as cli
from workers.services.budget import BudgetLimits
from workers.services.producer import InvalidRequest, parse_request
from workers.settings import Settings

pytestmark = pytest.mark.integration

# What a model library prints when it is not kept quiet (cli._quiet_model_libraries).
NOISE = ("Loading weights", "Loading pipeline components", "requires torchvision", "it/s]")


def _invoke(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(cli.app, list(args), input=stdin)


def _all_cells(output: str, first: str) -> list[list[str]]:
    """The cells of every table row whose first cell is ``first``, top to bottom."""
    rows = []
    for line in output.splitlines():
        cells = [c.strip() for c in line.replace("┃", "│").split("│")[1:-1]]
        if cells and cells[0] == first:
            rows.append(cells)
    assert rows, f"no row {first!r} in:\n{output}"
    return rows


def _cells(output: str, first: str) -> list[str]:
    """The cells of the first table row whose first cell is ``first``."""
    return _all_cells(output, first)[0]


def _rows(url: str) -> list[GenerationRequest]:
    with session_scope(url) as session:
        rows = list(session.scalars(select(GenerationRequest).order_by(GenerationRequest.seed)))
        session.expunge_all()
        return rows


@pytest.fixture
def workers(tiny_models: dict[str, Path], database: str, settings: Settings) -> Iterator[None]:
    """A router/quality worker and a worker for every tier of the pool, for one test: the
    others count what waits in the queues."""
    with (
        celery_worker("route,quality", "cli-router"),
        celery_worker("", "cli-gpu", tiers=",".join(settings.pool.names)),
    ):
        yield


def test_submit_file_shows_progress_waits_and_summarises(
    workers: None, clean_db: str, settings: Settings, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# three prompts\na red apple\n\nthree birds on a wire\na teapot\n")
    out = tmp_path / "results.jsonl"
    args = ("--file", str(prompts), "--wait", "--timeout", "180", "--seed", "5", "--out", str(out))
    result = _invoke("submit", *args)
    assert result.exit_code == 0, result.output
    assert "submitted" in result.stderr and "finished" in result.stderr  # the progress bars
    assert "3 requests: done 3" in result.stdout

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in records] == [2, 4, 5]
    assert {r["status"] for r in records} == {"done"}
    for record in records:
        assert record["tier"] in settings.pool
        assert Path(record["image"]).is_file()
        assert Path(record["image"]).is_relative_to(settings.image_store)
        assert 0.0 < record["quality"] < 1.0
    assert {row.seed for row in _rows(clean_db)} == {5}

    # The table counts what the database holds: answers and every image, per tier.
    with session_scope(clean_db) as session:
        answers = list(session.scalars(select(RoutingDecision.tier)))
        images = list(session.scalars(select(Generation.tier)))
    for tier in settings.pool.names:
        cells = _cells(result.stdout, tier)
        assert cells[1].startswith(f"{answers.count(tier)} (")
        assert cells[2] == str(images.count(tier))
        assert float(cells[4].split()[0]) == images.count(tier) * settings.pool[tier].cost
    assert _cells(result.stdout, "total")[2] == str(len(images))
    assert f"images: {settings.image_store}/<request id>/<tier>.png" in result.stdout


def test_submit_reads_json_lines_with_parameters_and_a_key_prefix(
    clean_db: str, clean_redis: redis.Redis, settings: Settings, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    lines = [
        {"prompt": "a lighthouse", "seed": 11, "width": 96, "steps": 3},
        {"prompt": "a harbour at night", "idempotency_key": "own-key"},
        {"prompt": "a fox in the snow", "guidance_scale": 4.5},
    ]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = ("submit", "--file", str(prompts), "--idempotency-key", "batch-7", "--seed", "2")
    first = _invoke(*args)
    assert first.exit_code == 0, first.output
    assert "3 requests: queued 3" in first.stdout
    rows = {row.prompt: row for row in _rows(clean_db)}
    assert (rows["a lighthouse"].seed, rows["a lighthouse"].width) == (11, 96)
    assert rows["a lighthouse"].steps == 3
    assert rows["a harbour at night"].seed == 2  # the command line's, under the line's own
    assert rows["a fox in the snow"].guidance_scale == 4.5
    keys = {row.prompt: row.idempotency_key for row in rows.values()}
    assert keys == {
        "a lighthouse": "batch-7:1",
        "a harbour at night": "own-key",
        "a fox in the snow": "batch-7:3",
    }
    assert clean_redis.llen(settings.queue_route) == 3

    # The same file again makes no request twice.
    again = _invoke(*args)
    assert again.exit_code == 0, again.output
    assert len(_rows(clean_db)) == 3
    assert clean_redis.llen(settings.queue_route) == 3


def _producer_message(settings: Settings, **fields: object) -> str:
    with pytest.raises(InvalidRequest) as refused:
        parse_request(settings, **fields)
    return str(refused.value)


def test_a_refused_line_is_named_with_the_producers_message_and_nothing_is_sent(
    clean_db: str, clean_redis: redis.Redis, settings: Settings, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "a cat"}\n'
        "\n"
        '{"prompt": "a dog", "seed": -1}\n'
        '{"prompt": "a cow", "colour": "red"}\n'
        '{"prompt": "   "}\n'
        "[1, 2]\n"
    )
    result = _invoke("submit", "--file", str(prompts))
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"{prompts}, line 6: expected a JSON object with a prompt",
        "nothing submitted: 1 lines refused",
    ]
    # Fixed the shape, the fields are checked, each by the producer's own words.
    prompts.write_text(prompts.read_text().replace("[1, 2]\n", ""))
    result = _invoke("submit", "--file", str(prompts))
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"{prompts}, line 3: {_producer_message(settings, prompt='a dog', seed=-1)}",
        f"{prompts}, line 4: {_producer_message(settings, prompt='a cow', colour='red')}",
        f"{prompts}, line 5: {_producer_message(settings, prompt='   ')}",
        "nothing submitted: 3 lines refused",
    ]
    assert _rows(clean_db) == []
    assert clean_redis.llen(settings.queue_route) == 0

    text = tmp_path / "prompts.txt"
    text.write_text("a cat\n" + "x" * (settings.max_prompt_chars + 1) + "\n")
    result = _invoke("submit", "--file", str(text), "--width", "65")
    assert result.exit_code == 2
    assert result.stderr.splitlines()[0] == (
        f"{text}, line 1: {_producer_message(settings, prompt='a cat', width=65)}"
    )
    assert _rows(clean_db) == []


def test_submit_dash_reads_prompts_from_standard_input(
    clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    result = _invoke("submit", "-", "--steps", "2", stdin="a red kite\r\nan old map\n")
    assert result.exit_code == 0, result.output
    rows = _rows(clean_db)
    assert sorted(row.prompt for row in rows) == ["a red kite", "an old map"]
    assert {row.steps for row in rows} == {2}
    assert "2 requests: queued 2" in result.stdout
    assert clean_redis.llen(settings.queue_route) == 2


def test_one_prompt_still_prints_only_its_request_id(
    clean_db: str, clean_redis: redis.Redis
) -> None:
    result = _invoke("submit", "a single prompt", "--seed", "4")
    assert result.exit_code == 0, result.output
    request_id = result.stdout.strip()
    assert str(uuid.UUID(request_id)) == request_id
    assert [row.id for row in _rows(clean_db)] == [request_id]


@pytest.mark.parametrize(
    "args",
    [("submit",), ("submit", "a cat", "--file", "prompts.txt")],
    ids=["neither", "both"],
)
def test_submit_wants_a_prompt_or_a_file(args: tuple[str, ...], clean_db: str) -> None:
    result = _invoke(*args)
    assert result.exit_code == 2
    assert "Usage:" in result.stderr
    assert _rows(clean_db) == []


def test_submit_of_an_empty_or_missing_file_says_so(tmp_path: Path, clean_db: str) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n\n")
    result = _invoke("submit", "--file", str(empty))
    assert (result.exit_code, result.stderr) == (2, f"{empty} holds no prompts\n")
    result = _invoke("submit", "--file", str(tmp_path / "absent.txt"))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"cannot read {tmp_path / 'absent.txt'}")


# --- report ------------------------------------------------------------------------------------


def _seed_traffic(url: str) -> None:
    """Four routed requests and a queued one in the last hour, one done three days ago."""
    now = datetime.now(UTC)

    def request(status: Status, age: timedelta) -> str:
        request_id = str(uuid.uuid4())
        session.add(
            GenerationRequest(
                id=request_id,
                prompt="a prompt",
                width=64,
                height=64,
                seed=1,
                status=status,
                created_at=now - age,
                updated_at=now - age + timedelta(seconds=2),
            )
        )
        session.flush()
        return request_id

    def decide(request_id: str, tier: str, version: str, tradeoff: float, spent: float) -> None:
        session.add(
            RoutingDecision(
                request_id=request_id,
                router_version=version,
                predicted_quality={"edge": 0.5, "cloud": 0.5},
                tradeoff=tradeoff,
                wanted_tier=tier,
                tier=tier,
                explored=["cloud"] if spent and tier == "edge" else [],
                spent=spent,
                budget_reason="granted",
            )
        )
        session.flush()

    def generate(request_id: str, tier: str, latency: float, quality: float) -> None:
        generation = Generation(
            request_id=request_id,
            tier=tier,
            model="tiny",
            image_path=f"{request_id}/{tier}.png",
            latency_ms=latency,
        )
        session.add(generation)
        session.flush()
        session.add(
            QualityScore(
                generation_id=generation.id,
                request_id=request_id,
                tier=tier,
                metrics_version=METRICS_VERSION,
                scores={"names": list(METRIC_NAMES), "values": [quality] * len(METRIC_NAMES)},
                mean_score=quality,
            )
        )

    hour = timedelta(hours=1)
    with session_scope(url) as session:
        first = request(Status.DONE, hour)
        decide(first, "edge", "version-a", 0.1, 0.0)
        generate(first, "edge", 100.0, 0.5)
        second = request(Status.DONE, hour / 2)
        decide(second, "cloud", "version-b", 0.2, 9.0)
        generate(second, "cloud", 300.0, 0.7)
        third = request(Status.DONE, hour / 3)
        decide(third, "edge", "version-b", 0.3, 9.0)
        generate(third, "edge", 120.0, 0.6)
        generate(third, "cloud", 310.0, 0.8)
        decide(request(Status.FAILED, hour / 4), "edge", "version-b", 0.25, 0.0)
        request(Status.QUEUED, hour / 5)
        old = request(Status.DONE, timedelta(days=3))
        decide(old, "cloud", "version-old", 0.9, 9.0)
        generate(old, "cloud", 500.0, 0.9)


def test_report_shows_states_spend_budget_quality_latency_and_versions(
    clean_db: str, settings: Settings, tmp_path: Path
) -> None:
    _seed_traffic(clean_db)
    result = _invoke("report", "--since", "24h")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith("5 requests created from ")
    assert _cells(out, "done")[1:] == ["2", "1", "0", "3"]  # edge, cloud, not routed, total
    assert _cells(out, "failed")[1:] == ["1", "0", "0", "1"]
    assert _cells(out, "queued")[1:] == ["0", "0", "1", "1"]

    (edge_spend, edge_quality), (cloud_spend, cloud_quality) = (
        _all_cells(out, "edge"),
        _all_cells(out, "cloud"),
    )
    cost = settings.pool.costs()
    # Answers, images (the exploration included), cost per image, spend.
    assert edge_spend[1:] == ["3 (75%)", "2", f"{cost['edge']:g}", f"{2 * cost['edge']:g}"]
    assert cloud_spend[1:] == ["1 (25%)", "2", f"{cost['cloud']:g}", f"{2 * cost['cloud']:g}"]
    assert _cells(out, "total")[1:] == ["4", "4", "", f"{2 * cost['edge'] + 2 * cost['cloud']:g}"]
    # Quality, images scored, generation ms p50 and p95, end to end s p50 and p95.
    assert edge_quality[1:] == ["0.550", "2", "110", "119", "2.0", "2.0"]
    assert cloud_quality[1:] == ["0.750", "2", "305", "310", "2.0", "2.0"]

    limits = BudgetLimits.from_settings(settings)
    allowance = limits.budget_per_request * 4 + limits.burst
    assert f"18 of {allowance:g} allowed ({18 / allowance:.0%})" in out
    assert "0.2500; 0.1000 .. 0.3000" in out  # the latest decision's lambda; the range
    assert _cells(out, "version-a")[1] == "1" and _cells(out, "version-b")[1] == "3"
    assert "version-old" not in out

    week = _invoke("report", "--since", "7d")
    assert week.exit_code == 0, week.output
    assert week.stdout.startswith("6 requests created from ")
    assert _cells(week.stdout, "version-old")[1] == "1"

    chart = tmp_path / "charts" / "report.png"
    drawn = _invoke("report", "--since", "30m", "--png", str(chart), "--bins", "6")
    assert drawn.exit_code == 0, drawn.output
    assert drawn.stdout.startswith("3 requests created from ")  # the last three of the hour
    assert f"chart: {chart}" in drawn.stdout
    with Image.open(chart) as image:
        assert image.format == "PNG"
        assert image.width >= 600 and image.height >= 400
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # drawn, not blank


@pytest.mark.parametrize("since", ["abc", "24", "0h", "-3d", "5y"])
def test_report_refuses_a_window_it_cannot_read(since: str, clean_db: str) -> None:
    result = _invoke("report", "--since", since)
    assert result.exit_code == 2
    assert "is not a time span" in result.stderr


def test_report_of_an_empty_window(clean_db: str) -> None:
    result = _invoke("report", "--since", "30m")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("0 requests created from ")


# --- library noise -----------------------------------------------------------------------------


def _run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.entrypoints.cli.main", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_sweep_and_retrain_print_their_result_and_no_library_noise(
    clean_db: str, clean_redis: redis.Redis, settings: Settings
) -> None:
    swept = _run_cli("sweep")
    assert swept.returncode == 0, swept.stderr
    assert swept.stdout == "re-enqueued 0 tasks\n"
    assert not [n for n in NOISE if n in swept.stderr], swept.stderr

    # Few pairs, so that training is quick: the noise came from loading the text encoder.
    seed_training_pairs(clean_db, 16)
    retrained = _run_cli("retrain", T2IROUTE_RETRAIN_MIN_PAIRS="12")
    assert retrained.returncode == 0, retrained.stderr
    assert json.loads(retrained.stdout)["n_pairs"] == 16
    assert not [n for n in NOISE if n in retrained.stderr], retrained.stderr
