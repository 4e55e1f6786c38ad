"""Uploaded images: encoded in the database, per key, and decoded in a memory cache.

Pixels arrive once, as encoded image files, and are kept under their content
id; scoring requests name images by id, so a generation's prompts never resend
pixels, and the model's own cache keeps each image's features.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import sqlalchemy as sa
from PIL import Image
from sqlalchemy.exc import IntegrityError

from .db import Database, images_table

__all__ = ["ImageStore", "StoredImageUnreadable"]

# Ids per ``IN (...)`` query.
_CHUNK = 500


class StoredImageUnreadable(Exception):
    """A stored image no longer decodes (e.g. the server's limits changed since its upload)."""

    def __init__(self, image_id: str, cause: ValueError) -> None:
        super().__init__(str(cause))
        self.image_id, self.cause = image_id, cause


class ImageStore:
    """Each key's uploaded images: files in the database, decoded images in memory.

    Parameters
    ----------
    db : Database
    decode : callable
        ``decode(file_bytes) -> PIL.Image.Image`` (RGB), for images read back from
        the database; raises :class:`ValueError` for a file it refuses.
    cache_size : int, default=20000
        Decoded images kept in memory, least recently used dropped first.

    Examples
    --------
    >>> import io
    >>> from PIL import Image
    >>> from skcarrot.serve.db import Database
    >>> from skcarrot.serve.image_store import ImageStore
    >>> from skcarrot.serve.ledger import Ledger
    >>> db = Database("sqlite://")
    >>> key_id, _ = Ledger(db).create_key("alice", budget=1)
    >>> store = ImageStore(db, decode=lambda raw: Image.open(io.BytesIO(raw)).convert("RGB"))
    >>> png = io.BytesIO()
    >>> Image.new("RGB", (2, 2)).save(png, format="PNG")
    >>> store.add(key_id, {"a" * 64: png.getvalue()})
    >>> sorted(store.fetch(key_id, ["a" * 64, "b" * 64]))  # from the database; b is unknown
    ['aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa']
    >>> len(store)  # now cached
    1
    """

    def __init__(self, db: Database, decode: Callable[[bytes], Image.Image], cache_size: int = 20_000) -> None:
        self.db = db
        self.decode = decode
        self.cache_size = int(cache_size)
        self._images: OrderedDict[str, Image.Image] = OrderedDict()
        self._lock = threading.Lock()

    # -- database -----------------------------------------------------------------------

    def _rows(self, key_id: int, image_ids: Sequence[str], *columns) -> Iterator:
        with self.db.connect() as conn:
            for start in range(0, len(image_ids), _CHUNK):
                chunk = list(image_ids[start : start + _CHUNK])
                yield from conn.execute(
                    sa.select(*columns).where(images_table.c.key_id == key_id, images_table.c.image_id.in_(chunk))
                )

    def known(self, key_id: int, image_ids: Sequence[str]) -> list[str]:
        """Those of ``image_ids`` this key has uploaded."""
        return [row.image_id for row in self._rows(key_id, image_ids, images_table.c.image_id)]

    def load(self, key_id: int, image_ids: Sequence[str]) -> dict[str, bytes]:
        """File bytes of those of ``image_ids`` this key has uploaded."""
        return {
            row.image_id: bytes(row.png)
            for row in self._rows(key_id, image_ids, images_table.c.image_id, images_table.c.png)
        }

    def add(self, key_id: int, images: dict[str, bytes]) -> None:
        """Store uploaded image files under their content ids; known ones are kept as they are."""
        if not images:
            return
        known = set(self.known(key_id, list(images)))
        rows = [
            {"key_id": key_id, "image_id": image_id, "png": png, "created_at": time.time()}
            for image_id, png in images.items()
            if image_id not in known
        ]
        if not rows:
            return
        try:
            with self.db.begin() as conn:
                conn.execute(images_table.insert(), rows)
        except IntegrityError:
            # a concurrent upload of the same image won the race: store the rest one by one
            for one in rows:
                try:
                    with self.db.begin() as conn:
                        conn.execute(images_table.insert(), [one])
                except IntegrityError:
                    pass

    # -- memory -------------------------------------------------------------------------

    def __len__(self) -> int:
        """Decoded images in memory."""
        return len(self._images)

    def remember(self, image_id: str, image: Image.Image) -> None:
        """Keep a decoded image in memory."""
        with self._lock:
            self._images[image_id] = image
            self._images.move_to_end(image_id)
            while len(self._images) > self.cache_size:
                self._images.popitem(last=False)

    # -- both ---------------------------------------------------------------------------

    def keep(self, key_id: int, uploads: dict[str, tuple[bytes, Image.Image]]) -> int:
        """Store uploads ``{content_id: (file_bytes, rgb_image)}``; returns how many were new to the key."""
        known = set(self.known(key_id, list(uploads)))
        self.add(key_id, {image_id: raw for image_id, (raw, _) in uploads.items() if image_id not in known})
        for image_id, (_, rgb) in uploads.items():
            self.remember(image_id, rgb)
        return len(set(uploads) - known)

    def fetch(self, key_id: int, ids: Sequence[str]) -> dict[str, Image.Image]:
        """The images named by ``ids`` that this key has uploaded, from memory or the database.

        Raises
        ------
        StoredImageUnreadable
            A stored file that ``decode`` refuses.
        """
        found: dict[str, Image.Image] = {}
        with self._lock:
            for image_id in ids:
                img = self._images.get(image_id)
                if img is not None:
                    found[image_id] = img
                    self._images.move_to_end(image_id)
        wanted = [i for i in dict.fromkeys(ids) if i not in found]
        if wanted:
            # Another process (or this one before a restart) may have stored them.
            for image_id, raw in self.load(key_id, wanted).items():
                try:
                    img = self.decode(raw)
                except ValueError as exc:
                    raise StoredImageUnreadable(image_id, exc) from exc
                found[image_id] = img
                self.remember(image_id, img)
        return found
