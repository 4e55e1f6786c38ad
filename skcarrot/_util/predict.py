"""Prediction shared by every image classifier: ``predict``, ``predict_proba`` and ``score`` from ``_scores``."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from .math import softmax
from ..images import flat_width, to_pil_images

__all__ = ["ImageClassifierMixin"]


class ImageClassifierMixin(ClassifierMixin):
    """scikit-learn's ClassifierMixin for image classifiers: ``predict``, ``predict_proba`` and ``score``.

    A classifier provides ``_scores(X)``: logits ``(n_samples, n_classes)`` in
    ``classes_`` order.
    """

    def _check_X(self, X: Any) -> list:
        """``X`` as PIL images, with the width of array input checked against the fit's."""
        images = to_pil_images(X, getattr(self, "image_range", None))
        width = flat_width(X)
        if width is not None and hasattr(self, "n_features_in_") and width != self.n_features_in_:
            raise ValueError(
                f"X has {width} features, but {type(self).__name__} is "
                f"expecting {self.n_features_in_} features as input"
            )
        return images

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities of each image.

        Parameters
        ----------
        X : sequence of images or ndarray
            As in :meth:`fit`.

        Returns
        -------
        proba : ndarray of shape (n_samples, n_classes)
            Rows sum to 1, columns in ``classes_`` order.
        """
        check_is_fitted(self)
        return softmax(self._scores(X))

    def predict(self, X: Any) -> np.ndarray:
        """Predicted label of each image.

        Parameters
        ----------
        X : sequence of images or ndarray
            As in :meth:`fit`.

        Returns
        -------
        y_pred : ndarray of shape (n_samples,)
        """
        check_is_fitted(self)
        return self.classes_[np.argmax(self._scores(X), axis=1)]

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """Mean accuracy of ``predict(X)`` against ``y``.

        Parameters
        ----------
        X : sequence of images or ndarray
            As in :meth:`fit`.
        y : array-like of shape (n_samples,)
            True labels.
        sample_weight : array-like of shape (n_samples,), default=None
            Sample weights.

        Returns
        -------
        score : float
            Fraction of correctly classified images.
        """
        return super().score(X, y, sample_weight=sample_weight)
