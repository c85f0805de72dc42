"""A database that accepts connections and never answers (a partition, a host gone without
a reset) is an outage like one that refuses them: the API answers 503 once the connect
timeout (``db.session.CONNECT_TIMEOUT_SECONDS``) has passed, not after the kernel's TCP
timeout, minutes later."""

from __future__ import annotations

import socket
import time
import uuid

import httpx
import pytest

from db.session import CONNECT_TIMEOUT_SECONDS
from tests.services import api_server

pytestmark = pytest.mark.integration


def test_a_silent_database_is_a_503_after_the_connect_timeout() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # the kernel completes the handshakes; nothing is ever read
        port = silent.getsockname()[1]
        env = {"T2IROUTE_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:{port}/t2i"}
        with api_server(env=env) as url:
            started = time.monotonic()
            response = httpx.get(f"{url}/v1/requests/{uuid.uuid4()}", timeout=120)
            waited = time.monotonic() - started
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert "retry-after" in response.headers
    assert CONNECT_TIMEOUT_SECONDS - 1 < waited < CONNECT_TIMEOUT_SECONDS + 15
