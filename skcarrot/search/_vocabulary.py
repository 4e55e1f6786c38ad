"""The concepts the embedded model learned, and a warning for class names outside them.

The embedded micro CLIP (see :mod:`skcarrot.tools.pretrain`) saw captions of
handwritten digits and of the ten Fashion-MNIST clothing classes, nothing else.
A class name outside those words gives it a near-random zero-shot start that
prompt tuning cannot repair: :func:`warn_if_unknown_to` says so, and what to
pass instead, when an estimator is about to fit such names on it.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Sequence
from typing import Any

__all__ = ["UnknownClassNamesWarning", "embedded_vocabulary", "unknown_class_names", "warn_if_unknown_to"]

# Names of Fashion-MNIST classes that the embedded model reads as well as the ones it learned
# (checked against its zero-shot accuracy; plurals such as "sneakers" it does not read).
_FASHION_VARIANTS = ("t-shirt/top", "trousers")

# Digit phrasings beyond the pretraining templates.
_DIGIT_PHRASES = ("digit {}", "number {}")

# Most unknown names spelled out in the warning.
_SHOWN = 8


class UnknownClassNamesWarning(UserWarning):
    """Class names the model never learned: its predictions for them start near chance.

    Raised by :meth:`skcarrot.CarrotClassifier.fit` on the embedded default
    model (which knows only handwritten digits and clothing) for any other
    class name.

    Examples
    --------
    >>> from skcarrot import UnknownClassNamesWarning
    >>> issubclass(UnknownClassNamesWarning, UserWarning)
    True
    """


def _normal(name: Any) -> str:
    """A name as the tokenizer reads it: lower case, single spaces, no final period."""
    text = re.sub(r"\s+", " ", str(name).replace("_", " ")).strip().lower()
    return text.rstrip(".").strip()


@functools.lru_cache(maxsize=1)
def embedded_vocabulary() -> frozenset[str]:
    """Every class name (normalised) the embedded model was pretrained on, in any of its phrasings.

    Examples
    --------
    >>> from skcarrot.search._vocabulary import embedded_vocabulary
    >>> {"7", "seven", "the digit 7", "sneaker", "ankle boot", "t-shirt/top"} <= embedded_vocabulary()
    True
    >>> "cat" in embedded_vocabulary()
    False
    """
    from ..datasets.offline import DIGIT_WORDS, FASHION_CLASSES
    from ..tools.pretrain import DIGIT_TEMPLATES, FASHION_TEMPLATES

    known = set()
    for digit, word in enumerate(DIGIT_WORDS):
        for name in (str(digit), word):
            known.update(_normal(t.format(name)) for t in DIGIT_TEMPLATES + _DIGIT_PHRASES)
    for name in FASHION_CLASSES + _FASHION_VARIANTS:
        known.update(_normal(t.format(name)) for t in FASHION_TEMPLATES)
    return frozenset(known)


def _suggestion(name: str) -> str | None:
    """A learned word close to ``name`` (a plural of it), or None."""
    text = _normal(name)
    for cut in (1, 2):
        if len(text) > cut + 1 and text.endswith("s") and text[:-cut] in embedded_vocabulary():
            return text[:-cut]
    return None


def unknown_class_names(class_names: Sequence[Any]) -> list[str]:
    """The class names the embedded model never learned, in order.

    Examples
    --------
    >>> from skcarrot.search._vocabulary import unknown_class_names
    >>> unknown_class_names(["cat", "7", "Sneaker", "ankle_boot", "dog"])
    ['cat', 'dog']
    """
    known = embedded_vocabulary()
    return [str(name) for name in class_names if _normal(name) not in known]


def _is_embedded(backend: Any) -> bool:
    from ..backends.embedded import EMBEDDED_MODEL, OpenCLIPTextBackend
    from ..backends.openclip import OpenCLIPBackend

    if isinstance(backend, OpenCLIPTextBackend):
        inner = backend.backend
        return inner is None or _is_embedded(inner)
    return isinstance(backend, OpenCLIPBackend) and backend.model_name == EMBEDDED_MODEL


def warn_if_unknown_to(backend: Any, class_names: Sequence[Any], stacklevel: int = 1) -> list[str]:
    """Warn when ``backend`` is the embedded model and some class names are words it never learned.

    Any other backend is left alone (nothing is asked of it).

    Parameters
    ----------
    backend : object
        The backend a fit is about to use (None is not resolved here: pass the
        resolved one).
    class_names : sequence of str
        The names the prompts will carry.
    stacklevel : int, default=1
        Frames above the caller of this function that the warning points at
        (1: the caller itself).

    Returns
    -------
    unknown : list of str
        The names warned about (empty: no warning).

    Warns
    -----
    UnknownClassNamesWarning

    Examples
    --------
    >>> import warnings
    >>> from skcarrot.backends import ToyBackend, embedded_backend
    >>> from skcarrot.search._vocabulary import warn_if_unknown_to
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     warn_if_unknown_to(embedded_backend(), ["cat", "dog"])
    ...     warn_if_unknown_to(ToyBackend(), ["cat", "dog"])
    ['cat', 'dog']
    []
    >>> [type(w.message).__name__ for w in caught]
    ['UnknownClassNamesWarning']
    """
    if not _is_embedded(backend):
        return []
    unknown = unknown_class_names(class_names)
    if not unknown:
        return []
    shown = ", ".join(repr(n) for n in unknown[:_SHOWN])
    if len(unknown) > _SHOWN:
        shown += f" and {len(unknown) - _SHOWN} more"
    close = {n: s for n in unknown if (s := _suggestion(n)) is not None}
    hint = ""
    if close:
        hint = " (as class_names, it reads " + ", ".join(f"{s!r} for {n!r}" for n, s in close.items()) + ")"
    warnings.warn(
        f"the embedded default model knows only handwritten digits ('0'..'9', 'zero'..'nine') and the 10 "
        f"Fashion-MNIST clothing classes ('t-shirt', 'trouser', 'pullover', 'dress', 'coat', 'sandal', "
        f"'shirt', 'sneaker', 'bag', 'ankle boot'); it never learned the class name(s) {shown}{hint}, so "
        "its predictions for them start near chance and tuning the prompt cannot teach it a new concept. "
        "For other images pass a real model: backend=OpenCLIPBackend(model_name='ViT-B-32', "
        "pretrained='openai') (or pretrained='/path/to/checkpoint' offline), or a hosted one: "
        "HTTPBackend(url) for 'skcarrot serve', ZeroShotHTTPBackend(endpoint_url) for a "
        "zero-shot-image-classification endpoint",
        UnknownClassNamesWarning,
        stacklevel=stacklevel + 1,
    )
    return unknown
