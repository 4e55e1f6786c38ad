"""Exceptions raised by skcarrot."""

from __future__ import annotations

__all__ = [
    "QueryBudgetExceededError",
    "WeightsUnavailableError",
    "RemoteBackendError",
    "RemoteValidationError",
    "RemoteAuthenticationError",
    "RemoteUnavailableError",
    "RemoteBudgetExceededError",
    "RemoteProtocolError",
]


class QueryBudgetExceededError(RuntimeError):
    """A call to the black box would spend more queries than the budget allows.

    The call is refused before it reaches the model, so nothing is spent.

    Examples
    --------
    >>> from skcarrot.exceptions import QueryBudgetExceededError
    >>> issubclass(QueryBudgetExceededError, RuntimeError)
    True
    """


class WeightsUnavailableError(OSError):
    """Pretrained weights could not be obtained (for example, no network).

    Examples
    --------
    >>> from skcarrot.exceptions import WeightsUnavailableError
    >>> issubclass(WeightsUnavailableError, OSError)
    True
    """


class RemoteBackendError(RuntimeError):
    """A model server refused a request or could not be reached.

    Raised by the remote backends, :class:`skcarrot.backends.HTTPBackend` and
    :class:`skcarrot.backends.ZeroShotHTTPBackend`, always as one of the
    subclasses below but for an unexpected status. ``status_code`` is the HTTP
    status (None when the server never answered) and ``detail`` the server's
    explanation.

    Examples
    --------
    >>> from skcarrot.exceptions import RemoteBackendError
    >>> RemoteBackendError("refused", status_code=404).status_code
    404
    """

    def __init__(self, message: str, status_code: int | None = None, detail=None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.detail = detail


class RemoteValidationError(RemoteBackendError, ValueError):
    """The server found the request invalid (a 4xx other than 401, 402, 403, 429); retrying would not help.

    Examples
    --------
    >>> from skcarrot.exceptions import RemoteValidationError
    >>> issubclass(RemoteValidationError, ValueError)
    True
    """


class RemoteAuthenticationError(RemoteBackendError, PermissionError):
    """The server refused the API key or token (401 or 403), or no key was given.

    Examples
    --------
    >>> from skcarrot.exceptions import RemoteAuthenticationError
    >>> issubclass(RemoteAuthenticationError, PermissionError)
    True
    """


class RemoteUnavailableError(RemoteBackendError, ConnectionError):
    """The server could not be reached, or kept failing, after every retry.

    Examples
    --------
    >>> from skcarrot.exceptions import RemoteUnavailableError
    >>> issubclass(RemoteUnavailableError, ConnectionError)
    True
    """


class RemoteBudgetExceededError(QueryBudgetExceededError, RemoteBackendError):
    """The server's ledger has no budget left for this key (402); nothing was charged.

    ``remaining`` is the key's budget left, as the server reported it.

    Examples
    --------
    >>> from skcarrot.exceptions import QueryBudgetExceededError, RemoteBudgetExceededError
    >>> issubclass(RemoteBudgetExceededError, QueryBudgetExceededError)
    True
    """

    def __init__(self, message: str, status_code: int | None = 402, detail=None, remaining: int | None = None) -> None:
        super().__init__(message, status_code=status_code, detail=detail)
        self.remaining = remaining


class RemoteProtocolError(RemoteBackendError, ValueError):
    """The server answered, but not in the form the protocol asks (invalid JSON, a missing score).

    Examples
    --------
    >>> from skcarrot.exceptions import RemoteProtocolError
    >>> issubclass(RemoteProtocolError, ValueError)
    True
    """
