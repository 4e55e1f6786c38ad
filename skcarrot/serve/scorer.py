"""The served model: what it is, and scoring images with it.

This is the far side of the door: checked images, class names, prompt strings
and offsets go in, logits come out.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["Scorer"]

# The Settings fields that say which model to serve.
_SETTINGS = ("model_name", "pretrained", "template", "device", "backend")


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
        template: str = "a photo of a {}.",
        device: str = "auto",
        backend: Any = None,
    ) -> None:
        from ..backends.embedded import embedded_backend
        from ..backends.openclip import OpenCLIPBackend

        if backend is None and model_name is None:
            backend = embedded_backend(template=template, device=device)
        elif backend is None:
            backend = OpenCLIPBackend(model_name=model_name, pretrained=pretrained, template=template, device=device)
        self.backend = backend
        self.text_capable = isinstance(backend, OpenCLIPBackend)
        params = backend.get_params() if hasattr(backend, "get_params") else {}
        self.model_name = str(params.get("model_name", type(backend).__name__))
        pretrained = params.get("pretrained")
        self.pretrained = None if pretrained is None else str(pretrained)
        self.template = str(params.get("template", template))
        tag = "random-init" if self.pretrained is None else os.path.basename(self.pretrained)
        self.model_id = f"{self.model_name}:{tag}" if self.text_capable else self.model_name
        self._context_shape: tuple[int, int] | None = None

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

    # -- scoring ------------------------------------------------------------------------

    def score(self, images: Sequence[Any], class_names: Sequence[str], offsets: np.ndarray) -> np.ndarray:
        """Logits ``(P, N, C)`` of every image against every class under each prompt offset."""
        out = np.asarray(self.backend.logits(images, list(class_names), offsets), dtype=np.float64)
        expected = (len(offsets), len(images), len(class_names))
        if out.shape != expected or not np.all(np.isfinite(out)):
            raise RuntimeError(f"the model returned logits of shape {out.shape} (expected {expected}) or non-finite")
        return out

    def score_text(self, images: Sequence[Any], prompts: Sequence[Sequence[str]]) -> np.ndarray:
        """Logits ``(P, N, L)`` of every image against each prompt set's full strings."""
        if not self.text_capable:
            raise TypeError(f"{type(self.backend).__name__} does not score prompt strings (not an open_clip model)")
        return np.asarray(self.backend.text_scores(images, prompts), dtype=np.float64)

    def label_probabilities(self, image: Any, prompts: Sequence[str]) -> np.ndarray:
        """Softmax over ``prompts`` (one per label) of one image's logits."""
        logits = self.score_text([image], [list(prompts)])[0, 0]
        z = np.exp(logits - logits.max())
        return z / z.sum()
