"""The ledger: keys, budgets and rate windows, charged and refunded.

Checking a key's budget and charging it is one transaction (the key's row is
locked for it), so concurrent requests can never overspend; a request's
``Idempotency-Key`` is recorded in that same transaction (see
:mod:`skcarrot.serve.idempotency`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from .db import Database, keys_table
from .idempotency import IdempotencyStore

__all__ = [
    "Ledger",
    "KeyRecord",
    "Charge",
    "BudgetExceeded",
    "RateLimited",
    "KeyRevoked",
    "hash_key",
    "new_key",
]

logger = logging.getLogger("skcarrot.serve")


def new_key() -> str:
    """A fresh API key: 256 random bits, URL-safe, with a recognisable prefix.

    Examples
    --------
    >>> from skcarrot.serve.ledger import new_key
    >>> key = new_key()
    >>> key.startswith("skc_"), len(key) > 40
    (True, True)
    """
    return "skc_" + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """sha256 of a key, hex: all the ledger keeps of it.

    A plain hash is enough: the key carries 256 random bits, so there is nothing
    to guess that a slow hash would protect.

    Examples
    --------
    >>> from skcarrot.serve.ledger import hash_key
    >>> len(hash_key("skc_example"))
    64
    """
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    """One key as the ledger sees it (never the key itself)."""

    id: int
    name: str
    budget: int
    rate_limit: int | None
    prompts_used: int
    images_used: int
    requests: int
    revoked: bool
    image_bytes: int = 0

    @property
    def remaining(self) -> int:
        """Queries left in the budget."""
        return max(0, self.budget - self.prompts_used)


@dataclass(frozen=True)
class Charge:
    """What :meth:`Ledger.begin_charge` decided.

    ``kind`` is ``"new"`` (charged now: run the model), ``"replay"`` (this
    Idempotency-Key already succeeded: answer with ``response``, charge nothing),
    ``"resume"`` (charged by an attempt that never finished, e.g. a server
    killed mid-request: run the model again, charge nothing) or ``"rerun"``
    (answered before, but the stored answer was dropped, acknowledged or
    expired: run the model again, charge nothing).
    """

    kind: str
    response: bytes | None = None
    remaining: int = 0


class BudgetExceeded(Exception):
    """The request would pass the key's query budget."""

    def __init__(self, requested: int, remaining: int, budget: int) -> None:
        super().__init__(f"{requested} queries requested, {remaining} left of {budget}")
        self.requested, self.remaining, self.budget = requested, remaining, budget


class KeyRevoked(Exception):
    """The key was revoked or rotated since the request authenticated."""


class RateLimited(Exception):
    """The key's rate window is full."""

    def __init__(self, retry_after: float, limit: int, window_s: float) -> None:
        super().__init__(f"rate limit of {limit} queries per {window_s:g} s reached")
        self.retry_after, self.limit, self.window_s = retry_after, limit, window_s


def _record(row) -> KeyRecord:
    return KeyRecord(
        id=row.id,
        name=row.name,
        budget=int(row.budget),
        rate_limit=None if row.rate_limit is None else int(row.rate_limit),
        prompts_used=int(row.prompts_used),
        images_used=int(row.images_used),
        requests=int(row.requests),
        revoked=bool(row.revoked),
        image_bytes=int(getattr(row, "image_bytes", 0) or 0),
    )


class Ledger:
    """Keys and budgets in a SQLite or PostgreSQL database.

    Parameters
    ----------
    db : Database or str
        The database, or its SQLAlchemy URL: ``sqlite:///ledger.db`` or
        ``postgresql://user@host/db``.
    rate_window_s : float, default=60.0
        Window of the per-key rate limits.
    idempotency_ttl_s : float, default=7 days
        How long a charged request's ``Idempotency-Key`` is remembered (see :attr:`answers`).
    answer_ttl_s : float, default=1 hour
        How long an answer not yet acknowledged is kept to replay.
    max_answer_bytes_per_key : int, default=32 MiB
        Most bytes of stored answers per key; the oldest are dropped first.
    answer_hold_s : float, default=2.0
        Seconds an answer is held in memory, waiting for its acknowledgement,
        before it is written to the database.

    Attributes
    ----------
    answers : IdempotencyStore
        The stored answers of charged requests, by ``Idempotency-Key``.

    Examples
    --------
    >>> from skcarrot.serve.ledger import Ledger
    >>> ledger = Ledger("sqlite://")  # in memory
    >>> key_id, key = ledger.create_key("alice", budget=100)
    >>> ledger.authenticate(key).name
    'alice'
    >>> ledger.begin_charge(key_id, n_prompts=40, n_images=16).kind
    'new'
    >>> ledger.usage(key_id).remaining
    60
    """

    def __init__(
        self,
        db: Database | str,
        rate_window_s: float = 60.0,
        idempotency_ttl_s: float = 7 * 24 * 3600.0,
        answer_ttl_s: float = 3600.0,
        max_answer_bytes_per_key: int = 32 * 1024 * 1024,
        answer_hold_s: float = 2.0,
    ) -> None:
        self.db = db if isinstance(db, Database) else Database(db)
        self.rate_window_s = float(rate_window_s)
        self.answers = IdempotencyStore(self.db, idempotency_ttl_s, answer_ttl_s, max_answer_bytes_per_key,
                                        hold_s=answer_hold_s)
        # The statements of every charge, built once (SQLAlchemy then skips most of its work per call).
        self._select_key = self.db.for_update(sa.select(keys_table).where(keys_table.c.id == sa.bindparam("key_id")))
        self._charge_key = (
            keys_table.update()
            .where(keys_table.c.id == sa.bindparam("b_key_id"))
            .values(
                prompts_used=keys_table.c.prompts_used + sa.bindparam("b_prompts", type_=sa.BigInteger),
                images_used=keys_table.c.images_used + sa.bindparam("b_images", type_=sa.BigInteger),
                requests=keys_table.c.requests + 1,
                window_start=sa.bindparam("b_window_start", type_=sa.Float),
                window_used=sa.bindparam("b_window_used", type_=sa.BigInteger),
            )
        )

    def dispose(self) -> None:
        """Write the answers held in memory, and close every pooled connection."""
        self.answers.close()
        self.db.dispose()

    # -- keys ---------------------------------------------------------------------------

    def create_key(self, name: str, budget: int, rate_limit: int | None = None) -> tuple[int, str]:
        """Create a key; returns ``(key_id, key)``. The key is shown only here.

        Parameters
        ----------
        name : str
            Unique name of the key's holder.
        budget : int
            Queries (prompts scored) the key may spend in total.
        rate_limit : int or None, default=None
            Queries per rate window; None is unlimited.
        """
        name = str(name).strip()
        if not name or len(name) > 200:
            raise ValueError(f"key name must be 1 to 200 characters, got {name!r}")
        if int(budget) < 0:
            raise ValueError(f"budget must be >= 0 queries, got {budget}")
        if rate_limit is not None and int(rate_limit) < 1:
            raise ValueError(f"rate_limit must be >= 1 query per window or None, got {rate_limit}")
        key = new_key()
        try:
            with self.db.begin() as conn:
                result = conn.execute(
                    keys_table.insert().values(
                        name=name,
                        key_hash=hash_key(key),
                        budget=int(budget),
                        rate_limit=None if rate_limit is None else int(rate_limit),
                        prompts_used=0,
                        images_used=0,
                        requests=0,
                        window_start=0.0,
                        window_used=0,
                        revoked=False,
                        created_at=time.time(),
                    )
                )
                key_id = int(result.inserted_primary_key[0])
        except IntegrityError as exc:
            raise ValueError(f"a key named {name!r} already exists; pick another name") from exc
        logger.info("created key %r (id %d) with a budget of %d queries", name, key_id, int(budget))
        return key_id, key

    def authenticate(self, key: str) -> KeyRecord | None:
        """The key's record, or None for an unknown or revoked key."""
        digest = hash_key(key)
        with self.db.connect() as conn:
            row = conn.execute(sa.select(keys_table).where(keys_table.c.key_hash == digest)).first()
        # The lookup is by hash, so its timing says nothing about the key; compare in
        # constant time anyway, so no code path ever compares secrets byte by byte.
        if row is None or not hmac.compare_digest(row.key_hash, digest) or row.revoked:
            return None
        return _record(row)

    def current(self, key_id: int) -> tuple[KeyRecord, str]:
        """The key's record as it stands now, and the hash of its current secret."""
        with self.db.connect() as conn:
            row = conn.execute(sa.select(keys_table).where(keys_table.c.id == key_id)).one()
        return _record(row), row.key_hash

    def usage(self, key_id: int) -> KeyRecord:
        """The key's current record."""
        with self.db.connect() as conn:
            row = conn.execute(sa.select(keys_table).where(keys_table.c.id == key_id)).one()
        return _record(row)

    def find_key(self, name: str) -> KeyRecord | None:
        """The record of the key called ``name``."""
        with self.db.connect() as conn:
            row = conn.execute(sa.select(keys_table).where(keys_table.c.name == name)).first()
        return None if row is None else _record(row)

    def list_keys(self) -> list[KeyRecord]:
        """Every key's record."""
        with self.db.connect() as conn:
            rows = conn.execute(sa.select(keys_table).order_by(keys_table.c.id)).all()
        return [_record(r) for r in rows]

    def _named(self, conn, name: str):
        row = conn.execute(self.db.for_update(sa.select(keys_table).where(keys_table.c.name == name))).first()
        if row is None:
            raise KeyError(f"no key named {name!r}")
        return row

    def revoke_key(self, name: str) -> KeyRecord:
        """Revoke the key called ``name``: every charged request that starts after this returns is refused (401).

        Its record (budget, usage, images) stays in the ledger, listed as revoked.
        """
        with self.db.begin() as conn:
            row = self._named(conn, name)
            conn.execute(keys_table.update().where(keys_table.c.id == row.id).values(revoked=True))
        logger.info("revoked key %r (id %d)", name, row.id)
        return self.find_key(name)

    def rotate_key(self, name: str) -> str:
        """A new secret for the key called ``name`` (same account, budget, usage and images); returns it.

        The old secret stops working for every charged request that starts after this returns.
        """
        key = new_key()
        with self.db.begin() as conn:
            row = self._named(conn, name)
            conn.execute(keys_table.update().where(keys_table.c.id == row.id).values(key_hash=hash_key(key)))
        logger.info("rotated the secret of key %r (id %d)", name, row.id)
        return key

    def set_budget(self, name: str, budget: int) -> KeyRecord:
        """Set the total budget (queries) of the key called ``name``; what it spent stays spent."""
        if int(budget) < 0:
            raise ValueError(f"budget must be >= 0 queries, got {budget}")
        with self.db.begin() as conn:
            row = self._named(conn, name)
            conn.execute(keys_table.update().where(keys_table.c.id == row.id).values(budget=int(budget)))
        logger.info("set the budget of key %r (id %d) to %d queries", name, row.id, int(budget))
        return self.find_key(name)

    def top_up(self, name: str, queries: int) -> KeyRecord:
        """Add ``queries`` to the budget of the key called ``name``."""
        if int(queries) < 1:
            raise ValueError(f"a top-up must add >= 1 query, got {queries}")
        with self.db.begin() as conn:
            row = self._named(conn, name)
            conn.execute(
                keys_table.update().where(keys_table.c.id == row.id).values(budget=keys_table.c.budget + int(queries))
            )
        logger.info("topped up key %r (id %d) by %d queries", name, row.id, int(queries))
        return self.find_key(name)

    # -- charging -----------------------------------------------------------------------

    def _locked_key(self, conn, key_id: int):
        return conn.execute(self._select_key, {"key_id": key_id}).one()

    def begin_charge(
        self,
        key_id: int,
        n_prompts: int,
        n_images: int,
        idempotency_key: str | None = None,
        fingerprint: str = "",
        now: float | None = None,
        key_hash: str | None = None,
        acknowledged: Sequence[str] = (),
    ) -> Charge:
        """Check the key, its budget and rate window and charge, in one transaction.

        Parameters
        ----------
        key_id : int
        n_prompts : int
            Queries this request spends.
        n_images : int
            Images it scores.
        idempotency_key : str or None
            The request's ``Idempotency-Key``; None: no replay protection.
        fingerprint : str
            Digest of the request; a reused key with another fingerprint is refused.
        now : float or None
            Clock, for tests.
        key_hash : str or None
            sha256 of the secret the request came with: a key revoked, or rotated
            to another secret, since the request authenticated is refused here,
            inside the charging transaction (None: check revocation only).
        acknowledged : sequence of str
            ``Idempotency-Key`` values of earlier requests whose answers the
            client received: their stored answers are dropped (a retry of one is
            scored again, free).

        Returns
        -------
        charge : Charge

        Raises
        ------
        KeyRevoked, BudgetExceeded, RateLimited, ~skcarrot.serve.idempotency.IdempotencyConflict
            Nothing was charged.
        """
        now = time.time() if now is None else now
        n_prompts, n_images = int(n_prompts), int(n_images)
        with self.db.begin() as conn:
            row = self._locked_key(conn, key_id)
            if row.revoked or (key_hash is not None and not hmac.compare_digest(row.key_hash, key_hash)):
                raise KeyRevoked(key_id)
            if acknowledged:
                self.answers.acknowledge(conn, key_id, acknowledged)
            if idempotency_key is not None:
                previous = self.answers.find(conn, key_id, idempotency_key, fingerprint)
                if previous is not None:
                    remaining = max(0, int(row.budget) - int(row.prompts_used))
                    if previous.response is not None:
                        return Charge("replay", previous.response, remaining)
                    return Charge("rerun" if previous.done else "resume", None, remaining)
            remaining = int(row.budget) - int(row.prompts_used)
            if n_prompts > remaining:
                raise BudgetExceeded(n_prompts, max(0, remaining), int(row.budget))
            window_start, window_used = float(row.window_start), int(row.window_used)
            if now >= window_start + self.rate_window_s or now < window_start:
                window_start, window_used = now, 0
            limit = row.rate_limit
            if limit is not None and n_prompts > 0 and window_used + n_prompts > int(limit):
                raise RateLimited(max(0.0, window_start + self.rate_window_s - now), int(limit), self.rate_window_s)
            conn.execute(
                self._charge_key,
                {"b_key_id": key_id, "b_prompts": n_prompts, "b_images": n_images, "b_window_start": window_start,
                 "b_window_used": window_used + n_prompts},
            )
            if idempotency_key is not None:
                self.answers.reserve(conn, key_id, idempotency_key, fingerprint, n_prompts, n_images, now)
        return Charge("new", None, remaining - n_prompts)

    def refund(self, key_id: int, n_prompts: int, n_images: int, idempotency_key: str | None) -> None:
        """Undo a charge whose request failed inside the server (the model never answered)."""
        with self.db.begin() as conn:
            self._locked_key(conn, key_id)
            if idempotency_key is not None:
                self.answers.release(conn, key_id, idempotency_key)
            conn.execute(
                keys_table.update()
                .where(keys_table.c.id == key_id)
                .values(
                    prompts_used=keys_table.c.prompts_used - int(n_prompts),
                    images_used=keys_table.c.images_used - int(n_images),
                )
            )
