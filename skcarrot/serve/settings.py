"""What a server is: the model it serves, the ledger it writes, and its limits."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Settings", "DEFAULT_DB_URL"]

#: Ledger used when none is given: one SQLite file in the working directory.
DEFAULT_DB_URL = "sqlite:///skcarrot-ledger.db"


@dataclass
class Settings:
    """Settings of one ``skcarrot serve`` application.

    Parameters
    ----------
    db_url : str, default="sqlite:///skcarrot-ledger.db"
        SQLAlchemy URL of the ledger: ``sqlite:///path.db`` (one file, WAL) or
        ``postgresql://user@host:port/db`` (several server processes or hosts
        share one ledger). The environment variable ``SKCARROT_DB`` overrides
        the default.
    model_name : str or None, default=None
        open_clip model name served; None serves the embedded micro CLIP.
    pretrained : str or None, default=None
        Pretrained tag or local checkpoint of ``model_name``.
    template : str, default="a photo of a {}."
        Prompt template; the words before ``{}`` are the context words the
        offsets move.
    device : str, default="auto"
        Torch device of the model.
    backend : object or None, default=None
        A ready black box to serve instead of ``model_name`` (tests, custom
        models). An :class:`~skcarrot.backends.OpenCLIPBackend` also serves the
        text-level endpoints.
    max_body_bytes : int, default=32 MiB
        Largest request body accepted (413 above).
    max_images_per_request : int, default=4096
        Most images uploaded or scored in one request.
    max_prompts_per_request : int, default=256
        Most prompts (queries) in one scoring request.
    max_classes : int, default=1000
        Most class names in one scoring request.
    max_image_pixels : int, default=4096 * 4096
        Largest image accepted, in pixels; a larger one is refused as a
        decompression bomb before it is decoded.
    max_class_name_chars : int, default=200
        Longest class name or prompt string.
    rate_window_s : float, default=60.0
        Window of the per-key rate limits (queries per window).
    idempotency_ttl_s : float, default=7 days
        How long a stored response answers retries of its ``Idempotency-Key``.
    image_cache_size : int, default=20000
        Decoded images kept in memory (the rest are read back from the ledger).
    """

    db_url: str = field(default_factory=lambda: os.environ.get("SKCARROT_DB", DEFAULT_DB_URL))
    model_name: str | None = None
    pretrained: str | None = None
    template: str = "a photo of a {}."
    device: str = "auto"
    backend: Any = None
    max_body_bytes: int = 32 * 1024 * 1024
    max_images_per_request: int = 4096
    max_prompts_per_request: int = 256
    max_classes: int = 1000
    max_image_pixels: int = 4096 * 4096
    max_class_name_chars: int = 200
    rate_window_s: float = 60.0
    idempotency_ttl_s: float = 7 * 24 * 3600.0
    image_cache_size: int = 20_000
