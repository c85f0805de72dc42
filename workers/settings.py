"""The one settings object: environment variables with prefix ``T2IROUTE_``, read once."""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from workers.egress import AllowList, split_entries
from workers.pool import Pool, PoolError, TierSpec, parse_tiers, read_tiers_file

log = logging.getLogger(__name__)

PREFIX = "T2IROUTE_"
# Variables of the test suite (the test database, Redis numbers, fault-suite scale), which
# share the prefix but are no settings.
TEST_PREFIX = "T2IROUTE_TEST_"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="T2IROUTE_",
        env_file=".env",
        extra="ignore",
        frozen=True,
        # A validation error must not echo the input: URLs in it carry credentials.
        hide_input_in_errors=True,
    )

    # The installation's folder: every relative path below (the stores, the broker folder,
    # the tiers file, local model folders, the tiers' models) is resolved against it once,
    # when the settings are read, so that every process of an installation finds the same
    # files whatever its working directory. Unset: the working directory of the process.
    home: Path = Field(default_factory=Path.cwd)
    # A T2IROUTE_ variable that names no setting (misspelt, or renamed since it was set)
    # refuses to start, naming the closest setting; "warn" logs it and starts.
    unknown_variables: Literal["refuse", "warn"] = "refuse"

    # Servers. The defaults are the local services of a development machine.
    # URLs carry credentials: left out of the settings' repr, so a log of them shows none.
    database_url: str = Field(
        default="postgresql+psycopg://postgres@127.0.0.1:5432/test", repr=False
    )
    broker_url: str = Field(default="redis://127.0.0.1:6379/0", repr=False)
    result_backend: str | None = Field(default=None, repr=False)
    # For the serverless demo broker (filesystem://): the folder messages pass through.
    broker_folder: Path | None = None
    task_events: bool = True
    redis_url: str = Field(default="redis://127.0.0.1:6379/1", repr=False)

    # Storage.
    image_store: Path = Field(default=Path("var/images"), validate_default=True)
    model_store: Path = Field(default=Path("var/routers"), validate_default=True)

    # The pool of tiers (workers/pool.py): a JSON list in T2IROUTE_TIERS, or a TOML file of
    # [[tiers]] tables. Without either, the two tiers edge and cloud from the settings below.
    tiers: list[dict[str, Any]] | None = None
    tiers_file: Path | None = None
    # The default two-tier pool: a local directory or a hub id, loaded with from_pretrained.
    edge_model: str = Field(default="var/models/edge", validate_default=True)
    cloud_model: str = Field(default="var/models/cloud", validate_default=True)
    clip_model: str = Field(default="var/models/clip", validate_default=True)
    model_revision: str | None = None
    device: str = "cpu"
    torch_dtype: str = "float32"

    # Router: the active version comes from router_versions; this policy serves until one exists.
    # Prompt length: on GenAI-Bench it beats noun count at every number of labels measured
    # (docs/learning.md, learning curve).
    default_policy: str = "prompt_length"
    router_encoder: str | None = None
    router_reload_seconds: float = 30.0
    calibration_window: int = Field(default=500, ge=10)

    # Budget keeper: shared buckets in Redis, or in-process for a single router (embedded demo).
    budget_backend: Literal["redis", "local"] = "redis"
    # With two tiers, rho: at most this share of generations on the cloud. In a pool, the
    # share of images of its dearest tier that the budget per request pays for, unless
    # ``budget_per_request`` (B, cost units above the cheapest tier) is given.
    cloud_ratio: float = Field(default=0.3, ge=0.0, le=1.0)
    budget_per_request: float | None = Field(default=None, ge=0.0, allow_inf_nan=False)
    cloud_burst: float = Field(default=5.0, ge=1.0)
    cloud_rate_per_second: float | None = Field(default=None, gt=0.0)
    cloud_rate_burst: float = Field(default=10.0, ge=1.0)
    exploration_rate: float = Field(default=0.05, ge=0.0, le=1.0)
    exploration_burst: float = Field(default=2.0, ge=1.0)
    # Which requests an exploration token is offered to (workers/services/exploration.py): every one
    # ("uniform"), or mostly those nearest the decision boundary ("margin"), with this share
    # of the tokens still drawn uniformly for the promotion gate's unbiased estimate.
    exploration_strategy: Literal["uniform", "margin"] = "uniform"
    exploration_uniform_share: float = Field(default=0.5, gt=0.0, le=1.0)
    # Cost per image in the operator's unit; the budget bounds the spend above the edge's.
    edge_cost: float = Field(default=1.0, ge=0.0)
    cloud_cost: float = Field(default=10.0, ge=0.0)
    budget_key_prefix: str = "t2iroute:budget"
    # Longest a routing decision may wait on the budget Redis before it routes to edge.
    budget_redis_timeout_seconds: float = Field(default=0.25, gt=0.0, le=5.0)

    # Queues.
    queue_route: str = "route"
    queue_edge: str = "edge"
    queue_cloud: str = "cloud"
    queue_quality: str = "quality"
    queue_maintenance: str = "maintenance"
    # Callback sends: I/O-bound, for a worker of their own with many threads, so that a
    # receiver that never answers holds no sweep, retraining or other tenant's callback.
    queue_callbacks: str = "callbacks"

    # Request limits, checked at the producer.
    max_prompt_chars: int = Field(default=2000, ge=1)
    min_side: int = 32
    max_side: int = 2048
    max_steps: int = 150
    default_width: int = 64
    default_height: int = 64
    default_steps: int = 2

    # Escalation (off by default): an answer whose mean quality is below the threshold is
    # generated again on the next dearer tier, within the budget; the better image answers.
    escalation_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    max_escalations: int = Field(default=1, ge=0)

    # Reliability. An attempt is a failure (a stage that raised, or a worker that died holding
    # the message), never a delivery: a step gives up after ``max_attempts`` of them.
    max_attempts: int = Field(default=3, ge=1)
    task_time_limit: int = Field(default=600, ge=1)
    task_soft_time_limit: int = Field(default=540, ge=1)
    visibility_timeout: int = Field(default=3600, ge=1)
    # A dispatched step whose message is neither queued, nor held unacknowledged by a worker,
    # nor started for this long is re-sent by the sweeper; a queued one never is.
    lost_after_seconds: int = Field(default=60, ge=1)
    # A step whose message was lost this many times fails with the reason.
    max_resends: int = Field(default=10, ge=1)
    sweep_interval_seconds: float = Field(default=30.0, gt=0.0)
    # How long a task keeps retrying a database or Redis outage (backoff with jitter) before
    # it leaves the step to the sweeper.
    transient_retry_seconds: float = Field(default=180.0, ge=0.0)
    # A tier whose generations fail this many times in a row is left out of routing for the
    # cooldown; the requests routed there go to a tier that works.
    tier_failure_threshold: int = Field(default=5, ge=1)
    tier_cooldown_seconds: float = Field(default=60.0, gt=0.0)
    retrain_interval_seconds: float = 3600.0
    # RouteT2I beats the prompt-length cold start beyond noise from 100 labelled pairs on
    # four GenAI-Bench pairs of five, and at 50 on none (docs/learning.md): below 100 a
    # retrain would only give the gate a tie to refuse.
    retrain_min_pairs: int = Field(default=100, ge=4)
    # The promotion gate (workers/services/retraining.py): a candidate must beat the cold-start
    # policy
    # on held-out labels by this many standard errors (paired bootstrap), and the serving
    # router by any margin.
    gate_min_z: float = Field(default=1.0, ge=0.0)
    # A retraining run is killed past this (Celery's hard limit; the soft one 30 s before),
    # and holds a Redis lock that expires with it, so a dead holder blocks no later run.
    retrain_time_limit: int = Field(default=1800, ge=60)
    worker_max_memory_per_child_kb: int | None = None

    # Performance. Torch's intra-op threads per worker process; unset, the cores this
    # process may run on divided by the worker's pool processes (workers/app/threads.py), so
    # that the pool never oversubscribes them. Several workers on one host: set it (or pin
    # each worker to its cores with taskset/cpuset, which the default follows).
    torch_threads: int | None = Field(default=None, ge=1)
    # Micro-batching per queue: a worker collects up to SIZE messages of a stage, or waits at
    # most WAIT_MS after the first, and runs one batched call (router forward pass, CLIP
    # scoring, one diffusers call per shared set of generation parameters). Size 1 is
    # unbatched. A tier's ``max_batch`` caps its diffusers call (GPU memory).
    route_batch_size: int = Field(default=32, ge=1, le=1024)
    route_batch_wait_ms: float = Field(default=20.0, gt=0.0, le=60_000.0)
    quality_batch_size: int = Field(default=32, ge=1, le=1024)
    quality_batch_wait_ms: float = Field(default=50.0, gt=0.0, le=60_000.0)
    generate_batch_size: int = Field(default=8, ge=1, le=1024)
    generate_batch_wait_ms: float = Field(default=50.0, gt=0.0, le=60_000.0)

    # Flower.
    flower_basic_auth: str | None = Field(default=None, repr=False)

    # Prometheus (workers/services/telemetry.py). A worker serves its metrics on this port when it
    # is
    # set (``t2iroute worker --metrics-port``), on this address; its pool's processes keep
    # their values in a folder of their own (a fresh temporary one when unset), emptied at
    # start. The API serves /metrics itself; its request counts by state read the last
    # ``metrics_window`` routing decisions.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_host: str = "127.0.0.1"
    metrics_dir: Path | None = None
    metrics_window: int = Field(default=1000, ge=1, le=10_000)

    # Callbacks (workers/stages/callbacks.py). A request made with an API key is signed with that
    # key's secret; one made without, with this server secret (none: such callbacks fail).
    callback_secret: str | None = Field(default=None, repr=False)
    # The whole exchange with a receiver (connect, send, the status line) must fit this.
    callback_timeout_seconds: float = Field(default=5.0, gt=0.0, le=60.0)
    callback_max_attempts: int = Field(default=8, ge=1, le=100)
    # Attempts in flight at once per API key (requests without a key share one bound): one
    # key's dead receiver can hold this many of the callbacks worker's threads, no more.
    callback_max_in_flight_per_key: int = Field(default=4, ge=1, le=1000)
    # Attempt n+1 waits about BACKOFF * 2**(n-1) seconds after attempt n (jittered), at most
    # BACKOFF_MAX.
    callback_backoff_seconds: float = Field(default=2.0, gt=0.0)
    callback_backoff_max_seconds: float = Field(default=600.0, gt=0.0)
    # A callback reaches only addresses reachable on the Internet (workers/egress.py); these
    # networks (CIDR, or one address) and host names are allowed besides, for a receiver
    # inside the operator's own network. A JSON list, or entries separated by commas.
    callback_allowed_networks: Annotated[list[str], NoDecode] = Field(default_factory=list)

    @field_validator("callback_allowed_networks", mode="before")
    @classmethod
    def _split_allowed_networks(cls, entries: Any) -> Any:
        return split_entries(entries) if isinstance(entries, str) else entries

    @field_validator("callback_allowed_networks")
    @classmethod
    def _allowed_networks(cls, entries: list[str]) -> list[str]:
        AllowList.parse(entries)  # an entry that is neither a network nor a name refuses to start
        return entries

    @cached_property
    def callback_allowed(self) -> AllowList:
        """What callbacks may reach despite being internal (``callback_allowed_networks``)."""
        return AllowList.parse(self.callback_allowed_networks)

    # HTTP API. API keys: "auto" requires them wherever the API listens off loopback (as
    # Flower requires basic auth), and wherever the address is unknown (the app run by
    # uvicorn itself); "required" and "off" say so whatever the address.
    api_auth: Literal["auto", "required", "off"] = "auto"
    # The largest metadata object a request may carry, as compact UTF-8 JSON.
    max_metadata_bytes: int = Field(default=4096, ge=2, le=1_000_000)

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, home: Path) -> Path:
        return home.expanduser().resolve()

    @field_validator("image_store", "model_store", "broker_folder", "tiers_file", "metrics_dir")
    @classmethod
    def _path_under_home(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return None if path is None else _home(info) / path.expanduser()

    @field_validator("edge_model", "cloud_model", "clip_model", "router_encoder")
    @classmethod
    def _model_under_home(cls, model: str | None, info: ValidationInfo) -> str | None:
        return None if model is None else resolve_model(model, _home(info))

    @model_validator(mode="after")
    def _no_unknown_variables(self) -> Settings:
        unknown = unknown_variables(os.environ, _dotenv(self.model_config.get("env_file")))
        if unknown and self.unknown_variables == "refuse":
            raise ValueError(
                "; ".join(unknown) + " (T2IROUTE_UNKNOWN_VARIABLES=warn starts anyway)"
            )
        for problem in unknown:
            log.warning("%s; ignored", problem)
        return self

    @model_validator(mode="after")
    def _limits_are_ordered(self) -> Settings:
        if self.task_soft_time_limit >= self.task_time_limit:
            raise ValueError("task_soft_time_limit must be below task_time_limit")
        if self.visibility_timeout <= self.task_time_limit:
            raise ValueError("visibility_timeout must exceed task_time_limit (see DESIGN.md)")
        if self.min_side > self.max_side:
            raise ValueError("min_side must not exceed max_side")
        self.pool  # noqa: B018 (a pool that cannot be built is refused at start-up)
        if self.cloud_cost < self.edge_cost:
            raise ValueError("cloud_cost must not be below edge_cost")
        return self

    @cached_property
    def pool(self) -> Pool:
        """The tiers requests are routed among, checked once, when the settings are read."""
        if self.tiers is not None and self.tiers_file is not None:
            raise PoolError("set T2IROUTE_TIERS or T2IROUTE_TIERS_FILE, not both")
        if self.tiers is not None:
            tiers = parse_tiers(self.tiers, "T2IROUTE_TIERS")
        elif self.tiers_file is not None:
            tiers = read_tiers_file(self.tiers_file)
        else:
            tiers = [
                TierSpec(
                    name="edge", model=self.edge_model, cost=self.edge_cost, queue=self.queue_edge
                ),
                TierSpec(
                    name="cloud",
                    model=self.cloud_model,
                    cost=self.cloud_cost,
                    queue=self.queue_cloud,
                ),
            ]
        # A tier's model, like every model setting, is a folder under home or a hub id.
        tiers = [t.model_copy(update={"model": resolve_model(t.model, self.home)}) for t in tiers]
        reserved = (
            self.queue_route,
            self.queue_quality,
            self.queue_maintenance,
            self.queue_callbacks,
        )
        return Pool(tiers, reserved_queues=reserved)

    def batching(self, stage: Literal["route", "quality", "generate"]) -> tuple[int, float]:
        """A stage's batch: at most this many messages, waiting at most these seconds."""
        size, wait_ms = {
            "route": (self.route_batch_size, self.route_batch_wait_ms),
            "quality": (self.quality_batch_size, self.quality_batch_wait_ms),
            "generate": (self.generate_batch_size, self.generate_batch_wait_ms),
        }[stage]
        return size, wait_ms / 1000.0

    @property
    def queues(self) -> dict[str, str]:
        """Every queue by what it carries: route, quality, maintenance, callbacks, and each
        tier's."""
        return {
            "route": self.queue_route,
            **{tier.name: tier.queue_name for tier in self.pool},
            "quality": self.queue_quality,
            "maintenance": self.queue_maintenance,
            "callbacks": self.queue_callbacks,
        }


def unknown_variables(*sources: Mapping[str, str | None]) -> list[str]:
    """What is wrong with each ``T2IROUTE_`` variable of ``sources`` that names no setting:
    its name and the closest setting's, so that a renamed or misspelt variable is seen rather
    than silently left at its default."""
    known = {PREFIX + name.upper() for name in Settings.model_fields}
    problems = []
    for name in sorted({n for source in sources for n in source}):
        upper = name.upper()
        if not upper.startswith(PREFIX) or upper in known or upper.startswith(TEST_PREFIX):
            continue
        closest = difflib.get_close_matches(upper, known, n=1, cutoff=0.6)
        hint = f"; did you mean {closest[0]}?" if closest else ""
        problems.append(f"{name} is no setting{hint}")
    return problems


def _dotenv(env_file: object) -> dict[str, str | None]:
    """The variables of the settings' ``.env`` file, which are read like the environment."""
    if not isinstance(env_file, str | Path) or not Path(env_file).is_file():
        return {}
    from dotenv import dotenv_values

    return dict(dotenv_values(env_file))


def _home(info: ValidationInfo) -> Path:
    """The home folder validated before the field at hand (declared first for that reason);
    the working directory if home itself was refused, so that only its own error shows."""
    home = info.data.get("home")
    return home if isinstance(home, Path) else Path.cwd()


def resolve_model(path_or_id: str, home: Path) -> str:
    """A model setting as an absolute folder, or a hub id as it is.

    A relative path is a folder under ``home`` when it exists there or cannot be a hub id:
    it starts with ``.``, or has more than one ``/`` (``namespace/name`` is the hub's form).
    Otherwise it is left to ``from_pretrained`` as a hub id. This is the rule the model
    loaders apply (workers/services/pipelines.py), so after it every local model is absolute and a
    missing one can be found before any request needs it."""
    path = Path(path_or_id).expanduser()
    if path.is_absolute():
        return str(path)
    hub_id = not path_or_id.startswith(".") and path_or_id.count("/") <= 1
    if hub_id and not (home / path).exists():
        return path_or_id
    return str((home / path).resolve())


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
