"""White-box baselines: CoOp, a linear probe and Tip-Adapter(-F), trained as their papers do.

These reach *inside* the model through :meth:`OpenCLIPBackend.white_box`: image features
and gradients through the text encoder. They are here to measure what the black-box
setting costs; :class:`skcarrot.CarrotClassifier` never uses this access. Each is a
scikit-learn classifier over the same images as ``CarrotClassifier``.

- :class:`CoOpClassifier` (Zhou et al., IJCV 2022): SGD, momentum 0.9, weight decay 5e-4,
  one constant warm-up epoch at 1e-5, cosine schedule, batch 32, 50/100/200 epochs for
  1/2-4/8-16 shots, a fresh augmented view of every image each epoch.
- :class:`LinearProbeClassifier` (Radford et al., 2021): L2-regularised logistic regression
  on the L2-normalised image features, ``C`` chosen on validation shots, then refit on all.
- :class:`TipAdapterClassifier` (Zhang et al., ECCV 2022): the cache model, with ``alpha``
  and ``beta`` chosen on validation shots; ``fine_tune=True`` (the default) is Tip-Adapter-F.

The hyperparameter searches hold out a stratified part of the shots (at least one image
per class), pick from the grid by validation accuracy (ties: lower validation log-loss,
then the earlier grid entry) and refit on all the shots with the chosen values.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, _fit_context
from sklearn.linear_model import LogisticRegression
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from .._util.threads import torch_threads
from .._util.predict import ImageClassifierMixin
from .._util.split import stratified_holdout
from .._util.validation import check_images_and_labels, resolve_class_names, softmax
from ..backends.embedded import resolve_backend
from ..images import AUGMENTATIONS, augment_all, to_pil_images

__all__ = ["CoOpClassifier", "LinearProbeClassifier", "TipAdapterClassifier", "coop_epochs"]

#: CLIP's logit scale, which the official Tip-Adapter code writes as a literal 100.
CLIP_LOGIT_SCALE = 100.0


def coop_epochs(n_shots: int) -> int:
    """The official CoOp epoch count for ``n_shots`` per class: 50, 100 or 200.

    The official configs train 1 shot for 50 epochs, 2 and 4 shots for 100 and
    8 and 16 shots for 200.

    Examples
    --------
    >>> from skcarrot.tools.baselines import coop_epochs
    >>> [coop_epochs(k) for k in (1, 2, 4, 8, 16)]
    [50, 100, 100, 200, 200]
    """
    if n_shots <= 1:
        return 50
    if n_shots <= 4:
        return 100
    return 200


def _views(images: list, augmentation, rng: np.random.RandomState) -> list:
    """The images themselves (``"none"``) or one fresh augmented view of each."""
    if augmentation == "none":
        return images
    return augment_all(images, augmentation, rng)


def _validation_score(logits: np.ndarray, y_idx: np.ndarray) -> tuple[float, float]:
    """(accuracy, -log-loss): larger is better in both, compared in that order."""
    log_proba = np.log(np.clip(softmax(logits), 1e-12, None))
    accuracy = float(np.mean(np.argmax(logits, axis=1) == y_idx))
    return accuracy, float(np.mean(log_proba[np.arange(len(y_idx)), y_idx]))


def _best_on_validation(candidates: Sequence, score: Callable[[Any], tuple[float, float]]):
    """The candidate with the best validation score, and the score of each (accuracy, log-loss)."""
    scores = [score(c) for c in candidates]
    best = max(range(len(candidates)), key=lambda i: (scores[i], -i))  # ties: the earlier entry
    return candidates[best], [(acc, -neg_loss) for acc, neg_loss in scores]


def _validation_split(y_idx: np.ndarray, fraction: float, rng: np.random.RandomState, name: str):
    """Stratified (train, validation) indices of the shots, or None when no class can spare one."""
    train, held = stratified_holdout(y_idx, fraction, rng)
    if len(held) == 0 or len(np.unique(y_idx[train])) < len(np.unique(y_idx)):
        warnings.warn(
            f"{name}: every class has a single training image, so none can be held out to choose "
            "the hyperparameters; using the fallback values (pass them explicitly to silence this)",
            UserWarning,
            stacklevel=4,
        )
        return None
    return train, held


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
        return self._scores(X)

    def _scores(self, X: Any) -> np.ndarray:
        return self._logits(self._access(), to_pil_images(X))


class CoOpClassifier(_WhiteBoxBase):
    """CoOp (white-box): context vectors trained by gradient through the text encoder.

    Trained as the official CoOp code does: the learnable context starts at the
    template's own context words (zero offset, "a photo of a"), SGD with momentum 0.9
    and weight decay 5e-4, one warm-up epoch at a constant 1e-5, then a cosine schedule
    per epoch from ``learning_rate``; batch 32; 50, 100 or 200 epochs for 1, 2-4 or 8-16
    shots. Every epoch sees one fresh augmented view of each image, encoded by the
    (frozen) image tower.

    Parameters
    ----------
    backend : OpenCLIPBackend or None, default=None
        None: the embedded model.
    class_names : mapping, sequence or None, default=None
        As in :class:`skcarrot.CarrotClassifier`.
    max_epochs : int or None, default=None
        None: the official count for the number of shots (the smallest class's),
        see :func:`coop_epochs`.
    learning_rate : float, default=0.002
        Peak SGD learning rate.
    batch_size : int, default=32
    weight_decay : float, default=5e-4
    warmup_epochs : int, default=1
        Epochs at the constant learning rate 1e-5 before the cosine schedule.
    augmentation : {"crop", "crop+flip", "flip", "none"} or callable, default="crop"
        The fresh view of each image per epoch. The official code uses a random
        resized crop and a horizontal flip (``"crop+flip"``); flips change what
        digits and text mean, so the default keeps only the crop, as
        :class:`skcarrot.CarrotClassifier` does. ``"none"``: the images' features
        are computed once and reused every epoch (fastest).
    random_state : int, RandomState or None, default=None
        Seeds the batch order and the augmentation.

    Attributes
    ----------
    classes_, class_names_, prompt_offset_ : as in CarrotClassifier
    loss_curve_ : list of float
        Mean training loss per epoch.
    n_iter_ : int
        Epochs run.

    Examples
    --------
    >>> from skcarrot.tools.baselines import CoOpClassifier
    >>> from skcarrot.datasets import few_shot_split, load_digit_images
    >>> X, y = load_digit_images()
    >>> Xtr, ytr, Xte, yte = few_shot_split(X, y, 4, seed=0)
    >>> clf = CoOpClassifier(max_epochs=2, random_state=0).fit(Xtr, ytr)
    >>> clf.predict_proba(Xte[:2]).shape, clf.n_iter_
    ((2, 10), 2)
    """

    _parameter_constraints: dict = {
        **_WhiteBoxBase._parameter_constraints,
        "max_epochs": [Interval(Integral, 1, None, closed="left"), None],
        "learning_rate": [Interval(Real, 0, None, closed="neither")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "warmup_epochs": [Interval(Integral, 0, None, closed="left")],
        "augmentation": [StrOptions(set(AUGMENTATIONS)), callable],
        "random_state": ["random_state"],
    }

    def __init__(self, *, backend=None, class_names=None, max_epochs=None, learning_rate=0.002, batch_size=32,
                 weight_decay=5e-4, warmup_epochs=1, augmentation="crop", random_state=None):
        self.backend = backend
        self.class_names = class_names
        self.max_epochs = max_epochs
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.warmup_epochs = warmup_epochs
        self.augmentation = augmentation
        self.random_state = random_state

    def _epoch_lr(self, epoch: int, n_epochs: int) -> float:
        # Dassl's ConstantWarmupScheduler wraps CosineAnnealingLR(T_max=max_epoch): after the
        # warm-up the cosine continues from the epoch reached, it does not restart.
        if epoch < self.warmup_epochs:
            return 1e-5
        return 0.5 * self.learning_rate * (1.0 + math.cos(math.pi * epoch / n_epochs))

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any) -> "CoOpClassifier":
        """Train the context vectors on ``(X, y)``."""
        images, classes, y_idx, names = self._prepare(X, y)
        wb = self._access()
        rng = check_random_state(self.random_state)
        n_epochs = self.max_epochs or coop_epochs(int(np.bincount(y_idx).min()))
        labels = torch.as_tensor(y_idx)
        context = torch.zeros((1,) + wb.context_shape, requires_grad=True)
        optimizer = torch.optim.SGD([context], lr=self.learning_rate, momentum=0.9, weight_decay=self.weight_decay)
        # Without augmentation the features never change: encode them once.
        fixed = wb.image_features(images) if self.augmentation == "none" else None
        curve = []
        with torch_threads(1):  # tiny tensors: one thread beats two
            for epoch in range(n_epochs):
                features = fixed if fixed is not None else wb.image_features(_views(images, self.augmentation, rng))
                for group in optimizer.param_groups:
                    group["lr"] = self._epoch_lr(epoch, n_epochs)
                curve.append(self._epoch(wb, names, context, optimizer, features, labels, rng))
        self.classes_, self.class_names_ = classes, names
        self.prompt_offset_ = context.detach()[0].numpy().copy()
        self.loss_curve_ = curve
        self.n_iter_ = n_epochs
        return self

    def _epoch(self, wb, names, context, optimizer, features, labels, rng) -> float:
        """One pass over the shots in random mini-batches; the mean loss."""
        order = rng.permutation(len(labels))
        losses = []
        for start in range(0, len(order), self.batch_size):
            batch = torch.as_tensor(order[start : start + self.batch_size])
            text = wb.text_features(names, context)[0]
            loss = F.cross_entropy(wb.logit_scale * features[batch] @ text.T, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        return float(np.mean(losses))

    def _logits(self, wb, images):
        with torch.no_grad():
            text = wb.text_features(self.class_names_, torch.as_tensor(self.prompt_offset_)[None])[0]
            return (wb.logit_scale * wb.image_features(images) @ text.T).numpy().astype(np.float64)


class LinearProbeClassifier(_WhiteBoxBase):
    """Linear probe (white-box): logistic regression on the model's image features.

    As in the CLIP paper: L2-regularised logistic regression on the L2-normalised
    image features, with the inverse regularisation strength ``C`` chosen on
    validation shots held out of the training shots (stratified, at least one per
    class), then refit on all the shots with the chosen ``C``.

    Parameters
    ----------
    backend : OpenCLIPBackend or None, default=None
    class_names : ignored except for validation symmetry, default=None
    C : float or None, default=None
        None: chosen from ``Cs`` on the validation shots. A float fixes it (no search).
    Cs : tuple of float, default=(1e-3, 3e-3, 1e-2, ..., 1e3)
        The grid searched, a log grid of 13 values from 1e-3 to 1e3.
    validation_fraction : float, default=0.25
        Fraction of each class's shots held out for the search (at least one).
        With one shot per class nothing can be held out: ``C=1.0`` is used, with a warning.
    max_iter : int, default=1000
    random_state : int, RandomState or None, default=None
        Seeds the validation split.

    Attributes
    ----------
    classes_, class_names_ : as in CarrotClassifier
    C_ : float
        The ``C`` of the final model.
    search_scores_ : dict of float to tuple of (float, float)
        Validation (accuracy, log-loss) of each ``C`` tried; empty without a search.
    linear_ : LogisticRegression
        The final model, fitted on all the shots.

    Examples
    --------
    >>> from skcarrot.tools.baselines import LinearProbeClassifier
    >>> from skcarrot.datasets import few_shot_split, load_digit_images
    >>> X, y = load_digit_images()
    >>> Xtr, ytr, Xte, yte = few_shot_split(X, y, 4, seed=0)
    >>> clf = LinearProbeClassifier(random_state=0).fit(Xtr, ytr)
    >>> clf.predict(Xte[:3]).shape, clf.C_ in clf.Cs
    ((3,), True)
    """

    _parameter_constraints: dict = {
        **_WhiteBoxBase._parameter_constraints,
        "C": [Interval(Real, 0, None, closed="neither"), None],
        "Cs": ["array-like"],
        "validation_fraction": [Interval(Real, 0, 1, closed="neither")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
    }

    def __init__(self, *, backend=None, class_names=None, C=None,
                 Cs=(1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3),
                 validation_fraction=0.25, max_iter=1000, random_state=None):
        self.backend = backend
        self.class_names = class_names
        self.C = C
        self.Cs = Cs
        self.validation_fraction = validation_fraction
        self.max_iter = max_iter
        self.random_state = random_state

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any) -> "LinearProbeClassifier":
        """Choose ``C`` on validation shots, then fit the logistic regression on all of ``X``."""
        images, classes, y_idx, names = self._prepare(X, y)
        grid = [float(c) for c in np.ravel(self.Cs)]
        if self.C is None and (not grid or min(grid) <= 0):
            raise ValueError(f"Cs must be a non-empty sequence of positive floats, got {self.Cs!r}")
        features = self._features(self._access(), images)
        chosen, scores = self.C, {}
        if chosen is None:
            split = _validation_split(y_idx, self.validation_fraction, check_random_state(self.random_state),
                                      type(self).__name__)
            if split is None:
                chosen = 1.0
            else:
                train, held = split

                def score(c):
                    model = self._logistic(c).fit(features[train], y_idx[train])
                    # Columns follow the classes seen in training: every class is there (stratified).
                    return _validation_score(model.predict_log_proba(features[held]), y_idx[held])

                chosen, found = _best_on_validation(grid, score)
                scores = dict(zip(grid, found))
        linear = self._logistic(chosen).fit(features, y_idx)
        self.classes_, self.class_names_ = classes, names
        self.C_, self.search_scores_, self.linear_ = float(chosen), scores, linear
        return self

    def _logistic(self, C: float) -> LogisticRegression:
        return LogisticRegression(C=C, max_iter=self.max_iter)

    @staticmethod
    def _features(wb, images) -> np.ndarray:
        # The backend's features are L2-normalised already; normalise again so that any
        # backend's features are, as the CLIP paper's probe expects.
        features = wb.image_features(images).numpy().astype(np.float64)
        return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)

    def _logits(self, wb, images):
        # Log-probabilities: one column per class, also with two classes (where
        # decision_function has a single column); softmax of them is predict_proba.
        return self.linear_.predict_log_proba(self._features(wb, images)).astype(np.float64)


class TipAdapterClassifier(_WhiteBoxBase):
    """Tip-Adapter(-F) (white-box): zero-shot logits plus a key-value cache of the shots.

    ``logits = s f T^T + alpha (s / 100) exp(-beta (1 - f K^T)) L``, with ``s`` the model's
    logit scale, ``K`` the cache keys (the training images' features), ``L`` their one-hot
    labels and ``T`` the hand-written prompts' text features. The official code writes
    CLIP's logit scale as the literal 100; ``alpha`` is scaled by ``s / 100`` so that it
    means the same on a model with another scale.

    ``fine_tune=True`` is Tip-Adapter-F: the keys are trained by AdamW (lr 0.001, eps 1e-4,
    cosine schedule, batch 256) for ``max_epochs`` epochs on fresh augmented views, starting
    from ``init_alpha``, ``init_beta``. ``alpha`` and ``beta`` are then chosen from the grids
    on validation shots held out of the training shots, and the model is rebuilt on all the
    shots (keys fine-tuned again the same way) with the chosen values.

    Parameters
    ----------
    backend : OpenCLIPBackend or None, default=None
    class_names : mapping, sequence or None, default=None
    alpha : float or None, default=None
        Weight of the cache (in CLIP's units, see above). None: chosen from ``alphas``.
    beta : float or None, default=None
        Sharpness of the cache affinities. None: chosen from ``betas``.
    alphas : tuple of float, default=(0.5, 1, 2, 3, 5, 7, 10, 15, 20, 30, 50)
        The official configs set the search range per dataset; this grid covers
        the paper's ImageNet range (alpha up to 3, beta up to 7) and extends it,
        because on sklearn digits a 16-shot cache is far better than the
        hand-written prompts and the search ends on the edge of a narrow grid
        (alpha 10, beta 7 out of 10 and 7: Tip-Adapter-F 87.3% held out, against
        91.1% with this grid, seed 0; ``benchmarks/baselines_digits.py``).
    betas : tuple of float, default=(0.5, 1, 2, 3, 4, 5, 7, 9, 11, 13, 15, 20)
    fine_tune : bool, default=True
        Tip-Adapter-F (True) or the training-free Tip-Adapter (False).
    init_alpha, init_beta : float, default=1.0
        ``alpha`` and ``beta`` while the keys are fine-tuned (the official ImageNet
        config's initial beta; the same for alpha).
    max_epochs : int, default=20
    learning_rate : float, default=0.001
    batch_size : int, default=256
    augmentation : {"crop", "crop+flip", "flip", "none"} or callable, default="crop"
        The fresh view of each image per fine-tuning epoch (official: ``"crop+flip"``;
        flips are off by default for the reason given in :class:`CoOpClassifier`).
    validation_fraction : float, default=0.25
        Fraction of each class's shots held out for the search (at least one).
        With one shot per class nothing can be held out: ``init_alpha``, ``init_beta``
        are used, with a warning.
    random_state : int, RandomState or None, default=None
        Seeds the validation split, the batch order and the augmentation.

    Attributes
    ----------
    classes_, class_names_ : as in CarrotClassifier
    alpha_, beta_ : float
        The values of the final model.
    search_scores_ : dict of (float, float) to tuple of (float, float)
        Validation (accuracy, log-loss) of each ``(alpha, beta)`` tried; empty without a search.
    cache_keys_ : ndarray of shape (n_shots, n_features)
    cache_values_ : ndarray of shape (n_shots, n_classes)
    text_features_ : ndarray of shape (n_classes, n_features)
    loss_curve_ : list of float
        Mean fine-tuning loss per epoch of the final model (empty without fine-tuning).

    Examples
    --------
    >>> from skcarrot.tools.baselines import TipAdapterClassifier
    >>> from skcarrot.datasets import few_shot_split, load_digit_images
    >>> X, y = load_digit_images()
    >>> Xtr, ytr, Xte, yte = few_shot_split(X, y, 4, seed=0)
    >>> clf = TipAdapterClassifier(max_epochs=2, random_state=0).fit(Xtr, ytr)
    >>> clf.predict_proba(Xte[:2]).shape, clf.alpha_ in clf.alphas, clf.beta_ in clf.betas
    ((2, 10), True, True)
    """

    _parameter_constraints: dict = {
        **_WhiteBoxBase._parameter_constraints,
        "alpha": [Interval(Real, 0, None, closed="left"), None],
        "beta": [Interval(Real, 0, None, closed="left"), None],
        "alphas": ["array-like"],
        "betas": ["array-like"],
        "fine_tune": ["boolean"],
        "init_alpha": [Interval(Real, 0, None, closed="left")],
        "init_beta": [Interval(Real, 0, None, closed="left")],
        "max_epochs": [Interval(Integral, 1, None, closed="left")],
        "learning_rate": [Interval(Real, 0, None, closed="neither")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "augmentation": [StrOptions(set(AUGMENTATIONS)), callable],
        "validation_fraction": [Interval(Real, 0, 1, closed="neither")],
        "random_state": ["random_state"],
    }

    def __init__(self, *, backend=None, class_names=None, alpha=None, beta=None,
                 alphas=(0.5, 1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 15.0, 20.0, 30.0, 50.0),
                 betas=(0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 7.0, 9.0, 11.0, 13.0, 15.0, 20.0),
                 fine_tune=True, init_alpha=1.0, init_beta=1.0, max_epochs=20, learning_rate=0.001,
                 batch_size=256, augmentation="crop", validation_fraction=0.25, random_state=None):
        self.backend = backend
        self.class_names = class_names
        self.alpha = alpha
        self.beta = beta
        self.alphas = alphas
        self.betas = betas
        self.fine_tune = fine_tune
        self.init_alpha = init_alpha
        self.init_beta = init_beta
        self.max_epochs = max_epochs
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.augmentation = augmentation
        self.validation_fraction = validation_fraction
        self.random_state = random_state

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any) -> "TipAdapterClassifier":
        """Build the cache from ``(X, y)``, fine-tune its keys (Tip-Adapter-F), choose alpha and beta."""
        images, classes, y_idx, names = self._prepare(X, y)
        alphas = self._grid(self.alphas, "alphas") if self.alpha is None else [float(self.alpha)]
        betas = self._grid(self.betas, "betas") if self.beta is None else [float(self.beta)]
        wb = self._access()
        rng = check_random_state(self.random_state)
        with torch.no_grad():
            text = wb.text_features(names, torch.zeros((1,) + wb.context_shape))[0]
        features = wb.image_features(images)
        values = torch.eye(len(classes))[torch.as_tensor(y_idx)]
        scale = wb.logit_scale
        chosen, scores = (alphas[0], betas[0]), {}
        if len(alphas) * len(betas) > 1:
            split = _validation_split(y_idx, self.validation_fraction, rng, type(self).__name__)
            if split is None:
                chosen = (self.init_alpha if self.alpha is None else alphas[0],
                          self.init_beta if self.beta is None else betas[0])
            else:
                train, held = split
                keys, _ = self._keys(wb, [images[i] for i in train], features[train], values[train], text, rng)
                held_features = features[held]

                def score(pair):
                    logits = _tip_logits(held_features, text, keys, values[train], pair[0], pair[1], scale)
                    return _validation_score(logits.numpy(), y_idx[held])

                grid = [(a, b) for b in betas for a in alphas]
                chosen, found = _best_on_validation(grid, score)
                scores = dict(zip(grid, found))
        keys, curve = self._keys(wb, images, features, values, text, rng)
        self.classes_, self.class_names_ = classes, names
        self.alpha_, self.beta_ = float(chosen[0]), float(chosen[1])
        self.search_scores_ = scores
        self.cache_keys_ = keys.numpy().astype(np.float32)
        self.cache_values_ = values.numpy().astype(np.float32)
        self.text_features_ = text.numpy().astype(np.float32)
        self.loss_curve_ = curve
        return self

    @staticmethod
    def _grid(values, name: str) -> list[float]:
        grid = [float(v) for v in np.ravel(values)]
        if not grid or min(grid) < 0:
            raise ValueError(f"{name} must be a non-empty sequence of non-negative floats, got {values!r}")
        return grid

    def _keys(self, wb, images, features, values, text, rng) -> tuple[torch.Tensor, list]:
        """The cache keys: the images' features, fine-tuned with AdamW when ``fine_tune``."""
        if not self.fine_tune:
            return features.clone(), []
        keys = features.clone().requires_grad_(True)
        labels = values.argmax(dim=1)
        optimizer = torch.optim.AdamW([keys], lr=self.learning_rate, eps=1e-4)
        steps = self.max_epochs * math.ceil(len(labels) / self.batch_size)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        fixed = features if self.augmentation == "none" else None
        curve = []
        with torch_threads(1):
            for _ in range(self.max_epochs):
                views = fixed if fixed is not None else wb.image_features(_views(images, self.augmentation, rng))
                order = rng.permutation(len(labels))
                losses = []
                for start in range(0, len(order), self.batch_size):
                    batch = torch.as_tensor(order[start : start + self.batch_size])
                    logits = _tip_logits(views[batch], text, keys, values, self.init_alpha, self.init_beta,
                                         wb.logit_scale)
                    loss = F.cross_entropy(logits, labels[batch])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    losses.append(float(loss.detach()))
                curve.append(float(np.mean(losses)))
        return keys.detach(), curve

    def _logits(self, wb, images):
        with torch.no_grad():
            logits = _tip_logits(
                wb.image_features(images), torch.as_tensor(self.text_features_), torch.as_tensor(self.cache_keys_),
                torch.as_tensor(self.cache_values_), self.alpha_, self.beta_, wb.logit_scale,
            )
        return logits.numpy().astype(np.float64)


def _tip_logits(features, text, keys, values, alpha, beta, scale) -> torch.Tensor:
    """Tip-Adapter's logits, with the cache weight scaled from CLIP's logit scale to the model's."""
    affinity = torch.exp(-beta * (1.0 - features @ keys.T))
    return scale * features @ text.T + alpha * (scale / CLIP_LOGIT_SCALE) * affinity @ values
