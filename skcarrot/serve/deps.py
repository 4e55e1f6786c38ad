"""What a handler may ask for: the server's parts and the calling key, as ``Annotated`` aliases."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from .concurrency import InlinePolicy, KeySlots
from .config import Settings
from .db import Database
from .errors import ApiError
from .image_store import ImageStore
from .ledger import KeyRecord, Ledger, hash_key
from .metrics import Metrics
from .scorer import Scorer
from .validation import check_acknowledgements, check_idempotency_key

__all__ = [
    "Server",
    "KeyCache",
    "ServerDep",
    "SettingsDep",
    "DatabaseDep",
    "LedgerDep",
    "ImagesDep",
    "ScorerDep",
    "MetricsDep",
    "CurrentKey",
    "CachedKey",
    "CallerDigest",
    "IdempotencyKey",
    "Acknowledged",
]


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


@dataclass
class Server:
    """Everything one application holds: settings, database, ledger, images, model, metrics."""

    settings: Settings
    db: Database
    ledger: Ledger
    images: ImageStore
    scorer: Scorer
    metrics: Metrics
    keys: KeyCache = field(default_factory=KeyCache)
    slots: KeySlots = field(default_factory=KeySlots)
    inline: InlinePolicy = field(default_factory=InlinePolicy)


# Dependencies that do no I/O are ``async``: FastAPI would run a plain ``def`` in the
# thread pool, a thread hop per request for nothing.


async def get_server(request: Request) -> Server:
    return request.app.state.server


ServerDep = Annotated[Server, Depends(get_server)]


def _part(name: str):
    """A dependency giving the server's part ``name``."""

    async def dependency(server: ServerDep):
        return getattr(server, name)

    dependency.__name__ = f"get_{name}"
    return dependency


SettingsDep = Annotated[Settings, Depends(_part("settings"))]
DatabaseDep = Annotated[Database, Depends(_part("db"))]
LedgerDep = Annotated[Ledger, Depends(_part("ledger"))]
ImagesDep = Annotated[ImageStore, Depends(_part("images"))]
ScorerDep = Annotated[Scorer, Depends(_part("scorer"))]
MetricsDep = Annotated[Metrics, Depends(_part("metrics"))]

_bearer = HTTPBearer(auto_error=False, description="API key from `skcarrot keys create`, as a Bearer token")


def _missing_key() -> ApiError:
    return ApiError(
        401,
        "missing API key: send the header 'Authorization: Bearer <key>' (keys come from "
        "'skcarrot keys create'; never put a key in the URL)",
        headers={"WWW-Authenticate": "Bearer"},
    )


def _unknown_key() -> ApiError:
    return ApiError(401, "unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"})


async def current_key(
    server: ServerDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> KeyRecord:
    """The calling key's record, read from the ledger now; 401 for a missing, unknown or revoked key.

    What the uncharged endpoints use: a key revoked or rotated is refused from its very next
    request. The key is read from the ``Authorization`` header only, never from the URL,
    and never logged.
    """
    if credentials is None:
        raise _missing_key()
    record = await run_in_threadpool(server.ledger.authenticate, credentials.credentials)
    if record is None:
        raise _unknown_key()
    server.keys.put(hash_key(credentials.credentials), record)
    return record


async def cached_key(
    server: ServerDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> KeyRecord:
    """As :func:`current_key`, from the key cache when it holds the key (a ledger read saved).

    Only for charged endpoints: their charge's transaction checks again that the key is
    neither revoked nor rotated, so a cached record never lets a revoked key through.
    """
    if credentials is None:
        raise _missing_key()
    digest = hash_key(credentials.credentials)
    record = server.keys.get(digest)
    if record is None:
        record = await run_in_threadpool(server.ledger.authenticate, credentials.credentials)
        if record is None:
            raise _unknown_key()
        server.keys.put(digest, record)
    return record


async def caller_digest(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str | None:
    """sha256 of the secret the request came with (checked again where it is charged)."""
    return None if credentials is None else hash_key(credentials.credentials)


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
    return check_idempotency_key(value)


async def acknowledged(
    value: Annotated[
        str | None,
        Header(
            alias="Idempotency-Ack",
            description="Idempotency-Key values of earlier requests whose answers this client received, "
            "comma-separated (at most 64): the server drops their stored answers (a retry of one is scored "
            "again, free). HTTPBackend sends them with its next charged request",
        ),
    ] = None,
) -> list[str]:
    """The ``Idempotency-Ack`` header: answers the client has, which the server need not keep."""
    return check_acknowledgements(value)


CurrentKey = Annotated[KeyRecord, Depends(current_key)]
CachedKey = Annotated[KeyRecord, Depends(cached_key)]
CallerDigest = Annotated[str | None, Depends(caller_digest)]
IdempotencyKey = Annotated[str | None, Depends(idempotency_key)]
Acknowledged = Annotated[list[str], Depends(acknowledged)]
