"""Exceptions raised by skcarrot."""

__all__ = ["QueryBudgetExceededError", "WeightsUnavailableError"]


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
