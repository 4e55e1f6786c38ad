"""Refuse requests over the size limits before anything parses them: bodies (413), headers (431)."""

from __future__ import annotations

import json

__all__ = ["BodyLimitMiddleware", "HeaderLimitMiddleware"]


async def _refuse_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})


class HeaderLimitMiddleware:
    """ASGI middleware: 431 when the request's header names and values take more than ``max_bytes``.

    ``skcarrot serve`` also bounds what its HTTP parser buffers for a request
    head, so an oversized one is dropped before it is ever held whole.
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            size = sum(len(name) + len(value) for name, value in scope.get("headers", []))
            size += len(scope.get("query_string", b"")) + len(scope.get("raw_path", b"") or b"")
            if size > self.max_bytes:
                await _refuse_json(send, 431, {
                    "detail": f"request headers of {size} bytes are larger than the {self.max_bytes} allowed",
                    "max_header_bytes": self.max_bytes,
                })
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """ASGI middleware: 413 for a body over ``max_bytes``, declared or streamed."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)

    async def _refuse(self, send, size: str) -> None:
        body = json.dumps(
            {
                "detail": f"request body of {size} bytes is larger than the {self.max_bytes} allowed; "
                "send fewer images or prompts per request",
                "max_body_bytes": self.max_bytes,
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = None
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
                break
        if declared is not None and declared > self.max_bytes:
            await self._refuse(send, str(declared))
            return
        if declared is not None:
            await self.app(scope, receive, send)
            return
        # No declared length (chunked): read up to the limit, then hand the body on.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send, f"more than {self.max_bytes}")
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
