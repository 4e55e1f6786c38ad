"""What a handler may ask for: the server's parts and the calling key, as ``Annotated`` aliases."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

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
    "KeySlots",
    "InlinePolicy",
    "CurrentKey",
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
class _Slots:
    loop: asyncio.AbstractEventLoop
    free: asyncio.Semaphore
    active: int = 0


class KeySlots:
    """At most ``per_key`` requests of one key at work at once (in this process); the rest wait their turn.

    A key that already has ``max_waiting`` requests waiting is refused (429): one
    key, however many requests it sends, holds at most ``per_key`` of the
    server's threads, and its queue is bounded.
    """

    def __init__(self, per_key: int = 4, max_waiting: int | None = None) -> None:
        self.per_key = max(1, int(per_key))
        self.max_waiting = 4 * self.per_key if max_waiting is None else int(max_waiting)
        self._keys: dict[int, _Slots] = {}

    @asynccontextmanager
    async def hold(self, key_id: int):
        loop = asyncio.get_running_loop()
        slots = self._keys.get(key_id)
        if slots is None or slots.loop is not loop:
            slots = self._keys[key_id] = _Slots(loop, asyncio.Semaphore(self.per_key))
        if slots.active - self.per_key >= self.max_waiting:
            raise ApiError(
                429,
                f"this key already has {self.per_key} requests at work and {self.max_waiting} waiting; "
                "send fewer at once",
                headers={"Retry-After": "1"},
                retry_after=1.0,
            )
        slots.active += 1
        try:
            async with slots.free:
                yield
        finally:
            slots.active -= 1
            if slots.active == 0 and self._keys.get(key_id) is slots:
                del self._keys[key_id]


class InlinePolicy:
    """Which charged requests run in the event loop's own thread instead of the thread pool.

    Handing a request to a pool thread and back wakes two threads; on a busy
    machine each wake-up can wait for a scheduler slice, milliseconds a request.
    A small request (at most one model call's worth of work, no large upload)
    runs in the loop's thread when nothing else is in flight in this process, so
    it holds up nobody but a request arriving meanwhile, and only while this
    endpoint's recent requests took at most ``max_s`` (an estimate kept per
    endpoint from every request it ran, here or in the pool; one slower request
    sends the next ones back to the pool).

    Examples
    --------
    >>> from skcarrot.serve.deps import InlinePolicy
    >>> policy = InlinePolicy(max_s=0.02)
    >>> policy.allows("/v1/score", in_flight=1)  # no estimate yet: the pool, which measures it
    False
    >>> policy.record("/v1/score", 0.005)
    >>> policy.allows("/v1/score", in_flight=1), policy.allows("/v1/score", in_flight=2)
    (True, False)
    >>> policy.record("/v1/score", 0.5)
    >>> policy.allows("/v1/score", in_flight=1)
    False
    """

    def __init__(self, max_s: float = 0.025) -> None:
        self.max_s = float(max_s)
        self._seconds: dict[str, float] = {}

    def allows(self, route: str, in_flight: int) -> bool:
        """Whether a small request of ``route`` runs inline, with ``in_flight`` requests (itself included) at work."""
        estimate = self._seconds.get(route)
        return in_flight <= 1 and estimate is not None and estimate <= self.max_s

    def record(self, route: str, seconds: float) -> None:
        """A request of ``route`` took ``seconds`` of work."""
        before = self._seconds.get(route)
        if before is None or seconds > self.max_s:
            self._seconds[route] = seconds
        else:
            self._seconds[route] = 0.75 * before + 0.25 * seconds


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


async def current_key(
    server: ServerDep,
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
CallerDigest = Annotated[str | None, Depends(caller_digest)]
IdempotencyKey = Annotated[str | None, Depends(idempotency_key)]
Acknowledged = Annotated[list[str], Depends(acknowledged)]
