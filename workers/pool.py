"""The pool of tiers: the models a request can be generated on, each with its queue, its
diffusers pipeline, its generation defaults and its cost per image.

A tier is configuration. ``T2IROUTE_TIERS`` (JSON) or ``T2IROUTE_TIERS_FILE`` (TOML, a
``[[tiers]]`` table per tier) declare a pool; without either, the pool is today's two tiers,
``edge`` and ``cloud``, built from ``T2IROUTE_EDGE_MODEL``, ``T2IROUTE_CLOUD_MODEL``, their
queues and their costs. The same model at another step count is another tier."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

TIER_NAME = r"^[a-z][a-z0-9_-]{0,31}$"


class PoolError(ValueError):
    """The pool's configuration is not usable; the message says what to change."""


class TierSpec(BaseModel):
    """One model of the pool, as an operator declares it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Name used in decisions, metrics, the API and ``t2iroute worker --tiers``.
    name: str = Field(pattern=TIER_NAME)
    #: The diffusers pipeline: a local folder or a hub id, loaded with from_pretrained.
    model: str = Field(min_length=1)
    #: Cost of one image in the operator's unit (GPU-seconds, cents); only differences count.
    cost: float = Field(ge=0.0, allow_inf_nan=False)
    #: The Celery queue of its generation workers; the tier's name when not given.
    queue: str | None = Field(default=None, min_length=1)
    #: Generation defaults, used where the request states none.
    steps: int | None = Field(default=None, ge=1, le=1000)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=50.0, allow_inf_nan=False)
    #: Where it runs; the settings' device and dtype when not given.
    device: str | None = None
    torch_dtype: str | None = None
    #: The most images one diffusers call renders on this tier; the settings' batch size
    #: when not given.
    max_batch: int | None = Field(default=None, ge=1, le=1024)

    @property
    def queue_name(self) -> str:
        return self.queue or self.name


class Pool:
    """The tiers, cheapest first (ties keep the declared order)."""

    def __init__(self, tiers: Sequence[TierSpec], reserved_queues: Sequence[str] = ()) -> None:
        if not tiers:
            raise PoolError("a pool needs at least one tier")
        _no_repeats("tier name", [t.name for t in tiers])
        _no_repeats("queue", [t.queue_name for t in tiers] + list(reserved_queues))
        self.tiers: tuple[TierSpec, ...] = tuple(sorted(tiers, key=lambda t: t.cost))
        self._by_name = {t.name: t for t in self.tiers}

    def __iter__(self) -> Iterator[TierSpec]:
        return iter(self.tiers)

    def __len__(self) -> int:
        return len(self.tiers)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> TierSpec:
        try:
            return self._by_name[name]
        except KeyError:
            raise PoolError(
                f"unknown tier {name!r}; the pool has {', '.join(self.names)}"
            ) from None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tiers)

    @property
    def cheapest(self) -> TierSpec:
        return self.tiers[0]

    def extra_cost(self, name: str) -> float:
        """What the budget charges for an image on this tier: its cost above the cheapest."""
        return self[name].cost - self.cheapest.cost

    def costs(self) -> dict[str, float]:
        return {t.name: t.cost for t in self.tiers}

    def select(self, names: str) -> list[TierSpec]:
        """The tiers named in a comma-separated list (``t2iroute worker --tiers``)."""
        chosen = [n.strip() for n in names.split(",") if n.strip()]
        if not chosen:
            raise PoolError("no tier named")
        return [self[n] for n in chosen]


def _no_repeats(what: str, values: Sequence[str]) -> None:
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise PoolError(f"{what} used twice: {', '.join(repeated)}")


def parse_tiers(entries: Any, source: str) -> list[TierSpec]:
    """Tiers from a list of tables; an error names the entry and the field."""
    if not isinstance(entries, list):
        raise PoolError(f"{source}: expected a list of tiers")
    tiers = []
    for i, entry in enumerate(entries):
        try:
            tiers.append(TierSpec.model_validate(entry))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'tier'}: {err['msg']}"
                for err in exc.errors()
            )
            name = entry.get("name", f"#{i + 1}") if isinstance(entry, dict) else f"#{i + 1}"
            raise PoolError(f"{source}: tier {name}: {problems}") from None
    return tiers


def read_tiers_file(path: Path) -> list[TierSpec]:
    """A TOML file with one ``[[tiers]]`` table per tier."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PoolError(f"cannot read the tiers file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PoolError(f"{path}: not valid TOML: {exc}") from None
    return parse_tiers(document.get("tiers"), str(path))
