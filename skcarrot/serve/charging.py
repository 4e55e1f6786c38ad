"""Check-and-charge around a model call, with idempotent replays."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import Response
from starlette.background import BackgroundTask

from .deps import Server
from .errors import ApiError, retry_after_header
from .ledger import BudgetExceeded, IdempotencyConflict, KeyRecord, RateLimited

__all__ = ["fingerprint", "charged_call"]

logger = logging.getLogger("skcarrot.serve")


def fingerprint(path: str, body: bytes) -> str:
    """Digest of a request: a reused Idempotency-Key must come with the same one."""
    return hashlib.sha256(path.encode() + b"\n" + body).hexdigest()


def charged_call(
    server: Server,
    key: KeyRecord,
    n_prompts: int,
    n_images: int,
    idem_key: str | None,
    request_digest: str,
    compute: Callable[[int], Any],
) -> Response:
    """Charge ``n_prompts`` queries, run ``compute(remaining)``, store and return its JSON.

    The charge is taken in one transaction before the model runs (402 over
    budget, 429 over the rate limit: nothing charged). A request whose
    ``Idempotency-Key`` already succeeded gets the stored response and is not
    charged again; one whose earlier attempt was charged but never answered (a
    server killed mid-request) runs again without a second charge. If the model
    fails, the charge is refunded.
    """
    ledger, metrics = server.ledger, server.metrics
    if key.rate_limit is not None and n_prompts > key.rate_limit:
        # waiting would never help: refuse as invalid rather than rate limited
        raise ApiError(
            422,
            [
                {
                    "loc": ["body"],
                    "msg": f"{n_prompts} queries in one request, more than the key's rate limit of {key.rate_limit} "
                    f"per {server.settings.rate_window_s:g} s; send fewer prompts per request",
                    "type": "value_error.over_rate_limit",
                }
            ],
        )
    try:
        charge = ledger.begin_charge(key.id, n_prompts, n_images, idem_key, request_digest)
    except BudgetExceeded as exc:
        metrics.refusals.labels("budget").inc()
        raise ApiError(
            402,
            f"query budget exhausted: this request needs {exc.requested} queries and the key has "
            f"{exc.remaining} left of {exc.budget}; ask the model owner for more budget",
            remaining=exc.remaining,
            budget=exc.budget,
            requested=exc.requested,
        ) from None
    except RateLimited as exc:
        metrics.refusals.labels("rate").inc()
        raise ApiError(
            429,
            f"rate limit of {exc.limit} queries per {exc.window_s:g} s reached; retry after "
            f"{exc.retry_after:.1f} s",
            headers=retry_after_header(exc.retry_after),
            retry_after=exc.retry_after,
        ) from None
    except IdempotencyConflict:
        metrics.refusals.labels("idempotency").inc()
        raise ApiError(
            422,
            [
                {
                    "loc": ["header", "Idempotency-Key"],
                    "msg": "this Idempotency-Key was already used for a different request; use a new key "
                    "for each distinct request",
                    "type": "value_error.idempotency_conflict",
                }
            ],
        ) from None
    if charge.kind == "replay":
        metrics.replays.inc()
        logger.info("key %d: replayed idempotent request", key.id)
        return Response(charge.response, media_type="application/json", headers={"Idempotent-Replayed": "true"})
    try:
        payload = compute(charge.remaining)
        body = json.dumps(payload, separators=(",", ":")).encode()
    except ApiError:
        _refund(server, key, charge.kind, n_prompts, n_images, idem_key)
        raise
    except Exception:
        _refund(server, key, charge.kind, n_prompts, n_images, idem_key)
        logger.exception("key %d: the model failed on a charged request (refunded)", key.id)
        raise ApiError(500, "the model failed on this request; nothing was charged") from None
    except BaseException:  # cancelled, interrupted: the model never answered
        _refund(server, key, charge.kind, n_prompts, n_images, idem_key)
        raise
    if charge.kind == "new":
        metrics.queries.inc(n_prompts)
        metrics.images_scored.inc(n_images)
    # The answer is stored for retries after it is sent, while the client works on it: a
    # retry that comes first finds the charge without an answer and reruns the model, free.
    store = BackgroundTask(ledger.finish_charge, key.id, idem_key, body) if idem_key is not None else None
    return Response(body, media_type="application/json", background=store)


def _refund(server: Server, key: KeyRecord, kind: str, n_prompts: int, n_images: int, idem_key: str | None) -> None:
    # Only a charge taken by this attempt is given back; a resumed attempt's charge stays
    # with the attempt that took it.
    if kind == "new":
        server.ledger.refund(key.id, n_prompts, n_images, idem_key)
