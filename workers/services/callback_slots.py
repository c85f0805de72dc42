"""Callback slots: at most ``callback_max_in_flight_per_key`` callback attempts in flight per
API key (requests made without a key share the server's slots), so that a receiver that never
answers holds a few of the callbacks worker's threads and leaves the rest to every other key.

A key's slots are a Redis sorted set of holders scored by when each expires, on Redis
``TIME`` (the one clock every worker shares). One Lua script prunes the expired holders,
counts the rest and adds the new one, so two workers never both take the last slot. A slot
is given back when its attempt ends; the slot of a worker that died expires with the
attempt's claim (``callback_timeout_seconds`` plus ``CLAIM_MARGIN_SECONDS``), no later than
another attempt of that callback could start.

Redis unreachable: the attempt goes ahead without a slot (fail open), with a warning. The
bound is fairness between keys, not a safety property: the claim in Postgres still makes
each attempt once, and the callbacks worker's thread count still bounds the sends in flight.
Failing closed would stop every key's callbacks for as long as Redis is down, to protect
them from one another."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from functools import lru_cache

from redis import Redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.exceptions import RedisError
from redis.retry import Retry

from workers.settings import Settings

__all__ = ["KEY_PREFIX", "SERVER", "Slot", "give_back", "sender", "take"]

log = logging.getLogger(__name__)

KEY_PREFIX = "t2iroute:callbacks:slots:"
#: The sender of the callbacks of requests made without an API key.
SERVER = "server"
# A slot is a convenience, not worth holding an attempt for: Redis answers within this or the
# attempt goes ahead without one.
REDIS_TIMEOUT_SECONDS = 0.5

# KEYS[1]: the key's slots. ARGV: the holder, the number of slots, the seconds a slot lasts.
# 1 if the holder now has a slot; 0 if every slot is taken.
_TAKE_LUA = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
-- An idle key's set goes with its last holder.
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) * 1000))
return 1
"""


@dataclass(frozen=True)
class Slot:
    """One attempt's place among its key's slots; ``holder`` None when taken without Redis."""

    key: str
    holder: str | None


def sender(api_key_id: int | None) -> str:
    """Whose slots a request's callback takes: its API key's, or the server's."""
    return SERVER if api_key_id is None else f"key:{api_key_id}"


def take(settings: Settings, of: str, lease_seconds: float) -> Slot | None:
    """A slot of sender ``of`` for an attempt that ends within ``lease_seconds``, or None when
    all of its ``callback_max_in_flight_per_key`` slots are taken."""
    key = KEY_PREFIX + of
    holder = uuid.uuid4().hex
    try:
        taken = _take_script(settings.redis_url)(
            keys=[key], args=[holder, settings.callback_max_in_flight_per_key, lease_seconds]
        )
    except RedisError as exc:
        log.warning("callback slots unavailable (%s); sending without the per-key bound", exc)
        return Slot(key, None)
    return Slot(key, holder) if int(taken) else None


def give_back(settings: Settings, slot: Slot) -> None:
    """Free a slot taken by ``take``; one Redis cannot free now expires with its lease."""
    if slot.holder is None:
        return
    try:
        _client(settings.redis_url).zrem(slot.key, slot.holder)
    except RedisError as exc:
        log.warning("callback slot of %s left to expire: %s", slot.key, exc)


@lru_cache(maxsize=4)
def _client(url: str) -> Redis:
    # No backoff between tries: a slot is not worth holding an attempt for (see above).
    return Redis.from_url(
        url,
        socket_timeout=REDIS_TIMEOUT_SECONDS,
        socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
        retry=Retry(NoBackoff(), 1),
    )


@lru_cache(maxsize=4)
def _take_script(url: str) -> Script:
    return _client(url).register_script(_TAKE_LUA)
