"""White-box baselines: CoOp, a linear probe and Tip-Adapter.

These reach *inside* the model through :meth:`OpenCLIPBackend.white_box`: image features
and gradients through the text encoder. They are here to measure what the black-box
setting costs; :class:`skcarrot.CarrotClassifier` never uses this access. Each is a
scikit-learn classifier over the same images as ``CarrotClassifier``.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, _fit_context
from sklearn.linear_model import LogisticRegression
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted

from .backends.embedded import resolve_backend
from ._validation import ImageClassifierMixin, check_images_and_labels, resolve_class_names, softmax
from .images import to_pil_images

__all__ = ["CoOpClassifier", "LinearProbeClassifier", "TipAdapterClassifier"]


class _WhiteBoxBase(ImageClassifierMixin, BaseEstimator):
    """Shared plumbing: backend resolution, targets, class names, features."""

    _parameter_constraints: dict = {"backend": "no_validation", "class_names": "no_validation"}

    def _access(self):
        backend = resolve_backend(self.backend)
        if not hasattr(backend, "white_box"):
            raise TypeError(
                f"{type(self).__name__} is a white-box method: it needs a backend with white_box() "
                f"(OpenCLIPBackend), got {type(backend).__name__}"
            )
        return backend.white_box()

    def _prepare(self, X, y):
        images, classes, y_idx = check_images_and_labels(X, y)
        return images, classes, y_idx, resolve_class_names(self.class_names, classes)

    def decision_function(self, X: Any) -> np.ndarray:
        """Logits ``(n_samples, n_classes)`` in ``classes_`` order."""
        check_is_fitted(self)
        return self._logits(self._access(), to_pil_images(X))

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities ``(n_samples, n_classes)``; rows sum to 1."""
        return softmax(self.decision_function(X))

    def predict(self, X: Any) -> np.ndarray:
        """Predicted labels."""
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]


class CoOpClassifier(_WhiteBoxBase):
    """CoOp (white-box): context vectors trained by gradient through the text encoder.

    The learnable context starts at the template's own context words (zero offset) and
    is trained with SGD (momentum 0.9, cosine schedule) on cross-entropy over the
    training images' features.

    Parameters
    ----------
    backend : OpenCLIPBackend or None, default=None
        None: the embedded model.
    class_names : mapping, sequence or None, default=None
        As in :class:`skcarrot.CarrotClassifier`.
    max_epochs : int, default=50
    learning_rate : float, default=0.002
    batch_size : int, default=32
    random_state : int, RandomState or None, default=None

    Attributes
    ----------
    classes_, class_names_, prompt_offset_ : as in CarrotClassifier
    loss_curve_ : list of float
        Mean training loss per epoch.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot.baselines import CoOpClassifier
    >>> from skcarrot.datasets import few_shot_split, load_digit_images
    >>> X, y = load_digit_images()
    >>> Xtr, ytr, Xte, yte = few_shot_split(X, y, 4, seed=0)
    >>> clf = CoOpClassifier(max_epochs=2, random_state=0).fit(Xtr, ytr)
    >>> clf.predict_proba(Xte[:2]).shape
    (2, 10)
    """

    _parameter_constraints: dict = {
        **_WhiteBoxBase._parameter_constraints,
        "max_epochs": [Interval(Integral, 1, None, closed="left")],
        "learning_rate": [Interval(Real, 0, None, closed="neither")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
    }

    def __init__(self, *, backend=None, class_names=None, max_epochs=50, learning_rate=0.002, batch_size=32,
                 random_state=None):
        self.backend = backend
        self.class_names = class_names
        self.max_epochs = max_epochs
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.random_state = random_state

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any) -> "CoOpClassifier":
        """Train the context vectors on ``(X, y)``."""
        images, classes, y_idx, names = self._prepare(X, y)
        wb = self._access()
        rng = check_random_state(self.random_state)
        feats = wb.image_features(images)
        Y = torch.as_tensor(y_idx)
        ctx = torch.zeros((1,) + wb.context_shape, requires_grad=True)
        opt = torch.optim.SGD([ctx], lr=self.learning_rate, momentum=0.9)
        steps_per_epoch = math.ceil(len(Y) / self.batch_size)
        total = self.max_epochs * steps_per_epoch
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
        curve = []
        for _ in range(self.max_epochs):
            order = rng.permutation(len(Y))
            losses = []
            for start in range(0, len(order), self.batch_size):
                idx = torch.as_tensor(order[start : start + self.batch_size])
                text = wb.text_features(names, ctx)[0]
                logits = wb.logit_scale * feats[idx] @ text.T
                loss = F.cross_entropy(logits, Y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
            curve.append(float(np.mean(losses)))
        self.classes_, self.class_names_ = classes, names
        self.prompt_offset_ = ctx.detach()[0].numpy().copy()
        self.loss_curve_ = curve
        return self

    def _logits(self, wb, images):
        with torch.no_grad():
            text = wb.text_features(self.class_names_, torch.as_tensor(self.prompt_offset_)[None])[0]
            return (wb.logit_scale * wb.image_features(images) @ text.T).numpy().astype(np.float64)


class LinearProbeClassifier(_WhiteBoxBase):
    """Linear probe (white-box): logistic regression on the model's image features.

    Parameters
    ----------
    backend : OpenCLIPBackend or None, default=None
    class_names : ignored except for validation symmetry, default=None
    C : float, default=1.0
        Inverse regularisation strength of the logistic regression.
    max_iter : int, default=1000

    Examples
    --------
    >>> from skcarrot.baselines import LinearProbeClassifier
    >>> from skcarrot.datasets import few_shot_split, load_digit_images
    >>> X, y = load_digit_images()
    >>> Xtr, ytr, Xte, yte = few_shot_split(X, y, 4, seed=0)
    >>> LinearProbeClassifier().fit(Xtr, ytr).predict(Xte[:3]).shape
    (3,)
    """

    _parameter_constraints: dict = {
        **_WhiteBoxBase._parameter_constraints,
        "C": [Interval(Real, 0, None, closed="neither")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
    }

    def __init__(self, *, backend=None, class_names=None, C=1.0, max_iter=1000):
        self.backend = backend
        self.class_names = class_names
        self.C = C
        self.max_iter = max_iter

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any) -> "LinearProbeClassifier":
        """Fit the logistic regression on the image features of ``X``."""
        images, classes, y_idx, names = self._prepare(X, y)
        feats = self._access().image_features(images).numpy()
        self.classes_, self.class_names_ = classes, names
        self.linear_ = LogisticRegression(C=self.C, max_iter=self.max_iter).fit(feats, y_idx)
        return self

    def _logits(self, wb, images):
        # Log-probabilities: one column per class, also with two classes (where
        # decision_function has a single column); softmax of them is predict_proba.
        return self.linear_.predict_log_proba(wb.image_features(images).numpy()).astype(np.float64)


class TipAdapterClassifier(_WhiteBoxBase):
    """Tip-Adapter (white-box, training-free): zero-shot logits plus a key-value cache of the shots.

    ``logits = 100 * f T^T + alpha * exp(-beta * (1 - f F^T)) L``, with ``F`` the training
    image features, ``L`` their one-hot labels and ``T`` the hand-written prompts' text features.

    Parameters
    ----------
    backend : OpenCLIPBackend or None, default=None
    class_names : mapping, sequence or None, default=None
    alpha : float, default=1.0
        Weight of the cache.
    beta : float, default=5.5
        Sharpness of the cache affinities.

    Examples
    --------
    >>> from skcarrot.baselines import TipAdapterClassifier
    >>> from skcarrot.datasets import few_shot_split, load_digit_images
    >>> X, y = load_digit_images()
    >>> Xtr, ytr, Xte, yte = few_shot_split(X, y, 4, seed=0)
    >>> TipAdapterClassifier().fit(Xtr, ytr).predict_proba(Xte[:2]).shape
    (2, 10)
    """

    _parameter_constraints: dict = {
        **_WhiteBoxBase._parameter_constraints,
        "alpha": [Interval(Real, 0, None, closed="left")],
        "beta": [Interval(Real, 0, None, closed="left")],
    }

    def __init__(self, *, backend=None, class_names=None, alpha=1.0, beta=5.5):
        self.backend = backend
        self.class_names = class_names
        self.alpha = alpha
        self.beta = beta

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any) -> "TipAdapterClassifier":
        """Build the cache from ``(X, y)``; no training."""
        images, classes, y_idx, names = self._prepare(X, y)
        wb = self._access()
        self.classes_, self.class_names_ = classes, names
        self.cache_keys_ = wb.image_features(images).numpy().astype(np.float32)
        self.cache_values_ = np.eye(len(classes), dtype=np.float32)[y_idx]
        return self

    def _logits(self, wb, images):
        with torch.no_grad():
            text = wb.text_features(self.class_names_, torch.zeros((1,) + wb.context_shape))[0].numpy()
        f = wb.image_features(images).numpy()
        affinity = np.exp(-self.beta * (1.0 - f @ self.cache_keys_.T))
        return (100.0 * f @ text.T + self.alpha * affinity @ self.cache_values_).astype(np.float64)
