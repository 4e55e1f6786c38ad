"""The embedded default model: a micro CLIP pretrained by skcarrot and shipped in the package.

Also :class:`OpenCLIPTextBackend`, the text-door view of an open_clip model,
whose default model is this one.

It is loaded through the same path as any open_clip model: a registered config
(``skcarrot-micro-clip``) and a local checkpoint file. See the model card in the
documentation and :mod:`skcarrot.tools.pretrain` for how it was made.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator

from .models import DEFAULT_TEMPLATE, EMBEDDED_MODEL, EMBEDDED_WEIGHTS, open_model
from .openclip import OpenCLIPBackend

__all__ = ["EMBEDDED_MODEL", "EMBEDDED_WEIGHTS", "OpenCLIPTextBackend", "embedded_backend", "resolve_backend"]

def embedded_backend(template: str = DEFAULT_TEMPLATE, device: str = "auto") -> OpenCLIPBackend:
    """The default black box: the embedded micro CLIP, loaded offline.

    Parameters
    ----------
    template : str, default="a photo of a {}."
        Prompt template.
    device : str, default="auto"
        Torch device.

    Returns
    -------
    backend : OpenCLIPBackend

    Examples
    --------
    >>> from skcarrot.backends import embedded_backend
    >>> embedded_backend().context_shape
    (4, 64)
    """
    return open_model(None, template=template, device=device)


def resolve_backend(backend: Any) -> Any:
    """The backend an estimator uses: ``backend`` itself, or the embedded model for None.

    Examples
    --------
    >>> from skcarrot.backends import ToyBackend
    >>> from skcarrot.backends.embedded import resolve_backend
    >>> resolve_backend(None).model_name, type(resolve_backend(ToyBackend())).__name__
    ('skcarrot-micro-clip', 'ToyBackend')
    """
    return embedded_backend() if backend is None else backend


class OpenCLIPTextBackend(BaseEstimator):
    """A text-level black box over an open_clip model, in process; returns logits.

    A view of an :class:`OpenCLIPBackend` that offers only its text door
    (:meth:`OpenCLIPBackend.text_scores`).

    Parameters
    ----------
    backend : OpenCLIPBackend or None, default=None
        The model; None for the embedded default
        (:func:`skcarrot.backends.embedded_backend`). Its weights, image
        features and text features live in the process-level cache of
        :class:`OpenCLIPBackend`.

    Attributes
    ----------
    returns : str
        ``"logits"``.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot.backends import OpenCLIPTextBackend
    >>> from skcarrot.images import to_pil_images
    >>> door = OpenCLIPTextBackend()
    >>> images = to_pil_images(np.zeros((4, 8, 8), dtype=np.uint8))
    >>> door.text_scores(images, [["a photo of a one.", "a photo of a two."]]).shape
    (1, 4, 2)
    """

    returns = "logits"

    def __init__(self, backend: Any = None) -> None:
        self.backend = backend

    def _open_clip(self) -> OpenCLIPBackend:
        backend = resolve_backend(self.backend)
        if not isinstance(backend, OpenCLIPBackend):
            raise TypeError(
                f"OpenCLIPTextBackend needs an OpenCLIPBackend (or None for the embedded model), "
                f"got {type(backend).__name__}"
            )
        return backend

    def text_scores(self, images: Sequence[Any], prompts: Sequence[Sequence[str]]) -> np.ndarray:
        """Logits ``(P, n_images, L)``; see :meth:`OpenCLIPBackend.text_scores`."""
        return self._open_clip().text_scores(images, prompts)
