"""What a server is: the model it serves, the ledger it writes, and its limits.

Every environment variable the server reads is read here, and nowhere else.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from ..backends._template import DEFAULT_TEMPLATE
__all__ = [
    "Settings",
    "LIMIT_FIELDS",
    "DEFAULT_DB_URL",
    "DEFAULT_TEMPLATE",
    "db_url_from_env",
    "settings_from_env",
    "export_worker_env",
    "metrics_multiprocess_dir",
]

#: Ledger used when none is given: one SQLite file in the working directory.
DEFAULT_DB_URL = "sqlite:///skcarrot-ledger.db"

# The variables ``skcarrot serve`` hands to each of its workers, by Settings field.
_WORKER_ENV = {
    "db_url": "SKCARROT_DB",
    "model_name": "SKCARROT_MODEL",
    "pretrained": "SKCARROT_PRETRAINED",
    "template": "SKCARROT_TEMPLATE",
    "device": "SKCARROT_DEVICE",
    "chat_weights": "SKCARROT_CHAT_WEIGHTS",
}


def db_url_from_env(url: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The ledger URL: ``url`` if given, else ``SKCARROT_DB``, else :data:`DEFAULT_DB_URL`.

    Examples
    --------
    >>> from skcarrot.serve.config import db_url_from_env
    >>> db_url_from_env("sqlite://", {})
    'sqlite://'
    >>> db_url_from_env(None, {"SKCARROT_DB": "postgresql://me@db/ledger"})
    'postgresql://me@db/ledger'
    >>> db_url_from_env(None, {})
    'sqlite:///skcarrot-ledger.db'
    """
    env = os.environ if environ is None else environ
    return url or env.get("SKCARROT_DB") or DEFAULT_DB_URL


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
    chat_weights : str or None, default=None
        The chat model served at ``/v1/chat/completions``: None for the
        embedded micro chat model's shipped weights, a safetensors file the
        recipe wrote, ``"random"`` (random weights, with a warning) or ``"off"``
        (no chat endpoint).
    max_body_bytes : int, default=32 MiB
        Largest request body accepted (413 above).
    max_header_bytes : int, default=16 KiB
        Largest request head (all header names and values together); 431 above.
    max_images_per_request : int, default=4096
        Most images uploaded or scored in one request.
    max_prompts_per_request : int, default=256
        Most prompts (queries) in one scoring request.
    max_classes : int, default=1000
        Most class names in one scoring request.
    max_logits_per_request : int, default=4194304
        Most logits one scoring request may ask for: prompts x images x classes
        (``P x N x C``); a larger request is refused (422) before anything is charged.
    max_offset_abs : float, default=1e4
        Largest absolute value of a prompt offset; larger (finite) values only
        make the model overflow, and are refused (422).
    max_image_pixels : int, default=4096 * 4096
        Largest image accepted, in pixels; a larger one is refused as a
        decompression bomb before it is decoded.
    max_class_name_chars : int, default=200
        Longest class name or prompt string.
    rate_window_s : float, default=60.0
        Window of the per-key rate limits (queries per window).
    max_concurrent_per_key : int, default=4
        Requests of one key (uploads and charged requests) run at once in one
        server process; more wait their turn, and past ``4 x`` that many waiting
        are refused (429).
    idempotency_ttl_s : float, default=7 days
        How long a charged request's ``Idempotency-Key`` is remembered: a retry
        within it is never charged again.
    answer_ttl_s : float, default=1 hour
        How long an answer not yet acknowledged is stored to replay, byte for
        byte, to a retry of its ``Idempotency-Key``.
    max_answer_bytes_per_key : int, default=32 MiB
        Most bytes of stored answers per key; the oldest are dropped first, and
        an answer larger than a quarter of it is not stored. A retry of a
        request whose answer was dropped (acknowledged, expired, over this cap
        or too large) is scored again, free.
    answer_hold_s : float, default=2.0
        Seconds an answer is held in the server's memory, waiting for the
        client to acknowledge it, before it is written to the ledger (so that a
        restarted server, or another on the same ledger, replays it too); an
        acknowledged answer is never written. 0 writes every answer at once.
    image_ttl_s : float, default=7 days
        How long an uploaded image is kept (from its upload).
    max_image_bytes_per_key : int, default=256 MiB
        Most bytes of stored images per key (images are stored as the model
        reads them: reduced to its input size when they are larger); an upload
        past it is refused (422).
    max_image_bytes_total : int, default=4 GiB
        Most bytes of stored images, all keys together (507 past it).
    image_cache_bytes : int, default=256 MiB
        Decoded images kept in memory, in bytes, all keys together (the rest
        are read back from the ledger).
    image_cache_bytes_per_key : int, default=64 MiB
        Of which one key may hold at most this many.
    """

    db_url: str = field(default_factory=db_url_from_env)
    model_name: str | None = None
    pretrained: str | None = None
    template: str = DEFAULT_TEMPLATE
    device: str = "auto"
    backend: Any = None
    chat_weights: str | None = None
    max_body_bytes: int = 32 * 1024 * 1024
    max_header_bytes: int = 16 * 1024
    max_images_per_request: int = 4096
    max_prompts_per_request: int = 256
    max_classes: int = 1000
    max_logits_per_request: int = 4 * 1024 * 1024
    max_offset_abs: float = 1e4
    max_image_pixels: int = 4096 * 4096
    max_class_name_chars: int = 200
    rate_window_s: float = 60.0
    max_concurrent_per_key: int = 4
    idempotency_ttl_s: float = 7 * 24 * 3600.0
    answer_ttl_s: float = 3600.0
    max_answer_bytes_per_key: int = 32 * 1024 * 1024
    answer_hold_s: float = 2.0
    image_ttl_s: float = 7 * 24 * 3600.0
    max_image_bytes_per_key: int = 256 * 1024 * 1024
    max_image_bytes_total: int = 4 * 1024 * 1024 * 1024
    image_cache_bytes: int = 256 * 1024 * 1024
    image_cache_bytes_per_key: int = 64 * 1024 * 1024


#: The Settings limits a worker reads from ``SKCARROT_<NAME>`` (e.g. ``SKCARROT_MAX_BODY_BYTES``).
LIMIT_FIELDS = tuple(
    name for name, kind in Settings.__annotations__.items() if kind in ("int", "float")
)


def settings_from_env(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from environment variables, as each ``skcarrot serve`` worker builds them.

    ``SKCARROT_DB``, ``SKCARROT_MODEL``, ``SKCARROT_PRETRAINED``, ``SKCARROT_TEMPLATE``,
    ``SKCARROT_DEVICE``, ``SKCARROT_MAX_BODY_BYTES``, ``SKCARROT_RATE_WINDOW_S``; the
    rest are :class:`Settings` defaults. Every numeric limit is read from
    ``SKCARROT_<NAME>`` too (:data:`LIMIT_FIELDS`, e.g. ``SKCARROT_MAX_IMAGE_BYTES_PER_KEY``).

    Examples
    --------
    >>> from skcarrot.serve.config import settings_from_env
    >>> s = settings_from_env({"SKCARROT_DB": "sqlite://", "SKCARROT_RATE_WINDOW_S": "5"})
    >>> s.db_url, s.model_name, s.rate_window_s
    ('sqlite://', None, 5.0)
    """
    env = os.environ if environ is None else environ
    settings = Settings(
        db_url=db_url_from_env(None, env),
        model_name=env.get("SKCARROT_MODEL") or None,
        pretrained=env.get("SKCARROT_PRETRAINED") or None,
        template=env.get("SKCARROT_TEMPLATE", DEFAULT_TEMPLATE),
        device=env.get("SKCARROT_DEVICE", "auto"),
        chat_weights=env.get("SKCARROT_CHAT_WEIGHTS") or None,
    )
    for name in LIMIT_FIELDS:
        value = env.get(f"SKCARROT_{name.upper()}")
        if value:
            kind = int if Settings.__annotations__[name] == "int" else float
            setattr(settings, name, kind(float(value)) if kind is int else kind(value))
    return settings


def export_worker_env(environ: MutableMapping[str, str] | None = None, **values: str | None) -> None:
    """Write what :func:`settings_from_env` reads back, for server workers started later.

    ``values`` are :class:`Settings` field names (``db_url``, ``model_name``,
    ``pretrained``, ``template``, ``device``); None removes the variable.

    Examples
    --------
    >>> from skcarrot.serve.config import export_worker_env, settings_from_env
    >>> env = {"SKCARROT_MODEL": "old"}
    >>> export_worker_env(env, db_url="sqlite://", model_name=None, device="cpu")
    >>> sorted(env), settings_from_env(env).device
    (['SKCARROT_DB', 'SKCARROT_DEVICE'], 'cpu')
    """
    env = os.environ if environ is None else environ
    for name, value in values.items():
        variable = _WORKER_ENV[name]
        if value is None:
            env.pop(variable, None)
        else:
            env[variable] = value


def metrics_multiprocess_dir(environ: Mapping[str, str] | None = None) -> str | None:
    """``PROMETHEUS_MULTIPROC_DIR``: where prometheus_client's multiprocess mode keeps its files."""
    env = os.environ if environ is None else environ
    return env.get("PROMETHEUS_MULTIPROC_DIR") or None
