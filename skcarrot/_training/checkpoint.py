"""Checkpoints of a running fit: written every few generations, read back to resume.

A checkpoint holds the loop's whole state (prompt search, refiner and optimizer,
views, random generators, best model, query counts) and the history, in one file
replaced atomically, so a fit interrupted by a lost network or a killed process
resumes on the same trajectory and ends with the same model as one that never
stopped. It is a pickle: load only checkpoints you wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import tempfile
from typing import Any

import numpy as np

from ..wire import hash_pixels

__all__ = ["fingerprint", "fit_fingerprint", "read_checkpoint", "requests_named_by", "write_checkpoint"]

_FORMAT = 3  # 3: the loop saves each module's state and the counter's
# Parameters that do not change a fit's trajectory: where it runs, what it prints, where it saves.
_NOT_IN_FINGERPRINT = {"backend", "verbose", "checkpoint", "checkpoint_every", "warm_start"}


def fingerprint(images, y: np.ndarray, params: dict) -> str:
    """A digest of what decides a fit's trajectory: the images, labels and parameters.

    Examples
    --------
    >>> import numpy as np
    >>> from PIL import Image
    >>> from skcarrot._training.checkpoint import fingerprint
    >>> img = Image.new("RGB", (2, 2))
    >>> a = fingerprint([img], np.array([0]), {"popsize": 4})
    >>> a == fingerprint([img], np.array([0]), {"popsize": 4}), a == fingerprint([img], np.array([1]), {"popsize": 4})
    (True, False)
    """
    digest = hashlib.sha256()
    for img in images:
        hash_pixels(digest, img, repr((img.mode, img.size)))
    digest.update(np.asarray(y).tobytes())
    digest.update(repr(sorted((k, _describe(v)) for k, v in params.items())).encode())
    return digest.hexdigest()


def fit_fingerprint(images, y: np.ndarray, params: dict, classes: np.ndarray, warm_from: int | None) -> str:
    """The fingerprint of one call to ``fit``: its data, its parameters and the fit it warm-starts from."""
    params = {k: v for k, v in params.items() if k not in _NOT_IN_FINGERPRINT}
    params["warm_from"] = warm_from
    params["classes"] = np.asarray(classes).tolist()
    return fingerprint(images, y, params)


def requests_named_by(backend: Any, run_id: str | None, counter: Any):
    """Name a checkpointed fit's requests by the fit and their position in it, where the backend can.

    A backend with ``idempotency_scope`` (``HTTPBackend``) then keys each request by the fit's
    fingerprint and the queries spent before it: a resumed fit repeats the keys of the requests
    it repeats, which the server answers from its ledger and charges once. Without a checkpoint
    (``run_id`` None) or such a backend, nothing changes.
    """
    scope = getattr(backend, "idempotency_scope", None)
    if scope is None or run_id is None:
        return contextlib.nullcontext()
    return scope(f"fit-{run_id}", position=lambda: counter.n_queries)


def _describe(value: Any) -> str:
    # A function's repr holds its address, which changes from process to process.
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    return repr(value)


def write_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a crash mid-write leaves the previous checkpoint."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".skcarrot-checkpoint-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump({"format": _FORMAT, **state}, f, protocol=pickle.HIGHEST_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_checkpoint(path: str | os.PathLike, expected_fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint at ``path``, or None when there is none (or it is another fit's finished run).

    An unfinished checkpoint written by another fit is refused.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            state = pickle.load(f)
    except Exception as exc:
        raise ValueError(f"checkpoint {path!r} can not be read ({exc}); delete it to start afresh") from exc
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ValueError(f"{path!r} is not a skcarrot checkpoint of this version; delete it to start afresh")
    if state.get("fingerprint") != expected_fingerprint:
        if state.get("finished"):
            return None  # a finished run of another fit: nothing to resume, the new fit replaces it
        raise ValueError(
            f"checkpoint {path!r} was written by a fit with other images, labels or parameters; "
            "pass another checkpoint path, or delete this one to start afresh"
        )
    return state
