"""Where each refiner epoch's views of the training images come from."""

from __future__ import annotations

import numpy as np

from ..images import augment_all, augmented_views

__all__ = ["FreshViews", "ViewPool"]


class ViewPool:
    """A fixed pool of ``n_views`` views per image, made once; each epoch picks one per image.

    Examples
    --------
    >>> import numpy as np
    >>> from PIL import Image
    >>> from skcarrot._training import ViewPool
    >>> pool = ViewPool([Image.new("RGB", (8, 8))] * 3, 4, "crop", np.random.RandomState(0))
    >>> len(pool.epoch_views(np.random.RandomState(1))), pool.fixed
    (3, True)
    """

    fixed = True

    def __init__(self, images, n_views: int, augmentation, rng: np.random.RandomState) -> None:
        self.n_views = n_views
        self.views = augmented_views(images, n_views, augmentation, rng)

    def all_views(self) -> list:
        """Every view of every image, view-major: ``n_views * n_images`` images."""
        return [img for view in self.views for img in view]

    def epoch_views(self, rng: np.random.RandomState) -> list:
        """One view of each image, drawn from the pool."""
        pick = self.pick(rng, len(self.views[0]))
        return [self.views[v][i] for i, v in enumerate(pick)]

    def pick(self, rng: np.random.RandomState, n_images: int) -> np.ndarray:
        """Which view of each image an epoch uses (for logits already scored)."""
        return rng.randint(0, self.n_views, size=n_images)


class FreshViews:
    """A new augmented view of every image each epoch (the paper's setting).

    Examples
    --------
    >>> import numpy as np
    >>> from PIL import Image
    >>> from skcarrot._training import FreshViews
    >>> len(FreshViews([Image.new("RGB", (8, 8))] * 3, "crop+flip").epoch_views(np.random.RandomState(0)))
    3
    """

    fixed = False

    def __init__(self, images, augmentation) -> None:
        self.images = list(images)
        self.augmentation = augmentation

    def epoch_views(self, rng: np.random.RandomState) -> list:
        """One freshly augmented view of each image."""
        return augment_all(self.images, self.augmentation, rng)
