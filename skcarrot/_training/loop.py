"""The collaborative training loop: its state, one method per step, and the driver.

:class:`CollaborativeLoop` holds everything a fit changes as it runs (the prompt
search, the refiner and its optimizer, the views, the current prompt, the early
stopping state) and offers the steps of one generation:

- :meth:`~CollaborativeLoop.prompt_step`: ask the search for candidates, score
  them through the door, compute their fitness with the refiner frozen, tell;
- :meth:`~CollaborativeLoop.refiner_step`: score this epoch's views under the
  current prompt and train the refiner for one epoch;
- :meth:`~CollaborativeLoop.validation_step`: score the held-back shots and keep
  the best model;
- :meth:`~CollaborativeLoop.generation_step`: the three in order, returning the
  history record.

:func:`run_generations` runs the planned generations and calls the callbacks
(progress, checkpoints) after each; the estimator never reaches into the steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .._threads import fit_threads
from ..losses import cross_entropy, prompt_fitness
from ..refiner import ResidualRefiner, refine_logits
from .early_stopping import EarlyStopping, Snapshot
from .views import FreshViews, ViewPool

__all__ = ["BudgetTooSmallError", "CollaborativeLoop", "plan_generations", "run_generations"]


class BudgetTooSmallError(ValueError):
    """The query budget can not buy one generation."""


def plan_generations(
    query_budget: int,
    *,
    prompt_tuning: bool,
    refinement: bool,
    popsize: int,
    fresh_views: bool,
    validation: bool,
    max_iter: int | None,
    screening: int = 0,
) -> tuple[int, dict[str, int]]:
    """Generations a fit runs within ``query_budget``, and the cost of each part.

    Returns ``(n_generations, costs)`` with ``costs`` the queries of the start
    (``"start"``: the search's own start, e.g. ``screening`` candidate words on the
    text door, the zero-shot validation, and the one query that scores a fixed view
    pool when the prompt never moves) and of each generation (``"generation"``).
    Raises :class:`BudgetTooSmallError` (a ``ValueError``) when not even one generation fits.

    Examples
    --------
    >>> from skcarrot._training import plan_generations
    >>> plan_generations(200, prompt_tuning=True, refinement=True, popsize=8,
    ...                  fresh_views=False, validation=False, max_iter=None)
    (22, {'start': 0, 'generation': 9})
    """
    pool_once = refinement and not prompt_tuning and not fresh_views
    start = screening + int(validation) + int(pool_once)
    per_generation = popsize * int(prompt_tuning) + int(refinement and not pool_once) + int(validation)
    costs = {"start": start, "generation": per_generation}
    if not (prompt_tuning or refinement):
        return 0, costs
    affordable = (query_budget - start) // per_generation if per_generation else (query_budget - start >= 0) * 10**9
    if affordable < 1:
        parts = [f"{screening} screening queries"] if screening else []
        if validation:
            parts.append("1 zero-shot validation query")
        if prompt_tuning:
            parts.append(f"popsize={popsize} prompts")
        if refinement:
            parts.append("1 refiner query")
        if validation:
            parts.append("1 validation query")
        raise BudgetTooSmallError(
            f"query_budget={query_budget} is smaller than one generation "
            f"({' + '.join(parts)} = {start + per_generation} queries): "
            + _budget_remedies(query_budget, start + per_generation, prompt_tuning=prompt_tuning,
                               refinement=refinement, popsize=popsize, validation=validation)
        )
    if max_iter is not None:
        wanted = max_iter
    elif prompt_tuning:
        wanted = affordable
    else:  # as many epochs as a full fit with the same budget would run
        wanted = max(1, query_budget // (popsize + 1))
    return min(wanted, affordable), costs


def _budget_remedies(
    query_budget: int, needed: int, *, prompt_tuning: bool, refinement: bool, popsize: int, validation: bool
) -> str:
    """What makes one generation fit: the least budget, and the parameters that lower the cost."""
    remedies = [f"raise query_budget to at least {needed}"]
    if prompt_tuning:
        most = popsize - (needed - query_budget)  # one query less per prompt less
        if most >= 2:
            remedies.append(f"lower popsize to at most {most}")
        elif popsize > 2:
            remedies.append(f"lower popsize (popsize=2 needs {needed - popsize + 2})")
    if validation:
        remedies.append("set early_stopping=False (2 validation queries fewer)")
    alone = 2 * int(validation) + 1  # the refiner without the prompt search: one generation's cost
    if prompt_tuning and refinement and alone <= query_budget:
        remedies.append(f"set prompt_tuning=False (the refiner alone needs {alone})")
    if len(remedies) == 1:
        return remedies[0]
    return ", ".join(remedies[:-1]) + ", or " + remedies[-1]


@dataclass
class CollaborativeLoop:
    """State of one fit of the collaborative loop, one method per step.

    Parameters
    ----------
    door : skcarrot.doors.Door
        The black box behind its query counter, with the fit's budget.
    images : list of PIL.Image.Image
        Training images (without the validation shots).
    y : ndarray of int
        Class index of each training image.
    search : skcarrot.search.PromptSearch or None
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
        The current prompt, in the door's form.
    z : ndarray or None
        The search's coordinates of the current prompt.
    generation : int
        Generations already run (by earlier warm-started fits).
    early_stopping : EarlyStopping or None
        Held-back shots and the best model on them.
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
    early_stopping: EarlyStopping | None = None
    frozen_refiner_weights: dict | None = None
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
        self.prompt, self.z = self.search.current(), self.search.coordinates()
        best = int(np.argmin(fitness))
        scored = refined if refined is not None else candidate_logits
        return {
            "best_fitness": float(fitness[best]),
            "mean_fitness": float(np.mean(fitness)),
            "train_accuracy": float((scored[best].argmax(-1) == self.y_tensor).float().mean()),
        }

    def prompt_moves(self) -> bool:
        """Whether the prompt search runs: there is one, and it has more than one prompt to offer.

        When it has not (the text door's screening kept no word), the fit goes on as the
        refiner alone does: the prompt stays, and one query scores the view pool once.
        """
        if self.search is None:
            return False
        can_move = getattr(self.search, "can_move", None)  # optional: a search without it always moves
        return True if can_move is None else bool(can_move())

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
        if not self.prompt_moves() and self.views.fixed:
            pick = self.views.pick(self.rng, n_images)
            return self.pool_scores()[pick, np.arange(n_images)]
        sent = self.views.epoch_views(self.rng)
        return self.door.score(sent, self.door.one(self.prompt), "refiner")[0]

    def pool_scores(self) -> np.ndarray:
        """Scores ``(n_views, N, C)`` of the whole fixed view pool under the current prompt (one query, once)."""
        if self._pool_scores is None:
            pool = self.door.score(self.views.all_views(), self.door.one(self.prompt), "refiner")[0]
            self._pool_scores = pool.reshape(self.views.n_views, len(self.images), -1)
        return self._pool_scores

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
        return Snapshot(self.door.copy_prompt(self.prompt), z, weights, self.generation)

    def score_on_validation(self, snapshot: Snapshot) -> Snapshot:
        """Score ``snapshot`` on the held-back shots (one query) and record its accuracy and loss."""
        images, y = self.early_stopping.images, self.early_stopping.y
        logits = self.door.score(images, self.door.one(snapshot.prompt), "validation")[0]
        refined = refine_logits(logits, snapshot.refiner_weights)
        snapshot.accuracy = float(np.mean(refined.argmax(-1) == y))
        snapshot.loss = float(cross_entropy(torch.as_tensor(refined), torch.as_tensor(y, dtype=torch.long)))
        return snapshot

    def validation_step(self) -> dict:
        """Score the current model on the validation shots and keep it if it is the best yet."""
        snapshot = self.score_on_validation(self.current_snapshot())
        self.early_stopping.offer(snapshot)
        return {"validation_accuracy": snapshot.accuracy, "validation_loss": snapshot.loss}

    def generation_step(self) -> dict:
        """Prompt step, refiner step and validation step; returns the history record."""
        record = {"best_fitness": np.nan, "mean_fitness": np.nan, "refiner_loss": np.nan, "train_accuracy": np.nan}
        if self.prompt_moves():
            record.update(self.prompt_step())
        if self.refiner is not None:
            record.update(self.refiner_step())
        self.generation += 1
        if self.early_stopping is not None:
            record.update(self.validation_step())
        return {"generation": self.generation, "queries": self.counter.n_queries, **record}

    def result(self) -> Snapshot:
        """The model the fit ends with: the best on validation when there is one, else the last."""
        if self.early_stopping is not None and self.early_stopping.best is not None:
            return self.early_stopping.best
        return self.current_snapshot()

    def should_stop(self) -> bool:
        """Whether early stopping says the fit is over."""
        return self.early_stopping is not None and self.early_stopping.should_stop()

    # ------------------------------------------------------------ checkpoints
    _COUNTS = ("n_queries", "n_images_scored", "n_pairs_scored", "by_purpose", "images_by_purpose")
    _PLAIN = ("images", "y", "views", "prompt", "z", "generation", "early_stopping", "_pool_scores", "kl_until",
              "frozen_refiner_weights")

    def state(self) -> dict:
        """Everything the next generation depends on, for a checkpoint (the door excepted)."""
        state = {name: getattr(self, name) for name in self._PLAIN}
        state["search"] = None if self.search is None else self.search.state()
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
        if self.search is not None:
            self.search.restore(state["search"])
        self.y_tensor = torch.as_tensor(self.y, dtype=torch.long)
        self.rng.set_state(state["rng"])
        if self.refiner is not None:
            self.refiner.load_state_dict(state["refiner"])
            self.refiner.eval()
            self.optimizer.load_state_dict(state["optimizer"])
        for name, value in state["counts"].items():
            setattr(self.counter, name, dict(value) if isinstance(value, dict) else value)


def run_generations(loop: CollaborativeLoop, run: Any, callbacks=()) -> None:
    """Run the planned generations of ``run`` (a :class:`~skcarrot._training.RunState`), stopping early if told.

    Each callback has ``on_generation(loop, run, record)``, ``on_end(loop, run,
    stopped)`` and ``close()`` (called however the run ends).
    """
    try:
        with fit_threads():  # one BLAS thread, and one torch thread but for the stages that ask for more
            while loop.generation - run.generation0 < run.n_generations and not loop.should_stop():
                record = loop.generation_step()
                record["queries"] += run.base_queries
                run.history.append(record)
                for callback in callbacks:
                    callback.on_generation(loop, run, record)
        for callback in callbacks:
            callback.on_end(loop, run, stopped=loop.should_stop())
    finally:
        for callback in callbacks:
            callback.close()
