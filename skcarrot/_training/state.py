"""One fit's settings, what a warm start continues, and the run state: built through one path.

:func:`build_run` makes the loop and the :class:`RunState` of a new fit, a
warm-started fit and a fit resumed from a checkpoint alike: the same objects
are built in the same order from the same seeds; a new or warm fit then takes
its first steps (screening, the starting model's validation), while a resumed
one restores the state its checkpoint holds instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from sklearn.utils import check_random_state

from ..refiner import ResidualRefiner
from .early_stopping import EarlyStopping, Snapshot
from .loop import CollaborativeLoop, plan_generations
from .views import FreshViews, ViewPool

__all__ = ["FitSettings", "PreviousFit", "RunState", "build_run"]

_SEED_MAX = 2**31 - 1


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
                    "early_stopping": door.early_stopping_default}
        for name, default in defaults.items():
            if values[name] == "auto":
                values[name] = default
        values["query_budget"], values["popsize"] = int(values["query_budget"]), int(values["popsize"])
        return cls(**values)


@dataclass
class PreviousFit:
    """What a warm start continues from: the fitted model and where its schedule stood."""

    prompt: Any
    z: np.ndarray | None
    state: dict
    refiner_weights: dict | None
    generation: int
    kl_until: float
    history: list


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


def _refiner(settings: FitSettings, n_classes: int, seed: int):
    """A new refiner and its optimizer, or ``(None, None)`` without refinement."""
    if not settings.refinement:
        return None, None
    refiner = ResidualRefiner(n_classes, settings.hidden_dim, torch.Generator().manual_seed(seed))
    return refiner, torch.optim.Adam(refiner.parameters(), lr=settings.learning_rate)


def build_run(
    door: Any,
    settings: FitSettings,
    images: list,
    y: np.ndarray,
    random_state: Any,
    previous: PreviousFit | None = None,
    saved: dict | None = None,
) -> tuple[CollaborativeLoop, RunState]:
    """The loop and run state of a fit: new, warm-started (``previous``) or resumed (``saved`` checkpoint)."""
    if saved is None:
        rng = check_random_state(random_state)
        # Every generator of the fit is seeded here, once; nothing later reads numpy's global state.
        seeds = {name: int(rng.randint(1, _SEED_MAX)) for name in ("projection", "cma", "torch", "loop")}
    else:
        seeds = saved["run"].seeds
    search = door.build_search(settings, seeds, previous)
    use_validation = EarlyStopping.applies(settings, y)
    start_cost = door.start_cost(search)
    n_generations, costs = plan_generations(
        settings.query_budget,
        prompt_tuning=settings.prompt_tuning,
        refinement=settings.refinement,
        popsize=settings.popsize,
        fresh_views=settings.fresh_views,
        validation=use_validation,
        max_iter=settings.max_iter,
        screening=start_cost,
    )
    loop_rng = np.random.RandomState(seeds["loop"])
    early_stopping = None
    if use_validation:
        images, y, early_stopping = EarlyStopping.split(images, y, settings, loop_rng)
    refiner, optimizer = _refiner(settings, len(door.class_names), seeds["torch"])
    views = None
    if refiner is not None:
        if previous is not None and previous.refiner_weights is not None:
            refiner.set_weights(previous.refiner_weights)
        refiner.eval()
        if settings.fresh_views:
            views = FreshViews(images, settings.augmentation)
        else:
            views = ViewPool(images, settings.n_views, settings.augmentation, loop_rng)

    if previous is not None:
        prompt, z, generation0, kl_until = previous.prompt, previous.z, previous.generation, previous.kl_until
    else:
        prompt, z, generation0 = door.zero_shot_prompt(), None, 0
        # The consistency KL is on for the first fraction of the first fit's generations;
        # warm-started calls continue that schedule instead of restarting it.
        kl_until = np.inf if settings.consistency_fraction >= 1 else settings.consistency_fraction * n_generations
    loop = CollaborativeLoop(
        door=door, images=images, y=y, search=search, refiner=refiner, optimizer=optimizer, views=views,
        rng=loop_rng, consistency_weight=settings.consistency_weight, kl_until=kl_until,
        batch_size=settings.batch_size, prompt=prompt, z=z, generation=generation0, early_stopping=early_stopping,
        # A warm start without refinement keeps the refiner it has.
        frozen_refiner_weights=previous.refiner_weights if previous is not None and refiner is None else None,
    )
    if saved is not None:
        loop.restore(saved["loop"])
        return loop, saved["run"]

    door.start(search, images, y)
    if search is not None and not loop.prompt_moves():
        # Nothing to search (the text door's screen kept no word): the budget left goes as the
        # refiner alone would spend it, and no query scores identical prompt sets.
        n_generations, costs = plan_generations(
            settings.query_budget - start_cost, prompt_tuning=False, refinement=settings.refinement,
            popsize=settings.popsize, fresh_views=settings.fresh_views, validation=use_validation,
            max_iter=settings.max_iter,
        )
        costs["start"] += start_cost
        if previous is None:
            loop.kl_until = np.inf if settings.consistency_fraction >= 1 else settings.consistency_fraction * n_generations
    if search is not None and z is None:
        z = loop.z = search.coordinates()
        if previous is None:  # a warm start keeps the prompt it learned
            loop.prompt = search.current()
    if early_stopping is not None and n_generations > 0:  # with no generation there is nothing to choose from
        # The model the fit starts from is a candidate too: zero-shot (hand-written prompt,
        # identity refiner) on a fresh fit, the previous model on a warm start.
        start = Snapshot(loop.prompt, z, previous.refiner_weights if previous is not None else None, generation0)
        early_stopping.offer(loop.score_on_validation(start))
    run = RunState(
        seeds=seeds,
        n_generations=n_generations,
        planned=costs["start"] + n_generations * costs["generation"],
        generation0=generation0,
        warm=previous is not None,
        base_queries=previous.history[-1]["queries"] if previous is not None and previous.history else 0,
        history=list(previous.history) if previous is not None else [],
    )
    return loop, run
