"""The wire models (``workers.schemas``) are pure: the client reads them without the server's
stack, and their request states are the store's."""

from __future__ import annotations

import subprocess
import sys

from db.models import Status as StoredStatus
from workers.schemas import FINAL_STATES, Status


def test_the_schemas_and_the_client_import_no_server_stack() -> None:
    probe = (
        "import sys, workers.entrypoints.client; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'db', 'sqlalchemy', 'redis', 'celery', 'fastapi', 'kombu', 'torch'}))"
    )
    found = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert found.strip() == "[]"


def test_the_wire_states_are_the_stores() -> None:
    assert [(s.name, s.value) for s in Status] == [(s.name, s.value) for s in StoredStatus]
    assert Status.__doc__ == StoredStatus.__doc__
    assert {"done", "failed", "cancelled"} == FINAL_STATES
