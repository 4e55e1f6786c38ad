"""Dependencies shared by the routers: the server's parts and the calling key."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from .errors import ApiError, invalid
from .ledger import KeyRecord, Ledger, hash_key
from .metrics import Metrics
from .model import ModelService
from .settings import Settings

__all__ = ["Server", "KeyCache", "get_server", "current_key", "idempotency_key"]


@dataclass
class Server:
    """Everything one application holds: settings, ledger, model, metrics."""

    settings: Settings
    ledger: Ledger
    model: ModelService
    metrics: Metrics
    keys: "KeyCache" = field(default_factory=lambda: KeyCache())


# Dependencies that do no I/O are ``async``: FastAPI would run a plain ``def`` in the
# thread pool, a thread hop per request for nothing.


async def get_server(request: Request) -> Server:
    return request.app.state.server


_bearer = HTTPBearer(auto_error=False, description="API key from `skcarrot keys create`, as a Bearer token")


class KeyCache:
    """Key records by key hash, for a few seconds: most requests then skip a ledger read.

    Only identity and limits are read from a cached record; budgets are always checked
    and charged in the ledger itself.
    """

    def __init__(self, ttl_s: float = 2.0, max_size: int = 10_000) -> None:
        self.ttl_s, self.max_size = ttl_s, max_size
        self._records: dict[str, tuple[float, KeyRecord]] = {}

    def get(self, digest: str) -> KeyRecord | None:
        hit = self._records.get(digest)
        if hit is None or hit[0] < time.monotonic():
            return None
        return hit[1]

    def put(self, digest: str, record: KeyRecord) -> None:
        if len(self._records) >= self.max_size:
            self._records.clear()
        self._records[digest] = (time.monotonic() + self.ttl_s, record)


async def current_key(
    server: Annotated[Server, Depends(get_server)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> KeyRecord:
    """The calling key's record; 401 for a missing, unknown or revoked key.

    The key is read from the ``Authorization`` header only, never from the URL,
    and never logged.
    """
    if credentials is None:
        raise ApiError(
            401,
            "missing API key: send the header 'Authorization: Bearer <key>' (keys come from "
            "'skcarrot keys create'; never put a key in the URL)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    digest = hash_key(credentials.credentials)
    record = server.keys.get(digest)
    if record is None:
        record = await run_in_threadpool(server.ledger.authenticate, credentials.credentials)
        if record is None:
            raise ApiError(401, "unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"})
        server.keys.put(digest, record)
    return record


async def idempotency_key(
    value: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="Any unique string per logical request (e.g. a UUID); a retry with the same key "
            "is answered from the ledger and charged once",
        ),
    ] = None,
) -> str | None:
    """The ``Idempotency-Key`` header: 1-200 printable ASCII characters, or absent."""
    if value is None:
        return None
    if not 1 <= len(value) <= 200 or not value.isascii() or not value.isprintable():
        raise invalid(("header", "Idempotency-Key"), "must be 1 to 200 printable ASCII characters (a UUID is ideal)")
    return value
