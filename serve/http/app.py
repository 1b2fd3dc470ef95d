"""The HTTP API as a FastAPI app over any ``Backend``: the Serve ingress builds one per
replica over its deployment handles, the tests one per test over a fake."""

from __future__ import annotations

from fastapi import FastAPI

from mmembed.config import Settings
from mmembed.loaders.fetch import FetchLimits
from mmembed.serve.config import ServeConfig
from mmembed.serve.http.auth import ApiKeys, Cors, RequireKey
from mmembed.serve.http.backend import Backend
from mmembed.serve.http.errors import BodyLimit, install_error_handlers
from mmembed.serve.http.metrics import CountRequests
from mmembed.serve.http.routes import catalog, embeddings, items, jobs, migrations, operations, pages, search
from mmembed.serve.http.service import Api
from mmembed.store.objects import ObjectStore, object_store

ROUTERS = (embeddings, search, items, jobs, migrations, catalog, pages, operations)


def create_app(
    backend: Backend, config: ServeConfig, settings: Settings, objects: ObjectStore | None = None
) -> FastAPI:
    """``settings`` give the keys, CORS origins and URL policy; ``objects`` the store whose
    local files ``/objects`` serves (default: the settings' own)."""
    app = bare_app()
    app.state.backend = backend
    app.state.api_keys = ApiKeys.from_strings(*settings.api_keys(), settings.open_reads)
    app.state.cors_origins = tuple(settings.cors_origins)
    app.state.max_body_bytes = config.max_body_bytes
    limits = FetchLimits(max_bytes=config.max_body_bytes, policy=settings.url_policy())
    app.state.api = Api(
        backend,
        config,
        limits,
        settings.models_config(),
        objects if objects is not None else object_store(settings.objects_config()),
    )
    return app


def bare_app() -> FastAPI:
    """Every route, middleware and error handler, with nothing behind them: what the API looks
    like, for checks of its description (the endpoints the docs name, the OpenAPI schema)."""
    # FastAPI's own /docs loads its scripts from a CDN; ours serves them from /ui/. No ReDoc page:
    # its bundle fetches a logo from cdn.redoc.ly, so it cannot be served offline as shipped.
    app = FastAPI(
        title="mmembed",
        description="Multi-modal embeddings: text, images and audio.",
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(app)
    app.add_middleware(BodyLimit)
    app.add_middleware(RequireKey)  # added later is outside: a caller without a key learns nothing of limits
    app.add_middleware(Cors)  # so preflight requests are answered before the key check
    app.add_middleware(CountRequests)  # outermost: every answer is counted, refusals included
    for module in ROUTERS:
        app.include_router(module.router)
    app.state.routes = [route for module in ROUTERS for route in module.router.routes]
    return app
