"""Alembic environment and revisions (a package so that installs carry them)."""
