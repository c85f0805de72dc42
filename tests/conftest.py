"""Session-wide test setup: the test environment, and the tiny models every suite shares."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests import environment

# Before any test module imports the settings or a model library: the T2IROUTE_ variables
# point at the test services and at TINY_MODELS, and the model hub is off.
environment.apply()


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """The tiny edge, cloud and CLIP models, built once per session where the settings
    (``T2IROUTE_EDGE_MODEL`` and friends) expect them; tier -> model folder.

    ``workers.offline.tiny_models`` is imported here rather than at the top so that suites which
    never
    touch a model do not pay for importing diffusers.
    """
    from workers.offline.tiny_models import make_tiny

    return make_tiny(environment.TINY_MODELS)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove the session's scratch folder (models, images, worker logs) after a green run;
    keep it after a failure, for the worker logs."""
    if exitstatus == 0:
        shutil.rmtree(environment.SCRATCH, ignore_errors=True)
