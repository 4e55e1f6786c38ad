"""``prompt_tuning="auto"``: pay for the prompt search only where held-out shots say it pays.

The default fit is staged, cheapest first, and every choice is made on shots the candidate
did not train on, then refitted on all shots (no shot is held back from the final model):

0. **A prompt from a few shots** (doors whose query costs a call per image, so that a
   search on a few shots is cheap: the chat door). The prompt search alone runs on
   ``door.few_shot_search_shots`` shots a class within :data:`FEW_SHOT_FRACTION` of the
   budget. Step 1 then runs for both prompts, the hand-written one and the one found, each on
   its own view pool (the same views), and the prompt whose choice of step 1 has the lower
   held-out loss on the shots the search did not see goes on to step 2.
1. **Zero-shot or refiner?** One query scores the view pool of every shot under the
   hand-written prompt (the query a refine-only fit spends anyway). K-fold cross-validation
   on those logits trains a refiner per fold and scores it on the fold's held-out originals
   after the epochs a refine-only fit runs and three halvings of them (the full schedule
   only when its eighth is under 8 epochs or with an explicit ``max_iter``): no further query. The refiner trains for the epochs with the lowest held-out Brier score (the full schedule fits the
   shots' own domain more closely than held-out shots ask for, and generalises worse to
   images unlike them), and replaces the hand-written prompt when its score after all the
   epochs is lower (the best of several stops would flatter it). With two shots a class the
   folds train on one, the full schedule over-fits it, and the refiner is judged at its best
   stop instead.
2. **Prompt search?** A pilot of the full method (prompt search and refiner) is cross-fitted
   on two halves of the shots within a quarter of the budget, and compared, image by image
   on the half it did not see, with the choice of step 1 trained on the same half. The rest
   of the budget goes to the full method on all shots only when the pilot's gain exceeds
   twice its standard error; otherwise the fit ends with step 1's choice, refitted on all
   shots from the logits already paid for. A door whose first stages are costly counts
   them in the quarter (``door.pilot_share_includes_start``).

With one shot in some class nothing can be held out: the refiner on the hand-written
prompt is used (measured: see the benchmarks page).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.utils import check_random_state

from .._util.math import softmax
from .._util.split import draw_per_class, stratified_folds
from ..refiner import refine_logits
from .loop import BudgetTooSmallError, run_generations
from .modules import NullPrompt
from .start import StartingPoint
from .state import FitSettings, build_run

__all__ = ["Selection", "select_and_build", "start_fit"]

#: Fraction of the budget the prompt-search pilot may spend (both halves together).
PILOT_FRACTION = 0.25
#: Fraction of the budget step 0's search on a few shots may spend. At the chat door's defaults (8,000
#: calls, 16 shots of 10 classes, 2 views a shot) 720 calls of search and two 320-call view pools make
#: 1,360 calls, within the quarter; step 0 is skipped where the quarter can not hold them.
FEW_SHOT_FRACTION = 0.09
#: Standard errors by which a candidate must beat the simpler one. The refiner needs only a
#: positive gain: its fold models train on (K - 1) / K of the shots, so cross-validation already
#: understates the refiner refitted on all of them (measured on digits at 2 and 4 shots: a margin
#: of one standard error kept the bare prompt on seeds where the refiner was 4 to 12 points
#: better). The prompt search must clear two: going on spends the other three quarters of the budget.
REFINER_MARGIN = 0.0
SEARCH_MARGIN = 2.0
#: Standard errors by which fewer refiner epochs must beat the full schedule on held-out shots: none, the
#: lowest held-out loss wins (measured on digits at 4-16 shots, seeds 100-109, held-out and shifted test
#: sets: a margin of one standard error kept the full schedule where it over-fits the shots' domain, 1.9
#: and 2.7 points lower on noisy and shrunk digits at 16 shots, for -0.2 to +0.3 points in domain).
EPOCH_MARGIN = 0.0
_FOLDS = 4
_FEWEST_EPOCHS = 8
# Offsets from the refine-only run's loop seed: each stage draws from a generator of its own, so adding
# or dropping one stage leaves the others' draws as they were. Fold f's refiner is seeded FOLD + f.
_FOLD_SEED = 0
_HALVES_SEED = 97  # the pilot's two halves of the shots
_PILOT_SEED_STEP = 11  # half h's pilot run is seeded (h + 1) * _PILOT_SEED_STEP
_PILOT_REFINER_SEED = 50  # the refiner the pilot is compared with on half h: _PILOT_REFINER_SEED + h
_FEW_SHOT_SEED = 131  # step 0's draw of shots; its search is seeded _FEW_SHOT_SEED + 1
#: Shots a class a fold's refiner must train on for the refiner to be judged on its full schedule; with
#: fewer (two shots a class in all) it is judged at its best stop, which the full schedule over-fits past.
_LEAST_FOLD_SHOTS = 2
#: Stops scored: the schedule and its halvings down to an eighth of it. A sixteenth was chosen in 3 of 40
#: fits at 8-16 shots (seeds 100-119) and lost 0.8 points in domain on average, 5.8 on one split.
_N_STOPS = 4


@dataclass
class Selection:
    """What ``prompt_tuning="auto"`` chose, and why."""

    choice: str  # "zero-shot", "refine-only" or "carrot"
    reason: str
    refiner_gain: float | None = None
    search_gain: float | None = None
    refiner_epochs: int | None = None
    pilot_queries: int = 0
    prompt: Any = None  # step 0's prompt, when it replaced the hand-written one
    prompt_gain: float | None = None  # step 0's held-out gain over the hand-written prompt


def _per_image_loss(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each image's Brier score: the squared distance of its predicted probabilities from its one-hot label.

    A proper score like the cross-entropy, but bounded: a refiner trained on one or two shots a
    class is over-confident, and the few images it then gets wrong would dominate a cross-entropy
    (measured on 60 digits and Fashion-MNIST splits of 2-8 shots: choosing by the cross-entropy
    kept the wrong model 6 times, by the Brier score twice).
    """
    probabilities = softmax(np.asarray(logits, dtype=np.float64))
    return ((probabilities - np.eye(probabilities.shape[1])[y]) ** 2).sum(axis=1)


def _gain(simple: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """Mean per-image drop of the loss from ``simple`` to ``candidate``, and its standard error."""
    diff = np.asarray(simple, dtype=float) - np.asarray(candidate, dtype=float)
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else np.inf


def _refine_path(refine_run, idx: np.ndarray, seed: int, stops: list[int]) -> list[dict]:
    """Refiner weights after each of ``stops`` epochs, trained as the refine-only fit trains them on shots ``idx``.

    One trajectory on the pool logits already paid for (no query): the same epochs, consistency
    schedule and view draws as the refine-only fit, read off at each stop.
    """
    loop, _ = refine_run
    loop.pool_scores()  # bought once, by the caller's first look at the shots
    fold = dataclasses.replace(
        loop, images=[loop.images[i] for i in idx], y=loop.y[idx], rng=np.random.RandomState(seed),
        refiner=loop.refiner.fold(idx, seed), generation=0, early_stopping=None,
    )
    path = []
    for epoch in range(1, max(stops) + 1):
        fold.generation_step()
        if epoch in stops:
            path.append(fold.refiner.weights())
    return path


def epoch_stops(n_epochs: int) -> list[int]:
    """Epoch counts the refiner is scored at: ``n_epochs`` and three halvings of it, or ``n_epochs`` alone.

    A schedule whose eighth falls below :data:`_FEWEST_EPOCHS` epochs is kept whole. Its stops
    are refiners too alike for held-out shots to tell apart, and the pick of the lower of two
    noisy estimates buys nothing: the text door's refiner runs 22 epochs, and on 4-16 shots of
    seeds 100-139 the whole schedule was within 0.4 points of choosing between 11 and 22 on every
    test set (paired, 40 seeds), missing 10 checks of the default's bar where the choice missed 15.

    Examples
    --------
    >>> from skcarrot._training.selection import epoch_stops
    >>> epoch_stops(195)
    [24, 48, 97, 195]
    >>> epoch_stops(22)
    [22]
    """
    n_epochs = int(n_epochs)
    if n_epochs >> (_N_STOPS - 1) < _FEWEST_EPOCHS:
        return [n_epochs]
    return [n_epochs >> i for i in reversed(range(_N_STOPS))]


def _good_epochs(losses: np.ndarray) -> int:
    """Index of the stop the refiner trains to: the full schedule, or fewer epochs where held-out shots ask.

    ``losses``: ``(n_stops, n_shots)`` held-out losses, the last row the full schedule. Fewer epochs
    replace it only when their loss is lower by more than :data:`EPOCH_MARGIN` standard errors.
    A refiner trained longer fits the shots' own domain more closely, and nothing else says so.
    """
    best, full = int(np.argmin(losses.mean(axis=1))), len(losses) - 1
    if best == full:
        return full
    gain, se = _gain(losses[full], losses[best])
    return best if gain > EPOCH_MARGIN * se else full


def _few_shot_search(door: Any, settings: FitSettings, images: list, y: np.ndarray, seed: int,
                     pool_cost: int) -> tuple[Any, np.ndarray | None, str]:
    """Step 0's search: ``(prompt or None, shots searched, reason)``.

    The search alone (no refiner) on ``door.few_shot_search_shots`` shots a class, within
    :data:`FEW_SHOT_FRACTION` of the budget; None where the door does not ask for it, no shot
    would be left to judge it on, or the quarter can not hold it and a second view pool.
    """
    m, counts = int(door.few_shot_search_shots), np.bincount(y)
    if not m or not door.pilot_share_includes_start or counts.min() <= m:  # it must count in the quarter
        return None, None, ""
    budget = int(FEW_SHOT_FRACTION * settings.query_budget)
    if door.counter.n_queries + budget + 2 * pool_cost > PILOT_FRACTION * settings.query_budget:
        return None, None, (f"no prompt search on {m} shots a class ({budget} queries of search and two "
                            f"view pools of {pool_cost} do not fit in a quarter of the budget)")
    searched = np.sort(draw_per_class(y, m, np.random.RandomState(seed + _FEW_SHOT_SEED)))
    search = dataclasses.replace(settings, prompt_tuning=True, refinement=False, early_stopping=False,
                                 query_budget=budget)
    try:
        loop, run = build_run(door, search, [images[i] for i in searched], y[searched], seed + _FEW_SHOT_SEED + 1)
    except BudgetTooSmallError as exc:
        return None, None, f"no prompt search on {m} shots a class ({exc})"
    run_generations(loop, run)
    return loop.result().prompt, searched, f"prompt searched on {m} shots a class"


def _twin(refine_run: tuple, prompt: Any) -> tuple:
    """The refine-only run ``refine_run`` would be under ``prompt``: the same views, seeds and refiner, no pool scored yet."""
    loop, run = refine_run
    twin = dataclasses.replace(loop, prompt=NullPrompt(prompt, None), refiner=copy.deepcopy(loop.refiner),
                               rng=copy.deepcopy(loop.rng))
    return twin, copy.deepcopy(run)


def _refiner_or_prompt(refine_run: tuple, originals: np.ndarray, y: np.ndarray, seed: int,
                       settings: FitSettings) -> tuple[Selection, bool, int, np.ndarray]:
    """Step 1: ``(selection, use_refiner, epochs, held-out loss per shot of the choice)``; no query.

    Sets the refine-only run's epochs to those cross-validation chose.
    """
    counts = np.bincount(y)
    zero_shot = _per_image_loss(originals, y)
    k = int(min(_FOLDS, counts.min()))
    folds = stratified_folds(y, k, np.random.RandomState(seed))
    schedule = refine_run[1].n_generations
    fewest_trained = counts.min() - int(np.ceil(counts.min() / k))  # shots a class in a fold's training part
    # An explicit max_iter is the user's schedule: it is kept.
    stops = epoch_stops(schedule) if settings.max_iter is None else [schedule]
    refined = np.empty((len(stops), len(y)), dtype=float)
    for f in range(k):
        train, held = np.flatnonzero(folds != f), np.flatnonzero(folds == f)
        for j, weights in enumerate(_refine_path(refine_run, train, seed + _FOLD_SEED + f, stops)):
            refined[j, held] = _per_image_loss(refine_logits(originals[held], weights), y[held])
    best = _good_epochs(refined)
    epochs = stops[best]
    refine_run[1].n_generations = epochs  # the refine-only fit stops where cross-validation did
    # Refiner or bare prompt is decided on the full schedule when the folds train on two shots a class
    # or more: the best of several stops flatters the refiner by the luck of the pick (measured on
    # Fashion-MNIST at 4 shots, where the bare prompt is better: deciding on the chosen stop kept the
    # refiner more often and lost 0.9 points). A fold of one shot a class (two shots in all) is another
    # matter: the full schedule over-fits that one shot, and its held-out loss speaks of a refiner of
    # one shot, not of the refiner of two the fit trains; the refiner is judged at its best stop,
    # and trained to it (measured on digits at 2 shots, seeds 100-139: the full schedule's loss kept
    # the bare prompt on 8 of 40 splits where the refiner was 3-17 points better).
    judged = refined[best] if fewest_trained < _LEAST_FOLD_SHOTS else refined[-1]
    gain, se = _gain(zero_shot, judged)
    use_refiner = gain > REFINER_MARGIN * se
    selection = Selection(
        "refine-only" if use_refiner else "zero-shot",
        f"refiner's held-out gain in Brier score {gain:+.3f} ± {se:.3f} per image"
        + (f"; {epochs} of {schedule} epochs by held-out loss" if len(stops) > 1 else ""),
        refiner_gain=gain, refiner_epochs=epochs,
    )
    return selection, use_refiner, epochs, judged if use_refiner else zero_shot


def select_and_build(door: Any, settings: FitSettings, images: list, y: np.ndarray, random_state: Any,
                     start: StartingPoint | None = None) -> tuple[Any, Any, Selection]:
    """Run the stages and build the final run: ``(loop, run, selection)``; the run's generations are left to run.

    ``start.saved``: a checkpoint of the final run, restored once the (deterministic) stages chose it again.
    """
    start = StartingPoint() if start is None else start
    if settings.fresh_views and settings.refinement:
        raise ValueError(
            "prompt_tuning='auto' chooses on one query of a fixed view pool, and fresh_views=True draws new "
            "views each epoch instead: set prompt_tuning=True (the paper's protocol, as the dataset presets "
            "do) or False, or fresh_views=False"
        )
    refine_run, twin, found, searched, found_reason = None, None, None, None, ""
    if settings.refinement:
        refine_run = build_run(door, dataclasses.replace(settings, prompt_tuning=False, early_stopping=False),
                               images, y, random_state)
        seed = int(refine_run[1].seeds["loop"])
        # Step 0, where the door asks for it: a prompt searched on a few shots, and its own refine-only run.
        pool_cost = door.query_cost(len(images) * settings.n_views)
        found, searched, found_reason = _few_shot_search(door, settings, images, y, seed, pool_cost)
        # Its run is built even when the search ended on the hand-written prompt (their gain is then 0):
        # the fit's calls do not depend on the answers, so estimate_cost's dry run counts them exactly.
        twin = None if found is None else _twin(refine_run, found)
        # The one query: the view pool of every shot under the hand-written prompt; view 0 holds the originals.
        originals = refine_run[0].pool_scores()[0]
    else:  # no refiner to choose: the bare prompt's scores of the shots, for the pilot to beat
        originals = door.score(images, door.one(door.zero_shot_prompt()), "pilot")[0]
        seed = int(check_random_state(random_state).randint(1, 2**31 - 1))
    counts = np.bincount(y)
    if counts.min() < 2:
        choice = "refine-only" if settings.refinement else "zero-shot"
        selection = Selection(choice, "one shot in some class: nothing can be held out")
        return _final(door, settings, images, y, random_state, selection, refine_run, start)

    # Stage 1: zero-shot or refiner, by K-fold cross-validation on the logits already paid for.
    use_refiner, epochs = False, None
    selection = Selection("zero-shot", "no refiner (refinement=False)")
    if refine_run is not None:
        selection, use_refiner, epochs, losses = _refiner_or_prompt(refine_run, originals, y, seed, settings)
        if twin is not None:  # step 0's prompt, through the same stage on the same folds and views
            twin_originals = twin[0].pool_scores()[0]
            twin_choice = _refiner_or_prompt(twin, twin_originals, y, seed, settings)
            unseen = np.setdiff1d(np.arange(len(y)), searched)
            gain, se = _gain(losses[unseen], twin_choice[3][unseen])
            adopted = gain > 0
            found_reason += (f", held-out gain {gain:+.3f} ± {se:.3f} on the {len(unseen)} shots it did not see: "
                             + ("it replaces the hand-written prompt" if adopted else "the hand-written prompt is kept"))
            if adopted:
                refine_run, originals = twin, twin_originals
                selection, use_refiner, epochs, _ = twin_choice
                selection.prompt = found
            selection.prompt_gain = gain
        if found_reason:
            selection.reason = f"{found_reason}; {selection.reason}"

    # Stage 2: a cross-fitted pilot of the full method within a quarter of the budget.
    # A door whose first stage is costly (the chat door pays a call per view) counts it in the quarter:
    # where the search does not pay, the default then spends at most a quarter of the budget in all.
    share = int(PILOT_FRACTION * settings.query_budget)
    halves = stratified_folds(y, 2, np.random.RandomState(seed + _HALVES_SEED))
    pilot_budget = share // 2
    if door.pilot_share_includes_start:  # less what was spent, and each half's scoring of the other half
        pilot_budget = max(max(share - door.counter.n_queries, 0) // 2
                           - door.query_cost(int(np.bincount(halves).max())), 0)
    pilot = dataclasses.replace(settings, prompt_tuning=True, early_stopping=False, query_budget=pilot_budget)
    before = door.counter.n_queries
    simple, full = np.empty(len(y)), np.empty(len(y))
    try:
        for h in (0, 1):
            train, held = np.flatnonzero(halves != h), np.flatnonzero(halves == h)
            pilot_loop, pilot_run = build_run(door, pilot, [images[i] for i in train], y[train],
                                              seed + _PILOT_SEED_STEP * (h + 1))
            run_generations(pilot_loop, pilot_run)
            result = pilot_loop.result()
            held_logits = door.score([images[i] for i in held], door.one(result.prompt), "pilot")[0]
            full[held] = _per_image_loss(refine_logits(held_logits, result.refiner_weights), y[held])
            weights = _refine_path(refine_run, train, seed + _PILOT_REFINER_SEED + h, [epochs])[0] if use_refiner else None
            simple[held] = _per_image_loss(refine_logits(originals[held], weights), y[held])
    except BudgetTooSmallError as exc:  # a quarter of the budget can not buy a pilot generation
        selection.reason += f"; no pilot of the prompt search ({exc})"
        return _final(door, settings, images, y, random_state, selection, refine_run, start)
    selection.pilot_queries = door.counter.n_queries - before
    gain, se = _gain(simple, full)
    selection.search_gain = gain
    pays = gain > SEARCH_MARGIN * se
    selection.reason += f"; prompt search pilot's held-out gain {gain:+.3f} ± {se:.3f}"
    if pays:
        selection.choice = "carrot"
        selection.prompt = None  # the full method searches from the hand-written prompt, on all shots
    return _final(door, settings, images, y, random_state, selection, refine_run, start)


def _final(door, settings, images, y, random_state, selection: Selection, refine_run, start: StartingPoint):
    if selection.choice == "refine-only":
        loop, run = refine_run
        if start.saved is not None:  # the stages chose this run again: it goes on from its checkpoint
            loop.restore(start.saved["loop"])
            run = start.saved["run"]
        return loop, run, selection
    if selection.choice == "zero-shot":
        final = dataclasses.replace(settings, prompt_tuning=False, refinement=False, early_stopping=False)
        if selection.prompt is not None and start.prompt is None:  # step 0's prompt, not the hand-written one
            start = dataclasses.replace(start, prompt=selection.prompt)
    else:
        final = dataclasses.replace(settings, prompt_tuning=True, early_stopping=False,
                                    query_budget=int(door.counter.remaining))
    return (*build_run(door, final, images, y, random_state, start), selection)


def start_fit(door: Any, settings: FitSettings, images: list, y: np.ndarray, random_state: Any,
              start: StartingPoint | None = None) -> tuple[Any, Any, Selection | None]:
    """The run of a fit, whatever ``prompt_tuning`` says: ``(loop, run, selection)``.

    ``"auto"`` runs the stages of this module on a new fit (``selection`` says what they
    chose); a warm start continues the mode its previous fit ended in.
    """
    start = StartingPoint() if start is None else start
    settings = dataclasses.replace(settings, prompt_tuning=start.mode(settings.prompt_tuning))
    if settings.prompt_tuning != "auto":
        return (*build_run(door, settings, images, y, random_state, start), None)
    return select_and_build(door, settings, images, y, random_state, start)
