"""`t2iroute flower`: the operators' view of the queues, behind basic auth."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from tests.fault.servers import free_port
from tests.services import stop

pytestmark = pytest.mark.integration


def test_flower_runs_behind_basic_auth() -> None:
    port = free_port()
    env = {**os.environ, "T2IROUTE_FLOWER_BASIC_AUTH": "operator:s3cret"}
    process = subprocess.Popen(
        [sys.executable, "-m", "workers.entrypoints.cli.main", "flower", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                anonymous = httpx.get(url, timeout=2)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.5)
        assert anonymous.status_code == 401
        assert httpx.get(url, auth=("operator", "wrong"), timeout=5).status_code == 401
        assert httpx.get(url, auth=("operator", "s3cret"), timeout=5).status_code == 200
    finally:
        stop(process)


def test_flower_refuses_an_open_interface_without_auth() -> None:
    env = {k: v for k, v in os.environ.items() if k != "T2IROUTE_FLOWER_BASIC_AUTH"}
    result = subprocess.run(
        [sys.executable, "-m", "workers.entrypoints.cli.main", "flower", "--address", "0.0.0.0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "T2IROUTE_FLOWER_BASIC_AUTH" in result.stdout
