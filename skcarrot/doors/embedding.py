"""The embedding door (the paper's): a prompt is an offset added to the context word embeddings."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backends._base import check_backend, context_shape_of
from ..search import CMAESPromptSearch
from ._base import Door

__all__ = ["EmbeddingDoor"]


class EmbeddingDoor(Door):
    """Prompt offsets ``(n_ctx, dim)`` in, logits out; the offset is ``A z``, ``z`` searched by CMA-ES.

    Examples
    --------
    >>> from PIL import Image
    >>> from skcarrot.backends import ToyBackend
    >>> from skcarrot.doors import EmbeddingDoor
    >>> door = EmbeddingDoor(ToyBackend(), ["cat", "dog"], budget=10)
    >>> images = [Image.new("RGB", (8, 8))] * 3
    >>> door.score(images, door.one(door.zero_shot_prompt()), "prompt").shape, door.counter.n_queries
    ((1, 3, 2), 1)
    """

    name = "embedding"
    method = "logits"
    default_budget = 8000  # the paper's
    default_popsize = 40
    early_stopping_default = False
    fitted_attributes = ("prompt_offset_", "prompt_z_")

    def __init__(self, backend: Any, class_names, budget: int | None = None) -> None:
        super().__init__(backend, class_names, budget)
        self.context_shape = context_shape_of(backend)

    @classmethod
    def check(cls, backend: Any) -> None:
        if not hasattr(backend, "logits") and hasattr(backend, "text_scores"):
            raise TypeError(
                f"backend {type(backend).__name__} does not offer the embedding door: it has no "
                "'logits(images, class_names, offsets)' nor 'context_shape', only the text door's "
                "'text_scores(images, prompts)'; use door='text' (or 'auto')"
            )
        check_backend(backend)

    def score(self, images, prompts, purpose: str) -> np.ndarray:
        """Logits ``(P, N, C)`` of ``images`` under each offset of ``prompts`` (``P`` queries)."""
        return self.counter.logits(images, self.class_names, np.asarray(prompts), purpose=purpose)

    def one(self, prompt) -> np.ndarray:
        return np.asarray(prompt)[np.newaxis]

    def copy_prompt(self, prompt) -> np.ndarray:
        return np.asarray(prompt, dtype=np.float32).copy()

    def zero_shot_prompt(self) -> np.ndarray:
        return np.zeros(self.context_shape, dtype=np.float32)

    def build_search(self, settings: Any, seeds: dict, start: Any) -> CMAESPromptSearch | None:
        if start.prompt is not None and tuple(np.shape(start.prompt)) != self.context_shape:
            raise ValueError(
                f"warm_start can not change the backend's context shape: the fitted prompt offset is "
                f"{tuple(np.shape(start.prompt))}, the backend takes {self.context_shape}; fit a new estimator "
                "(warm_start=False) for this backend"
            )
        if not settings.prompt_tuning:
            return None
        # A warm start keeps its projection A, so that its z keeps its meaning.
        projection_seed = start.state["projection_seed"] if start.z is not None else seeds["projection"]
        x0 = start.z if start.z is not None and len(start.z) == settings.intrinsic_dim else None
        return CMAESPromptSearch(
            self.context_shape, settings.intrinsic_dim, settings.projection_std, settings.sigma,
            settings.popsize, settings.bound, projection_seed=projection_seed, cma_seed=seeds["cma"], x0=x0,
        )

    def fitted(self, result: Any, search: Any, seeds: dict, start: Any) -> tuple[dict, dict]:
        offset = np.asarray(result.prompt, dtype=np.float32).copy()
        z = None if result.z is None else np.asarray(result.z, dtype=np.float64)
        # The projection that gives z its meaning: this fit's search's, or the one a warm start kept.
        projection_seed = search.projection_seed if search is not None else start.state.get("projection_seed")
        state = {"prompt": offset, "z": z, "projection_seed": projection_seed if z is not None else None,
                 "searched": z is not None}
        return {"prompt_offset_": offset, "prompt_z_": z}, state
