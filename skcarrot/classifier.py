"""CarrotClassifier: the scikit-learn contract and the collaborative loop.

Everything the estimator learns comes through one door, a black-box model's
``logits(images, class_names, offsets)``, wrapped in a :class:`QueryCounter`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.utils import check_random_state, column_or_1d
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted

from ._progress import progress_bar
from .backends import QueryCounter
from .backends.embedded import resolve_backend
from .images import AUGMENTATIONS, augmented_views, flat_width, to_pil_images
from .losses import prompt_fitness
from .prompt import PromptSearch
from .refiner import ResidualRefiner, refine_logits

__all__ = ["CarrotClassifier"]

logger = logging.getLogger("skcarrot")

_SEED_MAX = 2**31 - 1


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def check_images_and_labels(X, y) -> tuple[list, np.ndarray, np.ndarray]:
    """Validate a training set: images, classes and class indices (shared by every estimator)."""
    images = to_pil_images(X)
    y = column_or_1d(y, warn=True)
    if len(images) != len(y):
        raise ValueError(f"X has {len(images)} images but y has {len(y)} labels")
    check_classification_targets(y)
    classes, y_idx = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(
            f"the training data contains only one class ({classes[0]!r}); a classifier needs at least two"
        )
    return images, classes, y_idx


def resolve_class_names(names, classes: np.ndarray) -> list[str]:
    """The prompt name of each class: from a mapping, a sequence, or ``str(label)``."""
    if names is None:
        return [str(c) for c in classes]
    if isinstance(names, Mapping):
        missing = [c.item() if isinstance(c, np.generic) else c for c in classes if c not in names]
        if missing:
            raise ValueError(f"class_names has no name for label(s) {missing[:5]}")
        return [str(names[c]) for c in classes]
    names = list(names)
    is_int = np.issubdtype(np.asarray(classes).dtype, np.integer)
    if is_int and classes.min() >= 0 and classes.max() < len(names):
        return [str(names[int(c)]) for c in classes]
    if len(names) == len(classes):
        return [str(n) for n in names]
    raise ValueError(
        f"class_names has {len(names)} names but y has {len(classes)} classes "
        f"({list(classes[:5])}...); pass a mapping label -> name, or one name per class"
    )


class ImageClassifierMixin(ClassifierMixin):
    """scikit-learn's ClassifierMixin, with ``score`` documented for image input."""

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


class CarrotClassifier(ImageClassifierMixin, BaseEstimator):
    """Few-shot classifier that adapts a black-box vision-language model (CARROT).

    Two modules are trained together within a budget of queries to the black
    box: a *prompt generation module* (prompt offset ``A z``, ``z`` searched by
    CMA-ES without gradients) and a *prediction refinement module* (a residual
    MLP on the returned logits, trained by Adam), tied by a prediction-consistency
    KL loss. Each generation spends ``popsize`` queries on candidate prompts and
    one query to score the training views under the new prompt for a refiner epoch.

    Parameters
    ----------
    backend : object or None, default=None
        The black box: any object with ``context_shape`` and
        ``logits(images, class_names, offsets)`` (see
        :class:`skcarrot.backends.BlackBoxVLM`). None uses the embedded micro
        CLIP shipped with skcarrot (:func:`skcarrot.backends.embedded_backend`);
        pass ``OpenCLIPBackend(model_name=..., pretrained=...)`` for a real model.
    class_names : mapping, sequence of str or None, default=None
        Names used in prompts. A mapping from label to name; a sequence indexed
        by the label when labels are integers ``0..len-1``, otherwise aligned
        with the sorted classes; None uses ``str(label)``.
    query_budget : int, default=8000
        Most queries ``fit`` may spend. A query is one prompt scored on one pass
        over the images it needs.
    popsize : int, default=40
        CMA-ES candidates per generation.
    intrinsic_dim : int, default=512
        Dimension of the searched vector ``z``.
    sigma : float, default=1.0
        Initial CMA-ES step size.
    bound : float or None, default=5.0
        Box ``[-bound, bound]`` on each coordinate of ``z``; None or 0 for none.
    projection_std : float, default=0.2
        Standard deviation of the random projection ``A``.
    consistency_weight : float, default=0.1
        Weight ``w`` of the prediction-consistency KL in both losses.
    consistency_fraction : float, default=0.25
        The refiner's loss includes the KL term during this first fraction of
        the generations, plain cross-entropy after.
    hidden_dim : int, default=256
        Hidden width of the refiner.
    learning_rate : float, default=1e-3
        Adam learning rate of the refiner.
    batch_size : int, default=32
        Refiner mini-batch size.
    n_views : int, default=8
        Views per training image (the image itself and ``n_views - 1``
        augmentations) that the refiner trains on; each epoch draws one view
        per image.
    augmentation : {"crop", "crop+flip", "flip", "none"} or callable, default="crop"
        How the extra views are made; a callable ``f(pil_image, rng) -> pil_image``
        is used as it is. Horizontal flips hurt on digits and text, hence off.
    prompt_tuning : bool, default=True
        Train the prompt generation module (off: the hand-written prompt).
    refinement : bool, default=True
        Train the prediction refinement module (off: identity).
        With both off the estimator is zero-shot and ``fit`` spends no query.
    max_iter : int or None, default=None
        Generations (refiner epochs without prompt tuning). None: as many as
        the budget allows; without prompt tuning, the number a full fit with the
        same budget would run, ``query_budget // (popsize + 1)``.
    random_state : int, RandomState instance or None, default=None
        Seeds the projection, CMA-ES, augmentation and the refiner.
    verbose : int, default=0
        0 prints nothing; 1 shows a progress bar over the queries (tqdm, on stderr); 2 also
        prints one line per generation (generation, queries, best fitness, refiner loss,
        training accuracy).
    warm_start : bool, default=False
        Continue from the previous fit's prompt and refiner (the class set
        must not change); each call has its own ``query_budget``.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Class labels.
    class_names_ : list of str
        The name of each class in prompts, in ``classes_`` order.
    prompt_offset_ : ndarray of shape (n_ctx, dim)
        Learned prompt offset ``A z`` (zeros: the hand-written prompt).
    prompt_z_ : ndarray of shape (intrinsic_dim,) or None
        Learned intrinsic vector ``z``.
    refiner_weights_ : dict of str to ndarray or None
        Weights of the refinement MLP (None when ``refinement=False``).
    n_queries_ : int
        Queries spent by the last call to ``fit``; never above ``query_budget``.
    n_queries_by_purpose_ : dict of str to int
        The same split into ``"prompt"`` (candidate prompts) and ``"refiner"``
        (training views scored for the refiner).
    history_ : list of dict
        One entry per generation: ``generation``, ``queries`` (spent so far),
        ``best_fitness``, ``mean_fitness``, ``refiner_loss`` and
        ``train_accuracy`` (of the current model on the training images when a
        refiner query shows it, else of the generation's best candidate).
    n_iter_ : int
        Generations run, over all warm-started fits.
    fit_time_ : float
        Seconds spent in the last ``fit``.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot import CarrotClassifier
    >>> from skcarrot.backends import ToyBackend
    >>> rng = np.random.RandomState(0)
    >>> X = rng.randint(0, 256, size=(20, 8, 8)).astype(np.uint8)
    >>> y = np.repeat([0, 1], 10)
    >>> clf = CarrotClassifier(backend=ToyBackend(), query_budget=60, popsize=4,
    ...                        intrinsic_dim=8, random_state=0).fit(X, y)
    >>> clf.n_queries_ <= 60
    True
    >>> clf.predict_proba(X[:3]).shape
    (3, 2)
    """

    _parameter_constraints: dict = {
        "backend": "no_validation",
        "class_names": [None, Mapping, list, tuple, np.ndarray],
        "query_budget": [Interval(Integral, 0, None, closed="left")],
        "popsize": [Interval(Integral, 2, None, closed="left")],
        "intrinsic_dim": [Interval(Integral, 1, None, closed="left")],
        "sigma": [Interval(Real, 0, None, closed="neither")],
        "bound": [None, Interval(Real, 0, None, closed="left")],
        "projection_std": [Interval(Real, 0, None, closed="neither")],
        "consistency_weight": [Interval(Real, 0, None, closed="left")],
        "consistency_fraction": [Interval(Real, 0, 1, closed="both")],
        "hidden_dim": [Interval(Integral, 1, None, closed="left")],
        "learning_rate": [Interval(Real, 0, None, closed="neither")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "n_views": [Interval(Integral, 1, None, closed="left")],
        "augmentation": [StrOptions(set(AUGMENTATIONS)), callable],
        "prompt_tuning": ["boolean"],
        "refinement": ["boolean"],
        "max_iter": [None, Interval(Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "warm_start": ["boolean"],
    }

    def __init__(
        self,
        *,
        backend=None,
        class_names=None,
        query_budget=8000,
        popsize=40,
        intrinsic_dim=512,
        sigma=1.0,
        bound=5.0,
        projection_std=0.2,
        consistency_weight=0.1,
        consistency_fraction=0.25,
        hidden_dim=256,
        learning_rate=1e-3,
        batch_size=32,
        n_views=8,
        augmentation="crop",
        prompt_tuning=True,
        refinement=True,
        max_iter=None,
        random_state=None,
        verbose=0,
        warm_start=False,
    ):
        self.backend = backend
        self.class_names = class_names
        self.query_budget = query_budget
        self.popsize = popsize
        self.intrinsic_dim = intrinsic_dim
        self.sigma = sigma
        self.bound = bound
        self.projection_std = projection_std
        self.consistency_weight = consistency_weight
        self.consistency_fraction = consistency_fraction
        self.hidden_dim = hidden_dim
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.n_views = n_views
        self.augmentation = augmentation
        self.prompt_tuning = prompt_tuning
        self.refinement = refinement
        self.max_iter = max_iter
        self.random_state = random_state
        self.verbose = verbose
        self.warm_start = warm_start

    # ------------------------------------------------------------------ helpers
    def _get_backend(self):
        return resolve_backend(self.backend)

    def _check_X(self, X) -> list:
        images = to_pil_images(X)
        width = flat_width(X)
        if width is not None and hasattr(self, "n_features_in_") and width != self.n_features_in_:
            raise ValueError(
                f"X has {width} features, but {type(self).__name__} is "
                f"expecting {self.n_features_in_} features as input"
            )
        return images

    def _n_generations(self, per_generation: int) -> int:
        if self.max_iter is not None:
            n = self.max_iter
            if self.prompt_tuning and n * per_generation > self.query_budget:
                n = self.query_budget // per_generation
            return n
        if self.prompt_tuning:
            return self.query_budget // per_generation
        return max(1, self.query_budget // (self.popsize + 1))

    # ---------------------------------------------------------------------- fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X: Any, y: Any) -> "CarrotClassifier":
        """Fit the prompt and the refiner to few-shot images within the query budget.

        Parameters
        ----------
        X : sequence of images or ndarray
            File paths, PIL images or ``HxW`` / ``HxWxC`` arrays, or one array
            ``(N, H, W[, C])``. See :func:`skcarrot.images.to_pil_images`.
        y : array-like of shape (n_samples,)
            Labels.

        Returns
        -------
        self : CarrotClassifier
            The fitted estimator.
        """
        start_time = time.perf_counter()
        images, classes, y_idx = check_images_and_labels(X, y)
        names = resolve_class_names(self.class_names, classes)

        warm = self.warm_start and hasattr(self, "classes_")
        if warm and (len(classes) != len(self.classes_) or np.any(classes != self.classes_)):
            raise ValueError(
                f"warm_start can not change the classes: fitted with {list(self.classes_)}, "
                f"got {list(classes)}"
            )

        per_generation = int(self.prompt_tuning) * self.popsize + int(self.refinement)
        if per_generation and self.query_budget < per_generation:
            parts = []
            if self.prompt_tuning:
                parts.append(f"popsize={self.popsize} prompts")
            if self.refinement:
                parts.append("1 refiner query")
            raise ValueError(
                f"query_budget={self.query_budget} is smaller than one generation "
                f"({' + '.join(parts)} = {per_generation} queries)"
            )

        backend = self._get_backend()
        box = QueryCounter(backend, budget=self.query_budget)
        context_shape = box.context_shape
        if warm and tuple(self.prompt_offset_.shape) != context_shape:
            raise ValueError("warm_start can not change the backend's context shape")

        rng = check_random_state(self.random_state)
        if warm and self.prompt_z_ is not None:
            projection_seed = self._projection_seed
        else:
            projection_seed = int(rng.randint(1, _SEED_MAX))
        cma_seed = int(rng.randint(1, _SEED_MAX))
        torch_seed = int(rng.randint(1, _SEED_MAX))

        search = None
        if self.prompt_tuning:
            x0 = None
            if warm and self.prompt_z_ is not None and len(self.prompt_z_) == self.intrinsic_dim:
                x0 = self.prompt_z_
            search = PromptSearch(
                context_shape,
                self.intrinsic_dim,
                self.projection_std,
                self.sigma,
                self.popsize,
                self.bound,
                projection_seed=projection_seed,
                cma_seed=cma_seed,
                x0=x0,
            )

        refiner = optimizer = None
        views = None
        if self.refinement:
            refiner = ResidualRefiner(len(classes), self.hidden_dim, torch.Generator().manual_seed(torch_seed))
            if warm and self.refiner_weights_ is not None:
                refiner.set_weights(self.refiner_weights_)
            refiner.eval()
            optimizer = torch.optim.Adam(refiner.parameters(), lr=self.learning_rate)
            views = augmented_views(images, self.n_views, self.augmentation, rng)

        if warm:
            offset = np.asarray(self.prompt_offset_, dtype=np.float32)
            z = self.prompt_z_
        else:
            offset = np.zeros(context_shape, dtype=np.float32)
            z = None
        if search is not None and z is None:
            z = search.current_x()

        n_gen = self._n_generations(per_generation) if per_generation else 0
        history = list(self.history_) if warm else []
        base_queries = history[-1]["queries"] if history else 0
        gen0 = self.n_iter_ if warm else 0
        y_t = torch.as_tensor(y_idx, dtype=torch.long)
        n_train = len(images)
        pool_logits = None
        # The bar counts queries; without prompt search (one query in all) it counts epochs.
        by_query = bool(self.prompt_tuning)
        bar = progress_bar(
            n_gen * per_generation if by_query else n_gen,
            "query" if by_query else "epoch",
            enabled=bool(self.verbose),
            desc="CarrotClassifier.fit",
        )
        for gen in range(n_gen):
            best_fit = mean_fit = train_acc = np.nan
            ref_loss = np.nan
            if search is not None:
                Z = search.ask()
                cand = torch.as_tensor(
                    box.logits(images, names, search.offsets(Z), purpose="prompt"), dtype=torch.float32
                )
                with torch.no_grad():
                    refined = refiner(cand) if refiner is not None else None
                    fitness = prompt_fitness(cand, refined, y_t, self.consistency_weight).numpy()
                search.tell(Z, fitness)
                z = search.current_x()
                offset = search.offsets(z)[0]
                best = int(np.argmin(fitness))
                best_fit, mean_fit = float(fitness[best]), float(np.mean(fitness))
                scored = refined if refined is not None else cand
                train_acc = float((scored[best].argmax(-1) == y_t).float().mean())
            if refiner is not None:
                pick = rng.randint(0, self.n_views, size=n_train)
                if search is None:
                    # The prompt never moves: one query scores every view once, for all epochs.
                    if pool_logits is None:
                        pool = [img for view in views for img in view]
                        pool_logits = box.logits(pool, names, offset[np.newaxis], purpose="refiner")[0]
                        pool_logits = pool_logits.reshape(self.n_views, n_train, len(classes))
                    train_logits = pool_logits[0]
                    epoch_logits = pool_logits[pick, np.arange(n_train)]
                else:
                    # New prompt: one query scores the images and this epoch's view of each.
                    sent = list(images) + [views[v][i] for i, v in enumerate(pick)]
                    both = box.logits(sent, names, offset[np.newaxis], purpose="refiner")[0]
                    train_logits, epoch_logits = both[:n_train], both[n_train:]
                use_kl = gen < self.consistency_fraction * n_gen
                ref_loss = refiner.train_epoch(
                    optimizer,
                    epoch_logits,
                    y_idx,
                    batch_size=self.batch_size,
                    weight=self.consistency_weight if use_kl else 0.0,
                    rng=rng,
                )
                with torch.no_grad():
                    current = refiner(torch.as_tensor(train_logits, dtype=torch.float32))
                train_acc = float((current.argmax(-1) == y_t).float().mean())
            record = {
                "generation": gen0 + gen + 1,
                "queries": base_queries + box.n_queries,
                "best_fitness": best_fit,
                "mean_fitness": mean_fit,
                "refiner_loss": ref_loss,
                "train_accuracy": train_acc,
            }
            history.append(record)
            bar.update(box.n_queries - bar.n if by_query else 1)
            if self.verbose >= 2:
                print(
                    f"Generation {record['generation']}, queries = {record['queries']}, "
                    f"best fitness = {best_fit:.4f}, refiner loss = {ref_loss:.4f}, "
                    f"train accuracy = {train_acc:.3f}"
                )
            logger.debug("generation %d: %s", record["generation"], record)
        bar.close()

        self.classes_ = classes
        self.class_names_ = names
        self.prompt_offset_ = np.asarray(offset, dtype=np.float32).copy()
        self.prompt_z_ = None if z is None else np.asarray(z, dtype=np.float64)
        self._projection_seed = projection_seed if z is not None else None
        if refiner is not None:
            self.refiner_weights_ = refiner.get_weights()
        elif not warm:
            self.refiner_weights_ = None
        self.n_queries_ = box.n_queries
        self.n_queries_by_purpose_ = {"prompt": box.by_purpose.get("prompt", 0), "refiner": box.by_purpose.get("refiner", 0)}
        self.history_ = history
        self.n_iter_ = gen0 + n_gen
        width = flat_width(X)
        if width is not None:
            self.n_features_in_ = width
        elif hasattr(self, "n_features_in_"):
            del self.n_features_in_
        self.fit_time_ = time.perf_counter() - start_time
        return self

    # ------------------------------------------------------------------ predict
    def decision_function(self, X: Any) -> np.ndarray:
        """Refined logits of each image.

        Parameters
        ----------
        X : sequence of images or ndarray
            As in :meth:`fit`.

        Returns
        -------
        scores : ndarray of shape (n_samples, n_classes), or (n_samples,) for two classes
            The black box's logits under the learned prompt, through the refiner.
            With two classes, the score of ``classes_[1]`` minus that of ``classes_[0]``.
        """
        check_is_fitted(self)
        scores = self._refined_logits(X)
        if len(self.classes_) == 2:
            return scores[:, 1] - scores[:, 0]
        return scores

    def _refined_logits(self, X) -> np.ndarray:
        images = self._check_X(X)
        backend = self._get_backend()
        logits = np.asarray(
            backend.logits(images, self.class_names_, self.prompt_offset_[np.newaxis]), dtype=np.float64
        )
        expected = (1, len(images), len(self.classes_))
        if logits.shape != expected:
            raise ValueError(f"backend.logits returned shape {logits.shape}, expected {expected}")
        return refine_logits(logits[0], self.refiner_weights_)

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
        return _softmax(self._refined_logits(X))

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
        return self.classes_[np.argmax(self._refined_logits(X), axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = True
        tags.input_tags.three_d_array = True
        # Tabular data read as images means nothing to a vision-language model,
        # so accuracy thresholds on synthetic tabular problems do not apply.
        tags.classifier_tags.poor_score = True
        return tags
