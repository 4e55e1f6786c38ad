"""Refusals: one exception type, one JSON shape, a 4xx that names the field."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["ApiError", "invalid"]


class ApiError(Exception):
    """A refusal with an HTTP status, a message and extra JSON fields.

    Parameters
    ----------
    status_code : int
    detail : str or list of dict
        A message, or FastAPI's validation shape ``[{"loc": [...], "msg": ..., "type": ...}]``.
    headers : dict or None
    **extra
        More fields of the JSON body (e.g. ``remaining``).
    """

    def __init__(self, status_code: int, detail: Any, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail if isinstance(detail, str) else repr(detail))
        self.status_code = status_code
        self.detail = detail
        self.headers = headers
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"detail": self.detail, **self.extra}


def invalid(loc: tuple | list, msg: str, kind: str = "value_error") -> ApiError:
    """A 422 in FastAPI's own validation shape, naming the field at ``loc``.

    Examples
    --------
    >>> from skcarrot.serve.errors import invalid
    >>> invalid(("body", "offsets"), "contains NaN").body()
    {'detail': [{'loc': ['body', 'offsets'], 'msg': 'contains NaN', 'type': 'value_error'}]}
    """
    return ApiError(422, [{"loc": list(loc), "msg": msg, "type": kind}])


def retry_after_header(seconds: float) -> dict[str, str]:
    """``Retry-After`` in whole seconds, at least 1."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}
