"""Softmax, log-softmax and logsumexp over the last axis, in numpy: written once, used everywhere."""

from __future__ import annotations

import numpy as np

__all__ = ["log_softmax", "logsumexp", "softmax"]


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax over the last axis, stable for large logits.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot._util.math import softmax
    >>> softmax(np.array([[0.0, 0.0], [1000.0, 0.0]])).round(3)
    array([[0.5, 0.5],
           [1. , 0. ]])
    """
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(z: np.ndarray) -> np.ndarray:
    """Log-softmax over the last axis, stable for large logits.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot._util.math import log_softmax
    >>> np.exp(log_softmax(np.array([[0.0, 0.0], [1000.0, 0.0]]))).round(3)
    array([[0.5, 0.5],
           [1. , 0. ]])
    """
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def logsumexp(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """``log(sum(exp(z)))`` along ``axis`` (which is dropped), stable for large values.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot._util.math import logsumexp
    >>> float(logsumexp(np.array([1000.0, 1000.0])) - 1000.0).__round__(4)
    0.6931
    """
    m = z.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=axis, keepdims=True))).squeeze(axis)
