"""The two interfaces a black-box vision-language model offers, their checks, and the counter on both.

The *embedding interface* (:class:`BlackBoxVLM`) takes images, class names and
prompt offsets and returns logits. The *text interface* (:class:`TextBlackBox`)
takes images and prompt strings and returns probabilities or logits, as hosted
endpoints do. Nothing else crosses: no features, no embeddings, no gradients.
Every prompt (embedding interface) or prompt set (text interface) scored is one
*query*; :class:`QueryCounter` counts them on either interface and refuses,
before the model is reached, any call that would overspend.

The strategies that use them, one per kind of access, are the *doors*
(:mod:`skcarrot.doors`); a backend is checked here, once, for the members a door needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .._util.math import log_softmax
from .._util.validation import check_logits, check_offsets
from ..exceptions import QueryBudgetExceededError

__all__ = [
    "BlackBoxVLM",
    "check_backend",
    "check_method",
    "QueryCounter",
    "RETURNS",
    "TextBlackBox",
    "check_prompt_sets",
    "check_text_scores",
    "context_shape_of",
    "log_probabilities",
    "returns_of",
]

#: What a text-level black box may return.
RETURNS = ("probabilities", "logits")


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


@runtime_checkable
class TextBlackBox(Protocol):
    """What a text-level black box must offer: two members.

    Attributes
    ----------
    returns : {"probabilities", "logits"}
        What :meth:`text_scores` returns. Probabilities are read as a softmax
        over the strings of one prompt set (what CLIP endpoints return), so
        their logarithms are logits up to a constant per image and prompt set.

    Methods
    -------
    text_scores(images, prompts)
        Score every image against every string of each prompt set. ``images`` is
        a sequence of RGB :class:`PIL.Image.Image`; ``prompts`` a sequence of
        ``P`` prompt sets, each a sequence of full prompt strings (usually one
        per class, e.g. ``"a photo of a cat."``), all of the same length ``L``.
        Returns an array ``(P, n_images, L)``. Each prompt set is one query.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot.backends import TextBlackBox
    >>> class Uniform:
    ...     returns = "probabilities"
    ...     def text_scores(self, images, prompts):
    ...         n_strings = len(prompts[0])
    ...         return np.full((len(prompts), len(images), n_strings), 1.0 / n_strings)
    >>> isinstance(Uniform(), TextBlackBox)
    True
    """

    returns: str

    def text_scores(self, images: Sequence[Any], prompts: Sequence[Sequence[str]]) -> np.ndarray:
        ...  # pragma: no cover


def check_method(backend: Any, name: str, signature: str, missing: str) -> None:
    """Refuse a backend whose member ``name`` is absent (``missing`` says so) or not callable.

    Examples
    --------
    >>> from skcarrot.backends._base import check_method
    >>> check_method(object(), "logits", "logits(images)", "no logits")
    Traceback (most recent call last):
    ...
    TypeError: no logits
    """
    member = getattr(backend, name, None)
    if member is None:
        raise TypeError(missing)
    if not callable(member):
        raise TypeError(
            f"backend {type(backend).__name__}: '{name}' must be a method {signature}, got {type(member).__name__}"
        )


def check_backend(backend: Any) -> Any:
    """Refuse, with a clear message, an object that does not offer the embedding interface.

    Examples
    --------
    >>> from skcarrot.backends._base import check_backend
    >>> class NotCallable:
    ...     context_shape = (1, 2)
    ...     logits = "scores"
    >>> check_backend(NotCallable())
    Traceback (most recent call last):
    ...
    TypeError: backend NotCallable: 'logits' must be a method logits(images, class_names, offsets), got str
    """
    check_method(
        backend, "logits", "logits(images, class_names, offsets)",
        f"backend {type(backend).__name__} has no 'logits'; a black-box model needs 'context_shape' (n_ctx, dim) "
        "and 'logits(images, class_names, offsets)'",
    )
    return backend


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


def returns_of(backend: Any) -> str:
    """Read and validate ``backend.returns`` of a text-level black box.

    Examples
    --------
    >>> from skcarrot.backends import OpenCLIPTextBackend
    >>> from skcarrot.backends._base import returns_of
    >>> returns_of(OpenCLIPTextBackend())
    'logits'
    """
    try:
        returns = backend.returns
    except AttributeError as exc:
        raise TypeError(
            f"backend {type(backend).__name__} has no 'returns'; a text-level black box needs "
            "'returns' ('probabilities' or 'logits') and 'text_scores(images, prompts)'"
        ) from exc
    if returns not in RETURNS:
        raise ValueError(f"backend.returns must be one of {RETURNS}, got {returns!r}")
    return returns


def check_prompt_sets(prompts: Any) -> list[tuple[str, ...]]:
    """Validate ``P`` prompt sets of the same length; return them as tuples of str.

    Parameters
    ----------
    prompts : sequence of sequence of str
        ``P >= 1`` prompt sets, each of ``L >= 1`` non-empty strings.

    Returns
    -------
    prompts : list of tuple of str

    Raises
    ------
    ValueError
        If there is no prompt set, one is empty or of another length than the
        first, or a string is empty; the message gives the index.
    TypeError
        If a prompt set is a bare string or holds something that is not a str.

    Examples
    --------
    >>> from skcarrot.backends._base import check_prompt_sets
    >>> check_prompt_sets([["a cat.", "a dog."]])
    [('a cat.', 'a dog.')]
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of prompt sets (sequences of str), got a single str")
    sets = list(prompts)
    if not sets:
        raise ValueError("expected at least one prompt set, got none")
    out = []
    for i, prompt_set in enumerate(sets):
        if isinstance(prompt_set, str):
            raise TypeError(
                f"prompt set {i} is a str ({prompt_set!r}); each prompt set is a sequence of "
                "strings, one per class: wrap it, e.g. [[...]]"
            )
        strings = tuple(prompt_set)
        if not strings:
            raise ValueError(f"prompt set {i} is empty; give one prompt string per class")
        for j, s in enumerate(strings):
            if not isinstance(s, str):
                raise TypeError(f"prompt set {i}, string {j} is a {type(s).__name__}, expected str")
            if not s.strip():
                raise ValueError(f"prompt set {i}, string {j} is empty")
        if strings and out and len(strings) != len(out[0]):
            raise ValueError(
                f"prompt set {i} has {len(strings)} strings but prompt set 0 has {len(out[0])}; "
                "every prompt set of one call must have the same length"
            )
        out.append(strings)
    return out


def check_text_scores(scores: Any, expected: tuple[int, int, int], returns: str) -> np.ndarray:
    """Check what a text-level black box returned: shape, finiteness, range of probabilities.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot.backends._base import check_text_scores
    >>> check_text_scores(np.full((1, 2, 2), 0.5), (1, 2, 2), "probabilities").dtype
    dtype('float64')
    """
    out = np.asarray(scores, dtype=np.float64)
    if out.shape != expected:
        raise ValueError(
            f"backend.text_scores returned shape {out.shape}, expected {expected} "
            "(prompt sets, images, strings per set)"
        )
    if not np.all(np.isfinite(out)):
        bad = np.argwhere(~np.isfinite(out))[0]
        raise ValueError(
            f"backend.text_scores returned non-finite values (first at prompt set {bad[0]}, image {bad[1]})"
        )
    if returns == "probabilities" and (out.min() < 0.0 or out.max() > 1.0 + 1e-6):
        raise ValueError(
            f"backend.text_scores returned probabilities outside [0, 1] (min {out.min():.3g}, "
            f"max {out.max():.3g}); a backend that returns logits must say returns='logits'"
        )
    return out


def log_probabilities(scores: np.ndarray, returns: str, floor: float = 1e-12) -> np.ndarray:
    """Log-probabilities over the last axis from what a text-interface black box returned.

    Logits go through a log-softmax. Probabilities are floored at ``floor``
    (endpoints may round tiny ones to 0) and renormalised, so rows sum to one
    even over a subset of the strings scored.

    Parameters
    ----------
    scores : ndarray of shape (..., n_strings)
    returns : {"probabilities", "logits"}
    floor : float, default=1e-12

    Returns
    -------
    log_probs : ndarray of the same shape

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot.backends._base import log_probabilities
    >>> np.exp(log_probabilities(np.array([[0.0, 0.0]]), "logits")).round(2)
    array([[0.5, 0.5]])
    >>> np.exp(log_probabilities(np.array([[0.2, 0.2]]), "probabilities")).round(2)
    array([[0.5, 0.5]])
    """
    scores = np.asarray(scores, dtype=np.float64)
    if returns == "logits":
        z = scores
    elif returns == "probabilities":
        z = np.log(np.maximum(scores, floor))
    else:
        raise ValueError(f"returns must be one of {RETURNS}, got {returns!r}")
    return log_softmax(z)


class QueryCounter:
    """Wrap a black-box model, count every query it scores on either interface, enforce a budget.

    One counter serves both interfaces: :meth:`logits` (the embedding interface, one
    query per prompt offset) and :meth:`text_scores` (the text interface, one query
    per prompt set). A backend needs only the interface it is used through: its
    ``context_shape`` and ``returns`` are read on the first call of their interface.

    Counting rule: a call handed to the backend is counted whether it returned
    or raised (the model may have done and billed the work), and counted in
    full, whatever came back. A call refused by the budget check (or by the
    validation of its arguments) never reaches the backend and is not counted.

    Parameters
    ----------
    backend : BlackBoxVLM or TextBlackBox
        The black box.
    budget : int or None, default=None
        Most queries allowed in total, both interfaces together; ``None`` means unlimited.

    Attributes
    ----------
    n_queries : int
        Queries spent so far: prompts (embedding interface) and prompt sets
        (text interface) scored. A prompt set with more strings than classes (as in
        screening candidate names) is still one query.
    n_images_scored : int
        Images sent so far, summed over calls: one image forward pass each for a
        model that encodes every image it receives once per call.
    n_pairs_scored : int
        Prompt x image pairs scored so far, summed over calls: the number of
        calls a one-image-per-call HTTP endpoint receives.
    by_purpose : dict of str to int
        Queries, split by the ``purpose`` given to each call.
    images_by_purpose : dict of str to int
        Images scored, split the same way.

    Examples
    --------
    >>> import numpy as np
    >>> from PIL import Image
    >>> from skcarrot.backends import QueryCounter, ToyBackend
    >>> box = QueryCounter(ToyBackend(), budget=3)
    >>> box.logits([Image.new("RGB", (8, 8))], ["cat", "dog"], np.zeros((2, 2, 8)), purpose="prompt").shape
    (2, 1, 2)
    >>> box.n_queries, box.n_images_scored, box.remaining
    (2, 1, 1)

    The text interface, on a backend that offers only it:

    >>> class Uniform:
    ...     returns = "probabilities"
    ...     def text_scores(self, images, prompts):
    ...         return np.full((len(prompts), len(images), len(prompts[0])), 0.5)
    >>> counter = QueryCounter(Uniform(), budget=3)
    >>> counter.text_scores(["img"] * 4, [["a cat.", "a dog."]] * 2, purpose="prompt").shape
    (2, 4, 2)
    >>> counter.n_queries, counter.n_images_scored, counter.n_pairs_scored, counter.remaining
    (2, 4, 8, 1)
    """

    def __init__(self, backend: Any, budget: int | None = None) -> None:
        if getattr(backend, "text_scores", None) is None and getattr(backend, "option_log_probs", None) is None:
            check_backend(backend)  # no text or chat interface: the embedding interface must be there
        self.backend = backend
        self.budget = budget
        self.n_queries = 0
        self.n_images_scored = 0
        self.n_pairs_scored = 0
        self.by_purpose: dict[str, int] = {}
        self.images_by_purpose: dict[str, int] = {}
        self._context_shape: tuple[int, int] | None = None
        self._returns: str | None = None

    #: The counts :meth:`state` saves (and :meth:`restore` puts back): what was spent, nothing of the backend.
    _COUNTS = ("n_queries", "n_images_scored", "n_pairs_scored", "by_purpose", "images_by_purpose")

    def state(self) -> dict:
        """The counts so far, as a picklable dict (for a checkpoint); the budget and the backend are not in it."""
        return {name: (dict(value) if isinstance(value, dict) else value)
                for name in self._COUNTS if (value := getattr(self, name, None)) is not None}

    def restore(self, state: dict) -> None:
        """Continue counting from :meth:`state`: a resumed fit's counts are those of the fit that saved it."""
        for name, value in state.items():
            setattr(self, name, dict(value) if isinstance(value, dict) else value)

    @property
    def remaining(self) -> int | None:
        """Queries left, or ``None`` when unlimited."""
        return None if self.budget is None else self.budget - self.n_queries

    @property
    def context_shape(self) -> tuple[int, int]:
        """The backend's ``(n_ctx, dim)``, read and checked once (embedding interface)."""
        if self._context_shape is None:
            self._context_shape = context_shape_of(check_backend(self.backend))
        return self._context_shape

    @property
    def returns(self) -> str:
        """What the backend's ``text_scores`` returns, read and checked once (text interface)."""
        if self._returns is None:
            self._returns = returns_of(self.backend)
        return self._returns

    def _spend(self, n_queries: int, n_images: int, what: str, purpose: str, call: Callable[[], Any]) -> Any:
        """Budget check, then the call, then the count: the same for both interfaces.

        A call refused here is not sent and not counted; a call handed to the
        backend is counted whether it returned or raised.
        """
        remaining = self.remaining
        if remaining is not None and n_queries > remaining:
            raise QueryBudgetExceededError(
                f"scoring {n_queries} {what} would exceed the query budget of "
                f"{self.budget} ({self.n_queries} spent, {remaining} left); the call was not sent"
            )
        try:
            return call()
        finally:
            self.charge(n_queries, n_images, purpose)

    def charge(self, n_queries: int, n_images: int, purpose: str = "other") -> None:
        """Count ``n_queries`` spent on ``n_images`` images: for a door whose black box says what a call cost
        only after it (retries of a chat API), which checks :attr:`remaining` before the call itself.
        """
        self.n_queries += n_queries
        self.n_images_scored += n_images
        self.n_pairs_scored += n_queries * n_images
        self.by_purpose[purpose] = self.by_purpose.get(purpose, 0) + n_queries
        self.images_by_purpose[purpose] = self.images_by_purpose.get(purpose, 0) + n_images

    def logits(
        self,
        images: Sequence[Any],
        class_names: Sequence[str],
        offsets: np.ndarray,
        purpose: str = "other",
    ) -> np.ndarray:
        """Score ``images`` x ``class_names`` under each prompt in ``offsets`` (embedding interface).

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
        out = self._spend(
            n_prompts, len(images), "prompt(s)", purpose, lambda: self.backend.logits(images, class_names, offsets)
        )
        return check_logits(out, (n_prompts, len(images), len(class_names)), self.backend)

    def text_scores(
        self, images: Sequence[Any], prompts: Sequence[Sequence[str]], purpose: str = "other"
    ) -> np.ndarray:
        """Score ``images`` against every string of each prompt set (text interface).

        Parameters
        ----------
        images : sequence of PIL.Image.Image
            Images, scored under every prompt set.
        prompts : sequence of sequence of str
            ``P`` prompt sets of ``L`` strings each (one query each).
        purpose : str, default="other"
            Label for the accounting in :attr:`by_purpose`.

        Returns
        -------
        scores : ndarray of shape (P, n_images, L)
            Float64 probabilities or logits, as :attr:`returns` says.

        Raises
        ------
        QueryBudgetExceededError
            If the call would spend more than the remaining budget; the model is
            not called.
        """
        returns = self.returns
        sets = check_prompt_sets(prompts)
        images = list(images)
        if not images:
            raise ValueError("expected at least one image to score, got none")
        out = self._spend(
            len(sets), len(images), "prompt set(s)", purpose, lambda: self.backend.text_scores(images, sets)
        )
        return check_text_scores(out, (len(sets), len(images), len(sets[0])), returns)

    def log_probabilities(
        self, images: Sequence[Any], prompts: Sequence[Sequence[str]], purpose: str = "other"
    ) -> np.ndarray:
        """As :meth:`text_scores`, turned into log-probabilities over each prompt set's strings.

        Examples
        --------
        >>> import numpy as np
        >>> from skcarrot.backends import OpenCLIPTextBackend, QueryCounter
        >>> counter = QueryCounter(OpenCLIPTextBackend())
        >>> from PIL import Image
        >>> logp = counter.log_probabilities([Image.new("RGB", (8, 8))], [["a one.", "a two."]])
        >>> logp.shape, bool(np.allclose(np.exp(logp).sum(-1), 1.0))
        ((1, 1, 2), True)
        """
        return log_probabilities(self.text_scores(images, prompts, purpose=purpose), self.returns)
