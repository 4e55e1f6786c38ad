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
from .chat.engine import CHAT_OFF, LazyChatEngine
from .config import Settings, settings_from_env
from .db import UNAVAILABLE, Database
from .deps import KeySlots, Server
from .errors import ApiError, invalid, retry_after_header
from .image_store import ImageStore
from .ledger import Ledger
from .limits import BodyLimitMiddleware, HeaderLimitMiddleware
from .metrics import Metrics, MetricsMiddleware
from .openapi import openapi_schema
from .routers import account, chat, images, ops, scoring, zero_shot
from .scorer import Scorer
from .validation import open_image

__all__ = ["create_app", "app_from_env", "QueryStringRedactor"]

logger = logging.getLogger("skcarrot.serve")

# How long a client should wait before retrying when the ledger's database is unavailable.
_UNAVAILABLE_RETRY_S = 2


class QueryStringRedactor(logging.Filter):
    """Drop query strings from uvicorn's access log lines: a key put in a URL is never written down.

    The API reads nothing from query strings, so nothing of use is lost.

    Examples
    --------
    >>> import logging
    >>> from skcarrot.serve.app import QueryStringRedactor
    >>> record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
    ...                            ("127.0.0.1:1", "GET", "/v1/info?api_key=skc_secret", "1.1", 401), None)
    >>> QueryStringRedactor().filter(record), record.getMessage()
    (True, '127.0.0.1:1 - "GET /v1/info?<redacted> HTTP/1.1" 401')
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                arg.split("?", 1)[0] + "?<redacted>" if isinstance(arg, str) and "?" in arg else arg
                for arg in record.args
            )
        elif isinstance(record.msg, str) and "?" in record.msg and not record.args:
            record.msg = record.msg.split("?", 1)[0] + "?<redacted>"
        return True


def _redact_access_log() -> None:
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, QueryStringRedactor) for f in access.filters):
        access.addFilter(QueryStringRedactor())

_DESCRIPTION = """
A black-box vision-language model behind a metered API, for
[skcarrot](https://pypi.org/project/skcarrot/)'s `HTTPBackend`.

Upload images once (`POST /v1/images`), then score them by content id under prompt offsets
(`POST /v1/score`, one query per offset) or full prompt strings (`POST /v1/score-text`, one query
per string), charged against the key's budget before the model runs; the zero-shot contract costs
one query per call. Send the key as `Authorization: Bearer <key>`, and an `Idempotency-Key` with
every charged request: a retry is answered from the ledger and charged once. Name the answers you
received in the `Idempotency-Ack` header of a later request, so the server can drop them.
"""


def _speaks_openai(request: Request) -> bool:
    """Whether the route answers in OpenAI's error shape (the chat routes)."""
    return request.url.path in ("/v1/chat/completions", "/v1/models")


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
    s = settings
    db = Database(s.db_url)
    metrics = Metrics()
    max_pixels = s.max_image_pixels
    server = Server(
        settings=s,
        db=db,
        ledger=Ledger(db, s.rate_window_s, s.idempotency_ttl_s, s.answer_ttl_s, s.max_answer_bytes_per_key,
                      s.answer_hold_s),
        images=ImageStore(
            db,
            lambda raw: open_image(raw, max_pixels),
            cache_bytes=s.image_cache_bytes,
            cache_bytes_per_key=s.image_cache_bytes_per_key,
            ttl_s=s.image_ttl_s,
            max_bytes_per_key=s.max_image_bytes_per_key,
            max_bytes_total=s.max_image_bytes_total,
        ),
        scorer=Scorer.from_settings(s),
        metrics=metrics,
        slots=KeySlots(s.max_concurrent_per_key),
    )
    _redact_access_log()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Load the weights before the first request, not during it.
        await run_in_threadpool(lambda: server.scorer.context_shape)
        if app.state.chat_engine is not None:
            await run_in_threadpool(app.state.chat_engine.load)
        logger.info("serving %s, ledger %s", server.scorer.model_id, db.engine.url.render_as_string())
        yield
        server.ledger.answers.close()  # answers not acknowledged yet are written down
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
        if _speaks_openai(request) and not isinstance(exc, chat.ChatError):
            exc = chat.openai_error(exc.status_code, exc.body(), exc.headers)
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _clean_errors(exc.errors())
        if _speaks_openai(request):
            refusal = chat.openai_error(422, {"detail": errors})
            return JSONResponse(refusal.body(), status_code=refusal.status_code)
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # a body FastAPI could not even read as text (not UTF-8): invalid JSON, like any other
            refusal = invalid(("body",), "the body is not JSON in UTF-8", "json_invalid")
            return JSONResponse(refusal.body(), status_code=422)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
        logger.error("ledger database unavailable on %s %s: %s", request.method, request.url.path,
                     type(exc).__name__)
        metrics.refusals.labels("unavailable").inc()
        return JSONResponse(
            {"detail": "the ledger's database is unavailable (unreachable or full); nothing was charged, "
                       "retry later", "retry_after": _UNAVAILABLE_RETRY_S},
            status_code=503,
            headers=retry_after_header(_UNAVAILABLE_RETRY_S),
        )

    for kind in UNAVAILABLE:
        app.add_exception_handler(kind, _unavailable)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal server error"}, status_code=500)

    app.state.chat_engine = None if s.chat_weights == CHAT_OFF else LazyChatEngine(s.chat_weights)
    for router in (images.router, scoring.router, zero_shot.router, chat.router, account.router, ops.router):
        app.include_router(router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=s.max_body_bytes)
    app.add_middleware(HeaderLimitMiddleware, max_bytes=s.max_header_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    fastapi_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_schema(fastapi_openapi(), s, server.scorer.context_shape)
        return app.openapi_schema

    app.openapi = openapi
    return app


def app_from_env() -> FastAPI:
    """The app ``skcarrot serve`` runs in each worker, configured by environment variables.

    See :func:`~skcarrot.serve.config.settings_from_env` for the variables. Used as a
    uvicorn factory (``uvicorn --factory skcarrot.serve.app:app_from_env``), so several
    workers can each build their own.
    """
    return create_app(settings_from_env())
