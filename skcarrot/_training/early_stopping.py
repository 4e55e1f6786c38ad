"""Early stopping in one place: the policy, the held-back shots, the best model and the stop test."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .._util.split import stratified_holdout

__all__ = ["EarlyStopping", "Snapshot", "stratified_holdout"]


@dataclass
class Snapshot:
    """A model the loop may end with: prompt, refiner weights and its validation score.

    ``prompt`` is in its door's form (an offset, or one string per class);
    ``z`` is the search's own coordinates of it.
    """

    prompt: Any
    z: np.ndarray | None
    refiner_weights: dict | None
    generation: int
    accuracy: float = -np.inf
    loss: float = np.inf

    def beats(self, other: "Snapshot", tol: float) -> bool:
        """A validation loss lower by more than ``tol``.

        The loss, not the accuracy: on a few held-back shots per class one image
        more or less moves the accuracy by whole points, while the cross-entropy
        of the refined predictions measures every image.
        """
        return self.loss < other.loss - tol


@dataclass
class EarlyStopping:
    """The held-back shots, the best model scored on them, and when to stop.

    Parameters
    ----------
    images : list of PIL.Image.Image
        Held-back shots.
    y : ndarray of int
        Their class indices.
    tol : float
        Least drop of validation loss that counts as an improvement.
    patience : int or None
        Generations without improvement before stopping; None never stops (the
        best model is still the one kept).
    """

    images: list
    y: np.ndarray
    tol: float
    patience: int | None
    best: Snapshot | None = None
    n_no_improvement: int = 0

    @staticmethod
    def applies(settings: Any, y: np.ndarray) -> bool:
        """Whether a fit with ``settings`` on labels ``y`` holds shots back.

        Validation needs a class with a shot to spare: with one image per class
        there is none; and a fit that trains nothing has nothing to choose.
        """
        spare = np.bincount(y).max() >= 2
        return bool(settings.early_stopping and spare and (settings.prompt_tuning or settings.refinement))

    @classmethod
    def split(cls, images: list, y: np.ndarray, settings: Any, rng: np.random.RandomState):
        """``(train images, train y, EarlyStopping)`` holding back ``settings.validation_fraction`` per class."""
        train, held = stratified_holdout(y, settings.validation_fraction, rng)
        stopping = cls([images[i] for i in held], y[held], settings.tol, settings.n_iter_no_change)
        return [images[i] for i in train], y[train], stopping

    def offer(self, snapshot: Snapshot) -> bool:
        """Keep ``snapshot`` if it beats the best so far; returns whether it did."""
        if self.best is None or snapshot.beats(self.best, self.tol):
            self.best = snapshot
            self.n_no_improvement = 0
            return True
        self.n_no_improvement += 1
        return False

    def should_stop(self) -> bool:
        """Validation has not improved for ``patience`` generations (never without a patience)."""
        return self.patience is not None and self.n_no_improvement >= self.patience
