"""A black box on the far side of a network: the client of ``skcarrot serve``.

:class:`HTTPBackend` implements the same members as any backend (both doors),
so the estimator does not know it talks over a network. Pixels cross once (each
distinct image is uploaded once, a few new small ones with the scoring request that
needs them, and named by its content id afterwards); offsets go as raw float32,
logits come back exact (raw bytes from a server that offers them); every charged request
carries an ``Idempotency-Key`` that its retries reuse, so a retry is never
charged twice, and names the answers received since in ``Idempotency-Ack``, so
the server need not keep them. Retries, errors and the key's handling are those
of :class:`~skcarrot.backends.remote._client.RemoteClient`.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from ...exceptions import RemoteAuthenticationError, RemoteBackendError, RemoteValidationError
from ...wire import RAW_MEDIA_TYPE, decode_array, encode_array, image_content_id, png_base64
from ._client import RemoteClient

__all__ = ["HTTPBackend", "API_KEY_ENV"]

#: Environment variable read for the API key when ``api_key`` is None.
API_KEY_ENV = "SKCARROT_API_KEY"

# Below this many pixels in all, unknown images are uploaded without first asking which are missing.
_ASK_FIRST_PIXELS = 64 * 64 * 64


# What a scoring request accepts: raw logits, or JSON from a server that does not offer them.
_ACCEPT = f"{RAW_MEDIA_TYPE}, application/json;q=0.5"


def _logits(value: Any) -> np.ndarray:
    # Finiteness is the query counter's to check, with its own message.
    if isinstance(value, np.ndarray):
        return value.astype(np.float64)
    return np.asarray(decode_array(value, finite=False), dtype=np.float64)


class HTTPBackend(RemoteClient):
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
        Retries of a request after a connection error, a timeout, a 5xx or a
        429, with exponential backoff and full jitter (and at least the
        server's ``Retry-After``, in seconds or as an HTTP date). Retries of a
        charged request reuse its ``Idempotency-Key``, so it is charged once.
        Other 4xx are never retried.
    backoff : float, default=0.5
        First backoff ceiling in seconds; doubles per retry.
    max_backoff : float, default=30.0
        Largest backoff ceiling in seconds.
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
    n_calls_, n_retries_ : int
        HTTP requests sent by this object in this process, retries included; of which retries.
    n_billed_ : int
        Queries the server billed for the requests this object sent in this
        process (each request counted once, retries or not), in the server's
        units: one per prompt offset on :meth:`logits`, one per string on
        :meth:`text_scores`. The estimator's ``n_queries_`` counts a prompt set
        as one query; here it counts as many as it has strings.

    Raises
    ------
    skcarrot.exceptions.RemoteBudgetExceededError
        The key's budget on the server is spent (a :class:`QueryBudgetExceededError`).
    skcarrot.exceptions.RemoteValidationError
        The server refused the request as invalid (a :class:`ValueError`).
    skcarrot.exceptions.RemoteAuthenticationError
        Unknown or missing key (a :class:`PermissionError`).
    skcarrot.exceptions.RemoteUnavailableError
        No answer after every retry (a :class:`ConnectionError`).
    skcarrot.exceptions.RemoteProtocolError
        An answer that is not valid JSON (a :class:`ValueError`).

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
    _acknowledges = True

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
        super().__init__(url, timeout=timeout, max_retries=max_retries, backoff=backoff, max_backoff=max_backoff)
        self.api_key = api_key
        self.store_key = store_key

    # -- what the client needs (see RemoteClient) ------------------------------------------

    def _new_state(self) -> dict:
        return {"uploaded": set(), "ids": {}, "info": None, "billed": 0, "inline": None}

    @property
    def n_billed_(self) -> int:
        return self._runtime()["billed"]

    def _charged(self, path: str, payload: dict, key: str) -> np.ndarray:
        """One charged scoring request under ``key``; its logits, its bill counted."""
        # logits come back as raw bytes from a server that offers them, else as base64 in JSON
        body = self._call("POST", f"{self.url.rstrip('/')}{path}", payload, charged=True, key=key, accept=_ACCEPT)
        state = self._runtime()
        with state["lock"]:
            state["billed"] += int(body.get("queries", 0))
        return _logits(body["logits"])

    def _per_request(self, n_images: int, n_columns: int) -> int | None:
        """Most prompts (or prompt sets) one request may carry under the server's work limit, or None."""
        most = self._limits().get("max_logits_per_request")
        if not most:
            return None
        return max(1, int(most) // max(1, n_images * n_columns))

    def _auth_headers(self) -> dict[str, str]:
        key = self.api_key if self.api_key is not None else os.environ.get(API_KEY_ENV)
        if not key:
            raise RemoteAuthenticationError(
                f"no API key: pass HTTPBackend(api_key=...) or set the environment variable {API_KEY_ENV} "
                "(create keys with 'skcarrot keys create --name NAME --budget QUERIES' on the server)"
            )
        return {"Authorization": f"Bearer {key}"}

    def _auth_hint(self) -> str:
        return f"check {API_KEY_ENV} or api_key"

    def _request(self, method: str, path: str, payload: Any = None, charged: bool = False) -> Any:
        """Send one request to ``path`` on the server, with retries; return the decoded JSON body."""
        return self._call(method, f"{self.url.rstrip('/')}{path}", payload, charged=charged)

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
        first = self._unknown(images, ids)
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
            encoded = png_base64(first[cid])
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
            first = next((i for i, (a, b) in enumerate(zip(returned, ids)) if a != b), min(len(returned), len(ids)))
            raise RemoteBackendError(
                f"the server computed other content ids for the {len(ids)} uploaded images than this client "
                f"({len(returned)} ids returned; the first difference at image {first}: server "
                f"{returned[first] if first < len(returned) else None!r}, client "
                f"{ids[first] if first < len(ids) else None!r}); client and server disagree on image decoding: "
                "upgrade both to the same skcarrot version"
            )

    def _unknown(self, images: Sequence[Any], ids: list[str]) -> dict[str, Any]:
        """The distinct images not uploaded yet, by content id."""
        uploaded = self._runtime()["uploaded"]
        first: dict[str, Any] = {}
        for img, cid in zip(images, ids):
            if cid not in uploaded and cid not in first:
                first[cid] = img
        return first

    def _inline(self, first: dict[str, Any]) -> list[str] | None:
        """Files of the new images to send with the scoring request itself, or None to upload them first.

        A few small images (an augmented view or two) go with the request: a request saved. Not
        inside :meth:`idempotency_scope`: a resumed run must send each request as it did the first
        time, whatever this process has uploaded since.
        """
        if not first or self._runtime()["inline"] is False or self._scoped():
            return None
        limits = self._limits()
        if len(first) > int(limits["max_images_per_request"]):
            return None
        if sum(img.size[0] * img.size[1] for img in first.values()) > _ASK_FIRST_PIXELS:
            return None
        files = [png_base64(img) for img in first.values()]
        return files if sum(len(f) + 16 for f in files) <= int(limits["max_body_bytes"]) // 4 else None

    def _with_images(self, images: Sequence[Any], send) -> Any:
        """``send(ids, files)``: the images' content ids, and the files of new ones to send along (or None)."""
        images = list(images)
        if not images:
            raise ValueError("expected at least one image to score, got none")
        ids = self._content_ids(images)
        first = self._unknown(images, ids)
        files = self._inline(first)
        if files is None:
            self._upload(images, ids)
        state = self._runtime()
        try:
            out = send(ids, files)
        except RemoteValidationError as exc:
            details = [d for d in (exc.detail if isinstance(exc.detail, list) else []) if isinstance(d, dict)]
            if files is not None and any(d.get("type") == "extra_forbidden" and list(d.get("loc", []))[:2]
                                         == ["body", "images"] for d in details):
                # a server that takes no images with a scoring request: upload them first, from now on
                state["inline"] = False
            elif any(d.get("type") == "value_error.unknown_image" for d in details):
                # The server lost images this client uploaded (another server, a wiped ledger):
                # upload them again, once.
                state["uploaded"].difference_update(ids)
            else:
                raise
            self._upload(images, ids)
            return send(ids, None)
        if files is not None:
            state["uploaded"].update(first)
        return out

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
        images = list(images)
        step = self._per_request(len(images), len(names))
        if step is not None and step < len(offsets):
            # over the server's work limit: the prompts go in several requests (the price is per prompt)
            parts = [encode_array(offsets[start : start + step]) for start in range(0, len(offsets), step)]
        else:
            parts = [encode_array(offsets)]  # float32 offsets go as float32, exactly
        keys = [self._next_key() for _ in parts]  # the same if the request must be sent again

        def send(ids: list[str], files: list[str] | None) -> np.ndarray:
            payloads = [{"image_ids": ids, "class_names": names, "offsets": part} for part in parts]
            if files:
                payloads[0]["images"] = files  # new images go with the first request
            return np.concatenate([self._charged("/v1/score", payload, key) for payload, key in zip(payloads, keys)])

        return self._with_images(images, send)

    def text_scores(self, images: Sequence[Any], prompts: Sequence[Sequence[str]]) -> np.ndarray:
        """Logits ``(P, n_images, L)`` of every image against each prompt set's strings.

        Makes this backend a text-level black box (see
        :class:`skcarrot.backends.TextBlackBox`), served by ``POST /v1/score-text``,
        which bills one query per string scored (``P x L``; see :attr:`n_billed_`).
        """
        sets = [[str(s) for s in prompt_set] for prompt_set in prompts]
        images = list(images)
        step = self._per_request(len(images), len(sets[0]) if sets else 1) if sets else None
        chunks = [sets] if step is None or step >= len(sets) else [
            sets[start : start + step] for start in range(0, len(sets), step)
        ]
        keys = [self._next_key() for _ in chunks]

        def send(ids: list[str], files: list[str] | None) -> np.ndarray:
            payloads = [{"image_ids": ids, "prompts": chunk} for chunk in chunks]
            if files:
                payloads[0]["images"] = files  # new images go with the first request
            return np.concatenate([
                self._charged("/v1/score-text", payload, key) for payload, key in zip(payloads, keys)
            ])

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
