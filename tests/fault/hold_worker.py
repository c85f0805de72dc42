"""A Celery app with t2iroute's configuration and one task that keeps a worker busy, for the
broker-loss tests: ``celery -A tests.fault.hold_worker worker``. The broker comes from
T2IROUTE_BROKER_URL, as for every t2iroute process."""

from __future__ import annotations

import time
from pathlib import Path

from celery import Celery

from workers.app import celery_app
from workers.settings import Settings

TASK_HOLD = "tests.hold"

app = Celery("t2iroute-hold")
app.conf.update(celery_app.celery_config(Settings()))


@app.task(name=TASK_HOLD)
def hold(started: str, seconds: float) -> None:
    """Note the start in the file ``started``, then hold the worker for ``seconds``."""
    with Path(started).open("a") as file:
        file.write(f"{time.time()}\n")
    time.sleep(seconds)
