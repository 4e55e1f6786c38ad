"""The door: the only way the estimator talks to a vision-language model.

A black-box model accepts images, class names and prompt offsets and returns
logits. Nothing else crosses: no features, no embeddings, no gradients.
Every prompt scored is one *query*; :class:`QueryCounter` counts them and
refuses, before the model is reached, any call that would overspend.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .._validation import check_backend, check_logits, check_offsets
from ..exceptions import QueryBudgetExceededError

__all__ = ["BlackBoxVLM", "QueryCounter"]


@runtime_checkable
class BlackBoxVLM(Protocol):
    """What a black-box vision-language model must offer: two members.

    Attributes
    ----------
    context_shape : tuple of (int, int)
        ``(n_ctx, dim)``: shape of the prompt offsets the model accepts. Inside
        the model they are added to the token embeddings of the prompt
        template's context words; a zero offset is the hand-written prompt.

    Methods
    -------
    logits(images, class_names, offsets)
        Score every image against every class name under each prompt. ``images``
        is a sequence of RGB :class:`PIL.Image.Image`, ``class_names`` a sequence
        of str and ``offsets`` a float array ``(P, n_ctx, dim)``. Returns an
        array ``(P, n_images, n_classes)``. Each of the ``P`` prompts is one query.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot.backends import BlackBoxVLM
    >>> class Constant:
    ...     context_shape = (1, 2)
    ...     def logits(self, images, class_names, offsets):
    ...         return np.zeros((len(offsets), len(images), len(class_names)))
    >>> isinstance(Constant(), BlackBoxVLM)
    True
    """

    context_shape: tuple[int, int]

    def logits(
        self, images: Sequence[Any], class_names: Sequence[str], offsets: np.ndarray
    ) -> np.ndarray:
        ...  # pragma: no cover


def context_shape_of(backend: Any) -> tuple[int, int]:
    """Read and validate ``backend.context_shape``."""
    try:
        shape = backend.context_shape
    except AttributeError as exc:
        raise TypeError(
            f"backend {type(backend).__name__} has no 'context_shape'; a black-box "
            "model needs 'context_shape' (n_ctx, dim) and 'logits(images, class_names, offsets)'"
        ) from exc
    try:
        n_ctx, dim = (int(v) for v in shape)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"backend.context_shape must be a pair of ints (n_ctx, dim), got {shape!r}"
        ) from exc
    if n_ctx < 1 or dim < 1:
        raise ValueError(f"backend.context_shape must be positive, got {(n_ctx, dim)}")
    return n_ctx, dim


class QueryCounter:
    """Wrap a black-box model, count every prompt it scores, enforce a budget.

    Parameters
    ----------
    backend : BlackBoxVLM
        The model behind the door.
    budget : int or None
        Most queries allowed in total; ``None`` means unlimited.

    Attributes
    ----------
    n_queries : int
        Queries spent so far: one per prompt scored.
    n_images_scored : int
        Images sent so far, summed over calls: one image forward pass each for a
        model that encodes every image it receives once per call.
    by_purpose : dict of str to int
        Queries, split by the ``purpose`` given to each call.
    images_by_purpose : dict of str to int
        Images scored, split the same way.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot.backends import QueryCounter
    >>> class Constant:
    ...     context_shape = (1, 2)
    ...     def logits(self, images, class_names, offsets):
    ...         return np.zeros((len(offsets), len(images), len(class_names)))
    >>> box = QueryCounter(Constant(), budget=3)
    >>> box.logits(["img"], ["cat", "dog"], np.zeros((2, 1, 2)), purpose="prompt").shape
    (2, 1, 2)
    >>> box.n_queries, box.n_images_scored, box.remaining
    (2, 1, 1)
    """

    def __init__(self, backend: Any, budget: int | None = None) -> None:
        self.backend = check_backend(backend)
        self.budget = budget
        self.context_shape = context_shape_of(backend)
        self.n_queries = 0
        self.n_images_scored = 0
        self.by_purpose: dict[str, int] = {}
        self.images_by_purpose: dict[str, int] = {}

    @property
    def remaining(self) -> int | None:
        """Queries left, or ``None`` when unlimited."""
        return None if self.budget is None else self.budget - self.n_queries

    def logits(
        self,
        images: Sequence[Any],
        class_names: Sequence[str],
        offsets: np.ndarray,
        purpose: str = "other",
    ) -> np.ndarray:
        """Score ``images`` x ``class_names`` under each prompt in ``offsets``.

        Parameters
        ----------
        images : sequence of PIL.Image.Image
            Images, scored in one call.
        class_names : sequence of str
            Class names, in column order of the result.
        offsets : ndarray of shape (P, n_ctx, dim)
            One prompt offset per query.
        purpose : str, default="other"
            Label for the accounting in :attr:`by_purpose`.

        Returns
        -------
        logits : ndarray of shape (P, n_images, n_classes)
            Float64 logits as returned by the model.

        Raises
        ------
        QueryBudgetExceededError
            If the call would spend more than the remaining budget; the model is
            not called.
        """
        offsets = check_offsets(offsets, self.context_shape)
        n_prompts = offsets.shape[0]
        remaining = self.remaining
        if remaining is not None and n_prompts > remaining:
            raise QueryBudgetExceededError(
                f"scoring {n_prompts} prompt(s) would exceed the query budget of "
                f"{self.budget} ({self.n_queries} spent, {remaining} left); "
                "the call was not sent"
            )
        out = self.backend.logits(images, class_names, offsets)
        # Count what was sent, whatever came back: the model did the work.
        self.n_queries += n_prompts
        self.n_images_scored += len(images)
        self.by_purpose[purpose] = self.by_purpose.get(purpose, 0) + n_prompts
        self.images_by_purpose[purpose] = self.images_by_purpose.get(purpose, 0) + len(images)
        return check_logits(out, (n_prompts, len(images), len(class_names)), self.backend)
