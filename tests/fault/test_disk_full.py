"""The image store out of space mid-run (issue 18, defect 7): a 200 KB tmpfs filled to its last
byte while requests arrive, for far longer than a few attempts' backoff, then given space back.
A full store is an outage of the store, not a fault of the requests: no attempt is counted,
no tier's breaker opens, /readyz and the worker metrics say so, and every request ends done once
space is back, each image beside its row, no file or folder left over, the budget bound kept."""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.fault.harness import GPU, ROUTER, Stack, prompts, scaled, settle
from tests.fault.servers import free_port
from tests.filesystems import FILLER, can_mount, fill, remount, tmpfs

pytestmark = pytest.mark.fault

ROUTING = {
    "T2IROUTE_CLOUD_RATIO": "0.4",
    "T2IROUTE_CLOUD_BURST": "3",
    "T2IROUTE_EXPLORATION_RATE": "0.2",
    "T2IROUTE_TIER_FAILURE_THRESHOLD": "3",
}
# As failed attempts the outage would fail every request within 2 + 4 s (three attempts):
# it lasts seven times that.
OUTAGE_SECONDS = 40.0


@contextlib.contextmanager
def _store_out(store: Path) -> Iterator[tuple[str, Callable[[], None]]]:
    """The image store unable to take a file, what it is, and how to give it back: a 200 KB
    tmpfs filled to its last byte, given 16 MB and its filler's space back; or, where this
    process cannot mount, a folder made read-only (chmod 0555, which root would ignore)."""
    if can_mount():
        with tmpfs(store, "200k"):
            fill(store)

            def give_back() -> None:
                remount(store, "size=16m")
                (store / FILLER).unlink()

            yield "full (a 200 KB tmpfs filled)", give_back
        return
    if os.geteuid() == 0:
        pytest.skip("root that cannot mount: nothing makes the store refuse a file")
    store.mkdir(parents=True, exist_ok=True)
    store.chmod(0o555)
    try:
        yield "read-only (chmod 0555)", lambda: store.chmod(0o755)
    finally:
        store.chmod(0o755)


def _worker_metrics(port: int) -> dict[str, float]:
    """The store-outage series a worker exports, summed over their other labels."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("t2iroute_image_store_outages_total"):
            name = "store outages"
        elif line.startswith("t2iroute_retries_total") and 'reason="store"' in line:
            name = "deliveries retried for the store"
        else:
            continue
        sums[name] = sums.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return sums


def _leftovers(stack: Stack, ids: list[str]) -> tuple[set[str], set[str], list[str]]:
    """Files in the store without a generations row, rows without their file, and request
    folders with no image in them."""
    with stack.database() as conn:
        rows = {
            str(path)
            for (path,) in conn.execute(
                "SELECT image_path FROM generations WHERE request_id = ANY(%s)", (ids,)
            ).fetchall()
        }
    store = stack.image_store
    files = {p.relative_to(store).as_posix() for p in store.rglob("*") if p.is_file()}
    empty = [p.name for p in store.iterdir() if p.is_dir() and not any(p.iterdir())]
    return files - rows, rows - files, empty


def test_a_full_image_store_fails_no_request(
    make_stack: Callable[..., Stack], show: Callable[[str], None]
) -> None:
    stack = make_stack(**ROUTING)
    metrics_port = free_port()
    with _store_out(stack.image_store) as (outage, give_back):
        stack.add_worker(ROUTER)
        stack.add_worker(GPU, env={"T2IROUTE_METRICS_PORT": str(metrics_port)})
        stack.add_beat()
        stack.add_api()
        stack.wait_ready()
        ids = stack.submit(prompts(scaled(20)), steps=6)
        began = time.monotonic()

        ready = httpx.get(f"{stack.api_url}/readyz", timeout=10)
        while time.monotonic() - began < OUTAGE_SECONDS:
            stack.supervise()
            time.sleep(0.5)
        during = stack.statuses(ids)
        with stack.database() as conn:
            counted = conn.execute(
                "SELECT coalesce(sum(failures), 0) FROM dispatches WHERE request_id = ANY(%s)",
                (ids,),
            ).fetchone()
            breakers = conn.execute(
                "SELECT tier, consecutive_failures, open_until FROM tier_health"
            ).fetchall()
        seen = _worker_metrics(metrics_port)

        give_back()
        back = time.monotonic()
        states = stack.wait_final(ids, timeout=240)
        recovered = time.monotonic() - back
        figures = settle(stack, ids, show, f"image store {outage} for {OUTAGE_SECONDS:.0f} s")
        ready_after = httpx.get(f"{stack.api_url}/readyz", timeout=10)
        orphans, missing, empty = _leftovers(stack, ids)
        show(
            f"store {outage} for {OUTAGE_SECONDS:.0f} s: states then {Counter(during.values())}; "
            f"attempts counted {counted[0] if counted else '?'}; breakers {breakers or 'none'}; "
            f"/readyz {ready.status_code} {ready.json().get('detail', '')!r}, "
            f"after {ready_after.status_code}; worker metrics {seen}; all final "
            f"{recovered:.0f} s after space came back; files without a row {len(orphans)}, "
            f"rows without a file {len(missing)}, empty folders {len(empty)}; budget "
            f"{figures.budget_counters}"
        )

        assert "failed" not in during.values(), "a request failed while the store was full"
        assert counted == (0,), "a store outage was counted as a failed attempt"
        assert breakers == [], "a store outage opened a tier's breaker"
        assert ready.status_code == 503
        assert [e["field"] for e in ready.json()["errors"]] == ["images"]
        assert "cannot take a file" in ready.json()["detail"]
        assert seen.get("store outages", 0) > 0 and seen.get("deliveries retried for the store")
        assert set(states.values()) == {"done"}, "space came back: every request is done"
        figures.check()
        assert (orphans, missing, empty) == (set(), set(), [])
        assert ready_after.status_code == 200
        assert not (figures.budget_counters or {}).get("refunded"), "nothing failed to refund"
        stack.close()
