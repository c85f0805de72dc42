"""The test session's T2IROUTE_ environment, set before anything reads the settings.

Integration and end-to-end tests use the machine's real Postgres and Redis, on a database
and Redis numbers of their own; a variable already set in the environment wins."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

POSTGRES_ADMIN_URL = os.environ.get(
    "T2IROUTE_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
# Several test sessions on one machine (developers side by side) each name their own.
TEST_DATABASE = os.environ.get("T2IROUTE_TEST_DATABASE", "t2iroute_test")
BROKER_DB, BUDGET_DB = os.environ.get("T2IROUTE_TEST_REDIS_DBS", "14,15").split(",")
SCRATCH = Path(tempfile.mkdtemp(prefix="t2iroute-tests-"))
TINY_MODELS = SCRATCH / "models"

TEST_ENV = {
    "T2IROUTE_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{TEST_DATABASE}",
    "T2IROUTE_BROKER_URL": f"redis://127.0.0.1:6379/{BROKER_DB}",
    "T2IROUTE_REDIS_URL": f"redis://127.0.0.1:6379/{BUDGET_DB}",
    "T2IROUTE_IMAGE_STORE": str(SCRATCH / "images"),
    "T2IROUTE_MODEL_STORE": str(SCRATCH / "routers"),
    "T2IROUTE_EDGE_MODEL": str(TINY_MODELS / "edge"),
    "T2IROUTE_CLOUD_MODEL": str(TINY_MODELS / "cloud"),
    "T2IROUTE_CLIP_MODEL": str(TINY_MODELS / "clip"),
    "T2IROUTE_TASK_TIME_LIMIT": "60",
    "T2IROUTE_TASK_SOFT_TIME_LIMIT": "50",
    "T2IROUTE_VISIBILITY_TIMEOUT": "90",
    "T2IROUTE_ROUTER_RELOAD_SECONDS": "0.5",
    # The tests' callback receivers listen on loopback, which callbacks may not reach unless
    # the operator allows it; the tests of that refusal read settings without this.
    "T2IROUTE_CALLBACK_ALLOWED_NETWORKS": "127.0.0.0/8,::1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def apply() -> None:
    for key, value in TEST_ENV.items():
        os.environ.setdefault(key, value)
