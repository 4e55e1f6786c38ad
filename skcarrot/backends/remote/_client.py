"""One retrying HTTP client under every remote backend.

:class:`RemoteClient` is the base of :class:`~skcarrot.backends.HTTPBackend`
and :class:`~skcarrot.backends.ZeroShotHTTPBackend`. It holds what they share:
an ``httpx`` client built on first use (and built again in a forked child, whose
parent's connections it must not reuse), retries of connection errors, timeouts,
429 and 5xx answers with exponential backoff and full jitter (never shorter
than the server's ``Retry-After``, in seconds or as an HTTP date), other 4xx
raised at once, one exception family (:class:`~skcarrot.exceptions.RemoteBackendError`
and its subclasses), and the handling of the secret parameter: masked in the
repr, dropped from pickles unless asked.
"""

from __future__ import annotations

import email.utils
import inspect
import json
import logging
import os
import random
import threading
import time
import uuid
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

__all__ = ["RETRY_STATUSES", "RemoteClient", "error_text", "retry_after_seconds"]

logger = logging.getLogger("skcarrot")

#: Statuses worth retrying: the server was busy, loading, restarting or rate limiting.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})

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

    # -- the client -------------------------------------------------------------------------

    def _http(self) -> Any:
        state = self._runtime()
        if state["client"] is None:
            with state["lock"]:
                if state["client"] is None:
                    try:
                        import httpx
                    except ImportError as exc:  # pragma: no cover - depends on the install
                        raise ImportError(
                            f"{type(self).__name__} needs httpx: pip install httpx (or 'skcarrot[serve]')"
                        ) from exc
                    most, alive = self._connection_limits()
                    state["client"] = httpx.Client(
                        timeout=self.timeout, limits=httpx.Limits(max_connections=most, max_keepalive_connections=alive)
                    )
        return state["client"]

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Full jitter below an exponential ceiling; at least ``Retry-After``, plus a little jitter."""
        rng = self._runtime()["rng"]
        delay = rng.uniform(0.0, min(float(self.max_backoff), float(self.backoff) * 2.0**attempt))
        if retry_after is not None:
            # Honour the server's wait, plus a little jitter so racing clients spread out.
            delay = max(delay, retry_after * (1.0 + 0.1 * rng.random()))
        return delay

    def _call(self, method: str, url: str, payload: Any = None, charged: bool = False) -> Any:
        """Send one logical request, retried as the class says; return the decoded JSON body.

        ``charged``: the request carries an ``Idempotency-Key``, the same on
        every retry, so a server charges it at most once.
        """
        import httpx

        client = self._http()
        state = self._runtime()
        headers = {"Accept": "application/json", **self._auth_headers()}
        if charged:
            headers["Idempotency-Key"] = uuid.uuid4().hex
        content = None
        if payload is not None:
            content = json.dumps(payload, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
        where = f"{method} {url}"
        attempts = int(self.max_retries) + 1
        last = ""
        for attempt in range(attempts):
            with state["lock"]:
                state["calls"] += 1
                state["retries"] += attempt > 0
            retry_after = None
            try:
                response = client.request(method, url, content=content, headers=headers)
            except httpx.TransportError as exc:  # connection errors and timeouts
                last = f"{type(exc).__name__}: {exc}"
            else:
                status = response.status_code
                if status < 400:
                    return self._json(response, where)
                body = _body(response)
                if status not in RETRY_STATUSES:
                    self._raise(status, body, where)
                last = f"HTTP {status}: {error_text(body.get('detail', body))}"
                retry_after = retry_after_seconds(response.headers.get("Retry-After"))
            if attempt + 1 < attempts:
                wait = self._delay(attempt, retry_after)
                logger.warning("%s failed (%s); retry %d of %d in %.2f s", where, last, attempt + 1, attempts - 1, wait)
                time.sleep(wait)
        raise RemoteUnavailableError(
            f"{where} failed after {attempts} attempt(s); last: {last}. Is the server running? "
            "Raise max_retries or timeout to wait longer",
            status_code=None,
        )

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
        if 400 <= status < 500:
            raise RemoteValidationError(f"{where}: the server refused the request ({status}): {text}", status, detail)
        raise RemoteBackendError(f"{where}: HTTP {status}: {text}", status, detail)
