"""The application factory: ``create_app(settings)`` builds one server."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .config import Settings, settings_from_env
from .db import Database
from .deps import Server
from .errors import ApiError
from .image_store import ImageStore
from .ledger import Ledger
from .limits import BodyLimitMiddleware
from .metrics import Metrics, MetricsMiddleware
from .routers import account, images, ops, scoring, zero_shot
from .scorer import Scorer
from .validation import open_image

__all__ = ["create_app", "app_from_env"]

logger = logging.getLogger("skcarrot.serve")

_DESCRIPTION = """
A black-box vision-language model behind a metered API, for
[skcarrot](https://pypi.org/project/skcarrot/)'s `HTTPBackend`.

Upload images once (`POST /v1/images`), then score them by content id under prompt offsets
(`POST /v1/score`) or full prompt strings (`POST /v1/score-text`). Every prompt scored is one
query, charged against the key's budget before the model runs. Send the key as
`Authorization: Bearer <key>`, and an `Idempotency-Key` with every charged request: a retry is
answered from the ledger and charged once.
"""


def _clean_errors(errors: list) -> list:
    """FastAPI's validation errors as plain JSON (no echoed input, no exception objects)."""
    out = []
    for err in errors:
        item = {"loc": list(err.get("loc", [])), "msg": str(err.get("msg", "")), "type": str(err.get("type", ""))}
        out.append(item)
    return out


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build a server: database, ledger, image store, model, routers, limits and metrics.

    Parameters
    ----------
    settings : Settings or None
        None: :class:`Settings` defaults (the embedded model, a SQLite ledger
        file in the working directory, or ``SKCARROT_DB``).

    Returns
    -------
    app : fastapi.FastAPI
        Its OpenAPI schema is at ``/openapi.json``, interactive docs at ``/docs``.

    Examples
    --------
    >>> from fastapi.testclient import TestClient
    >>> from skcarrot.serve import Settings, create_app
    >>> app = create_app(Settings(db_url="sqlite://"))
    >>> TestClient(app).get("/v1/health").json()["ledger"]
    True
    """
    settings = Settings() if settings is None else settings
    db = Database(settings.db_url)
    metrics = Metrics()
    max_pixels = settings.max_image_pixels
    server = Server(
        settings=settings,
        db=db,
        ledger=Ledger(db, settings.rate_window_s, settings.idempotency_ttl_s),
        images=ImageStore(db, lambda raw: open_image(raw, max_pixels), settings.image_cache_size),
        scorer=Scorer.from_settings(settings),
        metrics=metrics,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Load the weights before the first request, not during it.
        await run_in_threadpool(lambda: server.scorer.context_shape)
        logger.info("serving %s, ledger %s", server.scorer.model_id, db.engine.url.render_as_string())
        yield
        db.dispose()

    app = FastAPI(
        title="skcarrot model server",
        version=__version__,
        description=_DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.server = server

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _clean_errors(exc.errors())}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal server error"}, status_code=500)

    for router in (images.router, scoring.router, zero_shot.router, account.router, ops.router):
        app.include_router(router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def app_from_env() -> FastAPI:
    """The app ``skcarrot serve`` runs in each worker, configured by environment variables.

    See :func:`~skcarrot.serve.config.settings_from_env` for the variables. Used as a
    uvicorn factory (``uvicorn --factory skcarrot.serve.app:app_from_env``), so several
    workers can each build their own.
    """
    return create_app(settings_from_env())
