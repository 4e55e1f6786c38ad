"""The database under the ledger: tables, engines, and how each dialect locks.

One small interface over two real databases through SQLAlchemy Core: a SQLite
file by default (WAL, every write transaction ``BEGIN IMMEDIATE``) and
PostgreSQL when several server processes or hosts share one ledger (rows are
locked with ``SELECT ... FOR UPDATE``).
"""

from __future__ import annotations

import logging
import threading
import time

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError, ProgrammingError

__all__ = ["Database", "normalize_db_url", "keys_table", "requests_table", "images_table", "UNAVAILABLE", "Throttle"]

logger = logging.getLogger("skcarrot.serve")

metadata = sa.MetaData()

keys_table = sa.Table(
    "skcarrot_keys",
    metadata,
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
    # bytes of the key's stored images, kept with every insert and delete (its quota)
    sa.Column("image_bytes", sa.BigInteger, nullable=False, default=0, server_default="0"),
)

requests_table = sa.Table(
    "skcarrot_requests",
    metadata,
    sa.Column("key_id", sa.Integer, sa.ForeignKey("skcarrot_keys.id"), primary_key=True),
    sa.Column("idempotency_key", sa.String(200), primary_key=True),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("done", sa.Boolean, nullable=False, default=False),
    sa.Column("n_prompts", sa.BigInteger, nullable=False),
    sa.Column("n_images", sa.BigInteger, nullable=False),
    sa.Column("response", sa.LargeBinary, nullable=True),  # the JSON body, as sent
    sa.Column("created_at", sa.Float, nullable=False, index=True),
    sa.Column("response_bytes", sa.BigInteger, nullable=True),  # len(response) while it is stored
)

# The rows that still hold an answer, per key and age: few (answers are dropped once
# acknowledged), so capping and pruning them never scans the whole table.
answers_index = sa.Index(
    "ix_skcarrot_requests_answers",
    requests_table.c.key_id,
    requests_table.c.created_at,
    sqlite_where=requests_table.c.response.isnot(None),
    postgresql_where=requests_table.c.response.isnot(None),
)

images_table = sa.Table(
    "skcarrot_images",
    metadata,
    sa.Column("key_id", sa.Integer, sa.ForeignKey("skcarrot_keys.id"), primary_key=True),
    sa.Column("image_id", sa.String(64), primary_key=True),
    sa.Column("png", sa.LargeBinary, nullable=False),  # the image file as stored (see ImageStore)
    sa.Column("created_at", sa.Float, nullable=False, index=True),
    sa.Column("nbytes", sa.BigInteger, nullable=False, default=0, server_default="0"),
)

# Columns added since the first release, with what fills them in an existing ledger.
_ADDED_COLUMNS = {
    "skcarrot_keys": {"image_bytes": "BIGINT NOT NULL DEFAULT 0"},
    "skcarrot_requests": {"response_bytes": "BIGINT"},
    "skcarrot_images": {"nbytes": "BIGINT NOT NULL DEFAULT 0"},
}


#: Errors that mean the database is unreachable or out of space (not a bug): answered 503.
UNAVAILABLE = (OperationalError, InterfaceError, sa.exc.TimeoutError)


def normalize_db_url(url: str) -> str:
    """Pick the psycopg 3 driver for plain ``postgresql://`` URLs.

    Examples
    --------
    >>> from skcarrot.serve.db import normalize_db_url
    >>> normalize_db_url("postgresql://me@127.0.0.1:5432/ledger")
    'postgresql+psycopg://me@127.0.0.1:5432/ledger'
    >>> normalize_db_url("sqlite:///ledger.db")
    'sqlite:///ledger.db'
    """
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


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


class Database:
    """An engine on the ledger's database, with its tables created.

    Parameters
    ----------
    url : str
        SQLAlchemy URL: ``sqlite:///ledger.db`` or ``postgresql://user@host/db``.

    Examples
    --------
    >>> from skcarrot.serve.db import Database
    >>> db = Database("sqlite://")  # in memory
    >>> db.dialect, db.ping()
    ('sqlite', True)
    """

    def __init__(self, url: str) -> None:
        self.url = normalize_db_url(url)
        backend = sa.engine.make_url(self.url).get_backend_name()
        self.dialect = backend
        if backend == "sqlite":
            self.engine = _sqlite_engine(self.url)
        elif backend == "postgresql":
            self.engine = sa.create_engine(self.url, pool_pre_ping=True, pool_size=8, max_overflow=8)
        else:
            raise ValueError(
                f"unsupported ledger database {backend!r} in {url!r}; use sqlite:///path.db or "
                "postgresql://user@host:port/dbname"
            )
        self._create_tables()

    def _create_tables(self) -> None:
        # Several server processes may start at once on one PostgreSQL: whoever loses the
        # race to CREATE TABLE (or to a migration) simply finds it done on the next try.
        for attempt in range(5):
            try:
                metadata.create_all(self.engine, checkfirst=True)
                self._migrate()
                return
            except (IntegrityError, ProgrammingError, OperationalError):
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def _migrate(self) -> None:
        """Bring a ledger written by an earlier version up to date: added columns and indexes."""
        inspector = sa.inspect(self.engine)
        added = []
        for table, columns in _ADDED_COLUMNS.items():
            present = {c["name"] for c in inspector.get_columns(table)}
            added += [(table, name, ddl) for name, ddl in columns.items() if name not in present]
        if added:
            names = {name for _, name, _ in added}
            with self.begin() as conn:
                for table, name, ddl in added:
                    conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {name} {ddl}")
                if "nbytes" in names:
                    conn.exec_driver_sql("UPDATE skcarrot_images SET nbytes = LENGTH(png)")
                if "image_bytes" in names or "nbytes" in names:
                    conn.exec_driver_sql(
                        "UPDATE skcarrot_keys SET image_bytes = COALESCE((SELECT SUM(i.nbytes) FROM skcarrot_images i "
                        "WHERE i.key_id = skcarrot_keys.id), 0)"
                    )
                if "response_bytes" in names:
                    conn.exec_driver_sql(
                        "UPDATE skcarrot_requests SET response_bytes = LENGTH(response) WHERE response IS NOT NULL"
                    )
            logger.info("ledger migrated: added %s", ", ".join(f"{t}.{n}" for t, n, _ in added))
        indexes = {table: {i["name"] for i in inspector.get_indexes(table)} for table in _ADDED_COLUMNS}
        for table in metadata.sorted_tables:
            for index in table.indexes:
                if index.name not in indexes.get(table.name, set()):
                    index.create(self.engine, checkfirst=True)

    def begin(self):
        """A connection in a write transaction (``BEGIN IMMEDIATE`` on SQLite)."""
        return self.engine.begin()

    def connect(self):
        """A connection for reads."""
        return self.engine.connect()

    def for_update(self, query: sa.Select) -> sa.Select:
        """``query`` locking the rows it reads until the transaction ends.

        SQLite needs nothing more: its write transactions already hold the one lock.
        """
        return query.with_for_update() if self.dialect == "postgresql" else query

    def ping(self) -> bool:
        """True when the database answers."""
        try:
            with self.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            return True
        except Exception:  # noqa: BLE001 - health reports any failure as unhealthy
            logger.exception("ledger database did not answer")
            return False

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


class Throttle:
    """Run a periodic job (pruning) at most once every ``every_s`` seconds per process, never twice at once.

    Examples
    --------
    >>> from skcarrot.serve.db import Throttle
    >>> calls = []
    >>> throttle = Throttle(60)
    >>> throttle(calls.append); throttle(calls.append)
    >>> len(calls)
    1
    """

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._last = 0.0
        self._lock = threading.Lock()

    def __call__(self, job) -> None:
        """``job(now)``, unless it ran less than ``every_s`` ago or is running in another thread."""
        now = time.time()
        if now - self._last < self.every_s or not self._lock.acquire(blocking=False):
            return
        try:
            self._last = now
            job(now)
        finally:
            self._lock.release()
