"""Which requests an exploration token is offered to.

Exploration generates a request on more tiers than its answer's, so that the quality
scores of both give a label for retraining. The budget keeper decides whether a token is
there (its own bucket, ``exploration_rate`` per request); this module decides which
requests may take one.

* ``uniform``: every request is a candidate, so the bucket spends a token every
  ``1 / exploration_rate`` requests, whatever the prompt. The labels are an unbiased sample
  of the traffic.
* ``margin``: most labels go where they teach the router most, the prompts it ranks nearest
  its decision boundary (the smallest gap between the best tier's policy score and the
  next one's, at the current trade-off); a label far from the boundary rarely changes a
  decision. A share of the candidates (``exploration_uniform_share``) is still drawn
  uniformly, by a hash of the request id independent of the prompt: the gate scores a
  candidate router on that uniform slice only, so its estimate stays unbiased while the
  training labels are chosen.

A request's draw is a function of its id alone, so a redelivered routing task makes the
same choice, and the gate can tell the uniform slice from the rest later on.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

from routing import policy
from workers.pool import Pool

Strategy = Literal["uniform", "margin"]
STRATEGIES: tuple[Strategy, ...] = ("uniform", "margin")
UNIFORM, INFORMED = "uniform", "informed"

# Informed candidates are drawn at this multiple of the token rate they are meant to use,
# so that the bucket, not the supply of candidates, sets the exploration spend.
CANDIDATE_SURPLUS = 2.0


def draw(request_id: str) -> float:
    """A number in [0, 1) fixed by the request id and independent of its prompt."""
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def in_uniform_slice(request_id: str, strategy: str, exploration_rate: float, share: float) -> bool:
    """Whether an explored request was offered its token whatever its prompt: every one
    under ``uniform``; under ``margin`` those whose draw falls below ``rate * share``."""
    if strategy == "uniform":
        return True
    return draw(request_id) < exploration_rate * share


def margins(predicted: Sequence[Mapping[str, float]], pool: Pool, tradeoff: float) -> np.ndarray:
    """Per prediction, how far the policy is from choosing another tier
    (``routing.policy.margins``) over the pool's tiers; a tier a prediction does not score
    is never its choice."""
    scores = [[p.get(t.name, -math.inf) for t in pool] for p in predicted]
    return policy.margins(
        np.array(scores, dtype=float).reshape(len(predicted), len(pool)),
        [t.cost for t in pool],
        tradeoff,
    )


def margin_threshold(recent: np.ndarray, exploration_rate: float, share: float) -> float:
    """The margin below which a prompt is an informed candidate: the quantile of the recent
    margins that makes about ``CANDIDATE_SURPLUS`` times the informed token rate candidates.
    Until there are recent margins to compare with, every prompt is: a new router explores
    at the full rate rather than not at all."""
    finite = recent[np.isfinite(recent)]
    if finite.size == 0:
        return math.inf
    quantile = min(1.0, CANDIDATE_SURPLUS * exploration_rate * (1.0 - share))
    return float(np.quantile(finite, quantile))


def candidates(
    request_ids: Sequence[str],
    request_margins: np.ndarray,
    *,
    strategy: str,
    exploration_rate: float,
    share: float,
    threshold: float,
) -> list[bool]:
    """Whether each request is offered an exploration token."""
    if strategy == "uniform":
        return [True] * len(request_ids)
    return [
        in_uniform_slice(rid, strategy, exploration_rate, share) or bool(margin <= threshold)
        for rid, margin in zip(request_ids, request_margins, strict=True)
    ]
