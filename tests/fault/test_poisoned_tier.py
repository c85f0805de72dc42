"""A poisoned tier: the cloud pipeline's weights are truncated, so every cloud generation
fails. Its requests are re-routed to edge (or fail with the reason); edge requests are
unaffected, and explored requests end done, their cloud side abandoned."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fault.harness import Stack, prompts, scaled, settle, start

pytestmark = pytest.mark.fault


def _poisoned_copy(model: Path, into: Path) -> Path:
    """The model folder with its denoiser's weights cut in half."""
    target = into / "cloud-poisoned"
    shutil.copytree(model, target)
    weights = next(
        target / part / "diffusion_pytorch_model.safetensors"
        for part in ("transformer", "unet")
        if (target / part).is_dir()
    )
    with weights.open("r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    return target


def test_requests_of_a_poisoned_tier_are_rerouted(
    make_stack: Callable[..., Stack],
    show: Callable[[str], None],
    tiny_models: dict[str, Path],
    tmp_path: Path,
) -> None:
    stack = start(
        make_stack(
            T2IROUTE_CLOUD_MODEL=str(_poisoned_copy(tiny_models["cloud"], tmp_path)),
            T2IROUTE_CLOUD_RATIO="0.9",
            T2IROUTE_CLOUD_BURST="5",
            T2IROUTE_EXPLORATION_RATE="0.2",
            T2IROUTE_TIER_FAILURE_THRESHOLD="3",
            T2IROUTE_TIER_COOLDOWN_SECONDS="300",
        )
    )
    ids = stack.submit(prompts(scaled(20)), steps=2)
    states = stack.wait_final(ids, timeout=180)
    figures = settle(stack, ids, show, "poisoned cloud tier")
    with stack.database() as conn:
        rows = conn.execute(
            "SELECT r.id, r.status, r.failure_reason, d.tier, json_array_length(d.explored) > 0,"
            " d.wanted_tier = 'cloud', "
            "d.rerouted_from, d.reroute_reason FROM generation_requests r "
            "JOIN routing_decisions d ON d.request_id = r.id WHERE r.id = ANY(%s)",
            (ids,),
        ).fetchall()

    figures.check(allow_failure=lambda reason: "cloud" in reason)
    assert figures.generations["cloud"] == 0, "a broken pipeline made an image"
    rerouted = [row for row in rows if row[6] == "cloud"]
    assert rerouted, "no request was re-routed away from the failing tier"
    for rid, status, reason, tier, explore, _, source, why in rows:
        if source == "cloud":
            assert tier == "edge" and why, f"{rid}: re-routed without a tier or a reason"
            assert status == "done", f"{rid}: re-routed yet {status} ({reason})"
        elif tier == "edge":
            assert status == "done", f"{rid}: an edge request was hurt: {reason}"
        if explore:
            assert status == "done", f"{rid}: a failed exploration failed its request: {reason}"
    wanted_cloud = sum(1 for row in rows if row[5])
    assert wanted_cloud > stack.settings.tier_failure_threshold, "too few wanted the cloud tier"
    assert list(states.values()).count("done") >= len(rerouted)
