"""The published OpenAPI schema fuzzed with schemathesis against the app over the real Postgres
and Redis: whatever the generated input, valid or not, the API answers without a 5xx. Keys
are not required here, so that generated requests reach every handler; a bounded number of
examples per operation keeps the run under a minute."""

from __future__ import annotations

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.case import Case

from workers.entrypoints.http.app import create_app

pytestmark = pytest.mark.integration

APP = create_app(require_keys=False)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
EXAMPLES = 20


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_no_generated_input_gets_a_server_error(
    case: Case, clean_db: str, clean_redis: redis.Redis
) -> None:
    """Generated requests may be accepted and queued: nothing consumes them."""
    case.call_and_validate(checks=[not_a_server_error])
