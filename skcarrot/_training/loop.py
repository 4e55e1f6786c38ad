"""The collaborative training loop: its state, one method per step, and the driver.

:class:`CollaborativeLoop` holds what a fit changes as it runs: the paper's two
modules (:mod:`skcarrot._training.modules`, each owning its state), the loop's
generator and the early stopping state. :meth:`~CollaborativeLoop.generation_step`
is one generation of the paper's Algorithm 1: the prompt module's step (ask,
score through the door, fitness with the refiner frozen, tell), the refiner
module's step (score this epoch's views under the new prompt, one epoch), then
the validation step when shots are held back.

:func:`plan_generations` says, once per run, how many generations the budget buys.

:func:`run_generations` runs the planned generations and calls the callbacks
(progress, checkpoints) after each; the estimator never reaches into the steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._util.threads import fit_threads
from ..losses import cross_entropy
from ..refiner import refine_logits
from .early_stopping import EarlyStopping, Snapshot
from .modules import NullPrompt, NullRefiner, PromptModule, RefinerModule, pool_scored_once

__all__ = ["BudgetTooSmallError", "CollaborativeLoop", "QueryCosts", "check_budget", "plan_generations", "run_generations"]


class BudgetTooSmallError(ValueError):
    """The query budget can not buy one generation."""


@dataclass(frozen=True)
class QueryCosts:
    """Queries one prompt costs, scored on each set of images a run sends.

    On the embedding and text doors one prompt scored on any number of images
    is one query (every field 1); a door that bills each image apart says so in
    its ``query_cost(n_images)``, and the plan counts in its units.

    Examples
    --------
    >>> from skcarrot._training.loop import QueryCosts
    >>> QueryCosts()
    QueryCosts(train=1, pool=1, validation=1)
    """

    train: int = 1  # the training images: one candidate prompt, or one refiner epoch
    pool: int = 1  # every view of the fixed pool at once
    validation: int = 1  # the held-back shots

    @classmethod
    def of(cls, door: Any, n_train: int, n_pool: int, n_validation: int) -> "QueryCosts":
        """What ``door`` charges for one prompt on the training images, the view pool and the held-back shots."""
        return cls(int(door.query_cost(n_train)), int(door.query_cost(n_pool)), int(door.query_cost(n_validation)))


def _plan_costs(prompt_tuning: bool, refinement: bool, popsize: int, fresh_views: bool, validation: bool,
                screening: int, costs: QueryCosts) -> tuple[int, int]:
    """Queries of the start and of each generation."""
    pool_once = refinement and pool_scored_once(prompt_tuning, not fresh_views)
    start = screening + costs.validation * int(validation) + costs.pool * int(pool_once)
    per_generation = (popsize * costs.train * int(prompt_tuning) + costs.train * int(refinement and not pool_once)
                      + costs.validation * int(validation))
    return start, per_generation


def _queries(n: int, what: str) -> str:
    return f"{n} {what} {'query' if n == 1 else 'queries'}"


def check_budget(
    query_budget: int,
    *,
    prompt_tuning: bool,
    refinement: bool,
    popsize: int,
    fresh_views: bool,
    validation: bool,
    screening: int = 0,
    costs: QueryCosts = QueryCosts(),
) -> None:
    """Raise :class:`BudgetTooSmallError` (a ``ValueError``) when the budget can not buy the start and one generation.

    Asked before the start spends anything (the text door's screening), so a budget too
    small fails before the first query. Takes the arguments of :func:`plan_generations` but ``max_iter``.
    """
    start, per_generation = _plan_costs(prompt_tuning, refinement, popsize, fresh_views, validation, screening, costs)
    if not (prompt_tuning or refinement) or query_budget - start >= per_generation:
        return
    parts = [f"{screening} screening queries"] if screening else []
    if validation:
        parts.append(_queries(costs.validation, "zero-shot validation"))
    if prompt_tuning:
        parts.append(f"popsize={popsize} prompts" + (f" x {costs.train} queries" if costs.train != 1 else ""))
    if refinement:
        parts.append(_queries(costs.train, "refiner"))
    if validation:
        parts.append(_queries(costs.validation, "validation"))
    raise BudgetTooSmallError(
        f"query_budget={query_budget} is smaller than one generation "
        f"({' + '.join(parts)} = {start + per_generation} queries): "
        + _budget_remedies(query_budget, start + per_generation, prompt_tuning=prompt_tuning,
                           refinement=refinement, popsize=popsize, validation=validation, costs=costs)
    )


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
    costs: QueryCosts = QueryCosts(),
) -> tuple[int, dict[str, int]]:
    """Generations a fit runs within ``query_budget``, and the cost of each part.

    Returns ``(n_generations, costs)`` with ``costs`` the queries of the start
    (``"start"``: the search's own start, e.g. ``screening`` candidate words on the
    text door, the zero-shot validation, and the one query that scores a fixed view
    pool when the prompt never moves) and of each generation (``"generation"``).
    ``prompt_tuning`` is whether the prompt moves: a search that screening left
    nothing to move plans as the refiner alone. Raises :class:`BudgetTooSmallError`
    (a ``ValueError``) when not even one generation fits.

    Examples
    --------
    >>> from skcarrot._training import plan_generations
    >>> plan_generations(200, prompt_tuning=True, refinement=True, popsize=8,
    ...                  fresh_views=False, validation=False, max_iter=None)
    (22, {'start': 0, 'generation': 9})
    """
    check_budget(query_budget, prompt_tuning=prompt_tuning, refinement=refinement, popsize=popsize,
                 fresh_views=fresh_views, validation=validation, screening=screening, costs=costs)
    start, per_generation = _plan_costs(prompt_tuning, refinement, popsize, fresh_views, validation, screening, costs)
    plan = {"start": start, "generation": per_generation}
    if not (prompt_tuning or refinement):
        return 0, plan
    affordable = (query_budget - start) // per_generation if per_generation else (query_budget - start >= 0) * 10**9
    if max_iter is not None:
        wanted = max_iter
    elif prompt_tuning:
        wanted = affordable
    else:  # as many epochs as a full fit with the same budget (less what the start spent) would run
        wanted = max(1, (query_budget - screening) // ((popsize + 1) * costs.train))
    return min(wanted, affordable), plan


def _budget_remedies(
    query_budget: int, needed: int, *, prompt_tuning: bool, refinement: bool, popsize: int, validation: bool,
    costs: QueryCosts,
) -> str:
    """What makes one generation fit: the least budget, and the parameters that lower the cost."""
    remedies = [f"raise query_budget to at least {needed}"]
    if prompt_tuning:
        most = popsize - -(-(needed - query_budget) // costs.train)  # costs.train queries less per prompt less
        if most >= 2:
            remedies.append(f"lower popsize to at most {most}")
        elif popsize > 2:
            remedies.append(f"lower popsize (popsize=2 needs {needed - (popsize - 2) * costs.train})")
    if validation:
        remedies.append(f"set early_stopping=False ({2 * costs.validation} validation queries fewer)")
    # the refiner without the prompt search: one generation's cost
    alone = 2 * costs.validation * int(validation) + costs.pool
    if prompt_tuning and refinement and alone <= query_budget:
        remedies.append(f"set prompt_tuning=False (the refiner alone needs {alone})")
    if len(remedies) == 1:
        return remedies[0]
    return ", ".join(remedies[:-1]) + ", or " + remedies[-1]


@dataclass
class CollaborativeLoop:
    """State of one fit of the collaborative loop (the paper's Algorithm 1), one method per step.

    Each generation the prompt module steps (candidates scored with the refiner
    frozen), then the refiner module (one epoch on the scores of its views under
    the new prompt), then the validation step when shots are held back. Either
    module may be switched off (:class:`~skcarrot._training.modules.NullPrompt`,
    :class:`~skcarrot._training.modules.NullRefiner`); the loop does not ask.

    Parameters
    ----------
    door : skcarrot.doors.Door
        The black box behind its query counter, with the fit's budget.
    images : list of PIL.Image.Image
        Training images (without the validation shots).
    y : ndarray of int
        Class index of each training image.
    prompt : PromptModule or NullPrompt
        The prompt generation module; holds the current prompt.
    refiner : RefinerModule or NullRefiner
        The prediction refinement module.
    rng : numpy.random.RandomState
        The loop's own generator (views, shuffles).
    consistency_weight : float
    kl_until : float
        The refiner's loss includes the consistency KL while the (global)
        generation index is below this.
    generation : int
        Generations already run (by earlier warm-started fits).
    early_stopping : EarlyStopping or None
        Held-back shots and the best model on them.
    """

    door: Any
    images: list
    y: np.ndarray
    prompt: PromptModule | NullPrompt
    refiner: RefinerModule | NullRefiner
    rng: np.random.RandomState
    consistency_weight: float
    kl_until: float
    generation: int = 0
    early_stopping: EarlyStopping | None = None

    def __post_init__(self) -> None:
        self.y_tensor = torch.as_tensor(self.y, dtype=torch.long)

    @property
    def counter(self):
        """The query counter behind the door."""
        return self.door.counter

    # ----------------------------------------------------------------- steps
    def prompt_moves(self) -> bool:
        """Whether the prompt search runs: there is one, and it has more than one prompt to offer.

        When it has not (the text door's screening kept no word), the fit goes on as the
        refiner alone does: the prompt stays, and one query scores the view pool once.
        """
        return self.prompt.moves()

    def use_kl(self) -> bool:
        """Whether this generation's refiner loss includes the consistency KL."""
        return self.generation < self.kl_until

    def pool_scores(self) -> np.ndarray:
        """Scores ``(n_views, N, C)`` of the refiner's fixed view pool under the current prompt (one query, once)."""
        return self.refiner.pool_scores(self)

    def current_snapshot(self) -> Snapshot:
        """The model as it stands now."""
        z = None if self.prompt.z is None else np.asarray(self.prompt.z).copy()
        return Snapshot(self.door.copy_prompt(self.prompt.prompt), z, self.refiner.weights(), self.generation)

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
        record.update(self.prompt.step(self))
        record.update(self.refiner.step(self))
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
    def state(self) -> dict:
        """Everything the next generation depends on, for a checkpoint (the door excepted)."""
        return {
            "images": self.images, "y": self.y, "generation": self.generation, "kl_until": self.kl_until,
            "early_stopping": self.early_stopping, "rng": self.rng.get_state(),
            "prompt": self.prompt.state(), "refiner": self.refiner.state(), "counter": self.counter.state(),
        }

    def restore(self, state: dict) -> None:
        """Continue from :meth:`state`: the same trajectory as the fit that wrote it."""
        self.images, self.y, self.generation = state["images"], state["y"], state["generation"]
        self.kl_until, self.early_stopping = state["kl_until"], state["early_stopping"]
        self.y_tensor = torch.as_tensor(self.y, dtype=torch.long)
        self.rng.set_state(state["rng"])
        self.prompt.restore(state["prompt"])
        self.refiner.restore(state["refiner"])
        self.counter.restore(state["counter"])


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
