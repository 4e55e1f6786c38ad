"""A tiny deterministic black box, for tests, docs and trying the API offline."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from sklearn.base import BaseEstimator

from .._util.validation import check_offsets

__all__ = ["ToyBackend"]


def _name_seed(name: str, salt: int) -> int:
    digest = hashlib.sha256(f"{salt}:{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class ToyBackend(BaseEstimator):
    """A small, deterministic stand-in for a vision-language model.

    Images become 8x8 grayscale pixel vectors; each class name gets a fixed
    pseudo-random embedding and a class-specific linear response to the prompt
    offset, so a learned prompt can move classes relative to each other. Logits
    are scaled cosine similarities. The same inputs give the same logits in
    every process. Not a real model: it exists to exercise the door.

    Parameters
    ----------
    n_ctx : int, default=2
        Context tokens of the prompt offsets.
    dim : int, default=8
        Width of each context token.
    scale : float, default=10.0
        Logit scale.
    seed : int, default=0
        Salt of the class embeddings.

    Examples
    --------
    >>> import numpy as np
    >>> from PIL import Image
    >>> from skcarrot.backends import ToyBackend
    >>> box = ToyBackend()
    >>> box.logits([Image.new("RGB", (8, 8))], ["a", "b", "c"], np.zeros((2, 2, 8))).shape
    (2, 1, 3)
    """

    def __init__(self, n_ctx: int = 2, dim: int = 8, scale: float = 10.0, seed: int = 0) -> None:
        self.n_ctx = n_ctx
        self.dim = dim
        self.scale = scale
        self.seed = seed

    @property
    def context_shape(self) -> tuple[int, int]:
        return (self.n_ctx, self.dim)

    def _image_features(self, images: Sequence[Any]) -> np.ndarray:
        feats = []
        for img in images:
            g = img.convert("L").resize((8, 8), Image.BILINEAR)
            v = np.asarray(g, dtype=np.float64).ravel() / 255.0
            feats.append(v - 0.5)
        f = np.stack(feats)
        return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-8)

    def _class_params(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.RandomState(_name_seed(name, self.seed))
        embedding = rng.normal(size=64)
        response = rng.normal(scale=0.5, size=(64, self.n_ctx * self.dim))
        return embedding, response

    def logits(self, images: Sequence[Any], class_names: Sequence[str], offsets: np.ndarray) -> np.ndarray:
        """Logits ``(P, n_images, n_classes)``; see :class:`skcarrot.backends.BlackBoxVLM`."""
        offsets = check_offsets(offsets, self.context_shape).astype(np.float64)
        img = self._image_features(images)  # (N, 64)
        flat = offsets.reshape(len(offsets), -1)  # (P, n_ctx * dim)
        text = []
        for name in class_names:
            emb, resp = self._class_params(str(name))
            text.append(emb[None, :] + flat @ resp.T)  # (P, 64)
        t = np.stack(text, axis=1)  # (P, C, 64)
        t /= np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-8)
        return self.scale * np.einsum("nf,pcf->pnc", img, t)
