"""The budget keeper: a token bucket that bounds what a pool of tiers spends above its cheapest.

Each tier has a cost per image; its extra cost is its cost minus the cheapest tier's. Every
routed request adds ``B`` cost units to the spend bucket (capacity ``C``), and every image a
request is generated on takes its tier's extra cost from it. So over any N consecutive
decisions, by any number of router processes, the extra cost spent is at most ``B * N + C``:
the bucket after a decision holds between 0 and ``C``, and a window can only spend what it
started with plus what it added. With the two tiers edge and cloud, ``B = rho * (cost_cloud -
cost_edge)`` and ``C = burst * (cost_cloud - cost_edge)`` make this the cloud-share bound:
at most ``rho * N + burst`` cloud generations.

The caller ranks the tiers a request may go to, best first. The keeper grants the first one
whose extra cost the buckets hold, and the cheapest tier when none does (it costs nothing
extra, so it is always affordable): a refused choice gets the best tier the budget affords,
not necessarily the cheapest. An optional second bucket caps the spend per second (with two
tiers: cloud generations per second times the cloud's extra cost); a tier must fit both.

Two keepers make the same decisions. ``RedisBudgetKeeper`` runs each decision as one atomic
Lua script with Redis ``TIME`` as the only clock, so router processes on different hosts need
neither locks nor synchronised clocks. ``LocalBudgetKeeper`` runs the same step in Python under
a lock on the monotonic clock, for the embedded demo's single router process.

Amounts are kept in integer micro-units: Lua numbers are doubles, exact for integers, and a
Lua number in a script's reply is truncated to an integer. Budgets and rates are read to six
decimals rounded down and extra costs rounded up, so rounding never grants more than the
budget. Every amount stays below ``MAX_AMOUNT`` units, so that the micro-units stay below
10**14, which Lua's JSON (14 significant digits) carries exactly.

Exploration (generating a request on more tiers than its answer's, to get labelled pairs)
draws one token from its own bucket, independently of what the router wants, so the labelled
sample is not biased toward the prompts the router sends anywhere. It also takes the extra
cost of every tier it adds to the granted one from the spend (and rate) bucket, and waits while
they cannot pay for it. Hence the bound above holds for all generations, explorations
included: ``B`` is the whole spend, and the router's own share is what exploration leaves.

Each request's decision is kept under a marker for ``marker_ttl_seconds``, so a redelivered
routing task gets its first decision back and never spends twice. A request that ends failed
(no tier could serve it) gets back what it was charged, under its own decision and those of
its reroutes and escalations, once (a marker of its own) and never beyond the capacity: the
bound above then holds for what was kept, the spend less the refunds. All router processes must
share one set of limits; a keeper built with other values would refill the same buckets at
its own rate, or price the tiers otherwise.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from functools import cached_property
from typing import Any, NamedTuple

from redis import Redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from workers.settings import Settings

logger = logging.getLogger(__name__)

MICRO = 1_000_000
MAX_AMOUNT = 10_000_000

# What became of the caller's first choice: the verdict code that both the Lua script and
# ``_settle`` produce.
GRANTED, SPEND_EXHAUSTED, RATE_EXHAUSTED = range(3)
_REFUSALS = {SPEND_EXHAUSTED: "budget exhausted", RATE_EXHAUSTED: "rate budget exhausted"}

# The Lua twin of ``_settle``; the integration tests check that both decide alike.
# KEYS: 1 buckets hash, 2 counters hash, 3 this request's marker.
# ARGV: 1 budget per request, 2 burst, 3 rate per second (0: no rate bucket), 4 rate burst,
#       5 exploration rate, 6 exploration burst, 7 marker TTL in seconds, 8 the number P of
#       preferred tiers; then P pairs (tier, extra cost), best first, the last one costing
#       nothing extra; then a pair (tier, extra cost) for each tier to explore.
# Amounts are micro-units; the rate is micro-units per second.
_DECIDE_LUA = """
local stored = redis.call('GET', KEYS[3])
if stored then
  return stored
end
local per_request, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local rate, rate_burst = tonumber(ARGV[3]), tonumber(ARGV[4])
local explore_rate, explore_burst = tonumber(ARGV[5]), tonumber(ARGV[6])
local last_choice = 8 + 2 * tonumber(ARGV[8])
local one = 1000000

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])

-- A missing field is an empty bucket: a lost key must never hand out its burst twice.
local state = redis.call('HMGET', KEYS[1], 'spend', 'explore', 'rate', 'rate_at')
local spend = math.min(burst, (tonumber(state[1]) or 0) + per_request)
local explore = math.min(explore_burst, (tonumber(state[2]) or 0) + explore_rate)
local rate_tokens = 0
local rate_at = tonumber(state[4]) or now
if rate > 0 then
  -- A clock that steps back refills nothing until it has caught up again. The product is
  -- exact in doubles while rate_burst stays below 9,000 units; past that, the refill near
  -- the capacity may round differently from Python's, never beyond the capacity.
  local refill = math.floor(math.max(0, now - rate_at) * rate / 1000000)
  rate_tokens = math.min(rate_burst, (tonumber(state[3]) or 0) + refill)
  rate_at = math.max(rate_at, now)
end

local function refusal(cost, taken)
  if cost > spend - taken then return 1 end
  if rate > 0 and cost > rate_tokens - taken then return 2 end
  return 0
end

local tier, spent, verdict = nil, 0, 0
for i = 9, last_choice, 2 do
  local cost = tonumber(ARGV[i + 1])
  local refused = refusal(cost, 0)
  if refused == 0 then
    tier, spent = ARGV[i], cost
    break
  end
  if i == 9 then verdict = refused end
end

local explored, extra = {}, 0
for i = last_choice + 1, #ARGV, 2 do
  if ARGV[i] ~= tier then
    explored[#explored + 1] = ARGV[i]
    extra = extra + tonumber(ARGV[i + 1])
  end
end
if #explored > 0 and explore >= one and refusal(extra, spent) == 0 then
  explore = explore - one
  spent = spent + extra
else
  explored = {}
end

redis.call('HSET', KEYS[1], 'spend', spend - spent, 'explore', explore)
if rate > 0 then
  redis.call('HSET', KEYS[1], 'rate', rate_tokens - spent, 'rate_at', rate_at)
end
local seq = redis.call('HINCRBY', KEYS[2], 'requests', 1)
redis.call('HINCRBY', KEYS[2], tier .. '_routes', 1)
redis.call('HINCRBY', KEYS[2], tier .. '_generations', 1)
for _, name in ipairs(explored) do
  redis.call('HINCRBY', KEYS[2], name .. '_generations', 1)
end
if #explored > 0 then redis.call('HINCRBY', KEYS[2], 'explored', 1) end
if spent > 0 then redis.call('HINCRBY', KEYS[2], 'spent', spent) end

local decision = cjson.encode({tier = tier, explored = explored, verdict = verdict,
                               wanted = ARGV[9], spent = spent, tokens = spend - spent,
                               seq = seq})
redis.call('SET', KEYS[3], decision, 'NX', 'EX', ARGV[7])
return decision
"""


# The Lua twin of ``_give_back``: a failed request's charges back into the spend bucket.
# KEYS: 1 buckets hash, 2 counters hash, 3 this request's refund marker, then the markers of
#       the decisions that charged it. ARGV: 1 burst, 2 marker TTL in seconds.
_REFUND_LUA = """
if not redis.call('SET', KEYS[3], 1, 'NX', 'EX', ARGV[2]) then
  return 0
end
local charged = 0
for i = 4, #KEYS do
  local stored = redis.call('GET', KEYS[i])
  if stored then
    charged = charged + tonumber(cjson.decode(stored).spent)
  end
end
local spend = tonumber(redis.call('HGET', KEYS[1], 'spend')) or 0
local back = math.max(0, math.min(tonumber(ARGV[1]), spend + charged) - spend)
if back > 0 then
  redis.call('HSET', KEYS[1], 'spend', spend + back)
  redis.call('HINCRBY', KEYS[2], 'refunded', back)
end
return back
"""


@dataclass(frozen=True)
class BudgetDecision:
    """What the keeper allowed for one request; a redelivered request gets the same one back.

    ``tier`` is the tier granted to answer the request and ``explored`` the tiers to generate
    it on as well (empty when it is not explored). ``spent`` is the extra cost taken for all
    of them and ``tokens_left`` what the spend bucket holds after it (None when the keeper was
    unreachable). ``sequence`` is the decision's position among all decisions on these
    buckets, by every router process (None when the keeper was unreachable), so a log of
    decisions can be put back in the order the buckets saw them.
    """

    tier: str
    explored: tuple[str, ...]
    reason: str
    spent: float
    tokens_left: float | None
    sequence: int | None = None


def _micro(amount: float) -> int:
    """Micro-units from an amount, via its shortest decimal form, rounded down."""
    return int((Decimal(repr(amount)) * MICRO).to_integral_value(rounding=ROUND_FLOOR))


def _extra_micro(cost: float, cheapest: float) -> int:
    """Micro-units by which ``cost`` exceeds ``cheapest``, rounded up."""
    extra = (Decimal(repr(cost)) - Decimal(repr(cheapest))) * MICRO
    return int(extra.to_integral_value(rounding=ROUND_CEILING))


class _MicroLimits(NamedTuple):
    per_request: int
    burst: int
    rate: int  # per second; 0: no rate bucket
    rate_burst: int
    explore_rate: int
    explore_burst: int


@dataclass(frozen=True)
class BudgetLimits:
    """The pool's prices and the buckets' sizes, in the operator's cost unit.

    ``tier_costs`` maps each tier to its cost per image. ``budget_per_request`` (B) is the
    extra cost each request adds to the spend bucket, up to ``burst`` (C). ``rate_per_second``
    optionally caps the extra cost spent per second, up to ``rate_burst``. Exploration is
    allowed ``exploration_rate`` times per request, up to ``exploration_burst`` at once.
    """

    tier_costs: dict[str, float]
    budget_per_request: float
    burst: float
    rate_per_second: float | None = None
    rate_burst: float = 0.0
    exploration_rate: float = 0.0
    exploration_burst: float = 1.0

    def __post_init__(self) -> None:
        if not self.tier_costs or not all(self.tier_costs):
            raise ValueError("a pool needs at least one tier, and every tier a name")
        amounts = [
            *self.tier_costs.values(),
            self.budget_per_request,
            self.burst,
            self.rate_per_second or 0.0,
            self.rate_burst,
        ]
        # Written so that NaN fails it too.
        if not all(0.0 <= amount <= MAX_AMOUNT for amount in amounts):
            raise ValueError(f"costs, budgets and capacities must lie in [0, {MAX_AMOUNT}]")
        if not 0.0 <= self.exploration_rate <= 1.0:
            raise ValueError("exploration_rate must lie in [0, 1]")
        if self.exploration_burst < 1.0:
            raise ValueError("the exploration bucket must hold at least one exploration")
        # A bucket that can never hold the dearest tier's extra cost would silently deny it.
        dearest = max(self.extra_micro.values())
        if _micro(self.burst) < dearest:
            raise ValueError("burst must hold the dearest tier's extra cost")
        if self.rate_per_second is not None:
            # Below a micro-unit a second the rate would round to 0, which means no rate bucket.
            if _micro(self.rate_per_second) < 1:
                raise ValueError(
                    "rate_per_second must be at least 1e-6 units a second (it caps the extra "
                    "cost, so a pool whose tiers all cost the same has nothing to cap), or "
                    "None for no rate bucket"
                )
            if _micro(self.rate_burst) < dearest:
                raise ValueError("rate_burst must hold the dearest tier's extra cost")

    @classmethod
    def from_settings(cls, settings: Settings) -> BudgetLimits:
        """The pool of the settings. ``cloud_ratio`` and ``cloud_burst`` (and the optional
        ``cloud_rate_per_second``) count images of the pool's dearest tier, priced at its cost
        above the cheapest: with the two default tiers, the cloud generations over any N
        decisions stay at most ``cloud_ratio * N + cloud_burst``. ``budget_per_request``
        states B in cost units directly instead."""
        pool = settings.pool
        # Exact decimal products of the dearest tier's extra cost as the keeper prices it, so
        # that ``cloud_ratio`` 0.3 makes 0.3 such images a request and not a micro-unit less.
        extra = Decimal(_extra_micro(pool.tiers[-1].cost, pool.cheapest.cost)) / MICRO

        def dearest_images(count: float) -> float:
            return float(Decimal(repr(count)) * extra)

        rate = settings.cloud_rate_per_second
        per_request = settings.budget_per_request
        return cls(
            tier_costs=pool.costs(),
            budget_per_request=dearest_images(settings.cloud_ratio)
            if per_request is None
            else per_request,
            burst=dearest_images(settings.cloud_burst),
            rate_per_second=None if rate is None else dearest_images(rate),
            rate_burst=dearest_images(settings.cloud_rate_burst),
            exploration_rate=settings.exploration_rate,
            exploration_burst=settings.exploration_burst,
        )

    @property
    def cheapest(self) -> str:
        """The tier every other is priced against (the first named, among equals)."""
        return min(self.tier_costs, key=self.tier_costs.__getitem__)

    @cached_property
    def extra_micro(self) -> dict[str, int]:
        """Each tier's extra cost in micro-units, rounded up."""
        base = self.tier_costs[self.cheapest]
        return {tier: _extra_micro(cost, base) for tier, cost in self.tier_costs.items()}

    def extra_cost(self, tier: str) -> float:
        """What the keeper takes for one image on ``tier``, in cost units."""
        return self.extra_micro[tier] / MICRO

    def micro(self) -> _MicroLimits:
        return _MicroLimits(
            _micro(self.budget_per_request),
            _micro(self.burst),
            _micro(self.rate_per_second or 0.0),
            _micro(self.rate_burst),
            _micro(self.exploration_rate),
            _micro(self.exploration_burst),
        )


@dataclass(frozen=True)
class Buckets:
    """Micro-units per bucket after the last decision; all empty before the first one.

    ``rate_at`` is the clock reading (microseconds) the rate bucket was last refilled to.
    """

    spend: int = 0
    explore: int = 0
    rate: int = 0
    rate_at: int | None = None


class _Plan(NamedTuple):
    """One request's asks as (tier, extra micro-units): the preference, best first and ending
    with a tier that costs nothing extra, and the tiers to explore."""

    preference: tuple[tuple[str, int], ...]
    explore: tuple[tuple[str, int], ...]


class _Outcome(NamedTuple):
    tier: str
    explored: tuple[str, ...]
    verdict: int
    wanted: str
    spent: int
    tokens: int


def _settle(
    buckets: Buckets, limits: _MicroLimits, now: int, plan: _Plan
) -> tuple[Buckets, _Outcome]:
    """One decision on the buckets at clock reading ``now`` (microseconds): ``_DECIDE_LUA``
    in Python, step for step."""
    spend = min(limits.burst, buckets.spend + limits.per_request)
    explore = min(limits.explore_burst, buckets.explore + limits.explore_rate)
    rate_tokens, rate_at = 0, buckets.rate_at
    if limits.rate:
        last = now if rate_at is None else rate_at
        refill = max(0, now - last) * limits.rate // MICRO
        rate_tokens = min(limits.rate_burst, buckets.rate + refill)
        rate_at = max(last, now)

    def refusal(cost: int, taken: int) -> int:
        if cost > spend - taken:
            return SPEND_EXHAUSTED
        if limits.rate and cost > rate_tokens - taken:
            return RATE_EXHAUSTED
        return GRANTED

    wanted, wanted_cost = plan.preference[0]
    tier, spent = next((t, cost) for t, cost in plan.preference if refusal(cost, 0) == GRANTED)
    others = [(t, cost) for t, cost in plan.explore if t != tier]
    extra = sum(cost for _, cost in others)
    explored: tuple[str, ...] = ()
    if others and explore >= MICRO and refusal(extra, spent) == GRANTED:
        explored = tuple(t for t, _ in others)
        explore -= MICRO
        spent += extra
    settled = Buckets(spend - spent, explore, rate_tokens - spent if limits.rate else 0, rate_at)
    outcome = _Outcome(tier, explored, refusal(wanted_cost, 0), wanted, spent, spend - spent)
    return settled, outcome


def _give_back(buckets: Buckets, limits: _MicroLimits, charged: int) -> tuple[Buckets, int]:
    """A failed request's ``charged`` micro-units back into the spend bucket, as far as its
    capacity allows (``_REFUND_LUA`` in Python); the buckets after, and what went back."""
    back = max(0, min(limits.burst, buckets.spend + charged) - buckets.spend)
    return replace(buckets, spend=buckets.spend + back), back


def _decision(outcome: _Outcome, sequence: int) -> BudgetDecision:
    verdict = outcome.verdict
    refusal = f"wanted {outcome.wanted}: {_REFUSALS[verdict]}" if verdict != GRANTED else ""
    return BudgetDecision(
        tier=outcome.tier,
        explored=outcome.explored,
        reason=refusal or "granted",
        spent=outcome.spent / MICRO,
        tokens_left=outcome.tokens / MICRO,
        sequence=sequence,
    )


def worst_window_excess(spent: Iterable[float], per_request: float) -> float:
    """max over all windows of consecutive decisions of (spend - per_request * length).

    The keeper guarantees it is at most the burst. With prefix sums P, the excess of window
    (i, j] is (P_j - B j) - (P_i - B i), so one pass keeps the lowest earlier value.
    """
    running, lowest, worst = 0.0, 0.0, 0.0
    for amount in spent:
        running += amount - per_request
        worst = max(worst, running - lowest)
        lowest = min(lowest, running)
    return worst


class BudgetKeeper(ABC):
    """Decides, per request, which tier it may go to and whether to explore more tiers."""

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

    def decide(
        self, request_id: str, *, preference: Sequence[str], explore: Sequence[str] = ()
    ) -> BudgetDecision:
        """Make (or replay) the budget decision for one request.

        ``preference`` ranks the tiers the request may go to, best first: the first one the
        buckets can pay for is granted, and the cheapest tier when none can. ``explore`` names
        the tiers to generate as well, for labels, when the exploration bucket allows and the
        spend can pay for them too; the granted tier among them is left out. A replay returns
        the first decision, whatever it is asked. Never raises for a backend failure: the
        request gets the cheapest tier, unexplored, with the reason, because an unbudgeted
        dear tier costs money and a cheap one only some quality.
        """
        if not request_id:
            raise ValueError("a budget decision needs a request id")
        return self._decide(request_id, self._plan(preference, explore))

    def decide_many(
        self, requests: Sequence[tuple[str, Sequence[str], Sequence[str]]]
    ) -> list[BudgetDecision]:
        """``decide`` for a batch of (request id, preference, explore), in order: the same
        decisions as one call each, in one round trip where the backend allows."""
        for request_id, _, _ in requests:
            if not request_id:
                raise ValueError("a budget decision needs a request id")
        plans = [(rid, self._plan(preference, explore)) for rid, preference, explore in requests]
        return self._decide_many(plans)

    def _decide_many(self, plans: Sequence[tuple[str, _Plan]]) -> list[BudgetDecision]:
        return [self._decide(request_id, plan) for request_id, plan in plans]

    def _plan(self, preference: Sequence[str], explore: Sequence[str]) -> _Plan:
        if isinstance(preference, str) or isinstance(explore, str):
            raise TypeError("preference and explore are sequences of tier names, not one name")
        if not preference:
            raise ValueError("a budget decision needs at least one preferred tier")
        extra = self.limits.extra_micro
        unknown = [tier for tier in (*preference, *explore) if tier not in extra]
        if unknown:
            raise ValueError(f"unknown tiers {unknown}; the pool has {list(extra)}")
        # Plain strings, so that a str enum member and its value make the same decision.
        ranked: list[tuple[str, int]] = []
        for tier in dict.fromkeys(map(str, preference)):
            ranked.append((tier, extra[tier]))
            if extra[tier] == 0:  # always affordable: nothing after it is ever looked at
                break
        else:
            ranked.append((self.limits.cheapest, 0))
        explored = tuple((tier, extra[tier]) for tier in dict.fromkeys(map(str, explore)))
        return _Plan(tuple(ranked), explored)

    def refund(self, request_id: str, charges: Sequence[str]) -> float:
        """Give back what a request that failed was charged: the extra cost of the decisions
        named ``charges`` (the ids it was decided under: its own, its reroutes', its
        escalations'), into the spend bucket, never beyond its capacity. Once per request: a
        second call gives nothing. Returns the units given back. A decision whose marker has
        expired is not known any more and gives nothing; a backend failure gives nothing
        either and does not raise (the spend stays counted: the keeper fails closed)."""
        if not request_id:
            raise ValueError("a refund needs a request id")
        if isinstance(charges, str):
            raise TypeError("charges is a sequence of decision ids, not one id")
        return self._refund(request_id, list(dict.fromkeys(charges))) / MICRO

    def _unreachable(self, request_id: str, exc: Exception) -> BudgetDecision:
        reason = f"budget keeper unavailable: {type(exc).__name__}: {exc}"
        cheapest = self.limits.cheapest
        logger.warning("routing %s to %s: %s", request_id, cheapest, reason)
        return BudgetDecision(
            tier=cheapest, explored=(), reason=reason, spent=0.0, tokens_left=None
        )

    def stats(self) -> dict[str, float]:
        """Units in each bucket as of the last decision, the extra cost spent and given back,
        and the decisions, explorations, routes and generations (explorations included) per tier.

        The rate bucket is shown as stored, not refilled to now, so that reading the stats
        needs no clock of its own.
        """
        buckets, counters = self._snapshot()
        result = {
            "spend_tokens": buckets.spend / MICRO,
            "exploration_tokens": buckets.explore / MICRO,
        }
        if self._micro_limits.rate:
            result["rate_tokens"] = buckets.rate / MICRO
        result |= {
            "requests": float(counters.get("requests", 0)),
            "spent": counters.get("spent", 0) / MICRO,
            "refunded": counters.get("refunded", 0) / MICRO,
            "explored": float(counters.get("explored", 0)),
        }
        for tier in self.limits.tier_costs:
            for counter in (f"{tier}_routes", f"{tier}_generations"):
                result[counter] = float(counters.get(counter, 0))
        return result

    @abstractmethod
    def reset(self) -> None:
        """Forget the buckets, counters and request markers; the buckets come back empty, as
        after a lost key, and fill at ``budget_per_request`` per request."""

    @abstractmethod
    def _decide(self, request_id: str, plan: _Plan) -> BudgetDecision: ...

    @abstractmethod
    def _refund(self, request_id: str, charges: Sequence[str]) -> int:
        """Micro-units given back."""

    @abstractmethod
    def _snapshot(self) -> tuple[Buckets, Mapping[str, int]]: ...


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
        self._refund_script = redis.register_script(_REFUND_LUA)
        self._buckets_key = f"{key_prefix}:buckets"
        self._counters_key = f"{key_prefix}:counters"
        self._marker_prefix = f"{key_prefix}:decision:"
        self._refund_prefix = f"{key_prefix}:refund:"

    def _call(self, request_id: str, plan: _Plan, client: Any = None) -> Any:
        keys = [self._buckets_key, self._counters_key, self._marker_prefix + request_id]
        args: list[str | int] = [*self._micro_limits, self._marker_ttl_seconds]
        args.append(len(plan.preference))
        for tier, cost in (*plan.preference, *plan.explore):
            args += [tier, cost]
        return self._script(keys=keys, args=args, client=client)

    def _decide(self, request_id: str, plan: _Plan) -> BudgetDecision:
        try:
            raw = self._call(request_id, plan)
        except RedisError as exc:
            return self._unreachable(request_id, exc)
        return self._parse(raw)

    def _decide_many(self, plans: Sequence[tuple[str, _Plan]]) -> list[BudgetDecision]:
        """One pipeline of script calls: the script runs atomically per request, in order,
        exactly as one call each, with one round trip for the batch."""
        pipe = self._redis.pipeline(transaction=False)
        for request_id, plan in plans:
            self._call(request_id, plan, client=pipe)
        try:
            replies = pipe.execute(raise_on_error=False)
        except RedisError as exc:
            return [self._unreachable(request_id, exc) for request_id, _ in plans]
        return [
            self._unreachable(request_id, reply)
            if isinstance(reply, Exception)
            else self._parse(reply)
            for (request_id, _), reply in zip(plans, replies, strict=True)
        ]

    def _refund(self, request_id: str, charges: Sequence[str]) -> int:
        keys = [self._buckets_key, self._counters_key, self._refund_prefix + request_id]
        keys += [self._marker_prefix + charge for charge in charges]
        try:
            return int(
                self._refund_script(
                    keys=keys, args=[self._micro_limits.burst, self._marker_ttl_seconds]
                )
            )
        except RedisError as exc:
            logger.warning("budget keeper unavailable: %s keeps its charge: %s", request_id, exc)
            return 0

    @staticmethod
    def _parse(raw: Any) -> BudgetDecision:
        stored: dict[str, Any] = json.loads(raw)
        outcome = _Outcome(
            str(stored["tier"]),
            # cjson writes an empty list as {}, which iterates as empty all the same.
            tuple(stored["explored"]),
            int(stored["verdict"]),
            str(stored["wanted"]),
            int(stored["spent"]),
            int(stored["tokens"]),
        )
        return _decision(outcome, int(stored["seq"]))

    def _snapshot(self) -> tuple[Buckets, Mapping[str, int]]:
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(self._buckets_key)
        pipe.hgetall(self._counters_key)
        buckets, counters = (_ints(reply) for reply in pipe.execute())
        return (
            Buckets(buckets.get("spend", 0), buckets.get("explore", 0), buckets.get("rate", 0)),
            counters,
        )

    def reset(self) -> None:
        batch: list[Any] = []
        for prefix in (self._marker_prefix, self._refund_prefix):
            for key in self._redis.scan_iter(match=_escape_glob(prefix) + "*", count=1000):
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
        self._counters: Counter[str] = Counter()
        # request id -> (expiry, decision); expiries grow in insertion order (one TTL).
        self._markers: OrderedDict[str, tuple[int, BudgetDecision]] = OrderedDict()
        # request id -> expiry of its refund's marker, in the same order.
        self._refunds: OrderedDict[str, int] = OrderedDict()

    def _expire(self, now: int) -> None:
        while self._markers and next(iter(self._markers.values()))[0] <= now:
            self._markers.popitem(last=False)
        while self._refunds and next(iter(self._refunds.values())) <= now:
            self._refunds.popitem(last=False)

    def _decide(self, request_id: str, plan: _Plan) -> BudgetDecision:
        with self._lock:
            now = self._clock()
            self._expire(now)
            if request_id in self._markers:
                return self._markers[request_id][1]
            self._buckets, outcome = _settle(self._buckets, self._micro_limits, now, plan)
            counters = self._counters
            counters["requests"] += 1
            counters[f"{outcome.tier}_routes"] += 1
            counters.update(f"{tier}_generations" for tier in (outcome.tier, *outcome.explored))
            if outcome.explored:
                counters["explored"] += 1
            if outcome.spent:
                counters["spent"] += outcome.spent
            decision = _decision(outcome, counters["requests"])
            self._markers[request_id] = (now + self._marker_ttl_seconds * MICRO, decision)
            return decision

    def _refund(self, request_id: str, charges: Sequence[str]) -> int:
        with self._lock:
            now = self._clock()
            self._expire(now)
            if request_id in self._refunds:
                return 0
            self._refunds[request_id] = now + self._marker_ttl_seconds * MICRO
            charged = sum(
                round(self._markers[charge][1].spent * MICRO)
                for charge in charges
                if charge in self._markers
            )
            self._buckets, back = _give_back(self._buckets, self._micro_limits, charged)
            if back:
                self._counters["refunded"] += back
            return back

    def _snapshot(self) -> tuple[Buckets, Mapping[str, int]]:
        with self._lock:
            return self._buckets, dict(self._counters)

    def reset(self) -> None:
        with self._lock:
            self._buckets = Buckets()
            self._counters.clear()
            self._markers.clear()
            self._refunds.clear()


def budget_keeper_from_settings(settings: Settings) -> BudgetKeeper:
    """The keeper ``settings.budget_backend`` names: ``redis`` for router workers that share
    buckets (short socket timeouts on ``redis_url``), ``local`` for one router process."""
    limits = BudgetLimits.from_settings(settings)
    if settings.budget_backend == "local":
        return LocalBudgetKeeper(limits)
    client = budget_redis(settings.redis_url, settings.budget_redis_timeout_seconds)
    return RedisBudgetKeeper(client, limits, key_prefix=settings.budget_key_prefix)
