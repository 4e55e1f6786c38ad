"""CarrotClassifier: the scikit-learn contract of the collaborative loop.

Everything the estimator learns comes through one door (:mod:`skcarrot.doors`),
picked once per fit; the fit's lifecycle lives in :mod:`skcarrot._training`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping
from numbers import Integral, Real
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, _fit_context, clone
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._training import (
    Checkpointer,
    FitSettings,
    Progress,
    StartingPoint,
    start_fit,
    fit_fingerprint,
    read_checkpoint,
    requests_named_by,
    run_generations,
)
from ._util.predict import ImageClassifierMixin
from ._util.validation import check_images_and_labels, resolve_class_names
from .search._vocabulary import warn_if_unknown_to
from .backends.embedded import resolve_backend
from .doors import door_named, fitted_attribute_names, pick_door
from .images import AUGMENTATIONS, flat_width
from .refiner import refine_logits

__all__ = ["CarrotClassifier"]


class CarrotClassifier(ImageClassifierMixin, BaseEstimator):
    """Few-shot classifier that adapts a black-box vision-language model (CARROT).

    Two modules are trained together within a budget of queries to the black
    box: a *prompt generation module* (prompt offset ``A z``, ``z`` searched by
    CMA-ES without gradients) and a *prediction refinement module* (a residual
    MLP on the returned logits, trained by Adam), tied by a prediction-consistency
    KL loss. Each generation spends ``popsize`` queries on candidate prompts and
    one query to score the training views under the new prompt for a refiner epoch.

    The door decides the mode (``door``; by default the one the backend offers). On the *embedding* door (the
    paper's) prompts are offsets added to the context word embeddings. On the
    *text* door, which hosted endpoints offer, prompts are strings: the prompt
    generation module searches each class's wording with a policy gradient over
    words (:class:`skcarrot.search.TextPromptSearch`), and the refiner and
    the consistency loss work on log-probabilities.

    Parameters
    ----------
    backend : object or None, default=None
        The black box: any :class:`skcarrot.backends.BlackBoxVLM` (embedding
        door) or :class:`skcarrot.backends.TextBlackBox` (text door), e.g.
        ``OpenCLIPBackend(model_name=..., pretrained=...)``, ``HTTPBackend`` or
        ``ZeroShotHTTPBackend``. None: the embedded micro CLIP
        (:func:`skcarrot.backends.embedded_backend`).
    door : {"auto", "embedding", "text"}, default="auto"
        How to reach the backend (:mod:`skcarrot.doors`). "auto": the embedding
        door when the backend offers ``logits``, else the text door. An explicit
        door works with any backend that offers it (``HTTPBackend`` offers both).
    class_names : mapping, sequence of str or None, default=None
        Names used in prompts. A mapping from label to name; a sequence indexed
        by the label when labels are integers ``0..len-1``, otherwise aligned
        with the sorted classes; None uses ``str(label)``.
    query_budget : int or "auto", default="auto"
        Most queries ``fit`` may spend; "auto" is 8000 on the embedding door
        (the paper's) and 250 on the text door. A *query* is one prompt (an
        offset, or a set of prompt strings) scored on the images of one call;
        the images sent are counted apart, in ``n_images_scored_``.
    popsize : int or "auto", default="auto"
        Candidate prompts per generation; "auto" is 40 on the embedding door
        (CMA-ES) and 10 on the text door (prompt sets sampled by the policy
        gradient).
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
        the generations of the first fit, plain cross-entropy after (1.0: always).
    hidden_dim : int, default=256
        Hidden width of the refiner.
    learning_rate : float, default=1e-3
        Adam learning rate of the refiner.
    batch_size : int, default=32
        Refiner mini-batch size.
    n_views : int or "auto", default="auto"
        Size of the fixed view pool (the image itself and ``n_views - 1``
        augmentations) that the refiner trains on; each epoch draws one view
        per image. Ignored when ``fresh_views=True``. ``"auto"`` is the door's
        default: 8 on the embedding and text doors (one query scores the whole
        pool), 2 on the chat door (each view is a call; measured there, 2 views
        trained the refiner as well as 8 for a quarter of the calls).
    augmentation : {"crop", "crop+flip", "flip", "none"} or callable, default="crop"
        How views are made; a callable ``f(pil_image, rng) -> pil_image``
        is used as it is. Horizontal flips hurt on digits and text, hence off.
    fresh_views : bool, default=False
        Draw a new augmented view of every image each epoch, as the paper does,
        instead of the fixed pool of ``n_views``. Without prompt tuning this
        costs one query per epoch instead of one in all.
    image_range : tuple of (float, float) or None, default=None
        ``(black, white)`` of array images. None reads each format by its true
        range (uint8 0-255, uint16 0-65535, floats in [0, 1] or 0-255) and
        raises when the range is ambiguous; see
        :func:`skcarrot.images.to_pil_images`.
    vocabulary : sequence of str, int or None, default=None
        Text door only: the words the prompt search may use for a class,
        screened on the training shots first (one query per ``backend.max_labels``
        words). An int: a seeded subset of that many words of open_clip's
        tokenizer. None: 200 of them (measured: more words fit the shots, not the task).
    prompt_tuning : bool or "auto", default="auto"
        Train the prompt generation module (False: the hand-written prompt;
        True: the paper's protocol, the whole budget, unless the text door's
        screen keeps no word: then there is nothing to search and the refiner
        trains alone). "auto" pays for the
        search only where it pays: the refiner on the hand-written prompt is
        chosen over the bare prompt, and its number of epochs picked (on a
        schedule of 64 epochs or more), by cross-validation on the logits of one query, then a pilot of the prompt search, cross-fitted on two halves of
        the shots within a quarter of the budget, must beat it on the half it did
        not see by twice its standard error before the rest of the budget is
        spent; the choice is refitted on all shots (``selection_`` says what was
        chosen and why). At the chat door a search on 2 shots a class comes
        first, and its prompt replaces the hand-written one when the refiner
        on it does better on the shots it did not see. A warm start continues
        the previous fit's mode.
    refinement : bool, default=True
        Train the prediction refinement module (off: identity).
        With both off the estimator is zero-shot and ``fit`` spends no query.
    max_iter : int or None, default=None
        Generations (refiner epochs without prompt tuning). None: as many as
        the budget allows; without prompt tuning, the number a full fit with the
        same budget would run, ``query_budget // (popsize + 1)``, or, with
        ``prompt_tuning="auto"``, as many of those as cross-validation chose.
    early_stopping : bool or "auto", default=False
        Hold back ``validation_fraction`` of the shots of each class (at least
        one) and keep the model with the lowest cross-entropy on them, the
        starting model included; with ``n_iter_no_change``, stop when it has not
        improved for that many generations. One query per generation, plus one.
        False is the paper's protocol (the last generation); "auto" is the
        door's default (off on both doors).
    validation_fraction : float, default=0.1
        Fraction of each class's shots held back when ``early_stopping``.
    n_iter_no_change : int or None, default=None
        Generations without improvement before stopping; None never stops
        early (the best model on validation is still the one kept).
    tol : float, default=1e-4
        The least drop of validation loss that counts as an improvement.
    checkpoint : str, path or None, default=None
        File where ``fit`` saves its whole state every ``checkpoint_every``
        generations and at the end, atomically. When it exists as ``fit``
        starts, the fit resumes from it on the same trajectory (same model, same
        ``n_queries_``). An unfinished checkpoint of a fit with other images,
        labels or parameters is refused; the backend is not compared. One file
        per fit; a pickle: load only checkpoints you wrote.
    checkpoint_every : int, default=10
        Generations between checkpoints.
    random_state : int, RandomState instance or None, default=None
        Seeds the projection, CMA-ES, augmentation, the validation split and
        the refiner. Every generator is made from it at the start of ``fit``;
        with an int, ``fit`` never touches numpy's global random state.
    verbose : int, default=0
        0 prints nothing; 1 shows a progress bar over the queries (tqdm, on stderr); 2 also
        prints one line per generation (generation, queries, best fitness, refiner loss,
        training accuracy).
    warm_start : bool, default=False
        Continue from the previous fit's prompt and refiner (the class set
        must not change); each call has its own ``query_budget``, and the
        consistency-loss schedule continues where the previous call left it.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Class labels.
    class_names_ : list of str
        The name of each class in prompts, in ``classes_`` order.
    door_ : {"embedding", "text"}
        The door the fit went through.
    prompt_offset_ : ndarray of shape (n_ctx, dim) or None
        Learned prompt offset ``A z`` (zeros: the hand-written prompt); None on
        the text door.
    prompt_z_ : ndarray of shape (intrinsic_dim,) or None
        Learned intrinsic vector ``z``.
    prompt_ : list of str or None
        Text door: the learned prompt of each class, in ``classes_`` order,
        readable by a person. None on the embedding door.
    prompt_candidates_ : list of list of str or None
        Text door: each class's own name then the words kept by screening.
    refiner_weights_ : dict of str to ndarray or None
        Weights of the refinement MLP (None when ``refinement=False``).
    n_queries_ : int
        Queries spent by the last call to ``fit``; never above ``query_budget``.
    n_queries_by_purpose_ : dict of str to int
        The same split into ``"screen"`` (text door: candidate words),
        ``"prompt"``, ``"refiner"``, ``"validation"`` and ``"pilot"`` (held-out
        scoring of the pilots of ``prompt_tuning="auto"``; their training is
        counted as prompt and refiner queries).
    n_images_scored_ : int
        Images sent to the black box by the last ``fit``, summed over calls:
        its cost in image forward passes.
    n_pairs_scored_ : int
        Prompt x image pairs scored: the calls a one-image-per-call endpoint
        (``ZeroShotHTTPBackend``) receives, and bills.
    history_ : list of dict
        One entry per generation: ``generation``, ``queries`` (spent so far),
        ``best_fitness``, ``mean_fitness``, ``refiner_loss``, ``train_accuracy``
        and, with early stopping, ``validation_accuracy`` and ``validation_loss``.
    n_iter_ : int
        Generations run, over all warm-started fits.
    best_generation_ : int
        Generation of the model kept (the last one without early stopping).
    validation_score_ : float or None
        Validation accuracy of the kept model (None without early stopping).
    validation_loss_ : float or None
        Its validation cross-entropy, the criterion of the choice.
    selection_ : dict or None
        What ``prompt_tuning="auto"`` chose (``choice``: "zero-shot",
        "refine-only" or "carrot"), why (``reason``), the held-out gains,
        ``refiner_epochs`` (the epochs a refine-only choice trains) and
        ``pilot_queries``; None for any other setting.
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
        "door": [str],
        "class_names": [None, Mapping, list, tuple, np.ndarray],
        "query_budget": [Interval(Integral, 0, None, closed="left"), StrOptions({"auto"})],
        "popsize": [Interval(Integral, 2, None, closed="left"), StrOptions({"auto"})],
        "intrinsic_dim": [Interval(Integral, 1, None, closed="left")],
        "sigma": [Interval(Real, 0, None, closed="neither")],
        "bound": [None, Interval(Real, 0, None, closed="left")],
        "projection_std": [Interval(Real, 0, None, closed="neither")],
        "consistency_weight": [Interval(Real, 0, None, closed="left")],
        "consistency_fraction": [Interval(Real, 0, 1, closed="both")],
        "hidden_dim": [Interval(Integral, 1, None, closed="left")],
        "learning_rate": [Interval(Real, 0, None, closed="neither")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "n_views": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "augmentation": [StrOptions(set(AUGMENTATIONS)), callable],
        "image_range": [None, tuple, list],
        "vocabulary": [None, Interval(Integral, 1, None, closed="left"), list, tuple, np.ndarray],
        "fresh_views": ["boolean"],
        "prompt_tuning": ["boolean", StrOptions({"auto"})],
        "refinement": ["boolean"],
        "max_iter": [None, Interval(Integral, 1, None, closed="left")],
        "early_stopping": ["boolean", StrOptions({"auto"})],
        "validation_fraction": [Interval(Real, 0, 1, closed="neither")],
        "n_iter_no_change": [None, Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "checkpoint": [None, str, os.PathLike],
        "checkpoint_every": [Interval(Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "warm_start": ["boolean"],
    }

    def __init__(
        self, *, backend=None, door="auto", class_names=None, query_budget="auto", popsize="auto",
        intrinsic_dim=512, sigma=1.0, bound=5.0, projection_std=0.2, consistency_weight=0.1,
        consistency_fraction=0.25, hidden_dim=256, learning_rate=1e-3, batch_size=32, n_views="auto",
        augmentation="crop", fresh_views=False, image_range=None, vocabulary=None, prompt_tuning="auto",
        refinement=True, max_iter=None, early_stopping=False, validation_fraction=0.1, n_iter_no_change=None,
        tol=1e-4, checkpoint=None, checkpoint_every=10, random_state=None, verbose=0, warm_start=False,
    ):
        self.backend = backend
        self.door = door
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
        self.fresh_views = fresh_views
        self.image_range = image_range
        self.vocabulary = vocabulary
        self.prompt_tuning = prompt_tuning
        self.refinement = refinement
        self.max_iter = max_iter
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.tol = tol
        self.checkpoint = checkpoint
        self.checkpoint_every = checkpoint_every
        self.random_state = random_state
        self.verbose = verbose
        self.warm_start = warm_start

    def _starting_point(self, classes: np.ndarray, door: str) -> StartingPoint:
        """Where this fit starts: fresh, or the previous fit on a warm start (refusing a changed class set or door)."""
        if not (self.warm_start and hasattr(self, "classes_")):
            return StartingPoint()
        if len(classes) != len(self.classes_) or np.any(classes != self.classes_):
            raise ValueError(
                f"warm_start can not change the classes: fitted with {list(self.classes_)}, got {list(classes)}"
            )
        if door != self.door_:
            raise ValueError(f"warm_start can not change the door: fitted on the {self.door_} door, got {door}")
        return StartingPoint.continuing(self._prompt_state, self.refiner_weights_, self.n_iter_, self._kl_until,
                                        self.history_)

    # ---------------------------------------------------------------------- cost
    def estimate_cost(self, X: Any, y: Any, prices: dict | None = None) -> dict:
        """What :meth:`fit` would spend on ``X, y``, before any call: a dry run.

        The fit runs as it would, against a stand-in for the backend that answers
        every call with equal scores and counts it; no call reaches the model, no
        answer is cached, and none is read from the cache: answers a backend's cache
        already holds make the fit's calls fewer than the estimate. The stages of ``prompt_tuning="auto"`` choose on real
        answers, so for it the count is what the stand-in's answers led to (at the
        chat door the search on a few shots and both view pools; the refiner's first
        stage; the pilot, when the pilot is affordable), at most ``query_budget``.

        Parameters
        ----------
        X, y
            As for :meth:`fit`.
        prices : dict or None, default=None
            ``{"input": usd_per_million_tokens, "output": usd_per_million_tokens}``.

        Returns
        -------
        cost : dict
            ``calls`` (queries), ``input_tokens`` and ``output_tokens`` (for a backend
            that estimates them, e.g. :class:`~skcarrot.backends.ChatVLMBackend`: images
            by its ``detail``, text by its ``count_tokens``), and ``usd`` with ``prices``.

        Examples
        --------
        >>> from skcarrot import CarrotClassifier, ChatVLMBackend
        >>> from skcarrot.datasets import few_shot_split, load_digit_images
        >>> X, y = load_digit_images()
        >>> X_train, y_train, _, _ = few_shot_split(X[y < 3], y[y < 3], n_shots=4, seed=0)
        >>> clf = CarrotClassifier(backend=ChatVLMBackend(model="gpt-4o", cache=None), prompt_tuning=False,
        ...                        class_names=["0", "1", "2"])
        >>> cost = clf.estimate_cost(X_train, y_train, prices={"input": 2.5, "output": 10.0})
        >>> cost["calls"], cost["output_tokens"]
        (24, 24)
        """
        from ._training.dry_run import dry_run_backend

        dry = dry_run_backend(resolve_backend(self.backend))
        estimator = clone(self).set_params(backend=dry, checkpoint=None, verbose=0, warm_start=False)
        estimator.fit(X, y)
        cost = {"calls": int(estimator.n_queries_), "input_tokens": dry.n_input_tokens_,
                "output_tokens": dry.n_output_tokens_}
        if prices is not None:
            cost["usd"] = (cost["input_tokens"] * prices["input"] + cost["output_tokens"] * prices["output"]) / 1e6
        return cost

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
        images, classes, y_idx = check_images_and_labels(X, y, self.image_range)
        names = resolve_class_names(self.class_names, classes)
        backend = resolve_backend(self.backend)
        warn_if_unknown_to(backend, names, stacklevel=3)
        door_type = pick_door(backend, self.door)
        start = self._starting_point(classes, door_type.name)
        params = self.get_params(deep=False)
        settings = FitSettings.resolve(params, door_type)
        door = door_type(backend, names, budget=settings.query_budget)
        run_id = None
        if self.checkpoint is not None:
            run_id = fit_fingerprint(images, y_idx, params, classes, start.warm_from)
            start.saved = read_checkpoint(self.checkpoint, run_id)
        with requests_named_by(backend, run_id, door.counter):
            loop, run, selection = start_fit(door, settings, images, y_idx, self.random_state, start)
            run.fingerprint = run_id
            callbacks = [Progress(loop, run, verbose=self.verbose, by_query=loop.prompt_moves(),
                                  patience=settings.n_iter_no_change, selection=selection)]
            if self.checkpoint is not None:
                callbacks.append(Checkpointer(self.checkpoint, self.checkpoint_every))
            run_generations(loop, run, callbacks)
        self._store(door, loop, run, start, classes, names, X)
        self.selection_ = None if selection is None else dataclasses.asdict(selection)
        self.fit_time_ = time.perf_counter() - start_time
        return self

    def _store(self, door, loop, run, start, classes, names, X) -> None:
        """Write every fitted attribute, and only here: a fit that fails leaves the old model intact."""
        result = loop.result()
        attributes, self._prompt_state = door.fitted(result, loop.prompt.search, run.seeds, start)
        for name in fitted_attribute_names():  # the other doors' attributes are None
            setattr(self, name, attributes.get(name))
        counter = loop.counter
        self.classes_ = classes
        self.class_names_ = names
        self.door_ = door.name
        self.refiner_weights_ = result.refiner_weights
        self.best_generation_ = result.generation
        best = loop.early_stopping.best if loop.early_stopping is not None else None
        self.validation_score_ = None if best is None else best.accuracy
        self.validation_loss_ = None if best is None else best.loss
        self.n_queries_ = counter.n_queries
        self.n_queries_by_purpose_ = {
            purpose: counter.by_purpose.get(purpose, 0)
            for purpose in ("screen", "prompt", "refiner", "validation", "pilot")
        }
        self.n_images_scored_ = counter.n_images_scored
        self.n_pairs_scored_ = counter.n_pairs_scored
        self.history_ = run.history
        self.n_iter_ = loop.generation
        self._kl_until = loop.kl_until
        width = flat_width(X)
        if width is not None:
            self.n_features_in_ = width
        elif hasattr(self, "n_features_in_"):
            del self.n_features_in_

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
        scores = self._scores(X)
        if len(self.classes_) == 2:
            return scores[:, 1] - scores[:, 0]
        return scores

    def _scores(self, X) -> np.ndarray:
        """Refined logits ``(n_samples, n_classes)``: the learned prompt scored through the door, then the refiner."""
        images = self._check_X(X)
        door = door_named(self.door_)(resolve_backend(self.backend), self.class_names_)
        scores = door.score(images, door.one(self._prompt_state["prompt"]), "predict")[0]
        return refine_logits(scores, self.refiner_weights_)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = True
        tags.input_tags.three_d_array = True
        # Tabular data read as images means nothing to a vision-language model,
        # so accuracy thresholds on synthetic tabular problems do not apply.
        tags.classifier_tags.poor_score = True
        return tags
