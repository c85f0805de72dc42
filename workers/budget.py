"""The budget keeper: a token bucket that caps the cloud share of routed requests.

Every routed request adds ``rho`` tokens to the ratio bucket (capacity ``C``) and a cloud
generation takes one, so over any N consecutive decisions, by any number of router
processes, the cloud generations number at most ``rho * N + C``: the tokens after a
decision stay in ``[0, C]``, and a window can only spend what it started with plus what it
added. An optional second bucket caps cloud generations per second.

Two keepers make the same decisions. ``RedisBudgetKeeper`` runs each decision as one atomic
Lua script with Redis ``TIME`` as the only clock, so router processes on different hosts need
neither locks nor synchronised clocks. ``LocalBudgetKeeper`` runs the same step in Python under
a lock on the monotonic clock, for the embedded demo's single router process.

Amounts are kept in integer micro-tokens: Lua numbers are doubles, exact for integers, and a
Lua number in a script's reply is truncated to an integer. ``rho`` and the rates are read to
six decimals, rounded down, so rounding never grants more than the ratio.

Exploration (generating a request on both tiers to get a labelled pair) draws from its own
bucket, independently of what the router wants, so the labelled sample is not biased toward
the prompts the router sends anywhere. An explored request that is routed to edge costs an
extra cloud generation, so it also takes a cloud token from every cloud bucket (and waits
while there is none); one routed to cloud costs only an extra edge generation. Hence the
bound above holds for cloud generations, explorations included: ``cloud_ratio`` is the
whole cloud spend, and the router's own share is what exploration leaves of it.

Each request's decision is kept under a marker for ``marker_ttl_seconds``, so a redelivered
routing task gets its first decision back and never spends twice. All router processes must
share one set of limits; a keeper built with other values would refill the same buckets at
its own rate.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from decimal import ROUND_FLOOR, Decimal
from typing import Any, NamedTuple

from redis import Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from workers.settings import Settings

logger = logging.getLogger(__name__)

MICRO = 1_000_000

# Indexed by the verdict code that both the Lua script and ``_settle`` produce.
REASONS = ("not wanted", "granted", "ratio budget exhausted", "rate budget exhausted")
NOT_WANTED, GRANTED, RATIO_EXHAUSTED, RATE_EXHAUSTED = range(len(REASONS))

# The Lua twin of ``_settle``; the integration tests check that both decide alike.
# KEYS: 1 buckets hash, 2 counters hash, 3 this request's marker.
# ARGV: 1 wants cloud (1/0), 2 rho, 3 burst, 4 rate per second (0: no rate bucket),
#       5 rate burst, 6 exploration rate, 7 exploration burst, 8 marker TTL in seconds.
# Amounts are micro-tokens; the rate is micro-tokens per second.
_DECIDE_LUA = """
local stored = redis.call('GET', KEYS[3])
if stored then
  return stored
end
local wants_cloud = ARGV[1] == '1'
local rho, burst = tonumber(ARGV[2]), tonumber(ARGV[3])
local rate, rate_burst = tonumber(ARGV[4]), tonumber(ARGV[5])
local explore_rate, explore_burst = tonumber(ARGV[6]), tonumber(ARGV[7])
local one = 1000000

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])

-- A missing field is an empty bucket: a lost key must never hand out its burst twice.
local state = redis.call('HMGET', KEYS[1], 'ratio', 'explore', 'rate', 'rate_at')
local ratio = math.min(burst, (tonumber(state[1]) or 0) + rho)
local explore = math.min(explore_burst, (tonumber(state[2]) or 0) + explore_rate)
local rate_tokens = one
local rate_at = tonumber(state[4]) or now
if rate > 0 then
  -- A clock that steps back refills nothing until it has caught up again.
  local refill = math.floor(math.max(0, now - rate_at) * rate / 1000000)
  rate_tokens = math.min(rate_burst, (tonumber(state[3]) or 0) + refill)
  rate_at = math.max(rate_at, now)
end

local verdict = 0
if wants_cloud then
  if ratio < one then verdict = 2 elseif rate_tokens < one then verdict = 3 else verdict = 1 end
end
local cloud = verdict == 1
local explored = explore >= one and ratio >= one and rate_tokens >= one
if explored then
  explore = explore - one
end
if cloud or explored then
  ratio = ratio - one
  rate_tokens = rate_tokens - one
end

redis.call('HSET', KEYS[1], 'ratio', ratio, 'explore', explore)
if rate > 0 then
  redis.call('HSET', KEYS[1], 'rate', rate_tokens, 'rate_at', rate_at)
end
local seq = redis.call('HINCRBY', KEYS[2], 'requests', 1)
if cloud then redis.call('HINCRBY', KEYS[2], 'cloud', 1) end
if explored then redis.call('HINCRBY', KEYS[2], 'explore', 1) end
if cloud or explored then redis.call('HINCRBY', KEYS[2], 'cloud_generations', 1) end

local decision = cjson.encode({cloud = cloud, explore = explored, verdict = verdict,
                               tokens = ratio, seq = seq})
redis.call('SET', KEYS[3], decision, 'NX', 'EX', ARGV[8])
return decision
"""


@dataclass(frozen=True)
class BudgetDecision:
    """What the keeper allowed for one request; a redelivered request gets the same one back.

    ``sequence`` is the decision's position among all decisions on these buckets, by every
    router process (None when the keeper was unreachable), so a log of decisions can be put
    back in the order the buckets saw them.
    """

    cloud: bool
    explore: bool
    reason: str
    tokens_left: float | None
    sequence: int | None = None


def _micro(amount: float) -> int:
    """Micro-tokens from an amount, via its shortest decimal form, rounded down."""
    return int((Decimal(repr(amount)) * MICRO).to_integral_value(rounding=ROUND_FLOOR))


class _MicroLimits(NamedTuple):
    rho: int
    burst: int
    rate: int  # per second; 0: no rate bucket
    rate_burst: int
    explore_rate: int
    explore_burst: int


@dataclass(frozen=True)
class BudgetLimits:
    """The buckets' sizes: ``rho`` tokens per request up to ``burst``, optionally at most
    ``rate_per_second`` cloud generations per second up to ``rate_burst``, and
    ``exploration_rate`` explorations per request up to ``exploration_burst``."""

    rho: float
    burst: float
    rate_per_second: float | None = None
    rate_burst: float = 10.0
    exploration_rate: float = 0.0
    exploration_burst: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.rho <= 1.0 or not 0.0 <= self.exploration_rate <= 1.0:
            raise ValueError("rho and exploration_rate must lie in [0, 1]")
        # A bucket that can never hold a whole token would silently deny every request.
        if min(self.burst, self.rate_burst, self.exploration_burst) < 1.0:
            raise ValueError("every bucket capacity must hold at least one token")
        if self.rate_per_second is not None and self.rate_per_second <= 0.0:
            raise ValueError("rate_per_second must be positive, or None for no rate bucket")

    @classmethod
    def from_settings(cls, settings: Settings) -> BudgetLimits:
        return cls(
            rho=settings.cloud_ratio,
            burst=settings.cloud_burst,
            rate_per_second=settings.cloud_rate_per_second,
            rate_burst=settings.cloud_rate_burst,
            exploration_rate=settings.exploration_rate,
            exploration_burst=settings.exploration_burst,
        )

    def micro(self) -> _MicroLimits:
        return _MicroLimits(
            _micro(self.rho),
            _micro(self.burst),
            _micro(self.rate_per_second or 0.0),
            _micro(self.rate_burst),
            _micro(self.exploration_rate),
            _micro(self.exploration_burst),
        )


@dataclass(frozen=True)
class Buckets:
    """Micro-tokens per bucket after the last decision; all empty before the first one.

    ``rate_at`` is the clock reading (microseconds) the rate bucket was last refilled to.
    """

    ratio: int = 0
    explore: int = 0
    rate: int = 0
    rate_at: int | None = None


@dataclass(frozen=True)
class Counters:
    requests: int = 0
    cloud: int = 0
    explore: int = 0
    cloud_generations: int = 0


class _Outcome(NamedTuple):
    cloud: bool
    explore: bool
    verdict: int
    tokens: int


def _settle(
    buckets: Buckets, limits: _MicroLimits, now: int, wants_cloud: bool
) -> tuple[Buckets, _Outcome]:
    """One decision on the buckets at clock reading ``now`` (microseconds): ``_DECIDE_LUA``
    in Python, step for step."""
    ratio = min(limits.burst, buckets.ratio + limits.rho)
    explore = min(limits.explore_burst, buckets.explore + limits.explore_rate)
    rate_tokens, rate_at = MICRO, buckets.rate_at
    if limits.rate:
        last = now if rate_at is None else rate_at
        refill = max(0, now - last) * limits.rate // MICRO
        rate_tokens = min(limits.rate_burst, buckets.rate + refill)
        rate_at = max(last, now)

    verdict = NOT_WANTED
    if wants_cloud:
        verdict = (
            RATIO_EXHAUSTED if ratio < MICRO else RATE_EXHAUSTED if rate_tokens < MICRO else GRANTED
        )
    cloud = verdict == GRANTED
    explored = explore >= MICRO and ratio >= MICRO and rate_tokens >= MICRO
    if explored:
        explore -= MICRO
    if cloud or explored:
        ratio -= MICRO
        rate_tokens -= MICRO
    settled = Buckets(ratio, explore, rate_tokens if limits.rate else 0, rate_at)
    return settled, _Outcome(cloud, explored, verdict, ratio)


def _decision(outcome: _Outcome, sequence: int) -> BudgetDecision:
    return BudgetDecision(
        cloud=outcome.cloud,
        explore=outcome.explore,
        reason=REASONS[outcome.verdict],
        tokens_left=outcome.tokens / MICRO,
        sequence=sequence,
    )


def worst_window_excess(spent: Iterable[bool], rho: float) -> float:
    """max over all windows of consecutive decisions of (cloud generations - rho * length).

    The keeper guarantees it is at most the burst. With prefix sums P, the excess of window
    (i, j] is (P_j - rho j) - (P_i - rho i), so one pass keeps the lowest earlier value.
    """
    running, lowest, worst = 0.0, 0.0, 0.0
    for was_spent in spent:
        running += float(was_spent) - rho
        worst = max(worst, running - lowest)
        lowest = min(lowest, running)
    return worst


class BudgetKeeper(ABC):
    """Decides, per request, whether it may go to the cloud tier and whether to explore it."""

    def __init__(self, limits: BudgetLimits, marker_ttl_seconds: int) -> None:
        if marker_ttl_seconds < 1:
            raise ValueError("marker_ttl_seconds must be at least 1")
        self.limits = limits
        self._micro_limits = limits.micro()
        self._marker_ttl_seconds = marker_ttl_seconds

    @staticmethod
    def from_settings(settings: Settings) -> BudgetKeeper:
        """The keeper ``settings.budget_backend`` names (see ``budget_keeper_from_settings``)."""
        return budget_keeper_from_settings(settings)

    def decide(self, request_id: str, *, wants_cloud: bool) -> BudgetDecision:
        """Make (or replay) the budget decision for one request. Never raises for a backend
        failure: the request goes to edge, unexplored, with the reason, because an
        unbudgeted cloud route costs money and an edge route only some quality."""
        if not request_id:
            raise ValueError("a budget decision needs a request id")
        return self._decide(request_id, wants_cloud)

    def stats(self) -> dict[str, float]:
        """Tokens in each bucket as of the last decision, and the decision counters.

        The rate bucket is shown as stored, not refilled to now, so that reading the stats
        needs no clock of its own.
        """
        buckets, counters = self._snapshot()
        result = {
            "ratio_tokens": buckets.ratio / MICRO,
            "exploration_tokens": buckets.explore / MICRO,
        }
        if self._micro_limits.rate:
            result["rate_tokens"] = buckets.rate / MICRO
        result |= {
            "requests": float(counters.requests),
            "cloud": float(counters.cloud),
            "explore": float(counters.explore),
            "cloud_generations": float(counters.cloud_generations),
        }
        return result

    @abstractmethod
    def reset(self) -> None:
        """Forget the buckets, counters and request markers; the buckets come back empty, as
        after a lost key, and fill at ``rho`` per request."""

    @abstractmethod
    def _decide(self, request_id: str, wants_cloud: bool) -> BudgetDecision: ...

    @abstractmethod
    def _snapshot(self) -> tuple[Buckets, Counters]: ...


def budget_redis(url: str, timeout_seconds: float) -> Redis:
    """A client that gives up within about two timeouts, never backing off between tries.

    redis-py retries with exponential backoff by default, which would hold a routing
    decision for seconds while Redis is down. One immediate retry is kept: it rescues a
    pooled connection that a Redis restart closed, and is safe because the per-request
    marker makes a repeated decision return the first one.
    """
    return Redis.from_url(
        url,
        socket_timeout=timeout_seconds,
        socket_connect_timeout=timeout_seconds,
        retry=Retry(NoBackoff(), 1),
    )


def _escape_glob(text: str) -> str:
    """Escape the characters that SCAN's MATCH treats as a pattern."""
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)


def _ints(reply: dict[Any, Any]) -> dict[str, int]:
    """A hash reply as names to integers, whether or not the client decodes responses."""
    return {
        (key.decode() if isinstance(key, bytes) else key): int(value)
        for key, value in reply.items()
    }


class RedisBudgetKeeper(BudgetKeeper):
    """The buckets in one Redis, shared by every router process; one script call a decision."""

    def __init__(
        self,
        redis: Redis,
        limits: BudgetLimits,
        *,
        key_prefix: str = "t2iroute:budget",
        marker_ttl_seconds: int = 86400,
    ) -> None:
        super().__init__(limits, marker_ttl_seconds)
        self._redis = redis
        self._script = redis.register_script(_DECIDE_LUA)
        self._buckets_key = f"{key_prefix}:buckets"
        self._counters_key = f"{key_prefix}:counters"
        self._marker_prefix = f"{key_prefix}:request:"

    def _decide(self, request_id: str, wants_cloud: bool) -> BudgetDecision:
        keys = [self._buckets_key, self._counters_key, self._marker_prefix + request_id]
        args = [int(wants_cloud), *self._micro_limits, self._marker_ttl_seconds]
        try:
            raw = self._script(keys=keys, args=args)
        except RedisError as exc:
            reason = f"budget keeper unavailable: {type(exc).__name__}: {exc}"
            logger.warning("routing %s to edge: %s", request_id, reason)
            return BudgetDecision(cloud=False, explore=False, reason=reason, tokens_left=None)
        stored: dict[str, Any] = json.loads(raw)
        outcome = _Outcome(
            bool(stored["cloud"]),
            bool(stored["explore"]),
            int(stored["verdict"]),
            int(stored["tokens"]),
        )
        return _decision(outcome, int(stored["seq"]))

    def _snapshot(self) -> tuple[Buckets, Counters]:
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(self._buckets_key)
        pipe.hgetall(self._counters_key)
        buckets, counters = (_ints(reply) for reply in pipe.execute())
        return (
            Buckets(buckets.get("ratio", 0), buckets.get("explore", 0), buckets.get("rate", 0)),
            Counters(**counters),
        )

    def reset(self) -> None:
        pattern = _escape_glob(self._marker_prefix) + "*"
        batch: list[Any] = []
        for key in self._redis.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) == 1000:
                self._redis.delete(*batch)
                batch.clear()
        self._redis.delete(self._buckets_key, self._counters_key, *batch)


def _monotonic_micros() -> int:
    return time.monotonic_ns() // 1000


class LocalBudgetKeeper(BudgetKeeper):
    """The buckets in this process, for a single router process without Redis (the embedded
    demo). Thread-safe; its state, markers included, lasts as long as the process, and a
    restarted process starts with empty buckets, as after a lost Redis key."""

    def __init__(
        self,
        limits: BudgetLimits,
        *,
        marker_ttl_seconds: int = 86400,
        clock: Callable[[], int] = _monotonic_micros,
    ) -> None:
        """``clock`` reads microseconds and never goes back (the rate bucket's time)."""
        super().__init__(limits, marker_ttl_seconds)
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets = Buckets()
        self._counters = Counters()
        # request id -> (expiry, decision); expiries grow in insertion order (one TTL).
        self._markers: OrderedDict[str, tuple[int, BudgetDecision]] = OrderedDict()

    def _decide(self, request_id: str, wants_cloud: bool) -> BudgetDecision:
        with self._lock:
            now = self._clock()
            while self._markers and next(iter(self._markers.values()))[0] <= now:
                self._markers.popitem(last=False)
            if request_id in self._markers:
                return self._markers[request_id][1]
            self._buckets, outcome = _settle(self._buckets, self._micro_limits, now, wants_cloud)
            spent = outcome.cloud or outcome.explore
            counters = self._counters
            self._counters = replace(
                counters,
                requests=counters.requests + 1,
                cloud=counters.cloud + outcome.cloud,
                explore=counters.explore + outcome.explore,
                cloud_generations=counters.cloud_generations + spent,
            )
            decision = _decision(outcome, self._counters.requests)
            self._markers[request_id] = (now + self._marker_ttl_seconds * MICRO, decision)
            return decision

    def _snapshot(self) -> tuple[Buckets, Counters]:
        with self._lock:
            return self._buckets, self._counters

    def reset(self) -> None:
        with self._lock:
            self._buckets = Buckets()
            self._counters = Counters()
            self._markers.clear()


def budget_keeper_from_settings(settings: Settings) -> BudgetKeeper:
    """The keeper ``settings.budget_backend`` names: ``redis`` for router workers that share
    buckets (short socket timeouts on ``redis_url``), ``local`` for one router process."""
    limits = BudgetLimits.from_settings(settings)
    if settings.budget_backend == "local":
        return LocalBudgetKeeper(limits)
    client = budget_redis(settings.redis_url, settings.budget_redis_timeout_seconds)
    return RedisBudgetKeeper(client, limits, key_prefix=settings.budget_key_prefix)
