"""One retrying HTTP client under every remote backend.

:class:`RemoteClient` is the base of :class:`~skcarrot.backends.HTTPBackend`
and :class:`~skcarrot.backends.ZeroShotHTTPBackend`. It holds what they share:
an HTTP client built on first use (urllib3's kept-alive connection pool, see
:mod:`~skcarrot.backends.remote._transport`; built again in a forked child, whose
parent's connections it must not reuse), retries of connection errors, timeouts,
429 and 5xx answers with exponential backoff and full jitter (never shorter
than the server's ``Retry-After``, in seconds or as an HTTP date), other 4xx
raised at once, one exception family (:class:`~skcarrot.exceptions.RemoteBackendError`
and its subclasses), ``Idempotency-Key`` values for charged requests (random,
or deterministic inside :meth:`RemoteClient.idempotency_scope`, so a resumed
run repeats them), and the handling of the secret parameter: masked in the
repr, dropped from pickles unless asked.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import inspect
import json
import logging
import os
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from sklearn.base import BaseEstimator

from ...exceptions import (
    RemoteAuthenticationError,
    RemoteBackendError,
    RemoteBudgetExceededError,
    RemoteProtocolError,
    RemoteUnavailableError,
    RemoteValidationError,
)
from ...wire import RAW_MEDIA_TYPE, WireFormatError, decode_raw
from ._transport import Transport, TransportError

__all__ = ["RETRY_STATUSES", "RemoteClient", "error_text", "retry_after_seconds"]

logger = logging.getLogger("skcarrot")

#: Statuses worth retrying: the server was busy, loading, restarting or rate limiting.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})

# The 422 ``type`` of an Idempotency-Key reused with another body.
_CONFLICT = "value_error.idempotency_conflict"

# Answers remembered for acknowledgement, at most (the oldest are forgotten: the server drops
# them anyway after a while).
_MAX_PENDING_ACKS = 256

# Characters a scope's name may keep in an Idempotency-Key.
_KEY_SAFE = re.compile(r"[^A-Za-z0-9_.:-]")

# Where the connection pool, the counters and each backend's caches live; never pickled.
_STATE = "_remote_state"
_STATE_LOCK = threading.Lock()


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), or None.

    Examples
    --------
    >>> from skcarrot.backends.remote._client import retry_after_seconds
    >>> retry_after_seconds("2.5"), retry_after_seconds("Thu, 01 Jan 1970 00:00:00 GMT"), retry_after_seconds("soon")
    (2.5, 0.0, None)
    """
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_text(detail: Any) -> str:
    """A server's error detail as one line (FastAPI's lists of ``{"loc", "msg"}`` joined).

    Examples
    --------
    >>> from skcarrot.backends.remote._client import error_text
    >>> error_text([{"loc": ["body", "class_names"], "msg": "too long"}, "other"])
    'body.class_names: too long; other'
    """
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


class _Scope:
    """Deterministic ``Idempotency-Key`` values: ``<name>.<position>.<n>``."""

    def __init__(self, name: str, position: Callable[[], int] | None) -> None:
        clean = _KEY_SAFE.sub("-", str(name))
        if len(clean) > 100 or clean != str(name):
            # keep it short and printable: a digest names the scope as well
            clean = clean[:40] + "-" + hashlib.sha256(str(name).encode()).hexdigest()[:32]
        self.name = clean
        self.position = position
        self.lock = threading.Lock()
        self.last: Any = None
        self.n = 0

    def next_key(self) -> str:
        where = self.position() if self.position is not None else ""
        with self.lock:
            if self.position is None:
                n, self.n = self.n, self.n + 1
                return f"{self.name}.{n}"
            if where != self.last:
                self.last, self.n = where, 0
            n, self.n = self.n, self.n + 1
        return f"{self.name}.{where}.{n}"


def _is_conflict(detail: Any) -> bool:
    return isinstance(detail, list) and any(isinstance(d, dict) and d.get("type") == _CONFLICT for d in detail)


def _body(response: Any) -> dict:
    try:
        body = response.json()
    except ValueError:
        return {"detail": response.text[:500]}
    return body if isinstance(body, dict) else {"detail": body}


class RemoteClient(BaseEstimator):
    """Base of the remote backends: the retrying HTTP client and the secret's handling.

    A subclass has the parameters ``url``, ``timeout``, ``max_retries``,
    ``backoff``, ``max_backoff``, a secret (named by ``_secret``) and the flag
    that keeps it in pickles (named by ``_store_secret``), and says how it
    authenticates (:meth:`_auth_headers`, :meth:`_auth_hint`).

    Attributes
    ----------
    n_calls_ : int
        HTTP requests sent by this object in this process, retries included.
    n_retries_ : int
        Of which retries.
    """

    _secret = "api_key"
    _store_secret = "store_key"
    _credential = "API key"
    # Whether to name the answers received in the ``Idempotency-Ack`` header of later
    # requests (a server of this project then drops them); other servers ignore it.
    _acknowledges = False

    def __init__(
        self, url: str, *, timeout: float, max_retries: int, backoff: float, max_backoff: float
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff

    # -- what never travels: the secret (unless asked), the connection pool, the lock -----------

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop(_STATE, None)
        if not getattr(self, self._store_secret):
            state[self._secret] = None
        return state

    def __repr__(self, N_CHAR_MAX: int = 700) -> str:
        signature = inspect.signature(type(self).__init__).parameters
        shown = []
        for name, value in self.get_params(deep=False).items():
            default = signature[name].default
            if name == "url" or default is inspect.Parameter.empty or value != default:
                masked = name == self._secret and value is not None
                shown.append(f"{name}={'***' if masked else repr(value)}")
        return f"{type(self).__name__}({', '.join(shown)})"

    def _new_state(self) -> dict:
        """Per-process caches of a subclass, added to the runtime state."""
        return {}

    def _runtime(self) -> dict:
        """This process's client, lock, counters and caches (made again after a fork)."""
        state = self.__dict__.get(_STATE)
        if state is None or state["pid"] != os.getpid():
            with _STATE_LOCK:
                state = self.__dict__.get(_STATE)
                if state is None or state["pid"] != os.getpid():
                    state = {
                        "pid": os.getpid(),
                        "client": None,
                        "lock": threading.Lock(),
                        "calls": 0,
                        "retries": 0,
                        # Jitter only spreads retries in time; it never touches results or numpy's state.
                        "rng": random.Random(),
                        "scope": None,
                        "acks": {},
                        **self._new_state(),
                    }
                    self.__dict__[_STATE] = state
        return state

    @property
    def n_calls_(self) -> int:
        return self._runtime()["calls"]

    @property
    def n_retries_(self) -> int:
        return self._runtime()["retries"]

    # -- idempotency keys --------------------------------------------------------------------

    @contextlib.contextmanager
    def idempotency_scope(self, name: str, position: Callable[[], int] | None = None) -> Iterator[None]:
        """Make the ``Idempotency-Key`` of every charged request sent inside deterministic.

        Inside the scope the n-th charged request sent while ``position()`` has
        one value gets the key ``<name>.<position>.<n>`` (``<name>.<n>`` without
        ``position``), instead of a random one. A run that starts again from a
        saved state (same ``name``, ``position()`` restored) sends its requests
        with the keys it sent the first time, so a server that keeps keys
        (``skcarrot serve``) answers the repeated ones without charging them
        again. Should a repeated key come back refused because the body differs,
        the request is sent once more under a random key (and charged).

        Parameters
        ----------
        name : str
            Names the run, e.g. the fingerprint of a fit (its data and parameters).
        position : callable or None
            Where the run stands, e.g. its query count so far; part of each key.

        Examples
        --------
        >>> from skcarrot.backends import HTTPBackend
        >>> backend = HTTPBackend("http://127.0.0.1:8000", api_key="skc_example")
        >>> with backend.idempotency_scope("fit-0123", position=lambda: 40):
        ...     backend._next_key(), backend._next_key()
        ('fit-0123.40.0', 'fit-0123.40.1')
        """
        state = self._runtime()
        previous = state["scope"]
        state["scope"] = _Scope(name, position)
        try:
            yield
        finally:
            state["scope"] = previous

    def _next_key(self) -> str:
        """The ``Idempotency-Key`` of the next charged request: the scope's, or a random one."""
        scope = self._runtime()["scope"]
        return uuid.uuid4().hex if scope is None else scope.next_key()

    def _scoped(self) -> bool:
        return self._runtime()["scope"] is not None

    @contextlib.contextmanager
    def _unscoped(self) -> Iterator[None]:
        state = self._runtime()
        previous, state["scope"] = state["scope"], None
        try:
            yield
        finally:
            state["scope"] = previous

    # -- what a subclass says ---------------------------------------------------------------

    def _connection_limits(self) -> tuple[int, int]:
        """Most connections, and most kept alive, in the pool."""
        return 32, 16

    def _auth_headers(self) -> dict[str, str]:
        """Headers that authenticate a request; read at each logical request."""
        raise NotImplementedError

    def _auth_hint(self) -> str:
        """What to do when the server refuses the credentials."""
        raise NotImplementedError

    def _not_found_hint(self) -> str:
        """What to do when the server has nothing at the URL asked (404, 405).

        This default is for a client that appends paths to ``url``: ``url`` must be the
        server's base URL.
        """
        base = self.url.split("/v1/")[0].rstrip("/") if "/v1/" in self.url else None
        hint = (
            f"url must be the server's base URL, without a path (requests go to url + '/v1/...'), "
            f"got url={self.url!r}"
        )
        return hint + (f"; try url={base!r}" if base else "")

    # -- the client -------------------------------------------------------------------------

    def _http(self) -> Any:
        state = self._runtime()
        if state["client"] is None:
            with state["lock"]:
                if state["client"] is None:
                    most, alive = self._connection_limits()
                    state["client"] = Transport(self.url, self.timeout, most, alive)
        return state["client"]

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Full jitter below an exponential ceiling; at least ``Retry-After``, plus a little jitter."""
        rng = self._runtime()["rng"]
        delay = rng.uniform(0.0, min(float(self.max_backoff), float(self.backoff) * 2.0**attempt))
        if retry_after is not None:
            # Honour the server's wait, plus a little jitter so racing clients spread out.
            delay = max(delay, retry_after * (1.0 + 0.1 * rng.random()))
        return delay

    def _call(
        self,
        method: str,
        url: str,
        payload: Any = None,
        charged: bool = False,
        key: str | None = None,
        accept: str = "application/json",
    ) -> Any:
        """Send one logical request, retried as the class says; return the decoded body.

        ``charged``: the request carries an ``Idempotency-Key`` (``key``, or the
        next of :meth:`_next_key`), the same on every retry, so a server charges
        it at most once. ``accept``: the ``Accept`` header; an answer in
        :data:`~skcarrot.wire.RAW_MEDIA_TYPE` is decoded as a dict whose
        ``logits`` is an array, any other as JSON.
        """
        client = self._http()
        state = self._runtime()
        headers = {"Accept": accept, **self._auth_headers()}
        scoped = False
        acks: list[str] = []
        if charged:
            scoped = self._scoped()
            key = key or self._next_key()
            headers["Idempotency-Key"] = key
            if self._acknowledges:
                with state["lock"]:
                    acks = list(state["acks"])[:64]
                if acks:
                    headers["Idempotency-Ack"] = ",".join(acks)
        content = None
        if payload is not None:
            content = json.dumps(payload, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
        where = f"{method} {url}"
        attempts = int(self.max_retries) + 1
        last, answered = "", False
        for attempt in range(attempts):
            with state["lock"]:
                state["calls"] += 1
                state["retries"] += attempt > 0
            retry_after = None
            try:
                response = client.request(method, url, content=content, headers=headers)
            except TransportError as exc:  # connection errors and timeouts
                last, answered = f"{type(exc).__name__}: {exc}", False
            else:
                status = response.status_code
                if status < 400:
                    body = self._decoded(response, where)
                    if self._acknowledges and charged:
                        with state["lock"]:
                            for sent in acks:
                                state["acks"].pop(sent, None)
                            state["acks"][key] = None
                            while len(state["acks"]) > _MAX_PENDING_ACKS:
                                state["acks"].pop(next(iter(state["acks"])))
                    return body
                body = _body(response)
                if status == 422 and scoped and _is_conflict(body.get("detail")):
                    # a resumed run whose request differs from the first time: send it as a new one
                    logger.warning("%s: a repeated Idempotency-Key came with another body; sending it anew", where)
                    with self._unscoped():
                        return self._call(method, url, payload, charged=True, key=uuid.uuid4().hex, accept=accept)
                if status not in RETRY_STATUSES or (status == 500 and body.get("retryable") is False):
                    self._raise(status, body, where)
                last, answered = f"HTTP {status}: {error_text(body.get('detail', body))}", True
                retry_after = retry_after_seconds(response.headers.get("Retry-After"))
            if attempt + 1 < attempts:
                wait = self._delay(attempt, retry_after)
                logger.warning("%s failed (%s); retry %d of %d in %.2f s", where, last, attempt + 1, attempts - 1, wait)
                time.sleep(wait)
        hint = (
            "The server answered but kept refusing for now"
            if answered
            else "Is the server running?"
        )
        raise RemoteUnavailableError(
            f"{where} failed after {attempts} attempt(s); last: {last}. {hint} "
            "Raise max_retries or timeout to wait longer",
            status_code=None,
        )

    @classmethod
    def _decoded(cls, response: Any, where: str) -> Any:
        """The body of a successful answer: raw logits (see :func:`~skcarrot.wire.decode_raw`), or JSON."""
        if response.headers.get("content-type", "").split(";")[0].strip().lower() == RAW_MEDIA_TYPE:
            try:
                return decode_raw(response.content, "logits")
            except WireFormatError as exc:
                raise RemoteProtocolError(f"{where} answered with a malformed {RAW_MEDIA_TYPE} body: {exc}",
                                          response.status_code) from exc
        return cls._json(response, where)

    @staticmethod
    def _json(response: Any, where: str) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise RemoteProtocolError(
                f"{where} answered with invalid JSON: {response.text[:200]!r}", response.status_code
            ) from exc

    def _raise(self, status: int, body: dict, where: str) -> None:
        """The exception of a status not worth retrying."""
        detail = body.get("detail", body)
        text = error_text(detail)
        if status in (401, 403):
            raise RemoteAuthenticationError(
                f"{where}: the server refused the {self._credential} ({status}): {text}; {self._auth_hint()}",
                status_code=status,
                detail=detail,
            )
        if status == 402:
            raise RemoteBudgetExceededError(
                f"{where}: the server's query budget for this {self._credential} is exhausted: {text}",
                status_code=status,
                detail=detail,
                remaining=body.get("remaining"),
            )
        if status in (404, 405):
            hint = self._not_found_hint()
            raise RemoteValidationError(f"{where}: the server refused the request ({status}): {text}; {hint}", status, detail)
        if 400 <= status < 500:
            raise RemoteValidationError(f"{where}: the server refused the request ({status}): {text}", status, detail)
        raise RemoteBackendError(f"{where}: HTTP {status}: {text}", status, detail)
