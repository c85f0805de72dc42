"""docs/operations.md's nginx block, run as written (free ports in place of 80 and 8000) in
front of the real API: what uvicorn cannot limit, the proxy does."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.fault.servers import free_port
from tests.services import api_server, stop

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def documented_block() -> str:
    blocks = re.findall(r"```nginx\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert len(blocks) == 1, "docs/operations.md has one nginx block"
    return blocks[0]


def configuration(block: str, folder: Path, listen: int, api: int) -> str:
    assert "listen 80;" in block and "server 127.0.0.1:8000;" in block
    block = block.replace("listen 80;", f"listen 127.0.0.1:{listen};")
    block = block.replace("server 127.0.0.1:8000;", f"server 127.0.0.1:{api};")
    temp = "\n".join(
        f"    {kind}_temp_path {folder / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"daemon off;\nworker_processes 1;\npid {folder / 'nginx.pid'};\n"
        f"error_log {folder / 'error.log'};\nevents {{}}\n"
        f"http {{\n    access_log off;\n{temp}\n{block}\n}}\n"
    )


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if NGINX is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light; .ci/run installs it)")
    folder = tmp_path_factory.mktemp("nginx")
    folder.chmod(0o777)  # nginx's worker runs as nobody and writes its temp files here
    listen = free_port()
    with api_server() as base:
        api = urlsplit(base).port
        assert api is not None
        conf = folder / "nginx.conf"
        conf.write_text(configuration(documented_block(), folder, listen, api))
        process = subprocess.Popen(
            [NGINX, "-p", str(folder), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{listen}"
        try:
            deadline = time.monotonic() + 20
            while True:
                assert process.poll() is None, (folder / "error.log").read_text()
                try:
                    httpx.get(f"{url}/healthz", timeout=2)
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "nginx did not start"
                    time.sleep(0.2)
            yield url
        finally:
            stop(process)


def test_a_request_within_the_limits_is_answered_by_the_api(proxied: str) -> None:
    assert httpx.get(f"{proxied}/healthz").json() == {"status": "ok"}
    refused = httpx.post(f"{proxied}/v1/requests", json={"prompt": ""})
    assert refused.status_code == 422
    assert refused.headers["content-type"] == "application/problem+json"


def test_a_body_over_the_limit_stops_at_the_proxy(proxied: str) -> None:
    response = httpx.post(
        f"{proxied}/v1/requests",
        content=b'{"prompt": "' + b"a" * 200_000 + b'"}',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 413


def test_a_header_over_the_limit_stops_at_the_proxy(proxied: str) -> None:
    response = httpx.get(f"{proxied}/healthz", headers={"x-padding": "a" * 8192})
    assert response.status_code == 400


def test_a_client_that_never_finishes_its_headers_is_cut_off(proxied: str) -> None:
    parts = urlsplit(proxied)
    assert parts.hostname is not None and parts.port is not None
    started = time.monotonic()
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as slow:
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: t2iroute\r\n")
        assert slow.recv(1024) == b""  # closed, with nothing sent on to the API
    # client_header_timeout is 10 s.
    assert 8 < time.monotonic() - started < 25
