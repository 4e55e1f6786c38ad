"""The remote backends' transport: urllib3's pooled HTTP/1.1 connections, kept alive.

:class:`Transport` has the one method :class:`~skcarrot.backends.remote._client.RemoteClient`
uses, ``request(method, url, content=, headers=)``, and answers :class:`Response` objects
(``status_code``, ``headers``, ``content``, ``text``, ``json()``); its transport errors are
:class:`TransportError`. Under it, one ``urllib3.PoolManager`` (or ``ProxyManager`` when the
environment names a proxy for the URL) keeps connections alive across requests and threads,
with urllib3's own retries and redirects off: the retrying client decides what is retried.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from typing import Any
from urllib.parse import urlsplit

__all__ = ["Response", "Transport", "TransportError"]

# Headers every request carries unless the caller sets them.
_DEFAULT_HEADERS = {"accept": "*/*", "user-agent": "skcarrot"}


class TransportError(ConnectionError):
    """No answer: the connection failed, broke, or timed out."""


class Response:
    """An answer, read in full.

    Examples
    --------
    >>> from skcarrot.backends.remote._transport import Response
    >>> r = Response(200, {"Content-Type": "application/json"}, b'{"a": 1}')
    >>> r.status_code, r.headers["content-type"], r.json(), r.text
    (200, 'application/json', {'a': 1}, '{"a": 1}')
    """

    __slots__ = ("status_code", "headers", "content")

    def __init__(self, status_code: int, headers: Any, content: bytes) -> None:
        import urllib3

        self.status_code = int(status_code)
        self.headers = headers if isinstance(headers, urllib3.HTTPHeaderDict) else urllib3.HTTPHeaderDict(headers)
        self.content = content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


class Transport:
    """Pooled, kept-alive HTTP(S) requests through urllib3; thread-safe.

    Parameters
    ----------
    url : str
        The server's URL (its scheme and host choose a proxy from the environment, if any).
    timeout : float or None
        Seconds for connecting, and for each read.
    max_connections : int
        Requests at once (more wait for one to finish).
    max_keepalive : int
        Connections kept alive per server.

    Examples
    --------
    >>> from skcarrot.backends.remote._transport import Transport
    >>> type(Transport("http://127.0.0.1:8000", 10).pool).__name__
    'PoolManager'
    """

    def __init__(self, url: str, timeout: float | None, max_connections: int = 32, max_keepalive: int = 16) -> None:
        import urllib3

        self.timeout = urllib3.Timeout(connect=timeout, read=timeout)
        self._turns = threading.BoundedSemaphore(max(1, int(max_connections)))
        options = dict(num_pools=4, maxsize=max(1, int(max_keepalive)), block=False, retries=False,
                       timeout=self.timeout)
        host = urlsplit(url).hostname or ""
        proxies = urllib.request.getproxies()
        proxy = proxies.get(urlsplit(url).scheme) or proxies.get("all")
        if proxy and not urllib.request.proxy_bypass(host):
            self.pool = urllib3.ProxyManager(proxy, **options)
        else:
            self.pool = urllib3.PoolManager(**options)

    def request(self, method: str, url: str, content: bytes | None = None,
                headers: dict[str, str] | None = None) -> Response:
        """Send one request and read its whole answer; :class:`TransportError` when none came."""
        import urllib3

        merged = dict(_DEFAULT_HEADERS)
        if headers:
            merged.update({k.lower(): v for k, v in headers.items()})
        with self._turns:
            try:
                r = self.pool.request(method, url, body=content, headers=merged, retries=False, redirect=False,
                                      preload_content=True)
            except urllib3.exceptions.HTTPError as exc:
                raise TransportError(f"{type(exc).__name__}: {exc}") from exc
        return Response(r.status, r.headers, r.data)

    def close(self) -> None:
        self.pool.clear()
