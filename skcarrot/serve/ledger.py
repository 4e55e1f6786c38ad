"""The ledger: keys, budgets, rate windows, stored responses and uploaded images.

One small interface over two real databases through SQLAlchemy Core: a SQLite
file by default (WAL, every write transaction ``BEGIN IMMEDIATE``) and
PostgreSQL when several server processes or hosts share one ledger (the key's
row is locked with ``SELECT ... FOR UPDATE``). Either way, checking a key's
budget and charging it is one transaction, so concurrent requests can never
overspend.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

__all__ = [
    "Ledger",
    "KeyRecord",
    "Charge",
    "BudgetExceeded",
    "RateLimited",
    "IdempotencyConflict",
    "hash_key",
    "new_key",
    "normalize_db_url",
]

logger = logging.getLogger("skcarrot.serve")

_metadata = sa.MetaData()

keys_table = sa.Table(
    "skcarrot_keys",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    # sha256 of the key: the key itself is never stored
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("budget", sa.BigInteger, nullable=False),
    sa.Column("rate_limit", sa.BigInteger, nullable=True),
    sa.Column("prompts_used", sa.BigInteger, nullable=False, default=0),
    sa.Column("images_used", sa.BigInteger, nullable=False, default=0),
    sa.Column("requests", sa.BigInteger, nullable=False, default=0),
    sa.Column("window_start", sa.Float, nullable=False, default=0.0),
    sa.Column("window_used", sa.BigInteger, nullable=False, default=0),
    sa.Column("revoked", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

requests_table = sa.Table(
    "skcarrot_requests",
    _metadata,
    sa.Column("key_id", sa.Integer, sa.ForeignKey("skcarrot_keys.id"), primary_key=True),
    sa.Column("idempotency_key", sa.String(200), primary_key=True),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("done", sa.Boolean, nullable=False, default=False),
    sa.Column("n_prompts", sa.BigInteger, nullable=False),
    sa.Column("n_images", sa.BigInteger, nullable=False),
    sa.Column("response", sa.LargeBinary, nullable=True),  # the JSON body, as sent
    sa.Column("created_at", sa.Float, nullable=False, index=True),
)

images_table = sa.Table(
    "skcarrot_images",
    _metadata,
    sa.Column("key_id", sa.Integer, sa.ForeignKey("skcarrot_keys.id"), primary_key=True),
    sa.Column("image_id", sa.String(64), primary_key=True),
    sa.Column("png", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)


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


def normalize_db_url(url: str) -> str:
    """Pick the psycopg 3 driver for plain ``postgresql://`` URLs.

    Examples
    --------
    >>> from skcarrot.serve.ledger import normalize_db_url
    >>> normalize_db_url("postgresql://me@127.0.0.1:5432/ledger")
    'postgresql+psycopg://me@127.0.0.1:5432/ledger'
    >>> normalize_db_url("sqlite:///ledger.db")
    'sqlite:///ledger.db'
    """
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


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

    @property
    def remaining(self) -> int:
        """Queries left in the budget."""
        return max(0, self.budget - self.prompts_used)


@dataclass(frozen=True)
class Charge:
    """What :meth:`Ledger.begin_charge` decided.

    ``kind`` is ``"new"`` (charged now: run the model), ``"replay"`` (this
    Idempotency-Key already succeeded: answer with ``response``, charge nothing)
    or ``"resume"`` (charged by an attempt that never finished, e.g. a server
    killed mid-request: run the model again, charge nothing).
    """

    kind: str
    response: bytes | None = None
    remaining: int = 0


class BudgetExceeded(Exception):
    """The request would pass the key's query budget."""

    def __init__(self, requested: int, remaining: int, budget: int) -> None:
        super().__init__(f"{requested} queries requested, {remaining} left of {budget}")
        self.requested, self.remaining, self.budget = requested, remaining, budget


class RateLimited(Exception):
    """The key's rate window is full."""

    def __init__(self, retry_after: float, limit: int, window_s: float) -> None:
        super().__init__(f"rate limit of {limit} queries per {window_s:g} s reached")
        self.retry_after, self.limit, self.window_s = retry_after, limit, window_s


class IdempotencyConflict(Exception):
    """An Idempotency-Key was reused for a different request."""


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
    )


class Ledger:
    """Keys, budgets and stored responses in a SQLite or PostgreSQL database.

    Parameters
    ----------
    url : str
        SQLAlchemy URL: ``sqlite:///ledger.db`` or ``postgresql://user@host/db``.
    rate_window_s : float, default=60.0
        Window of the per-key rate limits.
    idempotency_ttl_s : float, default=7 days
        Stored responses older than this are pruned.

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

    def __init__(self, url: str, rate_window_s: float = 60.0, idempotency_ttl_s: float = 7 * 24 * 3600.0) -> None:
        self.url = normalize_db_url(url)
        self.rate_window_s = float(rate_window_s)
        self.idempotency_ttl_s = float(idempotency_ttl_s)
        self._last_prune = 0.0
        self._prune_lock = threading.Lock()
        backend = sa.engine.make_url(self.url).get_backend_name()
        self.dialect = backend
        if backend == "sqlite":
            self.engine = self._sqlite_engine(self.url)
        elif backend == "postgresql":
            self.engine = sa.create_engine(self.url, pool_pre_ping=True, pool_size=8, max_overflow=8)
        else:
            raise ValueError(
                f"unsupported ledger database {backend!r} in {url!r}; use sqlite:///path.db or "
                "postgresql://user@host:port/dbname"
            )
        self._create_tables()

    @staticmethod
    def _sqlite_engine(url: str) -> sa.Engine:
        memory = sa.engine.make_url(url).database in (None, "", ":memory:")
        kwargs = {"poolclass": sa.pool.StaticPool} if memory else {}
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 60}, **kwargs)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection, _record):
            # Let SQLAlchemy, not the driver, open transactions, so they can be IMMEDIATE.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            if not memory:
                cursor.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a killed server loses nothing committed (the OS holds the WAL);
            # only a power cut may drop the last commits.
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn):
            # Take the write lock up front: two deferred transactions that both read and
            # then write would otherwise deadlock into "database is locked".
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine

    def _create_tables(self) -> None:
        # Several server processes may start at once on one PostgreSQL: whoever loses the
        # race to CREATE TABLE simply finds the tables there on the next try.
        for attempt in range(5):
            try:
                _metadata.create_all(self.engine, checkfirst=True)
                return
            except (IntegrityError, ProgrammingError, OperationalError):
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

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
            with self.engine.begin() as conn:
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
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(keys_table).where(keys_table.c.key_hash == digest)).first()
        # The lookup is by hash, so its timing says nothing about the key; compare in
        # constant time anyway, so no code path ever compares secrets byte by byte.
        if row is None or not hmac.compare_digest(row.key_hash, digest) or row.revoked:
            return None
        return _record(row)

    def usage(self, key_id: int) -> KeyRecord:
        """The key's current record."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(keys_table).where(keys_table.c.id == key_id)).one()
        return _record(row)

    def find_key(self, name: str) -> KeyRecord | None:
        """The record of the key called ``name``."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(keys_table).where(keys_table.c.name == name)).first()
        return None if row is None else _record(row)

    def list_keys(self) -> list[KeyRecord]:
        """Every key's record."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(keys_table).order_by(keys_table.c.id)).all()
        return [_record(r) for r in rows]

    # -- charging -----------------------------------------------------------------------

    def _locked_key(self, conn, key_id: int):
        query = sa.select(keys_table).where(keys_table.c.id == key_id)
        if self.dialect == "postgresql":
            query = query.with_for_update()
        return conn.execute(query).one()

    def begin_charge(
        self,
        key_id: int,
        n_prompts: int,
        n_images: int,
        idempotency_key: str | None = None,
        fingerprint: str = "",
        now: float | None = None,
    ) -> Charge:
        """Check the budget and rate window and charge, in one transaction.

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

        Returns
        -------
        charge : Charge

        Raises
        ------
        BudgetExceeded, RateLimited, IdempotencyConflict
            Nothing was charged.
        """
        now = time.time() if now is None else now
        n_prompts, n_images = int(n_prompts), int(n_images)
        with self.engine.begin() as conn:
            row = self._locked_key(conn, key_id)
            if idempotency_key is not None:
                previous = conn.execute(
                    sa.select(requests_table).where(
                        requests_table.c.key_id == key_id,
                        requests_table.c.idempotency_key == idempotency_key,
                    )
                ).first()
                if previous is not None:
                    if not hmac.compare_digest(previous.fingerprint, fingerprint):
                        raise IdempotencyConflict(idempotency_key)
                    remaining = max(0, int(row.budget) - int(row.prompts_used))
                    if previous.done:
                        return Charge("replay", bytes(previous.response), remaining)
                    return Charge("resume", None, remaining)
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
                keys_table.update()
                .where(keys_table.c.id == key_id)
                .values(
                    prompts_used=keys_table.c.prompts_used + n_prompts,
                    images_used=keys_table.c.images_used + n_images,
                    requests=keys_table.c.requests + 1,
                    window_start=window_start,
                    window_used=window_used + n_prompts,
                )
            )
            if idempotency_key is not None:
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
        return Charge("new", None, remaining - n_prompts)

    def finish_charge(self, key_id: int, idempotency_key: str | None, response: bytes) -> None:
        """Store the response of a charged request, to answer its retries."""
        if idempotency_key is None:
            return
        with self.engine.begin() as conn:
            conn.execute(
                requests_table.update()
                .where(requests_table.c.key_id == key_id, requests_table.c.idempotency_key == idempotency_key)
                # stored as sent: logits are float32 noise to zlib (it saved a quarter, at the
                # cost of most of a request's overhead)
                .values(done=True, response=response)
            )
        self._maybe_prune()

    def refund(self, key_id: int, n_prompts: int, n_images: int, idempotency_key: str | None) -> None:
        """Undo a charge whose request failed inside the server (the model never answered)."""
        with self.engine.begin() as conn:
            self._locked_key(conn, key_id)
            if idempotency_key is not None:
                conn.execute(
                    requests_table.delete().where(
                        requests_table.c.key_id == key_id, requests_table.c.idempotency_key == idempotency_key
                    )
                )
            conn.execute(
                keys_table.update()
                .where(keys_table.c.id == key_id)
                .values(
                    prompts_used=keys_table.c.prompts_used - int(n_prompts),
                    images_used=keys_table.c.images_used - int(n_images),
                )
            )

    def _maybe_prune(self) -> None:
        now = time.time()
        if now - self._last_prune < 600 or not self._prune_lock.acquire(blocking=False):
            return
        try:
            self._last_prune = now
            with self.engine.begin() as conn:
                conn.execute(
                    requests_table.delete().where(
                        requests_table.c.done.is_(True),
                        requests_table.c.created_at < now - self.idempotency_ttl_s,
                    )
                )
        finally:
            self._prune_lock.release()

    # -- images -------------------------------------------------------------------------

    def add_images(self, key_id: int, images: dict[str, bytes]) -> None:
        """Store uploaded images (PNG) under their content ids; known ones are kept as they are."""
        if not images:
            return
        known = set(self.known_images(key_id, list(images)))
        rows = [
            {"key_id": key_id, "image_id": image_id, "png": png, "created_at": time.time()}
            for image_id, png in images.items()
            if image_id not in known
        ]
        if not rows:
            return
        try:
            with self.engine.begin() as conn:
                conn.execute(images_table.insert(), rows)
        except IntegrityError:
            # a concurrent upload of the same image won the race: store the rest one by one
            for one in rows:
                try:
                    with self.engine.begin() as conn:
                        conn.execute(images_table.insert(), [one])
                except IntegrityError:
                    pass

    def known_images(self, key_id: int, image_ids: list[str]) -> list[str]:
        """Those of ``image_ids`` this key has uploaded."""
        found: list[str] = []
        with self.engine.connect() as conn:
            for start in range(0, len(image_ids), 500):
                chunk = image_ids[start : start + 500]
                found += conn.execute(
                    sa.select(images_table.c.image_id).where(
                        images_table.c.key_id == key_id, images_table.c.image_id.in_(chunk)
                    )
                ).scalars().all()
        return found

    def load_images(self, key_id: int, image_ids: list[str]) -> dict[str, bytes]:
        """PNG bytes of those of ``image_ids`` this key has uploaded."""
        out: dict[str, bytes] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(image_ids), 500):
                chunk = image_ids[start : start + 500]
                for row in conn.execute(
                    sa.select(images_table.c.image_id, images_table.c.png).where(
                        images_table.c.key_id == key_id, images_table.c.image_id.in_(chunk)
                    )
                ):
                    out[row.image_id] = bytes(row.png)
        return out

    def ping(self) -> bool:
        """True when the database answers."""
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            return True
        except Exception:  # noqa: BLE001 - health reports any failure as unhealthy
            logger.exception("ledger database did not answer")
            return False
