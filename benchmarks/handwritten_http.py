"""The hand-written HTTP/1.1 client the remote backends once had, kept for comparison only.

``http_vs_in_process.py --handwritten`` measures a fit with it in place of urllib3, side by side.
The package itself speaks HTTP through urllib3 (``skcarrot.backends.remote._transport``).

A lean HTTP/1.1 client for plain ``http://`` servers: kept-alive sockets, the standard library's parser.

:class:`PlainClient` has the one method :class:`~skcarrot.backends.remote._client.RemoteClient`
uses of an ``httpx.Client``, ``request(method, url, content=, headers=)``, answers
``httpx.Response`` objects and raises ``httpx`` transport errors, so the retrying client
treats both alike. Each request is written in one ``send`` (request line, headers and
body) on a socket without Nagle's delay, and read with :class:`http.client.HTTPResponse`;
sockets are kept alive and reused, a socket the server closed while idle is dropped
before use. It does a fraction of ``httpx``'s work per request, which counts when a fit
sends hundreds of small ones. ``https`` URLs and proxies stay with ``httpx`` (see
:func:`plain_client_for`).
"""

from __future__ import annotations

import http.client
import select
import socket
import threading
import urllib.request
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

__all__ = ["PlainClient", "plain_client_for"]

# Headers every request carries unless the caller sets them (those httpx would send, less compression).
_DEFAULT_HEADERS = {"accept": "*/*", "connection": "keep-alive", "user-agent": "skcarrot"}


def plain_client_for(
    url: str, timeout: float | None, max_connections: int = 32, max_keepalive: int = 16
) -> PlainClient | None:
    """A :class:`PlainClient` for ``url``, or None where ``httpx`` must do (``https``, a proxy to go through).

    Examples
    --------
    >>> from skcarrot.backends.remote._plain import plain_client_for
    >>> plain_client_for("https://example.org", 10) is None, type(plain_client_for("http://127.0.0.1:8000", 10))
    (True, <class 'skcarrot.backends.remote._plain.PlainClient'>)
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        return None
    proxies = urllib.request.getproxies()
    if ("http" in proxies or "all" in proxies) and not urllib.request.proxy_bypass(parts.hostname):
        return None
    return PlainClient(timeout, max_connections, max_keepalive)


def _alive(sock: socket.socket) -> bool:
    """An idle kept-alive socket is readable only when the server closed it (or broke the protocol)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


class PlainClient:
    """Send HTTP/1.1 requests to plain ``http://`` URLs over kept-alive sockets; thread-safe.

    Parameters
    ----------
    timeout : float or None
        Seconds for connecting, and for each send and receive.
    max_connections : int
        Requests at once (more wait for one to finish).
    max_keepalive : int
        Idle sockets kept per server.
    """

    def __init__(self, timeout: float | None, max_connections: int = 32, max_keepalive: int = 16) -> None:
        self.timeout = timeout
        self.max_keepalive = int(max_keepalive)
        self._idle: dict[tuple[str, int], list[socket.socket]] = {}
        self._lock = threading.Lock()
        self._turns = threading.BoundedSemaphore(max(1, int(max_connections)))

    # -- sockets ---------------------------------------------------------------------------

    def _connect(self, host: str, port: int) -> socket.socket:
        import httpx

        try:
            sock = socket.create_connection((host, port), timeout=self.timeout)
        except socket.timeout as exc:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from exc
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _take(self, server: tuple[str, int]) -> tuple[socket.socket, bool]:
        """A kept-alive socket to ``server`` and True, or a new one and False."""
        with self._lock:
            idle = self._idle.get(server)
            while idle:
                sock = idle.pop()
                if _alive(sock):
                    return sock, True
                sock.close()
        return self._connect(*server), False

    def _keep(self, server: tuple[str, int], sock: socket.socket) -> None:
        with self._lock:
            idle = self._idle.setdefault(server, [])
            if len(idle) < self.max_keepalive:
                idle.append(sock)
                return
        sock.close()

    def close(self) -> None:
        """Close every idle socket."""
        with self._lock:
            idle, self._idle = self._idle, {}
        for socks in idle.values():
            for sock in socks:
                sock.close()

    # -- requests --------------------------------------------------------------------------

    def request(
        self, method: str, url: str, content: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> Any:
        """Send one request; its ``httpx.Response`` (body read), or an ``httpx.TransportError``."""
        import httpx

        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port or 80
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        fields = {**_DEFAULT_HEADERS, **{k.lower(): v for k, v in (headers or {}).items()}}
        fields["host"] = parts.netloc.rpartition("@")[2]
        body = content or b""
        if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
            fields["content-length"] = str(len(body))
        head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n"
        message = head.encode("latin-1") + body
        server = (host, port)
        with self._turns:
            sock, reused = self._take(server)
            try:
                return self._exchange(sock, server, method, message, url)
            except (httpx.WriteError, httpx.RemoteProtocolError):
                if not reused:
                    raise
                # The server closed a kept-alive socket as it was taken: once more, on a new one.
                return self._exchange(self._connect(*server), server, method, message, url)

    def _exchange(self, sock: socket.socket, server: tuple[str, int], method: str, message: bytes, url: str) -> Any:
        import httpx

        keep = False
        try:
            try:
                sock.settimeout(self.timeout)
                sock.sendall(message)
            except socket.timeout as exc:
                raise httpx.WriteTimeout(f"sending to {url} timed out") from exc
            except OSError as exc:
                raise httpx.WriteError(f"sending to {url} failed: {exc}") from exc
            answer = http.client.HTTPResponse(sock, method=method)
            try:
                answer.begin()
                data = answer.read()
            except socket.timeout as exc:
                raise httpx.ReadTimeout(f"no answer from {url} in time") from exc
            except http.client.HTTPException as exc:
                raise httpx.RemoteProtocolError(f"{url} broke the protocol: {type(exc).__name__}: {exc}") from exc
            except OSError as exc:
                raise httpx.ReadError(f"reading from {url} failed: {exc}") from exc
            finally:
                answer.close()
            keep = not answer.will_close
            return httpx.Response(
                answer.status, headers=answer.getheaders(), content=data,
                request=httpx.Request(method, url),
            )
        finally:
            if keep:
                self._keep(server, sock)
            else:
                sock.close()
