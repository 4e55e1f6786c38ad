"""The charged endpoint, written once: validate, charge, score, refund on failure, answer.

The key is authenticated by its dependency; then :meth:`ChargedRequest.run`
waits for one of the key's slots, checks the request (``prepare``), charges its
queries with replay protection (and checks, in that same transaction, that the
key was neither revoked nor rotated), runs the model, refunds the charge if the
model fails, and answers (storing the answer for retries of its
``Idempotency-Key`` until the client acknowledges it).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from starlette.concurrency import run_in_threadpool

from ..wire import RAW_MEDIA_TYPE, accepts_raw
from .deps import Acknowledged, CachedKey, CallerDigest, IdempotencyKey, Server, ServerDep
from .errors import ApiError, invalid, retry_after_header
from .idempotency import IdempotencyConflict, fingerprint
from .ledger import BudgetExceeded, KeyRecord, KeyRevoked, RateLimited
from .schemas import ErrorResponse
from .scorer import ModelOutputError

__all__ = ["Job", "ChargedRequest", "ChargedRequestDep", "RawChargedRequestDep", "CHARGED_ERRORS", "revoked_error"]

logger = logging.getLogger("skcarrot.serve")

#: The refusals every charged endpoint documents.
CHARGED_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing, unknown, revoked or rotated key"},
    402: {"model": ErrorResponse, "description": "Query budget exhausted; the body gives `remaining`"},
    413: {"model": ErrorResponse, "description": "Body too large"},
    422: {"model": ErrorResponse, "description": "Invalid request; `loc` names the field"},
    429: {"model": ErrorResponse, "description": "Rate limited, or too many requests of this key at once; "
          "see Retry-After"},
}


def revoked_error() -> ApiError:
    """The 401 of a key revoked or rotated since the request authenticated."""
    return ApiError(401, "unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"})


@dataclass(frozen=True)
class Job:
    """A checked request: what it costs and how to answer it.

    ``n_prompts`` is what the request is billed (queries, in the unit of its
    endpoint); ``compute(remaining)`` runs the model and returns the answer
    (JSON-ready, or bytes of ``media_type``), ``remaining`` being the key's
    budget after this charge; ``loc`` names the field a refusal of the model's
    answer points at.
    """

    n_prompts: int
    n_images: int
    compute: Callable[[int], Any]
    loc: tuple = ("body",)
    media_type: str = "application/json"


def _refusal(exc: Exception) -> tuple[str, ApiError]:
    """The metric label and the answer of a charge the ledger refused (nothing charged)."""
    if isinstance(exc, BudgetExceeded):
        return "budget", ApiError(
            402,
            f"query budget exhausted: this request needs {exc.requested} queries and the key has "
            f"{exc.remaining} left of {exc.budget}; ask the model owner for more budget",
            remaining=exc.remaining,
            budget=exc.budget,
            requested=exc.requested,
        )
    if isinstance(exc, KeyRevoked):
        return "revoked", revoked_error()
    if isinstance(exc, RateLimited):
        return "rate", ApiError(
            429,
            f"rate limit of {exc.limit} queries per {exc.window_s:g} s reached; retry after {exc.retry_after:.1f} s",
            headers=retry_after_header(exc.retry_after),
            retry_after=exc.retry_after,
        )
    return "idempotency", invalid(
        ("header", "Idempotency-Key"),
        "this Idempotency-Key was already used for a different request; use a new key for each distinct request",
        "value_error.idempotency_conflict",
    )


@dataclass(frozen=True)
class ChargedRequest:
    """One charged request: its server, key, ``Idempotency-Key``, fingerprint, and the answers it acknowledges.

    ``raw``: None for an endpoint that answers JSON only; else whether the client
    accepts answers as :data:`~skcarrot.wire.RAW_MEDIA_TYPE` (the fingerprint then
    says so, so a retry is replayed in the form it was first answered).
    """

    server: Server
    key: KeyRecord
    idempotency_key: str | None
    fingerprint: str
    key_hash: str | None = None
    acknowledged: tuple[str, ...] = ()
    raw: bool | None = None

    async def run(self, prepare: Callable[[], Job], route: str = "", small: bool = False) -> Response:
        """In one of the key's slots: check the request with ``prepare()`` (422s), then charge and answer it.

        In a pool thread; a ``small`` request of ``route`` may run in the event loop's own
        thread instead (see :class:`~skcarrot.serve.concurrency.InlinePolicy`).
        """
        server = self.server
        async with server.slots.hold(self.key.id):
            inline = small and server.inline.allows(route, server.metrics.in_flight)
            start = time.perf_counter()
            try:
                if inline:
                    return self.answer(prepare())
                return await run_in_threadpool(lambda: self.answer(prepare()))
            finally:
                if small:
                    server.inline.record(route, time.perf_counter() - start)

    def answer(self, job: Job) -> Response:
        """Charge ``job.n_prompts`` queries, run ``job.compute(remaining)``, store and return its JSON.

        The charge is taken in one transaction before the model runs (402 over
        budget, 429 over the rate limit: nothing charged). A request whose
        ``Idempotency-Key`` already succeeded gets the stored response and is not
        charged again; one whose earlier attempt was charged but never answered (a
        server killed mid-request) runs again without a second charge. If the model
        fails, the charge is refunded.
        """
        server, key, idem = self.server, self.key, self.idempotency_key
        ledger, metrics = server.ledger, server.metrics
        n_prompts, n_images = job.n_prompts, job.n_images
        if key.rate_limit is not None and n_prompts > key.rate_limit:
            # waiting would never help: refuse as invalid rather than rate limited
            raise invalid(
                ("body",),
                f"{n_prompts} queries in one request, more than the key's rate limit of {key.rate_limit} "
                f"per {server.settings.rate_window_s:g} s; send fewer prompts per request",
                "value_error.over_rate_limit",
            )
        try:
            charge = ledger.begin_charge(key.id, n_prompts, n_images, idem, self.fingerprint,
                                         key_hash=self.key_hash, acknowledged=self.acknowledged)
        except (KeyRevoked, BudgetExceeded, RateLimited, IdempotencyConflict) as exc:
            reason, error = _refusal(exc)
            metrics.refusals.labels(reason).inc()
            raise error from None
        if charge.kind == "replay":
            metrics.replays.inc()
            logger.info("key %d: replayed idempotent request", key.id)
            return Response(charge.response, media_type=job.media_type, headers=self._headers(True))
        try:
            payload = job.compute(charge.remaining)
            body = payload if isinstance(payload, bytes) else json.dumps(payload, separators=(",", ":")).encode()
        except ApiError:
            self._refund(charge.kind, job)
            raise
        except ModelOutputError as exc:
            # the same request would fail the same way: refused, not worth a retry
            self._refund(charge.kind, job)
            metrics.refusals.labels("model_output").inc()
            raise invalid(job.loc, f"{exc}; nothing was charged", "value_error.model_output") from None
        except Exception as exc:
            self._refund(charge.kind, job)
            if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
                logger.warning("key %d: out of memory on a charged request (refunded)", key.id)
                raise ApiError(503, "the server is out of memory for now; nothing was charged, retry later",
                               headers=retry_after_header(5)) from None
            logger.exception("key %d: the model failed on a charged request (refunded)", key.id)
            raise ApiError(500, "the model failed on this request; nothing was charged", retryable=False) from None
        except BaseException:  # cancelled, interrupted: the model never answered
            self._refund(charge.kind, job)
            raise
        if charge.kind == "new":
            metrics.queries.inc(n_prompts)
            metrics.images_scored.inc(n_images)
        # Kept for retries until the client acknowledges it: held in memory, written to the
        # ledger only if no acknowledgement comes soon (see IdempotencyStore.hold).
        ledger.answers.hold(key.id, idem, body)
        return Response(body, media_type=job.media_type, headers=self._headers(False))

    def _headers(self, replayed: bool) -> dict[str, str]:
        headers = {} if self.raw is None else {"Vary": "Accept"}
        if replayed:
            headers["Idempotent-Replayed"] = "true"
        return headers

    def _refund(self, kind: str, job: Job) -> None:
        # Only a charge taken by this attempt is given back; a resumed attempt's charge stays
        # with the attempt that took it.
        if kind == "new":
            self.server.ledger.refund(self.key.id, job.n_prompts, job.n_images, self.idempotency_key)


async def charged_request(
    request: Request,
    server: ServerDep,
    key: CachedKey,
    digest: CallerDigest,
    idem: IdempotencyKey,
    acks: Acknowledged,
) -> ChargedRequest:
    """The calling key (401 without one), the request's ``Idempotency-Key``, fingerprint and acknowledgements."""
    body = fingerprint(request.url.path, await request.body())
    return ChargedRequest(server, key, idem, body, digest, tuple(acks))


async def raw_charged_request(
    request: Request,
    server: ServerDep,
    key: CachedKey,
    digest: CallerDigest,
    idem: IdempotencyKey,
    acks: Acknowledged,
) -> ChargedRequest:
    """As :func:`charged_request`, for an endpoint that answers :data:`~skcarrot.wire.RAW_MEDIA_TYPE` to a
    client that accepts it."""
    raw = accepts_raw(request.headers.get("accept"))
    path = f"{request.url.path};{RAW_MEDIA_TYPE}" if raw else request.url.path
    return ChargedRequest(server, key, idem, fingerprint(path, await request.body()), digest, tuple(acks), raw)


ChargedRequestDep = Annotated[ChargedRequest, Depends(charged_request)]
RawChargedRequestDep = Annotated[ChargedRequest, Depends(raw_charged_request)]
