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
TEXTS = PROMPTS.splitlines()
# What a model library prints when it is not kept quiet (cli._quiet_model_libraries).
NOISE = ("Loading weights", "Loading pipeline components", "requires torchvision", "it/s]")


def _demo(tmp_path: Path, env: dict[str, str], *flags: str) -> subprocess.CompletedProcess[str]:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment line is skipped\n" + PROMPTS)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "workers.entrypoints.cli.main",
            "demo",
            "--prompts",
            str(prompts),
            "--workdir",
            str(tmp_path / "demo"),
            "--timeout",
            "240",
            *flags,
        ],
        # Wide enough that no prompt wraps in the table.
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _cells(output: str, first: str) -> list[str]:
    """The cells of the first table row whose first cell is ``first``."""
    for line in output.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in:\n{output}")


def _row(output: str, label: str) -> str:
    return _cells(output, label)[-1]


def _spend(output: str) -> dict[str, list[str]]:
    """The spend table's rows by tier: answers, images, cost per image, spend, quality."""
    table = output.split("spend per tier", 1)[1].split("└", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells and cells[0] not in ("", "tier"):
            rows[cells[0]] = cells[1:]
    return rows


def _check_summary(result: subprocess.CompletedProcess[str], workdir: Path) -> dict[str, list[str]]:
    """What every demo prints: progress, the outcome, the real spend per tier, and each
    prompt's tier and image."""
    output = result.stdout
    assert "submitted" in result.stderr and "finished" in result.stderr  # progress bars
    assert not [n for n in NOISE if n in result.stdout + result.stderr]
    assert _row(output, "requests") == "3"
    assert _row(output, "done / failed / unfinished") == "3 / 0 / 0"
    images = list((workdir / "images").rglob("*.png"))
    assert int(_row(output, "images written")) == len(images) >= 3
    assert int(_row(output, "of which exploration and escalation")) == len(images) - 3

    spend = _spend(output)
    total = spend.pop("total")
    # Every image counts, explorations included: what the tiers really spent.
    assert sum(int(cells[1]) for cells in spend.values()) == len(images) == int(total[1])
    assert sum(int(cells[0].split()[0]) for cells in spend.values()) == 3 == int(total[0])
    spent = {tier: float(cells[3].split()[0]) for tier, cells in spend.items()}
    for tier, (_, made, cost, _, _) in spend.items():
        assert spent[tier] == pytest.approx(int(made) * float(cost))
        assert spend[tier][3].endswith(f"({spent[tier] / sum(spent.values()):.0%})")
    assert float(total[3]) == pytest.approx(sum(spent.values()))

    for text in TEXTS:
        _, tier, image = _cells(output, text)
        assert tier in spend
        assert (workdir / "images" / image).is_file()
        assert image.endswith(f"/{tier}.png")
    return spend


def test_embedded_demo_needs_no_server(tmp_path: Path) -> None:
    # Nothing of the test session's servers leaks in: the demo must find its own way.
    env = {k: v for k, v in os.environ.items() if not k.startswith("T2IROUTE_")}
    result = _demo(tmp_path, env)
    assert "embedded" in result.stdout
    spend = _check_summary(result, tmp_path / "demo")
    assert set(spend) == {"edge", "cloud"}
    assert [spend["edge"][2], spend["cloud"][2]] == ["1", "10"]  # the default pool's costs
    assert 0.0 < float(spend["edge"][4]) < 1.0
    assert (tmp_path / "demo" / "t2iroute.db").exists()


def test_demo_uses_the_servers_when_their_urls_are_set(
    tmp_path: Path,
    tiny_models: dict[str, Path],
    clean_db: str,
    clean_redis: redis.Redis,
) -> None:
    # Its own image store: the session's holds other tests' images.
    env = {**os.environ, "T2IROUTE_IMAGE_STORE": str(tmp_path / "demo" / "images")}
    result = _demo(tmp_path, env, "--servers")
    assert "servers" in result.stdout
    _check_summary(result, tmp_path / "demo")
    assert not (tmp_path / "demo" / "t2iroute.db").exists()


def test_the_embedded_demo_runs_a_three_tier_pool(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("T2IROUTE_")}
    result = _demo(tmp_path, env, "--three-tiers")
    spend = _check_summary(result, tmp_path / "demo")
    assert set(spend) == {"turbo", "base", "large"}
    assert [spend[tier][2] for tier in ("turbo", "base", "large")] == ["0.5", "1", "10"]
