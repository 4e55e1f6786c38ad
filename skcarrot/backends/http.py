"""A black box on the far side of a network: the client of ``skcarrot serve``.

:class:`HTTPBackend` implements the same two members as any backend, so the
estimator does not know it talks over a network. Pixels cross once (each
distinct image is uploaded once and named by its content id afterwards);
offsets go as raw float32, logits come back exact; every charged request
carries an ``Idempotency-Key`` that its retries reuse, so a retry is never
charged twice.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import random
import threading
import time
import uuid
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator

from ..exceptions import (
    RemoteAuthenticationError,
    RemoteBackendError,
    RemoteBudgetExceededError,
    RemoteUnavailableError,
    RemoteValidationError,
)

__all__ = ["HTTPBackend", "image_content_id", "API_KEY_ENV"]

logger = logging.getLogger("skcarrot")

#: Environment variable read for the API key when ``api_key`` is None.
API_KEY_ENV = "SKCARROT_API_KEY"

# Below this many pixels in all, unknown images are uploaded without first asking which are missing.
_ASK_FIRST_PIXELS = 64 * 64 * 64

# Statuses worth retrying: the server was busy, restarting or rate limiting.
_RETRY_STATUSES = {429, 500, 502, 503, 504}


def image_content_id(image: Any) -> str:
    """Content id of an image: sha256 of its RGB pixels and size, hex.

    Client and server compute it from pixels, not file bytes, so any lossless
    encoding of the same image has the same id.

    Parameters
    ----------
    image : PIL.Image.Image

    Returns
    -------
    content_id : str
        64 hex digits.

    Examples
    --------
    >>> from PIL import Image
    >>> from skcarrot.backends.http import image_content_id
    >>> a = image_content_id(Image.new("RGB", (4, 4)))
    >>> a == image_content_id(Image.new("L", (4, 4))), len(a)
    (True, 64)
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    digest = hashlib.sha256(f"skcarrot-rgb {rgb.size[0]}x{rgb.size[1]}\n".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def _png_base64(image: Any) -> str:
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _decode_array(value: Any) -> np.ndarray:
    if isinstance(value, dict):
        dtype = "<f4" if value["dtype"] == "float32" else "<f8"
        arr = np.frombuffer(base64.b64decode(value["data"]), dtype=dtype).reshape(value["shape"])
        return arr.astype(np.float64)
    return np.asarray(value, dtype=np.float64)


def _error_text(detail: Any) -> str:
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", []))
                parts.append(f"{loc}: {item.get('msg', '')}" if loc else str(item.get("msg", "")))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return str(detail)


class HTTPBackend(BaseEstimator):
    """A black-box model served by ``skcarrot serve``, reached over HTTP.

    Parameters
    ----------
    url : str, default="http://127.0.0.1:8000"
        Base URL of the server.
    api_key : str or None, default=None
        API key (from ``skcarrot keys create``). None reads the environment
        variable ``SKCARROT_API_KEY`` at every call, so the key never sits in
        the estimator's parameters, reprs or pickles: the recommended way. An
        explicit key is kept in memory (it shows in ``get_params()`` and in the
        repr of an estimator holding this backend) but is dropped when the
        backend is pickled, unless ``store_key=True``.
    timeout : float, default=120.0
        Seconds to wait for one response.
    max_retries : int, default=8
        Retries of a request after a connection error, a 5xx or a 429, with
        exponential backoff and jitter (and at least the server's
        ``Retry-After``). Retries of a charged request reuse its
        ``Idempotency-Key``, so it is charged once. 4xx validation errors are
        never retried.
    backoff : float, default=0.5
        First backoff delay in seconds; doubles per retry.
    max_backoff : float, default=30.0
        Longest backoff delay in seconds.
    store_key : bool, default=False
        Keep an explicit ``api_key`` in pickles (and so in joblib copies sent
        to worker processes). Off by default: a pickle on disk or in a cache
        should not carry a secret.

    Attributes
    ----------
    context_shape : tuple of (int, int)
        ``(n_ctx, dim)`` of the served model (asked once, from ``GET /v1/info``).
    returns : str
        ``"logits"``: :meth:`text_scores` makes this a text-level black box too.

    Raises
    ------
    skcarrot.exceptions.RemoteBudgetExceededError
        The key's budget on the server is spent (a :class:`QueryBudgetExceededError`).
    skcarrot.exceptions.RemoteValidationError
        The server refused the request as invalid (a :class:`ValueError`).
    skcarrot.exceptions.RemoteAuthenticationError
        Unknown or missing key.
    skcarrot.exceptions.RemoteUnavailableError
        No answer after every retry (a :class:`ConnectionError`).

    Examples
    --------
    >>> from skcarrot import CarrotClassifier
    >>> from skcarrot.backends import HTTPBackend
    >>> backend = HTTPBackend("http://127.0.0.1:8000")  # key from $SKCARROT_API_KEY
    >>> clf = CarrotClassifier(backend=backend, query_budget=8000, random_state=0)
    >>> backend
    HTTPBackend(url='http://127.0.0.1:8000')
    """

    returns = "logits"

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        max_retries: int = 8,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        store_key: bool = False,
    ) -> None:
        self.url = url
        self.api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.store_key = store_key

    # -- plumbing (nothing here is a parameter; none of it is pickled) -------------------

    def _runtime(self) -> dict:
        state = self.__dict__.get("_http_state")
        if state is None or state["pid"] != os.getpid():
            state = {
                "pid": os.getpid(),
                "client": None,
                "lock": threading.Lock(),
                "uploaded": set(),
                "ids": {},
                "info": None,
                "rng": random.Random(),
            }
            self.__dict__["_http_state"] = state
        return state

    def __getstate__(self):
        state = super().__getstate__()
        state = dict(state)
        state.pop("_http_state", None)
        if not self.store_key:
            state["api_key"] = None
        return state

    def __repr__(self, N_CHAR_MAX: int = 700) -> str:
        defaults = HTTPBackend().get_params()
        shown = []
        for name, value in self.get_params(deep=False).items():
            if name == "url" or value != defaults[name]:
                shown.append(f"{name}={'***' if name == 'api_key' and value is not None else repr(value)}")
        return f"HTTPBackend({', '.join(shown)})"

    def _key(self) -> str:
        key = self.api_key if self.api_key is not None else os.environ.get(API_KEY_ENV)
        if not key:
            raise RemoteAuthenticationError(
                f"no API key: pass HTTPBackend(api_key=...) or set the environment variable {API_KEY_ENV} "
                "(create keys with 'skcarrot keys create --name NAME --budget QUERIES' on the server)"
            )
        return key

    def _client(self):
        state = self._runtime()
        if state["client"] is None:
            with state["lock"]:
                if state["client"] is None:
                    try:
                        import httpx
                    except ImportError as exc:  # pragma: no cover - depends on the install
                        raise ImportError("HTTPBackend needs httpx: pip install 'skcarrot[serve]'") from exc
                    state["client"] = httpx.Client(
                        base_url=self.url.rstrip("/"),
                        timeout=self.timeout,
                        limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
                    )
        return state["client"]

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        rng = self._runtime()["rng"]
        delay = min(self.max_backoff, self.backoff * 2.0**attempt) * (0.5 + 0.5 * rng.random())
        if retry_after is not None:
            # Honour the server's wait, plus a little jitter so racing clients spread out.
            delay = max(delay, retry_after * (1.0 + 0.1 * rng.random()))
        return delay

    def _request(self, method: str, path: str, payload: Any = None, charged: bool = False) -> Any:
        """Send one request with retries; return the decoded JSON body."""
        import httpx

        client = self._client()
        headers = {"Authorization": f"Bearer {self._key()}"}
        if charged:
            # One key for the logical request: every retry of it is charged at most once.
            headers["Idempotency-Key"] = uuid.uuid4().hex
        content = None
        if payload is not None:
            content = json.dumps(payload, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
        last: str = ""
        for attempt in range(int(self.max_retries) + 1):
            retry_after = None
            try:
                response = client.request(method, path, content=content, headers=headers)
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                status = response.status_code
                if status < 400:
                    return response.json()
                detail = self._detail(response)
                if status not in _RETRY_STATUSES:
                    self._raise(status, detail, response)
                last = f"HTTP {status}: {_error_text(detail.get('detail', detail))}"
                header = response.headers.get("Retry-After")
                if header is not None:
                    try:
                        retry_after = float(header)
                    except ValueError:
                        retry_after = None
            if attempt < int(self.max_retries):
                wait = self._delay(attempt, retry_after)
                logger.warning("%s %s failed (%s); retry %d of %d in %.2f s", method, path, last, attempt + 1,
                               self.max_retries, wait)
                time.sleep(wait)
        raise RemoteUnavailableError(
            f"{method} {self.url.rstrip('/')}{path} failed after {int(self.max_retries) + 1} attempt(s); last: "
            f"{last}. Is the server running? Raise max_retries or timeout to wait longer",
            status_code=None,
        )

    @staticmethod
    def _detail(response) -> dict:
        try:
            body = response.json()
        except ValueError:
            return {"detail": response.text[:500]}
        return body if isinstance(body, dict) else {"detail": body}

    def _raise(self, status: int, body: dict, response) -> None:
        detail = body.get("detail", body)
        text = _error_text(detail)
        where = f"{response.request.method} {response.request.url.path}"
        if status == 401:
            raise RemoteAuthenticationError(
                f"{where}: the server refused the API key ({text}); check {API_KEY_ENV} or api_key",
                status_code=status,
                detail=detail,
            )
        if status == 402:
            raise RemoteBudgetExceededError(
                f"the server's query budget for this key is exhausted: {text}",
                status_code=status,
                detail=detail,
                remaining=body.get("remaining"),
            )
        if status in (413, 422):
            raise RemoteValidationError(f"{where}: the server refused the request: {text}", status, detail)
        raise RemoteBackendError(f"{where}: HTTP {status}: {text}", status, detail)

    # -- images ---------------------------------------------------------------------------

    def _content_ids(self, images: Sequence[Any]) -> list[str]:
        # The estimator passes the same PIL objects generation after generation: remember
        # their ids by object (while it lives) instead of hashing the pixels every call.
        known = self._runtime()["ids"]
        out = []
        for img in images:
            entry = known.get(id(img))
            if entry is not None and entry[0]() is img:
                out.append(entry[1])
                continue
            cid = image_content_id(img)
            try:
                ref = weakref.ref(img, lambda _, key=id(img), table=known: table.pop(key, None))
            except TypeError:
                pass
            else:
                known[id(img)] = (ref, cid)
            out.append(cid)
        return out

    def _limits(self) -> dict:
        return self._info()["limits"]

    def _upload(self, images: Sequence[Any], ids: list[str]) -> None:
        """Upload the images the server does not have yet (each distinct one once)."""
        uploaded = self._runtime()["uploaded"]
        first: dict[str, Any] = {}
        for img, cid in zip(images, ids):
            if cid not in uploaded and cid not in first:
                first[cid] = img
        if not first:
            return
        limits = self._limits()
        per_request = max(1, int(limits["max_images_per_request"]))
        unknown = list(first)
        pixels = sum(img.size[0] * img.size[1] for img in first.values())
        if pixels <= _ASK_FIRST_PIXELS:
            # Few small images (an augmented view or two): sending them costs less than
            # asking which the server lacks; it keeps each one once anyway.
            missing = unknown
        else:
            missing = []
            for start in range(0, len(unknown), per_request):
                chunk = unknown[start : start + per_request]
                missing += self._request("POST", "/v1/images/missing", {"ids": chunk})["missing"]
        budget = int(limits["max_body_bytes"]) * 3 // 4
        batch: list[str] = []
        batch_ids: list[str] = []
        size = 0
        for cid in missing:
            encoded = _png_base64(first[cid])
            if batch and (size + len(encoded) + 16 > budget or len(batch) >= per_request):
                self._send_images(batch, batch_ids)
                batch, batch_ids, size = [], [], 0
            batch.append(encoded)
            batch_ids.append(cid)
            size += len(encoded) + 16
        if batch:
            self._send_images(batch, batch_ids)
        uploaded.update(unknown)

    def _send_images(self, encoded: list[str], ids: list[str]) -> None:
        returned = self._request("POST", "/v1/images", {"images": encoded})["ids"]
        if returned != ids:
            raise RemoteBackendError(
                "the server computed other content ids for the uploaded images than this client; "
                "client and server disagree on image decoding"
            )

    def _with_images(self, images: Sequence[Any], send) -> Any:
        images = list(images)
        if not images:
            raise ValueError("expected at least one image to score, got none")
        ids = self._content_ids(images)
        self._upload(images, ids)
        try:
            return send(ids)
        except RemoteValidationError as exc:
            # The server lost images this client uploaded (another server, a wiped ledger):
            # upload them again, once.
            if not any(
                isinstance(d, dict) and d.get("type") == "value_error.unknown_image"
                for d in (exc.detail if isinstance(exc.detail, list) else [])
            ):
                raise
            self._runtime()["uploaded"].difference_update(ids)
            self._upload(images, ids)
            return send(ids)

    # -- the door ---------------------------------------------------------------------------

    def _info(self) -> dict:
        state = self._runtime()
        if state["info"] is None:
            state["info"] = self._request("GET", "/v1/info")
        return state["info"]

    @property
    def context_shape(self) -> tuple[int, int]:
        n_ctx, dim = self._info()["model"]["context_shape"]
        return (int(n_ctx), int(dim))

    def logits(self, images: Sequence[Any], class_names: Sequence[str], offsets: np.ndarray) -> np.ndarray:
        """Logits ``(P, n_images, n_classes)`` from the server; ``P`` queries.

        Parameters
        ----------
        images : sequence of PIL.Image.Image
            Uploaded once each (by content id), then named by id.
        class_names : sequence of str
        offsets : ndarray of shape (P, n_ctx, dim)
            Sent as raw little-endian float32.

        Returns
        -------
        logits : ndarray of shape (P, n_images, n_classes)
        """
        offsets = np.ascontiguousarray(offsets, dtype="<f4")
        if offsets.ndim != 3 or offsets.shape[1:] != self.context_shape:
            raise ValueError(f"offsets must have shape (P, *{self.context_shape}), got {offsets.shape}")
        names = [str(c) for c in class_names]
        array = {
            "shape": list(offsets.shape),
            "dtype": "float32",
            "data": base64.b64encode(offsets.tobytes()).decode("ascii"),
        }

        def send(ids: list[str]) -> np.ndarray:
            body = self._request(
                "POST", "/v1/score", {"image_ids": ids, "class_names": names, "offsets": array}, charged=True
            )
            return _decode_array(body["logits"])

        return self._with_images(images, send)

    def text_scores(self, images: Sequence[Any], prompts: Sequence[Sequence[str]]) -> np.ndarray:
        """Logits ``(P, n_images, L)`` of every image against each prompt set's strings; ``P`` queries.

        Makes this backend a text-level black box (see
        :class:`skcarrot.backends.TextBlackBox`), served by ``POST /v1/score-text``.
        """
        sets = [[str(s) for s in prompt_set] for prompt_set in prompts]

        def send(ids: list[str]) -> np.ndarray:
            body = self._request("POST", "/v1/score-text", {"image_ids": ids, "prompts": sets}, charged=True)
            return _decode_array(body["logits"])

        return self._with_images(images, send)

    def usage(self) -> dict:
        """The calling key's budget and spending, as the server's ledger has them.

        Returns
        -------
        usage : dict
            ``name``, ``budget``, ``prompts_used``, ``images_used``, ``requests``,
            ``remaining``, ``rate_limit``, ``rate_window_s``.
        """
        return self._request("GET", "/v1/usage")
