"""How long a callback whose key's slots are all taken waits before it asks again."""

from __future__ import annotations

from workers.settings import Settings
from workers.stages.callbacks import slot_wait


def test_the_wait_doubles_within_jitter_up_to_the_attempt_timeout() -> None:
    settings = Settings(callback_timeout_seconds=5.0, lost_after_seconds=60)
    for refusals, step in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 5.0), (9, 5.0)]:
        waits = [slot_wait(refusals, settings) for _ in range(200)]
        assert all(w is not None and step / 2 <= w <= step for w in waits)
        assert len(set(waits)) > 1, "the waits are jittered"


def test_a_callback_waiting_past_the_lost_after_time_is_left_to_the_sweep() -> None:
    settings = Settings(callback_timeout_seconds=5.0, lost_after_seconds=60)
    # Steps waited: 0.5 + 1 + 2 + 4 + 5 * n; past 60 s after 15 refusals.
    assert slot_wait(15, settings) is not None
    assert slot_wait(16, settings) is None
    soon = Settings(lost_after_seconds=1)
    assert slot_wait(2, soon) is not None
    assert slot_wait(3, soon) is None, "0.5 s and 1 s waited"
