"""Stored answers of charged requests, by ``Idempotency-Key``: a retry is answered, not charged.

A charged request with an ``Idempotency-Key`` leaves a row, written in the same
transaction as its charge (see :meth:`~skcarrot.serve.ledger.Ledger.begin_charge`):
first without an answer, then with the JSON body as sent. Answered rows older
than the time to live are pruned.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from dataclasses import dataclass

import sqlalchemy as sa

from .db import Database, requests_table

__all__ = ["IdempotencyStore", "IdempotencyConflict", "StoredRequest", "fingerprint"]

# Prune at most this often (seconds), from whichever request stores an answer.
_PRUNE_EVERY_S = 600


def fingerprint(path: str, body: bytes) -> str:
    """Digest of a request: a reused Idempotency-Key must come with the same one.

    Examples
    --------
    >>> from skcarrot.serve.idempotency import fingerprint
    >>> fingerprint("/v1/score", b"{}") == fingerprint("/v1/score", b"{}") != fingerprint("/v1/score", b"[]")
    True
    """
    return hashlib.sha256(path.encode() + b"\n" + body).hexdigest()


class IdempotencyConflict(Exception):
    """An Idempotency-Key was reused for a different request."""


@dataclass(frozen=True)
class StoredRequest:
    """An earlier attempt of a request: its answer, or None while it has none."""

    response: bytes | None

    @property
    def done(self) -> bool:
        return self.response is not None


class IdempotencyStore:
    """Charged requests by key and ``Idempotency-Key``, with their answers once sent.

    Parameters
    ----------
    db : Database
    ttl_s : float, default=7 days
        Answers older than this are pruned.
    """

    def __init__(self, db: Database, ttl_s: float = 7 * 24 * 3600.0) -> None:
        self.db = db
        self.ttl_s = float(ttl_s)
        self._last_prune = 0.0
        self._prune_lock = threading.Lock()

    @staticmethod
    def _row(key_id: int, idempotency_key: str):
        return requests_table.c.key_id == key_id, requests_table.c.idempotency_key == idempotency_key

    # -- inside a charge's transaction ----------------------------------------------------

    def find(self, conn, key_id: int, idempotency_key: str, fingerprint: str) -> StoredRequest | None:
        """The earlier attempt of this request, or None for a new one.

        Raises
        ------
        IdempotencyConflict
            The key was used for a request with another fingerprint.
        """
        previous = conn.execute(sa.select(requests_table).where(*self._row(key_id, idempotency_key))).first()
        if previous is None:
            return None
        if not hmac.compare_digest(previous.fingerprint, fingerprint):
            raise IdempotencyConflict(idempotency_key)
        return StoredRequest(bytes(previous.response) if previous.done else None)

    def reserve(
        self, conn, key_id: int, idempotency_key: str, fingerprint: str, n_prompts: int, n_images: int, now: float
    ) -> None:
        """Record a request just charged, not yet answered."""
        conn.execute(
            requests_table.insert().values(
                key_id=key_id,
                idempotency_key=idempotency_key,
                fingerprint=fingerprint,
                done=False,
                n_prompts=n_prompts,
                n_images=n_images,
                response=None,
                created_at=now,
            )
        )

    def release(self, conn, key_id: int, idempotency_key: str) -> None:
        """Forget a request whose charge is refunded."""
        conn.execute(requests_table.delete().where(*self._row(key_id, idempotency_key)))

    # -- on their own ---------------------------------------------------------------------

    def store(self, key_id: int, idempotency_key: str | None, response: bytes) -> None:
        """Store the answer of a charged request, to answer its retries."""
        if idempotency_key is None:
            return
        with self.db.begin() as conn:
            conn.execute(
                requests_table.update()
                .where(*self._row(key_id, idempotency_key))
                # stored as sent: logits are float32 noise to zlib (it saved a quarter, at the
                # cost of most of a request's overhead)
                .values(done=True, response=response)
            )
        self._maybe_prune()

    def prune(self, now: float | None = None) -> None:
        """Delete the answers older than ``ttl_s``."""
        now = time.time() if now is None else now
        with self.db.begin() as conn:
            conn.execute(
                requests_table.delete().where(
                    requests_table.c.done.is_(True),
                    requests_table.c.created_at < now - self.ttl_s,
                )
            )

    def _maybe_prune(self) -> None:
        now = time.time()
        if now - self._last_prune < _PRUNE_EVERY_S or not self._prune_lock.acquire(blocking=False):
            return
        try:
            self._last_prune = now
            self.prune(now)
        finally:
            self._prune_lock.release()
