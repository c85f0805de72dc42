"""The command line imports only the module of the command it runs: ``t2iroute --help`` and
``t2iroute status ID`` load no model library (torch, diffusers, transformers, spaCy), each
run as a process of its own so that nothing the test session imported counts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import redis

from workers.services.producer import submit

pytestmark = pytest.mark.integration

MODEL_LIBRARIES = ("torch", "diffusers", "transformers", "spacy")

# Runs the command line as `t2iroute ARGS` would, then prints the modules it imported as the
# last line of standard output.
RUN_AND_LIST_MODULES = """
import json, sys
from workers.entrypoints.cli.main import app
try:
    app(sys.argv[1:], prog_name="t2iroute", standalone_mode=False)
finally:
    print(json.dumps(sorted(sys.modules)))
"""


def _modules(*args: str) -> tuple[str, set[str]]:
    done = subprocess.run(
        [sys.executable, "-c", RUN_AND_LIST_MODULES, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    *output, modules = done.stdout.splitlines()
    return "\n".join(output), set(json.loads(modules))


def _model_libraries(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in MODEL_LIBRARIES)


def test_help_imports_no_model_library() -> None:
    output, modules = _modules("--help")
    assert "submit" in output and "models" in output
    assert _model_libraries(modules) == []


def test_status_imports_no_model_library(clean_db: str, clean_redis: redis.Redis) -> None:
    request_id = submit("a lighthouse at dusk", seed=1).request_id
    output, modules = _modules("status", request_id)
    assert json.loads(output)["id"] == request_id
    assert "workers.services.producer" in modules
    assert _model_libraries(modules) == []
