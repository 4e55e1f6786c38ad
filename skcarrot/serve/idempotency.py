"""Stored answers of charged requests, by ``Idempotency-Key``: a retry is answered, not charged.

A charged request with an ``Idempotency-Key`` leaves a row, written in the same
transaction as its charge (see :meth:`~skcarrot.serve.ledger.Ledger.begin_charge`):
that row is what makes a retry free. Its answer, which makes a retry byte for byte
and costs most of the bytes, is kept only until the client acknowledges it (it
names it in the ``Idempotency-Ack`` header of a later request), for at most the
answers' time to live, and within a per-key cap (oldest dropped first).

An answer is first held in the server's memory (:meth:`IdempotencyStore.hold`):
a client that acknowledges its answers (``HTTPBackend`` does, with its next
request) has them dropped there, and the ledger never writes them. One still
unacknowledged after ``hold_s`` seconds, or when the server stops, is written to
the ledger in one transaction with the others then due (:meth:`IdempotencyStore.flush`),
so a restarted server or another process on the same ledger replays it too. A
retry of a request whose answer was dropped (or lost with a killed server) is
scored again, without a charge. Rows are pruned after their own, longer, time to live.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from .db import Database, requests_table, Throttle

__all__ = ["IdempotencyStore", "IdempotencyConflict", "StoredRequest", "fingerprint"]

logger = logging.getLogger("skcarrot.serve")

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


@dataclass(frozen=True)
class _Held:
    """An answer held in memory, not written to the ledger yet."""

    response: bytes
    created: float


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
        Most bytes of answers kept per key (in memory and in the ledger); keeping
        one more drops the oldest. An answer larger than a quarter of it is not kept at all.
    hold_s : float, default=2.0
        Seconds an answer is held in memory, waiting for its acknowledgement,
        before it is written to the ledger; 0 writes each at once.
    max_held_bytes : int, default=256 MiB
        Most bytes of answers held in memory, all keys together; past it the
        oldest are written to the ledger early.

    Examples
    --------
    >>> from skcarrot.serve.db import Database
    >>> from skcarrot.serve.ledger import Ledger
    >>> ledger = Ledger(Database("sqlite://"))
    >>> key_id, _ = ledger.create_key("alice", budget=10)
    >>> ledger.begin_charge(key_id, 1, 1, "r1", "f").kind
    'new'
    >>> ledger.answers.hold(key_id, "r1", b'{"ok":1}')
    >>> ledger.begin_charge(key_id, 1, 1, "r1", "f").response  # a retry: replayed, not charged
    b'{"ok":1}'
    >>> ledger.begin_charge(key_id, 1, 1, "r2", "f", acknowledged=["r1"]).kind
    'new'
    >>> ledger.answers.stored_bytes(key_id)  # acknowledged: dropped before it was ever written
    0
    """

    def __init__(
        self,
        db: Database,
        ttl_s: float = 7 * 24 * 3600.0,
        answer_ttl_s: float = 3600.0,
        max_answer_bytes_per_key: int = 32 * 1024 * 1024,
        hold_s: float = 2.0,
        max_held_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.db = db
        self.ttl_s = float(ttl_s)
        self.answer_ttl_s = float(answer_ttl_s)
        self.max_answer_bytes_per_key = int(max_answer_bytes_per_key)
        self.hold_s = float(hold_s)
        self.max_held_bytes = int(max_held_bytes)
        self._prune_throttle = Throttle(_PRUNE_EVERY_S)
        # answers held in memory, oldest first, and their bytes per key and in all
        self._held: OrderedDict[tuple[int, str], _Held] = OrderedDict()
        self._held_bytes: dict[int, int] = {}
        self._held_total = 0
        self._held_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._flushing: set[tuple[int, str]] = set()
        self._closed = False

    @staticmethod
    def _row(key_id: int, idempotency_key: str):
        return requests_table.c.key_id == key_id, requests_table.c.idempotency_key == idempotency_key

    # The statements of every charge, built once (SQLAlchemy then skips most of its work per call).
    _find = sa.select(requests_table).where(
        requests_table.c.key_id == sa.bindparam("key_id"), requests_table.c.idempotency_key == sa.bindparam("idem")
    )
    _reserve = requests_table.insert()
    _acknowledge = (
        requests_table.update()
        .where(
            requests_table.c.key_id == sa.bindparam("b_key_id"),
            requests_table.c.idempotency_key.in_(sa.bindparam("b_keys", expanding=True)),
        )
        .values(done=True, response=None, response_bytes=None)
    )

    # -- inside a charge's transaction ----------------------------------------------------

    def find(self, conn, key_id: int, idempotency_key: str, fingerprint: str) -> StoredRequest | None:
        """The earlier attempt of this request, or None for a new one.

        Raises
        ------
        IdempotencyConflict
            The key was used for a request with another fingerprint.
        """
        previous = conn.execute(self._find, {"key_id": key_id, "idem": idempotency_key}).first()
        if previous is None:
            return None
        if not hmac.compare_digest(previous.fingerprint, fingerprint):
            raise IdempotencyConflict(idempotency_key)
        response = None if previous.response is None else bytes(previous.response)
        if response is None:
            held = self._held.get((key_id, idempotency_key))
            if held is not None:
                response = held.response
        return StoredRequest(bool(previous.done), response)

    def acknowledge(self, conn, key_id: int, idempotency_keys: Sequence[str]) -> None:
        """Drop the stored answers the client says it received (their rows stay, marked answered).

        An answer still held in memory is simply forgotten: the ledger never had it.
        """
        keys = list(dict.fromkeys(idempotency_keys))
        written = [k for k in keys if not self._forget(key_id, k)]
        if written:
            conn.execute(self._acknowledge, {"b_key_id": key_id, "b_keys": written})

    def reserve(
        self, conn, key_id: int, idempotency_key: str, fingerprint: str, n_prompts: int, n_images: int, now: float
    ) -> None:
        """Record a request just charged, not yet answered."""
        conn.execute(
            self._reserve,
            {"key_id": key_id, "idempotency_key": idempotency_key, "fingerprint": fingerprint, "done": False,
             "n_prompts": n_prompts, "n_images": n_images, "response": None, "created_at": now},
        )

    def release(self, conn, key_id: int, idempotency_key: str) -> None:
        """Forget a request whose charge is refunded."""
        self._forget(key_id, idempotency_key)
        conn.execute(requests_table.delete().where(*self._row(key_id, idempotency_key)))

    # -- answers held in memory -----------------------------------------------------------

    def hold(self, key_id: int, idempotency_key: str | None, response: bytes, now: float | None = None) -> None:
        """Keep the answer of a charged request, to answer its retries, until it is acknowledged.

        Held in memory for ``hold_s`` seconds, then written to the ledger (see
        :meth:`flush`); the key's oldest answers are dropped while it keeps more
        than ``max_answer_bytes_per_key``, and one larger than a quarter of that
        is not kept at all (a retry of its request is scored again, free).
        """
        if idempotency_key is None or len(response) > self.max_answer_bytes_per_key // 4:
            # a very large answer is not kept (writing it would hold the ledger's write lock for
            # every key meanwhile): a retry of its request is scored again, free, like any whose
            # answer was dropped
            return
        if self.hold_s <= 0 or self._closed:
            self.store(key_id, idempotency_key, response)
            return
        now = time.time() if now is None else now
        name = (key_id, idempotency_key)
        with self._held_lock:
            self._pop_locked(name)
            self._held[name] = _Held(bytes(response), now)
            self._held_bytes[key_id] = self._held_bytes.get(key_id, 0) + len(response)
            self._held_total += len(response)
            if self._held_bytes[key_id] > self.max_answer_bytes_per_key:
                mine = [n for n in self._held if n[0] == key_id]
                for old in mine[:-1]:
                    if self._held_bytes[key_id] <= self.max_answer_bytes_per_key:
                        break
                    self._pop_locked(old)
            crowded = self._held_total > self.max_held_bytes
            self._arm_locked(now)
        if crowded:
            self.flush(crowded=True)

    def _pop_locked(self, name: tuple[int, str]) -> _Held | None:
        held = self._held.pop(name, None)
        if held is not None:
            key_id = name[0]
            left = self._held_bytes[key_id] - len(held.response)
            if left:
                self._held_bytes[key_id] = left
            else:
                del self._held_bytes[key_id]
            self._held_total -= len(held.response)
        return held

    def _forget(self, key_id: int, idempotency_key: str) -> bool:
        """Drop a held answer; whether it was held and is not being written to the ledger."""
        name = (key_id, idempotency_key)
        if name not in self._held:
            return False
        with self._held_lock:
            return self._pop_locked(name) is not None and name not in self._flushing

    def held_bytes(self, key_id: int | None = None) -> int:
        """Bytes of answers held in memory, not written to the ledger yet (of one key, or of all)."""
        return self._held_total if key_id is None else self._held_bytes.get(key_id, 0)

    def _arm_locked(self, now: float) -> None:
        if self._timer is not None or not self._held or self._closed:
            return
        oldest = next(iter(self._held.values())).created
        timer = threading.Timer(max(0.05, oldest + self.hold_s - now), self._on_timer)
        timer.daemon = True
        self._timer = timer
        timer.start()

    def _on_timer(self) -> None:
        with self._held_lock:
            self._timer = None
        try:
            self.flush()
        except Exception:  # noqa: BLE001 - a timer thread has no one to raise to
            logger.warning("could not write held answers to the ledger; their retries will be scored again, free",
                           exc_info=True)
            self._drop_due(time.time())
        with self._held_lock:
            self._arm_locked(time.time())

    def _drop_due(self, now: float) -> None:
        with self._held_lock:
            for name in [n for n, h in self._held.items() if h.created <= now - self.hold_s]:
                self._pop_locked(name)

    def flush(self, everything: bool = False, crowded: bool = False, now: float | None = None) -> int:
        """Write held answers to the ledger, in one transaction; returns how many were written.

        Those held ``hold_s`` seconds or more; with ``everything``, all of them;
        with ``crowded``, the oldest too, until the memory held is within ``max_held_bytes``.
        """
        now = time.time() if now is None else now
        with self._flush_lock:
            with self._held_lock:
                due, total = [], self._held_total
                for name, held in self._held.items():
                    if everything or held.created <= now - self.hold_s or (crowded and total > self.max_held_bytes):
                        due.append((name, held))
                        total -= len(held.response)
                    else:
                        break
                self._flushing.update(name for name, _ in due)
            if not due:
                return 0
            moving: dict[int, int] = {}  # bytes of each key's answers on their way to the ledger
            for (key_id, _), held in due:
                moving[key_id] = moving.get(key_id, 0) + len(held.response)
            try:
                with self.db.begin() as conn:
                    for (key_id, idempotency_key), held in due:
                        self._write(conn, key_id, idempotency_key, held.response)
                    for key_id, nbytes in moving.items():
                        self._cap(conn, key_id, moving=nbytes)
            finally:
                with self._held_lock:
                    self._flushing.clear()
                    for name, held in due:
                        if self._held.get(name) is held:
                            self._pop_locked(name)
        self._maybe_prune()
        return len(due)

    def close(self) -> None:
        """Write every held answer to the ledger and stop holding new ones (the server stops)."""
        with self._held_lock:
            self._closed = True
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        try:
            self.flush(everything=True)
        except Exception:  # noqa: BLE001 - stopping anyway: their retries are scored again, free
            logger.warning("could not write held answers to the ledger on shutdown", exc_info=True)

    # -- in the ledger --------------------------------------------------------------------

    @staticmethod
    def _write(conn, key_id: int, idempotency_key: str, response: bytes) -> int:
        # Only a request not answered yet is stored: an answer acknowledged meanwhile stays dropped.
        return conn.execute(
            requests_table.update()
            .where(requests_table.c.key_id == key_id, requests_table.c.idempotency_key == idempotency_key,
                   requests_table.c.done.is_(False))
            # stored as sent: logits are float32 noise to zlib (it saved a quarter, at the
            # cost of most of a request's overhead)
            .values(done=True, response=response, response_bytes=len(response))
        ).rowcount

    def store(self, key_id: int, idempotency_key: str | None, response: bytes) -> None:
        """Write the answer of a charged request to the ledger at once, to answer its retries.

        Only a request not answered yet is stored (an answer acknowledged while
        this one was on its way stays dropped); then the key's oldest answers
        are dropped while it keeps more than ``max_answer_bytes_per_key``.
        """
        if idempotency_key is None:
            return
        if len(response) > self.max_answer_bytes_per_key // 4:
            with self.db.begin() as conn:
                conn.execute(
                    requests_table.update()
                    .where(*self._row(key_id, idempotency_key), requests_table.c.done.is_(False))
                    .values(done=True)
                )
            return
        with self.db.begin() as conn:
            if self._write(conn, key_id, idempotency_key, response):
                self._cap(conn, key_id)
        self._maybe_prune()

    def _cap(self, conn, key_id: int, moving: int = 0) -> None:
        # what the key holds in memory counts too (less ``moving`` bytes, just written here)
        cap = self.max_answer_bytes_per_key - (self.held_bytes(key_id) - moving)
        held = requests_table.c.response.isnot(None)
        total = conn.execute(
            sa.select(sa.func.coalesce(sa.func.sum(requests_table.c.response_bytes), 0)).where(
                requests_table.c.key_id == key_id, held
            )
        ).scalar_one()
        if int(total) <= cap:
            return
        rows = conn.execute(
            sa.select(requests_table.c.idempotency_key, requests_table.c.response_bytes)
            .where(requests_table.c.key_id == key_id, held)
            .order_by(requests_table.c.created_at)
        ).all()
        drop = []
        for row in rows:
            if total <= cap:
                break
            drop.append(row.idempotency_key)
            total -= int(row.response_bytes or 0)
        self._drop_written(conn, key_id, drop)

    def _drop_written(self, conn, key_id: int, keys: Iterable[str]) -> None:
        keys = list(keys)
        if keys:
            conn.execute(self._acknowledge, {"b_key_id": key_id, "b_keys": keys})

    def stored_bytes(self, key_id: int | None = None) -> int:
        """Bytes of answers kept, in the ledger and held in memory (of one key, or of all)."""
        query = sa.select(sa.func.coalesce(sa.func.sum(requests_table.c.response_bytes), 0)).where(
            requests_table.c.response.isnot(None)
        )
        if key_id is not None:
            query = query.where(requests_table.c.key_id == key_id)
        with self.db.connect() as conn:
            return int(conn.execute(query).scalar_one()) + self.held_bytes(key_id)

    def prune(self, now: float | None = None) -> None:
        """Drop answers older than ``answer_ttl_s``; delete rows older than ``ttl_s``."""
        now = time.time() if now is None else now
        with self._held_lock:
            for name in [n for n, h in self._held.items() if h.created < now - self.answer_ttl_s]:
                self._pop_locked(name)
        with self.db.begin() as conn:
            conn.execute(
                requests_table.update()
                .where(requests_table.c.response.isnot(None), requests_table.c.created_at < now - self.answer_ttl_s)
                .values(done=True, response=None, response_bytes=None)
            )
            conn.execute(requests_table.delete().where(requests_table.c.created_at < now - self.ttl_s))

    def _maybe_prune(self) -> None:
        self._prune_throttle(self.prune)
