"""HTTP API: other services submit prompts, follow them, fetch their images, list and cancel
them; operators read the budget, readiness and metrics.

The rooms: ``routes/`` one module per resource (requests, images, budget, health, metrics),
gathered here; ``deps`` the typed dependencies (settings, session, the caller and its API
key); ``body`` what only HTTP can get wrong about a submission; ``problems`` every refusal,
4xx or 503, as an RFC 9457 problem naming the offending fields; the wire models are
``workers.schemas``, which the Python client reads too."""

from __future__ import annotations

import sys

from fastapi import FastAPI

from workers.entrypoints.http.deps import keys_required_at
from workers.entrypoints.http.problems import add_handlers
from workers.entrypoints.http.routes import budget, health, images, metrics, requests
from workers.settings import get_settings

__all__ = ["app", "create_app", "serve"]


def create_app(*, require_keys: bool | None = None) -> FastAPI:
    """The API. ``require_keys`` None: as ``T2IROUTE_API_AUTH`` says for an unknown address
    (``auto``: required), read at each request."""
    app = FastAPI(
        title="t2iroute",
        version="0.2.0",
        description="Edge-cloud routing for text-to-image generation: submit prompts, follow "
        "them, fetch their images.",
    )
    app.state.require_keys = require_keys
    for resource in (requests, images, budget, health, metrics):
        app.include_router(resource.router)
    add_handlers(app)
    return app


#: The app as ``uvicorn workers.entrypoints.http.app:app`` serves it: keys required
#: unless T2IROUTE_API_AUTH is off, since the address it listens on is unknown here.
app = create_app()


def serve(host: str, port: int) -> None:
    """Serve the API on ``host``: keys required off loopback unless T2IROUTE_API_AUTH says
    otherwise (``t2iroute api``)."""
    import uvicorn

    required = keys_required_at(get_settings(), host)
    print(f"API keys {'required' if required else 'not required'} on {host}", file=sys.stderr)
    uvicorn.run(create_app(require_keys=required), host=host, port=port, log_level="info")
