"""The API's routes, one module per resource (``workers.entrypoints.http.app`` gathers them)."""
