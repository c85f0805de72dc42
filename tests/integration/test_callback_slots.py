"""The per-key callback slots on the machine's real Redis: a bound per sender, given back
after the attempt, expiring with a dead holder's lease, atomic under contention, and open when
Redis cannot be reached."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from tests.fault.servers import free_port
from workers.services import callback_slots
from workers.services.callback_slots import SERVER, give_back, sender, take
from workers.settings import Settings

pytestmark = pytest.mark.integration

LEASE = 35.0


@pytest.fixture
def four(settings: Settings, clean_redis: redis.Redis) -> Settings:
    return settings.model_copy(update={"callback_max_in_flight_per_key": 4})


def test_a_sender_holds_at_most_its_slots_and_others_are_not_held_back(four: Settings) -> None:
    held = [take(four, "key:1", LEASE) for _ in range(4)]
    assert all(slot is not None and slot.holder for slot in held)
    assert take(four, "key:1", LEASE) is None
    assert take(four, "key:2", LEASE) is not None
    assert take(four, SERVER, LEASE) is not None

    first = held[0]
    assert first is not None
    give_back(four, first)
    assert take(four, "key:1", LEASE) is not None
    assert take(four, "key:1", LEASE) is None


def test_requests_without_a_key_share_the_servers_slots() -> None:
    assert sender(None) == SERVER
    assert sender(7) == "key:7" != sender(8)


def test_a_slot_whose_holder_died_expires_with_its_lease(four: Settings) -> None:
    for _ in range(3):
        assert take(four, "key:3", LEASE) is not None
    # A worker killed mid-attempt never gives its slot back.
    assert take(four, "key:3", 0.3) is not None
    assert take(four, "key:3", LEASE) is None
    time.sleep(0.4)
    assert take(four, "key:3", LEASE) is not None
    # The set goes with the last holder's lease: an idle key leaves nothing behind.
    with redis.Redis.from_url(four.redis_url) as client:
        ttl = client.pttl(callback_slots.KEY_PREFIX + "key:3")
    assert 0 < ttl <= LEASE * 1000


def test_contending_workers_never_take_more_than_the_slots(four: Settings) -> None:
    with ThreadPoolExecutor(max_workers=16) as pool:
        taken = list(pool.map(lambda _: take(four, "key:4", LEASE), range(64)))
    assert sum(slot is not None for slot in taken) == 4


def test_redis_unreachable_sends_without_the_bound(four: Settings) -> None:
    down = four.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    started = time.monotonic()
    slot = take(down, "key:5", LEASE)
    assert slot is not None and slot.holder is None
    give_back(down, slot)
    assert time.monotonic() - started < 2.0, "a slot is not worth holding an attempt for"
