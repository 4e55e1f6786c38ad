"""One fit's settings and the run state, built through one path.

:func:`build_run` makes the loop and the :class:`RunState` of a fit from its
:class:`~skcarrot._training.start.StartingPoint` (fresh, warm or resumed): the
same objects are built in the same order from the same seeds; a new or warm fit
then takes its first steps (screening, the plan, the starting model's
validation), while a resumed one restores the state its checkpoint holds instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from .early_stopping import EarlyStopping, Snapshot
from .loop import CollaborativeLoop, QueryCosts, check_budget, plan_generations
from .modules import NullPrompt, PromptModule, RefinerModule
from .start import StartingPoint

__all__ = ["FitSettings", "RunState", "build_run"]


@dataclass(frozen=True)
class FitSettings:
    """The estimator's hyperparameters for one fit, with every ``"auto"`` read for its door."""

    query_budget: int
    popsize: int
    early_stopping: bool
    intrinsic_dim: int
    sigma: float
    bound: float | None
    projection_std: float
    consistency_weight: float
    consistency_fraction: float
    hidden_dim: int
    learning_rate: float
    batch_size: int
    n_views: int
    augmentation: Any
    fresh_views: bool
    vocabulary: Any
    prompt_tuning: bool | str
    refinement: bool
    max_iter: int | None
    validation_fraction: float
    n_iter_no_change: int | None
    tol: float

    @classmethod
    def resolve(cls, params: dict, door: Any) -> "FitSettings":
        """From ``get_params()``: ``"auto"`` means the door's default."""
        values = {f.name: params[f.name] for f in fields(cls)}
        defaults = {"query_budget": door.default_budget, "popsize": door.default_popsize,
                    "early_stopping": door.early_stopping_default, "n_views": door.default_n_views}
        for name, default in defaults.items():
            if isinstance(values[name], str) and values[name] == "auto":
                values[name] = default
        for name in ("query_budget", "popsize", "n_views"):
            values[name] = int(values[name])
        return cls(**values)


@dataclass
class RunState:
    """The plan and the record of one call to ``fit``, saved with each checkpoint."""

    seeds: dict[str, int]
    n_generations: int
    planned: int
    generation0: int
    warm: bool
    base_queries: int = 0
    history: list = field(default_factory=list)
    fingerprint: str | None = None


def build_run(
    door: Any,
    settings: FitSettings,
    images: list,
    y: np.ndarray,
    random_state: Any,
    start: StartingPoint | None = None,
) -> tuple[CollaborativeLoop, RunState]:
    """The loop and run state of a fit, from where it starts (fresh by default; see :class:`StartingPoint`).

    A resumed fit (``start.saved``) is built the same way, then restored from its checkpoint.
    """
    start = StartingPoint() if start is None else start
    seeds = start.seeds(random_state)
    search = door.build_search(settings, seeds, start)
    loop_rng = np.random.RandomState(seeds["loop"])
    early_stopping = None
    if EarlyStopping.applies(settings, y):
        images, y, early_stopping = EarlyStopping.split(images, y, settings, loop_rng)
    refiner = RefinerModule.build(settings, len(door.class_names), seeds["torch"], images, loop_rng,
                                  start.refiner_weights)
    prompt = start.prompt_for(door)
    loop = CollaborativeLoop(
        door=door, images=images, y=y,
        prompt=NullPrompt(prompt, start.z) if search is None else PromptModule(search, prompt, start.z),
        refiner=refiner, rng=loop_rng, consistency_weight=settings.consistency_weight, kl_until=np.inf,
        generation=start.generation, early_stopping=early_stopping,
    )
    if start.saved is not None:
        loop.restore(start.saved["loop"])
        return loop, start.saved["run"]

    n_validation = 0 if early_stopping is None else len(early_stopping.y)
    plan = dict(refinement=settings.refinement, popsize=settings.popsize, fresh_views=settings.fresh_views,
                validation=early_stopping is not None, screening=door.start_cost(search, y),
                costs=QueryCosts.of(door, len(images), len(images) * settings.n_views, n_validation))
    # A budget that can not buy the start and one generation fails before the start spends a query.
    check_budget(settings.query_budget, prompt_tuning=search is not None, **plan)
    door.start(search, images, y)
    loop.prompt.begin(start)
    # The plan, once: a search that its start left nothing to move (the text door's screen kept
    # no word) plans as the refiner alone, and no query scores identical prompt sets.
    n_generations, costs = plan_generations(settings.query_budget, prompt_tuning=loop.prompt_moves(),
                                            max_iter=settings.max_iter, **plan)
    loop.kl_until = start.kl_schedule(settings.consistency_fraction, n_generations)
    if early_stopping is not None and n_generations > 0:  # with no generation there is nothing to choose from
        # The model the fit starts from is a candidate too: zero-shot (hand-written prompt,
        # identity refiner) on a fresh fit, the previous model on a warm start.
        snapshot = Snapshot(loop.prompt.prompt, loop.prompt.z, start.refiner_weights, start.generation)
        early_stopping.offer(loop.score_on_validation(snapshot))
    run = RunState(
        seeds=seeds,
        n_generations=n_generations,
        planned=costs["start"] + n_generations * costs["generation"],
        generation0=start.generation,
        warm=start.warm,
        base_queries=start.base_queries,
        history=list(start.history),
    )
    return loop, run
