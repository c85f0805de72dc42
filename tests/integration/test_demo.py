"""`t2iroute demo`, as a user runs it: embedded (no servers at all) and against the real
Postgres and Redis, each with real Celery worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

pytestmark = pytest.mark.integration

PROMPTS = "a red apple on a table\nthree birds on a wire above a street\na teapot\n"


def _demo(tmp_path: Path, env: dict[str, str], *flags: str) -> str:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment line is skipped\n" + PROMPTS)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "workers.cli",
            "demo",
            "--prompts",
            str(prompts),
            "--workdir",
            str(tmp_path / "demo"),
            "--timeout",
            "240",
            *flags,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _row(output: str, label: str) -> str:
    line = next(line for line in output.splitlines() if label in line)
    return line.split("│")[-2].strip()


def test_embedded_demo_needs_no_server(tmp_path: Path) -> None:
    # Nothing of the test session's servers leaks in: the demo must find its own way.
    env = {k: v for k, v in os.environ.items() if not k.startswith("T2IROUTE_")}
    output = _demo(tmp_path, env)
    assert "embedded" in output
    assert _row(output, "requests") == "3"
    assert _row(output, "done / failed / unfinished") == "3 / 0 / 0"
    images = list((tmp_path / "demo" / "images").rglob("*.png"))
    assert int(_row(output, "images written")) == len(images) >= 3
    assert (tmp_path / "demo" / "t2iroute.db").exists()
    assert 0.0 < float(_row(output, "mean quality, edge")) < 1.0


def test_demo_uses_the_servers_when_their_urls_are_set(
    tmp_path: Path,
    tiny_models: dict[str, Path],
    clean_db: str,
    clean_redis: redis.Redis,
) -> None:
    output = _demo(tmp_path, dict(os.environ), "--servers")
    assert "servers" in output
    assert _row(output, "done / failed / unfinished") == "3 / 0 / 0"
    assert not (tmp_path / "demo" / "t2iroute.db").exists()


def test_the_embedded_demo_runs_a_three_tier_pool(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("T2IROUTE_")}
    output = _demo(tmp_path, env, "--three-tiers")
    assert _row(output, "done / failed / unfinished") == "3 / 0 / 0"
    tiers = {
        line.split("│")[1].strip().split(":")[0]
        for line in output.splitlines()
        if ": answers" in line
    }
    assert tiers <= {"turbo", "base", "large"} and tiers
    images = list((tmp_path / "demo" / "images").rglob("*.png"))
    assert int(_row(output, "images written")) == len(images) >= 3
