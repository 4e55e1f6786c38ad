"""Uploaded images: per key, in the database and in a memory cache, both bounded in bytes.

Pixels arrive once, as encoded image files, and are kept under their content
id; scoring requests name images by id, so a generation's prompts never resend
pixels, and the model's own cache keeps each image's features.

Every image belongs to the key that uploaded it, everywhere: rows are keyed by
``(key_id, content_id)``, and so is the memory cache, so a key can neither score
nor learn anything about another key's images. Each key's stored bytes count
against its quota and the server's total, in the same transaction that stores
them; images expire a fixed time after their upload.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from PIL import Image
from sqlalchemy.exc import IntegrityError

from .db import Database, images_table, keys_table, Throttle

__all__ = ["ImageStore", "ImageQuotaExceeded", "StoredImageUnreadable", "image_nbytes"]

# Ids per ``IN (...)`` query.
_CHUNK = 500

# Delete expired images at most this often (seconds), from whichever upload comes.
_PRUNE_EVERY_S = 60


def image_nbytes(image: Image.Image) -> int:
    """Bytes a decoded image holds in memory."""
    return image.size[0] * image.size[1] * len(image.getbands())


class StoredImageUnreadable(Exception):
    """A stored image no longer decodes (e.g. the server's limits changed since its upload)."""

    def __init__(self, image_id: str, cause: ValueError) -> None:
        super().__init__(str(cause))
        self.image_id, self.cause = image_id, cause


class ImageQuotaExceeded(Exception):
    """Storing these images would pass the key's quota (``scope="key"``) or the server's (``"total"``)."""

    def __init__(self, scope: str, needed: int, used: int, limit: int) -> None:
        super().__init__(f"{needed} more bytes of images; {used} of {limit} used ({scope})")
        self.scope, self.needed, self.used, self.limit = scope, needed, used, limit


@dataclass
class _Cached:
    image: Image.Image
    nbytes: int
    expires: float


class ImageStore:
    """Each key's uploaded images: files in the database, decoded images in memory.

    Parameters
    ----------
    db : Database
    decode : callable
        ``decode(file_bytes) -> PIL.Image.Image`` (RGB), for images read back from
        the database; raises :class:`ValueError` for a file it refuses.
    cache_bytes : int, default=256 MiB
        Decoded images kept in memory, in bytes, least recently used dropped first.
    cache_bytes_per_key : int or None, default=None
        Of which one key may hold at most this many (None: ``cache_bytes``).
    ttl_s : float, default=7 days
        Images are kept this long after their upload.
    max_bytes_per_key : int or None, default=None
        Most bytes of stored files per key (None: unbounded).
    max_bytes_total : int or None, default=None
        Most bytes of stored files, all keys together (None: unbounded).

    Examples
    --------
    >>> import io
    >>> from PIL import Image
    >>> from skcarrot.serve.db import Database
    >>> from skcarrot.serve.image_store import ImageStore
    >>> from skcarrot.serve.ledger import Ledger
    >>> db = Database("sqlite://")
    >>> key_id, _ = Ledger(db).create_key("alice", budget=1)
    >>> other, _ = Ledger(db).create_key("bob", budget=1)
    >>> store = ImageStore(db, decode=lambda raw: Image.open(io.BytesIO(raw)).convert("RGB"))
    >>> png = io.BytesIO()
    >>> Image.new("RGB", (2, 2)).save(png, format="PNG")
    >>> store.add(key_id, {"a" * 64: png.getvalue()})
    1
    >>> sorted(store.fetch(key_id, ["a" * 64, "b" * 64]))  # from the database; b is unknown
    ['aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa']
    >>> store.fetch(other, ["a" * 64])  # another key's image is unknown to bob
    {}
    >>> len(store), store.stored_bytes(key_id) == len(png.getvalue())
    (1, True)
    """

    def __init__(
        self,
        db: Database,
        decode: Callable[[bytes], Image.Image],
        cache_bytes: int = 256 * 1024 * 1024,
        cache_bytes_per_key: int | None = None,
        ttl_s: float = 7 * 24 * 3600.0,
        max_bytes_per_key: int | None = None,
        max_bytes_total: int | None = None,
    ) -> None:
        self.db = db
        self.decode = decode
        self.cache_bytes = int(cache_bytes)
        self.cache_bytes_per_key = self.cache_bytes if cache_bytes_per_key is None else int(cache_bytes_per_key)
        self.ttl_s = float(ttl_s)
        self.max_bytes_per_key = max_bytes_per_key
        self.max_bytes_total = max_bytes_total
        self._images: OrderedDict[tuple[int, str], _Cached] = OrderedDict()
        self._per_key: dict[int, OrderedDict[str, None]] = {}
        self._key_bytes: dict[int, int] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self._prune_throttle = Throttle(_PRUNE_EVERY_S)
        # The statements of every upload, built once (SQLAlchemy then skips most of its work per call).
        key = sa.bindparam("b_key_id")
        self._lock_key = db.for_update(sa.select(keys_table.c.id).where(keys_table.c.id == key))
        self._expired = (
            sa.select(images_table.c.key_id, sa.func.sum(images_table.c.nbytes).label("nbytes"))
            .where(images_table.c.created_at < sa.bindparam("b_before"), images_table.c.key_id == key)
            .group_by(images_table.c.key_id)
        )
        self._known = sa.select(images_table.c.image_id).where(
            images_table.c.key_id == key, images_table.c.image_id.in_(sa.bindparam("b_ids", expanding=True))
        )
        self._key_bytes_used = sa.select(keys_table.c.image_bytes).where(keys_table.c.id == key)
        self._all_bytes_used = sa.select(sa.func.coalesce(sa.func.sum(keys_table.c.image_bytes), 0))
        self._insert = images_table.insert()
        self._charge_bytes = (
            keys_table.update()
            .where(keys_table.c.id == key)
            .values(image_bytes=keys_table.c.image_bytes + sa.bindparam("b_bytes", type_=sa.BigInteger))
        )

    # -- database -----------------------------------------------------------------------

    def _fresh(self, now: float | None = None):
        now = time.time() if now is None else now
        return images_table.c.created_at >= now - self.ttl_s

    def _rows(self, key_id: int, image_ids: Sequence[str], *columns) -> Iterator:
        with self.db.connect() as conn:
            for start in range(0, len(image_ids), _CHUNK):
                chunk = list(image_ids[start : start + _CHUNK])
                yield from conn.execute(
                    sa.select(*columns).where(
                        images_table.c.key_id == key_id, images_table.c.image_id.in_(chunk), self._fresh()
                    )
                )

    def known(self, key_id: int, image_ids: Sequence[str]) -> list[str]:
        """Those of ``image_ids`` this key has uploaded (and that have not expired)."""
        return [row.image_id for row in self._rows(key_id, image_ids, images_table.c.image_id)]

    def load(self, key_id: int, image_ids: Sequence[str]) -> dict[str, bytes]:
        """Stored files of those of ``image_ids`` this key has uploaded."""
        return {
            row.image_id: bytes(row.png)
            for row in self._rows(key_id, image_ids, images_table.c.image_id, images_table.c.png)
        }

    def stored_bytes(self, key_id: int | None = None) -> int:
        """Bytes of stored image files, of one key or of all."""
        query = sa.select(sa.func.coalesce(sa.func.sum(keys_table.c.image_bytes), 0))
        if key_id is not None:
            query = query.where(keys_table.c.id == key_id)
        with self.db.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def add(self, key_id: int, files: dict[str, bytes], now: float | None = None) -> int:
        """Store files under their content ids, within the quotas; returns how many were new to the key.

        Known ones are kept as they are. One transaction checks the quotas,
        inserts the rows and counts their bytes against the key.

        Raises
        ------
        ImageQuotaExceeded
            Nothing was stored.
        """
        return len(self._added(key_id, files, time.time() if now is None else now))

    def _added(self, key_id: int, files: dict[str, bytes], now: float) -> list[str]:
        if not files:
            return []
        for attempt in range(3):
            try:
                return self._add(key_id, files, now)
            except IntegrityError:
                # a concurrent upload of the same image won the race: look again
                if attempt == 2:
                    raise
        return []  # pragma: no cover

    def _add(self, key_id: int, files: dict[str, bytes], now: float) -> list[str]:
        with self.db.begin() as conn:
            # the key's row, locked: its quota is checked and charged by one transaction at a time
            conn.execute(self._lock_key, {"b_key_id": key_id}).one()
            if conn.execute(self._expired, {"b_key_id": key_id, "b_before": now - self.ttl_s}).first() is not None:
                self._drop_expired(conn, now, key_id)
            ids = list(files)
            known = set()
            for start in range(0, len(ids), _CHUNK):
                rows = conn.execute(self._known, {"b_key_id": key_id, "b_ids": ids[start : start + _CHUNK]})
                known.update(r.image_id for r in rows)
            rows = [
                {"key_id": key_id, "image_id": image_id, "png": raw, "created_at": now, "nbytes": len(raw)}
                for image_id, raw in files.items()
                if image_id not in known
            ]
            if not rows:
                return []
            needed = sum(r["nbytes"] for r in rows)
            used = int(conn.execute(self._key_bytes_used, {"b_key_id": key_id}).scalar_one())
            if self.max_bytes_per_key is not None and used + needed > self.max_bytes_per_key:
                raise ImageQuotaExceeded("key", needed, used, int(self.max_bytes_per_key))
            if self.max_bytes_total is not None:
                total = int(conn.execute(self._all_bytes_used).scalar_one())
                if total + needed > self.max_bytes_total:
                    raise ImageQuotaExceeded("total", needed, total, int(self.max_bytes_total))
            conn.execute(self._insert, rows)
            conn.execute(self._charge_bytes, {"b_key_id": key_id, "b_bytes": needed})
            return [r["image_id"] for r in rows]

    def _drop_expired(self, conn, now: float, key_id: int | None = None) -> None:
        """Delete expired images (of one key, or of all) and take their bytes off their keys."""
        expired = images_table.c.created_at < now - self.ttl_s
        where = [expired] if key_id is None else [expired, images_table.c.key_id == key_id]
        freed = conn.execute(
            sa.select(images_table.c.key_id, sa.func.sum(images_table.c.nbytes).label("nbytes"))
            .where(*where)
            .group_by(images_table.c.key_id)
        ).all()
        if not freed:
            return
        conn.execute(images_table.delete().where(*where))
        for r in freed:
            conn.execute(
                keys_table.update()
                .where(keys_table.c.id == r.key_id)
                .values(image_bytes=keys_table.c.image_bytes - int(r.nbytes or 0))
            )

    def prune(self, now: float | None = None) -> None:
        """Delete every key's expired images, from the database and from memory."""
        now = time.time() if now is None else now
        with self.db.begin() as conn:
            self._drop_expired(conn, now)
        with self._lock:
            for cache_key in [k for k, v in self._images.items() if v.expires <= now]:
                self._forget(cache_key)

    def maybe_prune(self) -> None:
        """:meth:`prune`, at most once a minute per process."""
        self._prune_throttle(self.prune)

    # -- memory -------------------------------------------------------------------------

    def __len__(self) -> int:
        """Decoded images in memory."""
        return len(self._images)

    @property
    def cached_bytes(self) -> int:
        """Bytes of decoded images in memory."""
        return self._bytes

    def _forget(self, cache_key: tuple[int, str]) -> None:
        entry = self._images.pop(cache_key)
        key_id, image_id = cache_key
        self._per_key[key_id].pop(image_id, None)
        if not self._per_key[key_id]:
            del self._per_key[key_id]
        self._key_bytes[key_id] -= entry.nbytes
        if not self._key_bytes[key_id]:
            del self._key_bytes[key_id]
        self._bytes -= entry.nbytes

    def remember(self, key_id: int, image_id: str, image: Image.Image, uploaded_at: float | None = None) -> None:
        """Keep a decoded image of ``key_id`` in memory, within the cache's bounds."""
        nbytes = image_nbytes(image)
        if nbytes > min(self.cache_bytes, self.cache_bytes_per_key):
            return
        expires = (time.time() if uploaded_at is None else uploaded_at) + self.ttl_s
        cache_key = (key_id, image_id)
        with self._lock:
            if cache_key in self._images:
                self._forget(cache_key)
            self._images[cache_key] = _Cached(image, nbytes, expires)
            self._per_key.setdefault(key_id, OrderedDict())[image_id] = None
            self._key_bytes[key_id] = self._key_bytes.get(key_id, 0) + nbytes
            self._bytes += nbytes
            while self._key_bytes.get(key_id, 0) > self.cache_bytes_per_key:
                self._forget((key_id, next(iter(self._per_key[key_id]))))
            while self._bytes > self.cache_bytes:
                self._forget(next(iter(self._images)))

    # -- both ---------------------------------------------------------------------------

    def keep(self, key_id: int, uploads: dict[str, tuple[bytes, Image.Image]]) -> int:
        """Store uploads ``{content_id: (file_bytes, rgb_image)}``; returns how many were new to the key.

        Raises
        ------
        ImageQuotaExceeded
            Nothing was stored.
        """
        now = time.time()
        new = self._added(key_id, {image_id: raw for image_id, (raw, _) in uploads.items()}, now)
        for image_id in new:  # a known image stays as it was stored (and expires as it was to)
            self.remember(key_id, image_id, uploads[image_id][1], now)
        self.maybe_prune()
        return len(new)

    def fetch(self, key_id: int, ids: Sequence[str]) -> dict[str, Image.Image]:
        """The images named by ``ids`` that this key has uploaded, from memory or the database.

        Raises
        ------
        StoredImageUnreadable
            A stored file that ``decode`` refuses.
        """
        found: dict[str, Image.Image] = {}
        now = time.time()
        with self._lock:
            for image_id in ids:
                entry = self._images.get((key_id, image_id))
                if entry is None:
                    continue
                if entry.expires <= now:
                    self._forget((key_id, image_id))
                    continue
                found[image_id] = entry.image
                self._images.move_to_end((key_id, image_id))
                self._per_key[key_id].move_to_end(image_id)
        wanted = [i for i in dict.fromkeys(ids) if i not in found]
        if wanted:
            # Another process (or this one before a restart) may have stored them.
            rows = {}
            for start in range(0, len(wanted), _CHUNK):
                chunk = wanted[start : start + _CHUNK]
                with self.db.connect() as conn:
                    rows.update(
                        (r.image_id, (bytes(r.png), float(r.created_at)))
                        for r in conn.execute(
                            sa.select(images_table.c.image_id, images_table.c.png, images_table.c.created_at).where(
                                images_table.c.key_id == key_id, images_table.c.image_id.in_(chunk), self._fresh(now)
                            )
                        )
                    )
            for image_id, (raw, uploaded_at) in rows.items():
                try:
                    img = self.decode(raw)
                except ValueError as exc:
                    raise StoredImageUnreadable(image_id, exc) from exc
                found[image_id] = img
                self.remember(key_id, image_id, img, uploaded_at)
        return found
