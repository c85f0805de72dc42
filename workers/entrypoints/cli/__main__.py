"""``python -m workers.entrypoints.cli``."""

from workers.entrypoints.cli.main import app

app()
