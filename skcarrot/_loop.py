"""The collaborative training loop: its state and one method per step.

:class:`CollaborativeLoop` holds everything a fit changes as it runs (the prompt
search, the refiner and its optimizer, the views, the current prompt, the best
model seen on validation) and offers the steps of one generation:

- :meth:`~CollaborativeLoop.prompt_step`: ask CMA-ES for candidates, score them
  through the door, compute their fitness with the refiner frozen, tell CMA-ES;
- :meth:`~CollaborativeLoop.refiner_step`: score this epoch's views under the
  current prompt and train the refiner for one epoch;
- :meth:`~CollaborativeLoop.validation_step`: score the held-back shots and keep
  the best model;
- :meth:`~CollaborativeLoop.generation_step`: the three in order, returning the
  history record.

The estimator builds the state, runs generations and reads the result; it never
reaches into the steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .images import augment_all, augmented_views
from .losses import cross_entropy, prompt_fitness
from .prompt import PromptSearch
from .refiner import ResidualRefiner, refine_logits

__all__ = [
    "CollaborativeLoop",
    "EmbeddingDoor",
    "EmbeddingPrompts",
    "FreshViews",
    "Snapshot",
    "TextDoor",
    "TextPrompts",
    "ViewPool",
    "plan_generations",
    "stratified_holdout",
]


class ViewPool:
    """A fixed pool of ``n_views`` views per image, made once; each epoch picks one per image.

    Examples
    --------
    >>> import numpy as np
    >>> from PIL import Image
    >>> from skcarrot._loop import ViewPool
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
    >>> from skcarrot._loop import FreshViews
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


class EmbeddingDoor:
    """The embedding-level door as the loop sees it: a prompt is an offset ``(n_ctx, dim)``."""

    kind = "embedding"

    def __init__(self, counter, class_names) -> None:
        self.counter = counter
        self.class_names = list(class_names)

    def score(self, images, prompts, purpose: str) -> np.ndarray:
        """Logits ``(P, N, C)`` of ``images`` under each prompt of ``prompts`` (``P`` queries)."""
        return self.counter.logits(images, self.class_names, np.asarray(prompts), purpose=purpose)

    def one(self, prompt) -> np.ndarray:
        """``prompts`` holding the single ``prompt``."""
        return np.asarray(prompt)[np.newaxis]


class TextDoor:
    """The text-level door as the loop sees it: a prompt is one string per class.

    Scores are log-probabilities (log-softmax of logits when the model returns
    them), so the refiner and the losses work the same on both doors.
    """

    kind = "text"

    def __init__(self, counter) -> None:
        self.counter = counter

    def score(self, images, prompts, purpose: str) -> np.ndarray:
        """Log-probabilities ``(P, N, C)`` of ``images`` under each prompt set (``P`` queries)."""
        return self.counter.log_probabilities(images, [list(p) for p in prompts], purpose=purpose)

    def one(self, prompt) -> list:
        """``prompts`` holding the single ``prompt``."""
        return [list(prompt)]


class EmbeddingPrompts:
    """:class:`~skcarrot.prompt.PromptSearch` with the loop's ask / tell / current."""

    def __init__(self, search: PromptSearch) -> None:
        self.search = search

    def ask(self):
        Z = self.search.ask()
        return Z, self.search.offsets(Z)

    def tell(self, handle, fitness) -> None:
        self.search.tell(handle, fitness)

    def current(self):
        """``(prompt offset, z)`` of the current solution."""
        z = self.search.current_x()
        return self.search.offsets(z)[0], z


class TextPrompts:
    """:class:`~skcarrot.text_prompt.TextPromptSearch` with the loop's ask / tell / current."""

    def __init__(self, search) -> None:
        self.search = search

    def ask(self):
        choices = self.search.ask()
        return choices, self.search.prompt_sets(choices)

    def tell(self, handle, fitness) -> None:
        self.search.tell(handle, fitness)

    def current(self):
        """``(prompt strings, choice indices)`` of the most probable prompt set."""
        return self.search.current(), self.search.current_choice()


@dataclass
class Snapshot:
    """A model the loop may end with: prompt, refiner weights and its validation score.

    ``prompt`` is an offset ``(n_ctx, dim)`` on the embedding door and one string
    per class on the text door; ``z`` is the search's own coordinates of it.
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


def plan_generations(
    query_budget: int,
    *,
    prompt_tuning: bool,
    refinement: bool,
    popsize: int,
    fresh_views: bool,
    validation: bool,
    max_iter: int | None,
) -> tuple[int, dict[str, int]]:
    """Generations a fit runs within ``query_budget``, and the cost of each part.

    Returns ``(n_generations, costs)`` with ``costs`` the queries of the start
    (``"start"``: the zero-shot validation and the one query that scores a fixed
    view pool when the prompt never moves) and of each generation
    (``"generation"``). Raises ``ValueError`` when not even one generation fits.

    Examples
    --------
    >>> from skcarrot._loop import plan_generations
    >>> plan_generations(200, prompt_tuning=True, refinement=True, popsize=8,
    ...                  fresh_views=False, validation=False, max_iter=None)
    (22, {'start': 0, 'generation': 9})
    """
    pool_once = refinement and not prompt_tuning and not fresh_views
    start = int(validation) + int(pool_once)
    per_generation = popsize * int(prompt_tuning) + int(refinement and not pool_once) + int(validation)
    costs = {"start": start, "generation": per_generation}
    if not (prompt_tuning or refinement):
        return 0, costs
    affordable = (query_budget - start) // per_generation if per_generation else (query_budget - start >= 0) * 10**9
    if affordable < 1:
        parts = []
        if validation:
            parts.append("1 zero-shot validation query")
        if prompt_tuning:
            parts.append(f"popsize={popsize} prompts")
        if refinement:
            parts.append("1 refiner query")
        if validation:
            parts.append("1 validation query")
        raise ValueError(
            f"query_budget={query_budget} is smaller than one generation "
            f"({' + '.join(parts)} = {start + per_generation} queries)"
        )
    if max_iter is not None:
        wanted = max_iter
    elif prompt_tuning:
        wanted = affordable
    else:  # as many epochs as a full fit with the same budget would run
        wanted = max(1, query_budget // (popsize + 1))
    return min(wanted, affordable), costs


@dataclass
class CollaborativeLoop:
    """State of one fit of the collaborative loop, one method per step.

    Parameters
    ----------
    door : EmbeddingDoor or TextDoor
        The black box behind its query counter, with the fit's budget.
    images : list of PIL.Image.Image
        Training images (without the validation shots).
    y : ndarray of int
        Class index of each training image.
    search : EmbeddingPrompts or TextPrompts or None
        The prompt generation module (None: the prompt never moves).
    refiner : ResidualRefiner or None
        The prediction refinement module (None: identity).
    optimizer : torch.optim.Optimizer or None
    views : ViewPool or FreshViews or None
        Where each epoch's views of the training images come from.
    rng : numpy.random.RandomState
        The loop's own generator (views, shuffles).
    consistency_weight : float
    kl_until : float
        The refiner's loss includes the consistency KL while the (global)
        generation index is below this.
    batch_size : int
    prompt : ndarray or list of str
        The current prompt: an offset ``(n_ctx, dim)`` or one string per class.
    z : ndarray or None
        The search's coordinates of the current prompt.
    generation : int
        Generations already run (by earlier warm-started fits).
    validation : tuple of (list, ndarray) or None
        Held-back images and class indices for early stopping.
    tol : float
        Least drop of validation loss that counts as an improvement.
    frozen_refiner_weights : dict or None
        Refiner weights the model keeps when the refiner is not trained.
    """

    door: Any
    images: list
    y: np.ndarray
    search: Any
    refiner: ResidualRefiner | None
    optimizer: torch.optim.Optimizer | None
    views: ViewPool | FreshViews | None
    rng: np.random.RandomState
    consistency_weight: float
    kl_until: float
    batch_size: int
    prompt: Any
    z: np.ndarray | None
    generation: int = 0
    validation: tuple | None = None
    tol: float = 1e-4
    frozen_refiner_weights: dict | None = None
    best: Snapshot | None = None
    n_no_improvement: int = 0
    _pool_scores: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.y_tensor = torch.as_tensor(self.y, dtype=torch.long)

    @property
    def counter(self):
        """The query counter behind the door."""
        return self.door.counter

    # ----------------------------------------------------------------- steps
    def prompt_step(self) -> dict:
        """Ask, score (``popsize`` queries), fitness with the refiner frozen, tell."""
        handle, candidates = self.search.ask()
        candidate_logits = torch.as_tensor(self.door.score(self.images, candidates, "prompt"), dtype=torch.float32)
        with torch.no_grad():
            refined = self.refiner(candidate_logits) if self.refiner is not None else None
            fitness = prompt_fitness(candidate_logits, refined, self.y_tensor, self.consistency_weight).numpy()
        self.search.tell(handle, fitness)
        self.prompt, self.z = self.search.current()
        best = int(np.argmin(fitness))
        scored = refined if refined is not None else candidate_logits
        return {
            "best_fitness": float(fitness[best]),
            "mean_fitness": float(np.mean(fitness)),
            "train_accuracy": float((scored[best].argmax(-1) == self.y_tensor).float().mean()),
        }

    def use_kl(self) -> bool:
        """Whether this generation's refiner loss includes the consistency KL."""
        return self.generation < self.kl_until

    def epoch_logits(self) -> np.ndarray:
        """Scores of this epoch's view of each training image under the current prompt.

        One query, sending one view per image. When the prompt never moves and
        the views come from a fixed pool, a single query scores the whole pool
        once and every epoch reads from it.
        """
        n_images = len(self.images)
        if self.search is None and self.views.fixed:
            if self._pool_scores is None:
                pool = self.door.score(self.views.all_views(), self.door.one(self.prompt), "refiner")[0]
                self._pool_scores = pool.reshape(self.views.n_views, n_images, -1)
            pick = self.views.pick(self.rng, n_images)
            return self._pool_scores[pick, np.arange(n_images)]
        sent = self.views.epoch_views(self.rng)
        return self.door.score(sent, self.door.one(self.prompt), "refiner")[0]

    def refiner_step(self) -> dict:
        """One refiner epoch on this epoch's views; training accuracy read off the same logits."""
        logits = self.epoch_logits()
        loss = self.refiner.train_epoch(
            self.optimizer,
            logits,
            self.y,
            batch_size=self.batch_size,
            weight=self.consistency_weight if self.use_kl() else 0.0,
            rng=self.rng,
        )
        with torch.no_grad():
            current = self.refiner(torch.as_tensor(logits, dtype=torch.float32))
        return {"refiner_loss": float(loss), "train_accuracy": float((current.argmax(-1) == self.y_tensor).float().mean())}

    def current_snapshot(self) -> Snapshot:
        """The model as it stands now."""
        weights = self.refiner.get_weights() if self.refiner is not None else self.frozen_refiner_weights
        z = None if self.z is None else np.asarray(self.z).copy()
        prompt = list(self.prompt) if self.door.kind == "text" else np.asarray(self.prompt, dtype=np.float32).copy()
        return Snapshot(prompt, z, weights, self.generation)

    def score_on_validation(self, snapshot: Snapshot) -> Snapshot:
        """Score ``snapshot`` on the held-back shots (one query) and record its accuracy and loss."""
        images, y = self.validation
        logits = self.door.score(images, self.door.one(snapshot.prompt), "validation")[0]
        refined = refine_logits(logits, snapshot.refiner_weights)
        snapshot.accuracy = float(np.mean(refined.argmax(-1) == y))
        snapshot.loss = float(cross_entropy(torch.as_tensor(refined), torch.as_tensor(y, dtype=torch.long)))
        return snapshot

    def offer(self, snapshot: Snapshot) -> bool:
        """Keep ``snapshot`` if it beats the best so far; returns whether it did."""
        if self.best is None or snapshot.beats(self.best, self.tol):
            self.best = snapshot
            self.n_no_improvement = 0
            return True
        self.n_no_improvement += 1
        return False

    def validation_step(self) -> dict:
        """Score the current model on the validation shots and keep it if it is the best yet."""
        snapshot = self.score_on_validation(self.current_snapshot())
        self.offer(snapshot)
        return {"validation_accuracy": snapshot.accuracy, "validation_loss": snapshot.loss}

    def generation_step(self) -> dict:
        """Prompt step, refiner step and validation step; returns the history record."""
        record = {"best_fitness": np.nan, "mean_fitness": np.nan, "refiner_loss": np.nan, "train_accuracy": np.nan}
        if self.search is not None:
            record.update(self.prompt_step())
        if self.refiner is not None:
            record.update(self.refiner_step())
        self.generation += 1
        if self.validation is not None:
            record.update(self.validation_step())
        return {"generation": self.generation, "queries": self.counter.n_queries, **record}

    def result(self) -> Snapshot:
        """The model the fit ends with: the best on validation when there is one, else the last."""
        return self.best if self.best is not None else self.current_snapshot()

    def should_stop(self, n_iter_no_change: int | None) -> bool:
        """Early stopping: validation has not improved for ``n_iter_no_change`` generations (None: never)."""
        return (
            self.validation is not None
            and n_iter_no_change is not None
            and self.n_no_improvement >= n_iter_no_change
        )

    # ------------------------------------------------------------ checkpoints
    _COUNTS = ("n_queries", "n_images_scored", "n_pairs_scored", "by_purpose", "images_by_purpose")
    _PLAIN = ("images", "y", "search", "views", "prompt", "z", "generation", "validation", "best",
              "n_no_improvement", "_pool_scores", "kl_until", "frozen_refiner_weights")

    def state(self) -> dict:
        """Everything the next generation depends on, for a checkpoint (the door excepted)."""
        state = {name: getattr(self, name) for name in self._PLAIN}
        state["rng"] = self.rng.get_state()
        state["refiner"] = None if self.refiner is None else self.refiner.state_dict()
        state["optimizer"] = None if self.optimizer is None else self.optimizer.state_dict()
        state["counts"] = {
            name: (dict(v) if isinstance(v, dict) else v)
            for name in self._COUNTS
            if (v := getattr(self.counter, name, None)) is not None
        }
        return state

    def restore(self, state: dict) -> None:
        """Continue from :meth:`state`: the same trajectory as the fit that wrote it."""
        for name in self._PLAIN:
            setattr(self, name, state[name])
        self.y_tensor = torch.as_tensor(self.y, dtype=torch.long)
        self.rng.set_state(state["rng"])
        if self.refiner is not None:
            self.refiner.load_state_dict(state["refiner"])
            self.refiner.eval()
            self.optimizer.load_state_dict(state["optimizer"])
        for name, value in state["counts"].items():
            setattr(self.counter, name, dict(value) if isinstance(value, dict) else value)


def stratified_holdout(
    y: np.ndarray, fraction: float, rng: np.random.RandomState
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, validation): ``round(fraction * n_c)`` per class, at least one.

    A class with a single image keeps it for training.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot._loop import stratified_holdout
    >>> train, val = stratified_holdout(np.repeat([0, 1], 10), 0.1, np.random.RandomState(0))
    >>> len(train), len(val), sorted(int(c) for c in np.repeat([0, 1], 10)[val])
    (18, 2, [0, 1])
    """
    validation = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        n_val = min(max(1, int(round(fraction * len(members)))), len(members) - 1)
        if n_val > 0:
            validation.extend(rng.choice(members, n_val, replace=False))
    validation = np.sort(np.asarray(validation, dtype=int))
    train = np.setdiff1d(np.arange(len(y)), validation)
    return train, validation

