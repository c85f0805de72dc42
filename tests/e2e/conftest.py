"""The end-to-end suites share the integration fixtures on the real Postgres and Redis."""

from tests.integration.conftest import clean_db, clean_redis, database, settings

__all__ = ["clean_db", "clean_redis", "database", "settings"]
