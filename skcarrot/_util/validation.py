"""Checks shared by every estimator and every backend: one home for each.

- training sets: :func:`check_images_and_labels`, :func:`resolve_class_names`;
- what crosses the door: :func:`check_offsets`, :func:`check_logits` (a backend's members are
  checked in :mod:`skcarrot.backends._base`);
- :func:`softmax` (:func:`skcarrot._util.math.softmax`) is re-exported.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
from sklearn.utils import column_or_1d
from sklearn.utils.multiclass import check_classification_targets

from .math import softmax
from ..images import to_pil_images

__all__ = [
    "check_images_and_labels",
    "check_logits",
    "check_offsets",
    "resolve_class_names",
    "softmax",
]

#: Largest magnitude a logit may have: the refiner and the losses work in float32.
LOGIT_LIMIT = float(np.finfo(np.float32).max) / 16


def check_images_and_labels(X, y, image_range=None) -> tuple[list, np.ndarray, np.ndarray]:
    """Validate a training set: images, classes and class indices (shared by every estimator).

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot._util.validation import check_images_and_labels
    >>> images, classes, y_idx = check_images_and_labels(np.zeros((3, 4, 4), np.uint8), ["b", "a", "b"])
    >>> len(images), [str(c) for c in classes], [int(i) for i in y_idx]
    (3, ['a', 'b'], [1, 0, 1])
    """
    images = to_pil_images(X, image_range)
    y = column_or_1d(y, warn=True)
    if len(images) != len(y):
        raise ValueError(f"X has {len(images)} images but y has {len(y)} labels")
    check_classification_targets(y)
    classes, y_idx = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(
            f"the training data contains only one class ({classes[0]!r}); a classifier needs at least two"
        )
    return images, classes, y_idx


def _names_for(names, classes: np.ndarray) -> list[str]:
    if names is None:
        return [str(c) for c in classes]
    if isinstance(names, Mapping):
        missing = [c.item() if isinstance(c, np.generic) else c for c in classes if c not in names]
        if missing:
            raise ValueError(f"class_names has no name for label(s) {missing[:5]}")
        return [str(names[c]) for c in classes]
    names = list(names)
    is_int = np.issubdtype(np.asarray(classes).dtype, np.integer)
    if is_int and classes.min() >= 0 and classes.max() < len(names):
        return [str(names[int(c)]) for c in classes]
    if len(names) == len(classes):
        return [str(n) for n in names]
    raise ValueError(
        f"class_names has {len(names)} names but y has {len(classes)} classes "
        f"({list(classes[:5])}...); pass a mapping label -> name, or one name per class"
    )


def resolve_class_names(names, classes: np.ndarray) -> list[str]:
    """The prompt name of each class: from a mapping, a sequence, or ``str(label)``.

    Two classes may not share a name: they would get the same prompt and the
    model could never tell them apart.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot._util.validation import resolve_class_names
    >>> resolve_class_names(["zero", "one"], np.array([0, 1]))
    ['zero', 'one']
    >>> resolve_class_names({0: "cat", 1: "cat"}, np.array([0, 1]))
    Traceback (most recent call last):
    ...
    ValueError: class_names gives the same name to different classes: 'cat' for labels [0, 1]; ...
    """
    resolved = _names_for(names, classes)
    counts = Counter(n.strip().lower() for n in resolved)
    clashes = [n for n, k in counts.items() if k > 1]
    if clashes:
        name = clashes[0]
        labels = [c.item() if isinstance(c, np.generic) else c
                  for c, n in zip(classes, resolved) if n.strip().lower() == name]
        raise ValueError(
            f"class_names gives the same name to different classes: {name!r} for labels {labels}; "
            "every class needs its own name in the prompt"
        )
    return resolved


def check_offsets(offsets: Any, context_shape: tuple[int, int]) -> np.ndarray:
    """Prompt offsets as a fresh float32 array ``(P, n_ctx, dim)``, finite.

    The result is always a copy, so a backend that writes into what it is
    given can not change the caller's prompt.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot._util.validation import check_offsets
    >>> check_offsets(np.zeros((2, 1, 3)), (1, 3)).shape
    (2, 1, 3)
    >>> check_offsets(np.zeros((1, 3)), (1, 3))
    Traceback (most recent call last):
    ...
    ValueError: offsets must have shape (P, 1, 3), got (1, 3)
    """
    out = np.array(offsets, dtype=np.float32, copy=True)
    n_ctx, dim = context_shape
    if out.ndim != 3 or out.shape[1:] != (n_ctx, dim):
        raise ValueError(f"offsets must have shape (P, {n_ctx}, {dim}), got {out.shape}")
    finite = np.isfinite(out)
    if not finite.all():
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise ValueError(
            f"offsets contain {int((~finite).sum())} NaN or infinite values of {out.size}, the first at index "
            f"{first} (prompt {first[0]}); every offset must be finite"
        )
    return out


def check_logits(logits: Any, expected: tuple[int, int, int], backend: Any) -> np.ndarray:
    """The backend's answer as float64 ``(P, N, C)``: right shape, finite, within float32's range.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot._util.validation import check_logits
    >>> check_logits(np.zeros((1, 2, 3)), (1, 2, 3), object()).shape
    (1, 2, 3)
    >>> check_logits(np.full((1, 1, 2), np.nan), (1, 1, 2), object())
    Traceback (most recent call last):
    ...
    ValueError: backend object returned non-finite logits (2 NaN or infinite values of 2); ...
    """
    name = type(backend).__name__
    try:
        out = np.asarray(logits, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"backend {name} returned logits that are not a numeric array ({exc})") from exc
    if out.shape != tuple(expected):
        raise ValueError(
            f"backend {name}.logits returned shape {out.shape}, expected {tuple(expected)} (prompts, images, classes)"
        )
    finite = np.isfinite(out)
    if not finite.all():
        raise ValueError(
            f"backend {name} returned non-finite logits ({int((~finite).sum())} NaN or infinite values of "
            f"{out.size}); the model's answer can not be used"
        )
    if out.size and np.abs(out).max() > LOGIT_LIMIT:
        raise ValueError(
            f"backend {name} returned logits beyond float32's range (largest magnitude {np.abs(out).max():.3g}); "
            "the refiner works in float32, rescale the model's logits"
        )
    return out
