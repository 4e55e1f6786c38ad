"""The served model: what it is, and scoring images with it.

This is the far side of the door: checked images, class names, prompt strings
and offsets go in, logits come out.

One model serves every key, one call at a time. Calls queue for it in arrival
order (:class:`FairLock`), and a large request is scored in pieces, each a call
of its own, so a key's small request waits for at most one piece of another
key's large one, never for all of it.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..backends.models import DEFAULT_TEMPLATE, EMBEDDED_WEIGHTS

__all__ = ["Scorer", "FairLock", "ModelOutputError", "one_call"]

# The Settings fields that say which model to serve.
_SETTINGS = ("model_name", "pretrained", "template", "device", "backend")

# One model call scores at most this many logits, and encodes at most this many prompts
# (offset x class name), when a request can be split (by prompts) to keep to it.
_LOGITS_PER_CALL = 1 << 16
_SEQUENCES_PER_CALL = 1024


class ModelOutputError(ValueError):
    """The model's answer to a request is unusable (non-finite or misshapen): scoring it again would not help."""


class FairLock:
    """A lock granted in arrival order (first come, first served), unlike :class:`threading.Lock`.

    Examples
    --------
    >>> from skcarrot.serve.scorer import FairLock
    >>> lock = FairLock()
    >>> with lock:
    ...     lock.locked()
    True
    >>> lock.locked()
    False
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._waiting: collections.deque[threading.Event] = collections.deque()
        self._held = False

    def acquire(self) -> None:
        with self._mutex:
            if not self._held:
                self._held = True
                return
            turn = threading.Event()
            self._waiting.append(turn)
        turn.wait()  # handed over by release(), still held

    def release(self) -> None:
        with self._mutex:
            if self._waiting:
                self._waiting.popleft().set()
            else:
                self._held = False

    def locked(self) -> bool:
        return self._held

    def __enter__(self) -> "FairLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def one_call(n_prompts: int, n_images: int, n_columns: int) -> bool:
    """Whether scoring this much is one model call (not split into pieces).

    Examples
    --------
    >>> from skcarrot.serve.scorer import one_call
    >>> one_call(40, 160, 10), one_call(256, 160, 10)
    (True, False)
    """
    return n_prompts * n_images * n_columns <= _LOGITS_PER_CALL and n_prompts * n_columns <= _SEQUENCES_PER_CALL


def _steps(total: int, step: int) -> list[tuple[int, int]]:
    return [(start, min(total, start + step)) for start in range(0, total, max(1, step))]


def _public_weights(pretrained: str | None) -> str | None:
    """What clients are told of the weights: a pretrained tag, never a file's path."""
    if pretrained is None:
        return None
    if os.path.abspath(pretrained) == os.path.abspath(EMBEDDED_WEIGHTS):
        return "embedded"
    if os.sep in pretrained or (os.altsep and os.altsep in pretrained) or os.path.exists(pretrained):
        return "local-checkpoint"
    return pretrained


class Scorer:
    """The model behind the door.

    Parameters
    ----------
    model_name, pretrained, template, device, backend
        As in :class:`~skcarrot.serve.Settings`: a ready ``backend``, else the
        open_clip model ``model_name``, else the embedded micro CLIP.

    Examples
    --------
    >>> import numpy as np
    >>> from PIL import Image
    >>> from skcarrot.serve.scorer import Scorer
    >>> scorer = Scorer()
    >>> scorer.context_shape, scorer.text_capable
    ((4, 64), True)
    >>> scorer.score([Image.new("RGB", (8, 8))], ["a", "b"], np.zeros((3, 4, 64), np.float32)).shape
    (3, 1, 2)
    """

    def __init__(
        self,
        model_name: str | None = None,
        pretrained: str | None = None,
        template: str = DEFAULT_TEMPLATE,
        device: str = "auto",
        backend: Any = None,
    ) -> None:
        from ..backends.models import open_model
        from ..backends.openclip import OpenCLIPBackend

        if backend is None:
            # The same resolver as the estimator's and the benchmark's: a name means the same weights
            # everywhere, random weights only when asked for, and weights that can not be had fail now.
            backend = open_model(model_name, pretrained, template=template, device=device, check=True)
        self.backend = backend
        self.text_capable = isinstance(backend, OpenCLIPBackend)
        params = backend.get_params() if hasattr(backend, "get_params") else {}
        self.model_name = str(params.get("model_name", type(backend).__name__))
        pretrained = params.get("pretrained")
        self.pretrained = _public_weights(None if pretrained is None else os.fspath(pretrained))
        self.template = str(params.get("template", template))
        tag = "random-init" if self.pretrained is None else self.pretrained
        self.model_id = f"{self.model_name}:{tag}" if self.text_capable else self.model_name
        self._context_shape: tuple[int, int] | None = None
        self._turns = FairLock()
        self._reduce: Callable[[Any], Any] | None | bool = False
        # Image sizes the reduction does not shrink (the output size of a resize and crop
        # depends on the input size alone): such an image is kept as it is, unreduced.
        self._not_shrunk: set[tuple[int, int]] = set()

    @classmethod
    def from_settings(cls, settings: Any) -> "Scorer":
        """The scorer a :class:`~skcarrot.serve.Settings` describes."""
        return cls(**{name: getattr(settings, name) for name in _SETTINGS})

    @property
    def context_shape(self) -> tuple[int, int]:
        """``(n_ctx, dim)``; loads the model on first use."""
        if self._context_shape is None:
            n_ctx, dim = self.backend.context_shape
            self._context_shape = (int(n_ctx), int(dim))
        return self._context_shape

    @property
    def loaded(self) -> bool:
        return self._context_shape is not None

    # -- text the model can read ----------------------------------------------------------

    def tokenize_class_names(self, names: Sequence[str]) -> None:
        """Tokenize class names as :meth:`score` will; raises whatever the tokenizer raises."""
        if self.text_capable:
            self.backend._box().tokens_for(list(names))

    def overlong_prompts(self, strings: Sequence[str]) -> list[str]:
        """Those of the distinct ``strings`` longer than the model's context length.

        Raises whatever the tokenizer raises on text it cannot read.
        """
        if not self.text_capable:
            return []
        distinct = list(dict.fromkeys(strings))
        tokens = self.backend._box().tokenizer(distinct)
        return [text for text, row in zip(distinct, tokens) if int(row[-1]) != 0]

    # -- images as the model reads them -------------------------------------------------

    def _geometry(self) -> Callable[[Any], Any] | None:
        """The model's own resize and crop (the steps before its pixels become a tensor), or None."""
        if not self.text_capable:
            return None
        from torchvision import transforms

        steps = []
        for step in getattr(self.backend._box().preprocess, "transforms", []):
            if type(step) not in (transforms.Resize, transforms.CenterCrop):
                break
            steps.append(step)
        if not steps:
            return None

        def geometry(image):
            for step in steps:
                image = step(image)
            return image

        return geometry

    def reduce(self, image: Any) -> Any:
        """``image`` as the model reads it: resized and cropped to its input size, when that is smaller.

        The model's preprocessing maps the reduced image to exactly the tensor it
        makes of the original (its resize and crop leave an image of their output
        size unchanged), so storing the reduced image changes no logit. An image
        the reduction would not shrink, or a model whose preprocessing is not a
        plain resize and crop, is returned as it is.
        """
        if self._reduce is False:
            self._reduce = self._geometry()
        if self._reduce is None or image.size in self._not_shrunk:
            return image
        small = self._reduce(image)
        if small.size[0] * small.size[1] >= image.size[0] * image.size[1]:
            if len(self._not_shrunk) < 4096:
                self._not_shrunk.add(image.size)
            return image
        again = self._reduce(small)  # a fixed point, or the model would read it otherwise
        if again.size != small.size or again.tobytes() != small.tobytes():
            return image
        return small

    # -- scoring ------------------------------------------------------------------------

    def _call(self, fn: Callable[..., Any], *args: Any) -> np.ndarray:
        """One model call, in turn with every other (arrival order)."""
        with self._turns:
            return np.asarray(fn(*args), dtype=np.float64)

    @staticmethod
    def _check(out: np.ndarray, expected: tuple[int, ...]) -> np.ndarray:
        if out.shape != expected:
            raise ModelOutputError(f"the model returned logits of shape {list(out.shape)}, expected {list(expected)}")
        if not np.all(np.isfinite(out)):
            raise ModelOutputError(
                "the model's logits for this request are not finite (NaN or infinity); scoring it again would "
                "give the same: use smaller prompt offsets"
            )
        return out

    def score(self, images: Sequence[Any], class_names: Sequence[str], offsets: np.ndarray) -> np.ndarray:
        """Logits ``(P, N, C)`` of every image against every class under each prompt offset.

        Raises
        ------
        ModelOutputError
            The model's logits are not finite (or not of that shape).
        """
        names = list(class_names)
        p, n, c = len(offsets), len(images), len(names)
        step = max(1, min(_LOGITS_PER_CALL // max(1, n * c), _SEQUENCES_PER_CALL // max(1, c)))
        if step >= p:
            return self._check(self._call(self.backend.logits, images, names, offsets), (p, n, c))
        parts = [self._call(self.backend.logits, images, names, offsets[a:b]) for a, b in _steps(p, step)]
        for (a, b), part in zip(_steps(p, step), parts):
            self._check(part, (b - a, n, c))
        return np.concatenate(parts)

    def score_text(self, images: Sequence[Any], prompts: Sequence[Sequence[str]]) -> np.ndarray:
        """Logits ``(P, N, L)`` of every image against each prompt set's full strings."""
        if not self.text_capable:
            raise TypeError(f"{type(self.backend).__name__} does not score prompt strings (not an open_clip model)")
        prompts = [list(p) for p in prompts]
        p, n, width = len(prompts), len(images), len(prompts[0])
        step = max(1, min(_LOGITS_PER_CALL // max(1, n * width), _SEQUENCES_PER_CALL // max(1, width)))
        parts = [self._call(self.backend.text_scores, images, prompts[a:b]) for a, b in _steps(p, step)]
        for (a, b), part in zip(_steps(p, step), parts):
            self._check(part, (b - a, n, width))
        return np.concatenate(parts)

    def label_probabilities(self, image: Any, prompts: Sequence[str]) -> np.ndarray:
        """Softmax over ``prompts`` (one per label) of one image's logits."""
        logits = self.score_text([image], [list(prompts)])[0, 0]
        z = np.exp(logits - logits.max())
        return z / z.sum()
