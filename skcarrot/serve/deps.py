"""Dependencies shared by the routers: the server's parts and the calling key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import ApiError, invalid
from .ledger import KeyRecord, Ledger
from .metrics import Metrics
from .model import ModelService
from .settings import Settings

__all__ = ["Server", "get_server", "current_key", "idempotency_key"]


@dataclass
class Server:
    """Everything one application holds: settings, ledger, model, metrics."""

    settings: Settings
    ledger: Ledger
    model: ModelService
    metrics: Metrics


def get_server(request: Request) -> Server:
    return request.app.state.server


_bearer = HTTPBearer(auto_error=False, description="API key from `skcarrot keys create`, as a Bearer token")


def current_key(
    server: Annotated[Server, Depends(get_server)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> KeyRecord:
    """The calling key's record; 401 for a missing, unknown or revoked key.

    The key is read from the ``Authorization`` header only, never from the URL,
    and never logged.
    """
    if credentials is None:
        raise ApiError(
            401,
            "missing API key: send the header 'Authorization: Bearer <key>' (keys come from "
            "'skcarrot keys create'; never put a key in the URL)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    record = server.ledger.authenticate(credentials.credentials)
    if record is None:
        raise ApiError(401, "unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"})
    return record


def idempotency_key(
    value: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="Any unique string per logical request (e.g. a UUID); a retry with the same key "
            "is answered from the ledger and charged once",
        ),
    ] = None,
) -> str | None:
    """The ``Idempotency-Key`` header: 1-200 printable ASCII characters, or absent."""
    if value is None:
        return None
    if not 1 <= len(value) <= 200 or not value.isascii() or not value.isprintable():
        raise invalid(("header", "Idempotency-Key"), "must be 1 to 200 printable ASCII characters (a UUID is ideal)")
    return value
