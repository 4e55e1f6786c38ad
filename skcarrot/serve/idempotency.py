"""Stored answers of charged requests, by ``Idempotency-Key``: a retry is answered, not charged.

A charged request with an ``Idempotency-Key`` leaves a row, written in the same
transaction as its charge (see :meth:`~skcarrot.serve.ledger.Ledger.begin_charge`):
first without an answer, then with the JSON body as sent. The row is what makes a
retry free; the answer is what makes it byte for byte, and costs most of the
bytes, so answers are kept only until the client acknowledges them (it names them
in the ``Idempotency-Ack`` header of a later request), for at most the answers'
time to live, and within a per-key cap (oldest dropped first). A retry of a
request whose answer was dropped is scored again, without a charge. Rows are
pruned after their own, longer, time to live.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from .db import Database, requests_table

__all__ = ["IdempotencyStore", "IdempotencyConflict", "StoredRequest", "fingerprint"]

# Prune at most this often (seconds), from whichever request stores an answer.
_PRUNE_EVERY_S = 60


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
    """An earlier attempt of a request: whether it was answered, and its answer while stored."""

    done: bool
    response: bytes | None


class IdempotencyStore:
    """Charged requests by key and ``Idempotency-Key``, with their answers once sent.

    Parameters
    ----------
    db : Database
    ttl_s : float, default=7 days
        Rows older than this are pruned: a retry after that is a new request.
    answer_ttl_s : float, default=1 hour
        Answers older than this are dropped (their rows stay).
    max_answer_bytes_per_key : int, default=32 MiB
        Most bytes of answers stored per key; storing one more drops the oldest.
        An answer larger than a quarter of it is not stored at all.
    """

    def __init__(
        self,
        db: Database,
        ttl_s: float = 7 * 24 * 3600.0,
        answer_ttl_s: float = 3600.0,
        max_answer_bytes_per_key: int = 32 * 1024 * 1024,
    ) -> None:
        self.db = db
        self.ttl_s = float(ttl_s)
        self.answer_ttl_s = float(answer_ttl_s)
        self.max_answer_bytes_per_key = int(max_answer_bytes_per_key)
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
        response = None if previous.response is None else bytes(previous.response)
        return StoredRequest(bool(previous.done), response)

    def acknowledge(self, conn, key_id: int, idempotency_keys: Sequence[str]) -> None:
        """Drop the stored answers the client says it received (their rows stay, marked answered)."""
        keys = list(dict.fromkeys(idempotency_keys))
        if keys:
            conn.execute(
                requests_table.update()
                .where(requests_table.c.key_id == key_id, requests_table.c.idempotency_key.in_(keys))
                .values(done=True, response=None, response_bytes=None)
            )

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
        """Store the answer of a charged request, to answer its retries.

        Only a request not answered yet is stored (an answer acknowledged while
        this one was on its way stays dropped); then the key's oldest answers
        are dropped while it holds more than ``max_answer_bytes_per_key``.
        """
        if idempotency_key is None:
            return
        if len(response) > self.max_answer_bytes_per_key // 4:
            # a very large answer is not kept (writing it would hold the ledger's write lock for
            # every key meanwhile): a retry of its request is scored again, free, like any whose
            # answer was dropped
            with self.db.begin() as conn:
                conn.execute(
                    requests_table.update()
                    .where(*self._row(key_id, idempotency_key), requests_table.c.done.is_(False))
                    .values(done=True)
                )
            return
        with self.db.begin() as conn:
            stored = conn.execute(
                requests_table.update()
                .where(*self._row(key_id, idempotency_key), requests_table.c.done.is_(False))
                # stored as sent: logits are float32 noise to zlib (it saved a quarter, at the
                # cost of most of a request's overhead)
                .values(done=True, response=response, response_bytes=len(response))
            ).rowcount
            if stored:
                self._cap(conn, key_id)
        self._maybe_prune()

    def _cap(self, conn, key_id: int) -> None:
        held = requests_table.c.response.isnot(None)
        total = conn.execute(
            sa.select(sa.func.coalesce(sa.func.sum(requests_table.c.response_bytes), 0)).where(
                requests_table.c.key_id == key_id, held
            )
        ).scalar_one()
        if int(total) <= self.max_answer_bytes_per_key:
            return
        rows = conn.execute(
            sa.select(requests_table.c.idempotency_key, requests_table.c.response_bytes)
            .where(requests_table.c.key_id == key_id, held)
            .order_by(requests_table.c.created_at)
        ).all()
        drop = []
        for row in rows:
            if total <= self.max_answer_bytes_per_key:
                break
            drop.append(row.idempotency_key)
            total -= int(row.response_bytes or 0)
        self.acknowledge(conn, key_id, drop)

    def stored_bytes(self, key_id: int | None = None) -> int:
        """Bytes of answers stored (of one key, or of all)."""
        query = sa.select(sa.func.coalesce(sa.func.sum(requests_table.c.response_bytes), 0)).where(
            requests_table.c.response.isnot(None)
        )
        if key_id is not None:
            query = query.where(requests_table.c.key_id == key_id)
        with self.db.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def prune(self, now: float | None = None) -> None:
        """Drop answers older than ``answer_ttl_s``; delete rows older than ``ttl_s``."""
        now = time.time() if now is None else now
        with self.db.begin() as conn:
            conn.execute(
                requests_table.update()
                .where(requests_table.c.response.isnot(None), requests_table.c.created_at < now - self.answer_ttl_s)
                .values(done=True, response=None, response_bytes=None)
            )
            conn.execute(requests_table.delete().where(requests_table.c.created_at < now - self.ttl_s))

    def _maybe_prune(self) -> None:
        now = time.time()
        if now - self._last_prune < _PRUNE_EVERY_S or not self._prune_lock.acquire(blocking=False):
            return
        try:
            self._last_prune = now
            self.prune(now)
        finally:
            self._prune_lock.release()
