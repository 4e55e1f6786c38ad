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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from .deps import Acknowledged, CallerDigest, CurrentKey, IdempotencyKey, Server, ServerDep
from .errors import ApiError, invalid, retry_after_header
from .idempotency import IdempotencyConflict, fingerprint
from .ledger import BudgetExceeded, KeyRecord, KeyRevoked, RateLimited
from .schemas import ErrorResponse
from .scorer import ModelOutputError

__all__ = ["Job", "ChargedRequest", "ChargedRequestDep", "CHARGED_ERRORS", "revoked_error"]

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
    endpoint); ``compute(remaining)`` runs the model and returns the JSON
    answer, ``remaining`` being the key's budget after this charge; ``loc``
    names the field a refusal of the model's answer points at.
    """

    n_prompts: int
    n_images: int
    compute: Callable[[int], Any]
    loc: tuple = ("body",)


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
    """One charged request: its server, key, ``Idempotency-Key``, fingerprint, and the answers it acknowledges."""

    server: Server
    key: KeyRecord
    idempotency_key: str | None
    fingerprint: str
    key_hash: str | None = None
    acknowledged: tuple[str, ...] = ()

    async def run(self, prepare: Callable[[], Job]) -> Response:
        """In one of the key's slots: check the request with ``prepare()`` (422s), then charge and answer it."""
        async with self.server.slots.hold(self.key.id):
            return await run_in_threadpool(lambda: self.answer(prepare()))

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
            return Response(charge.response, media_type="application/json", headers={"Idempotent-Replayed": "true"})
        try:
            payload = job.compute(charge.remaining)
            body = json.dumps(payload, separators=(",", ":")).encode()
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
        # The answer is stored for retries after it is sent, while the client works on it: a
        # retry that comes first finds the charge without an answer and reruns the model, free.
        store = BackgroundTask(ledger.answers.store, key.id, idem, body) if idem is not None else None
        return Response(body, media_type="application/json", background=store)

    def _refund(self, kind: str, job: Job) -> None:
        # Only a charge taken by this attempt is given back; a resumed attempt's charge stays
        # with the attempt that took it.
        if kind == "new":
            self.server.ledger.refund(self.key.id, job.n_prompts, job.n_images, self.idempotency_key)


async def charged_request(
    request: Request,
    server: ServerDep,
    key: CurrentKey,
    digest: CallerDigest,
    idem: IdempotencyKey,
    acks: Acknowledged,
) -> ChargedRequest:
    """The calling key (401 without one), the request's ``Idempotency-Key``, fingerprint and acknowledgements."""
    body = fingerprint(request.url.path, await request.body())
    return ChargedRequest(server, key, idem, body, digest, tuple(acks))


ChargedRequestDep = Annotated[ChargedRequest, Depends(charged_request)]
