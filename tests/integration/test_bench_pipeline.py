"""The pipeline benchmark's smoke run, as a user runs it (``python -m bench.pipeline
--quick``): its own Redis and PostgreSQL, real worker processes, every table printed with
numbers, and every request served."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# Slow like the end-to-end suites: several deployments of real workers, one after another.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]

REPOSITORY = Path(__file__).resolve().parents[2]
TITLES = (
    "1. Whole pipeline",
    "2. Route stage alone",
    "3. Batched vs one at a time",
    "4. Statements and transactions per request",
    "4b. Pipeline statements per request, by table",
    "5. Growth",
)
NUMBER = r"\s*[0-9][0-9,]*(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?\s*│"


def _printed_row(output: str, label: str, numbers: int) -> bool:
    """Whether a printed table row starts with ``label`` followed by ``numbers`` numbers."""
    pattern = re.compile(rf"│ {re.escape(label)}\s*│" + NUMBER * numbers)
    return any(pattern.search(line) for line in output.splitlines())


def test_quick_run_prints_every_table_and_serves_every_request(tmp_path: Path) -> None:
    # The caller's servers must not leak in: the bench brings its own.
    env = {k: v for k, v in os.environ.items() if not k.startswith("T2IROUTE_")}
    result = subprocess.run(
        [sys.executable, "-m", "bench.pipeline", "--quick", "--out", str(tmp_path)],
        cwd=REPOSITORY,
        env=env,
        capture_output=True,
        text=True,
        timeout=1400,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    output = result.stdout
    for title in TITLES:
        assert title in output, output
    assert _printed_row(output, "pipeline", 7), output
    assert _printed_row(output, "(a) no-op chain, same layout", 4), output
    assert _printed_row(output, "(b) models alone, 1 process", 2), output
    for label in ("no-op task (floor)", "route, unbatched", "route, batched"):
        assert _printed_row(output, label, 6), output
    assert _printed_row(output, "generate edge", 4), output
    assert _printed_row(output, "CLIP scores", 4), output
    assert _printed_row(output, "pipeline (all of the above)", 9), output
    assert "goal: pipeline wall / (models alone + no-op chain) =" in output

    reports = json.loads((tmp_path / "summary.json").read_text())["reports"]
    pipeline = reports["pipeline"]["rows"][0]
    assert (pipeline["done"], pipeline["failed"]) == (40, 0)
    growth = reports["growth"]["rows"]
    assert [row["requests"] for row in growth] == [20, 40]
    for row in growth:
        assert (row["done"], row["failed"]) == (row["requests"], 0)
        assert row["statements/request"] > 0 and row["commits/request"] > 0
    for row in reports["route_stage"]["rows"]:
        assert math.isfinite(row["decisions/s"]) and row["decisions/s"] > 0
        assert 0 < row["paced p50 ms"] <= row["paced p99 ms"]
    for row in reports["batching"]["rows"]:
        assert row["images/s"] > 0
    assert (tmp_path / "statements_by_query.csv").read_text().count("\n") > 5
