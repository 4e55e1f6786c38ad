"""Where a fit starts: fresh, from the previous fit (a warm start), and possibly resumed from its checkpoint.

A :class:`StartingPoint` holds what a run takes from before it. A fresh start
is the same object with nothing in it: the hand-written prompt, a new refiner,
generation 0, a consistency schedule that begins with this fit and an empty
history. So the run is built by one path with no question asked about where
it comes from, as MLPClassifier's warm start is one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.utils import check_random_state

__all__ = ["SEED_NAMES", "StartingPoint"]

_SEED_MAX = 2**31 - 1
#: The generators of a fit, each seeded once from ``random_state``.
SEED_NAMES = ("projection", "cma", "torch", "loop")


@dataclass
class StartingPoint:
    """What one call to ``fit`` continues from.

    Parameters
    ----------
    prompt : ndarray, list of str or None, default=None
        The prompt to start from, in the door's form; None: the door's hand-written one.
    z : ndarray or None, default=None
        The search's coordinates of ``prompt`` (None: wherever the search starts).
    state : dict
        The door's record of the fit continued (``{}`` for a fresh start): what its
        search needs to continue (a projection seed, screened words).
    refiner_weights : dict or None, default=None
        The refiner to start from (None: a new one).
    generation : int, default=0
        Generations already run.
    kl_until : float or None, default=None
        Where the consistency-loss schedule stands; None: it begins with this fit.
    history : list
        The history so far.
    warm : bool, default=False
        Whether this continues a previous fit.
    saved : dict or None, default=None
        A checkpoint of this very call: the run is restored from it instead of started.

    Examples
    --------
    >>> from skcarrot._training.start import StartingPoint
    >>> start = StartingPoint()
    >>> start.warm_from, start.base_queries, start.kl_schedule(0.25, 40), start.mode("auto")
    (None, 0, 10.0, 'auto')
    """

    prompt: Any = None
    z: np.ndarray | None = None
    state: dict = field(default_factory=dict)
    refiner_weights: dict | None = None
    generation: int = 0
    kl_until: float | None = None
    history: list = field(default_factory=list)
    warm: bool = False
    saved: dict | None = None

    @classmethod
    def continuing(cls, prompt_state: dict, refiner_weights: dict | None, generation: int, kl_until: float,
                   history: list) -> "StartingPoint":
        """A warm start from a fitted estimator's record."""
        return cls(prompt_state["prompt"], prompt_state["z"], prompt_state, refiner_weights, generation, kl_until,
                   history, warm=True)

    @property
    def warm_from(self) -> int | None:
        """The generation a warm start continues from (None: a fresh fit); part of a checkpoint's fingerprint."""
        return self.generation if self.warm else None

    @property
    def base_queries(self) -> int:
        """Queries the history already counts."""
        return self.history[-1]["queries"] if self.history else 0

    def seeds(self, random_state: Any) -> dict[str, int]:
        """The seeds of every generator of the run: the checkpoint's, or drawn once from ``random_state``.

        Nothing later reads numpy's global state.
        """
        if self.saved is not None:
            return dict(self.saved["run"].seeds)
        rng = check_random_state(random_state)
        return {name: int(rng.randint(1, _SEED_MAX)) for name in SEED_NAMES}

    def prompt_for(self, door: Any) -> Any:
        """The prompt the run starts from: this start's, or the door's hand-written one."""
        return door.zero_shot_prompt() if self.prompt is None else self.prompt

    def kl_schedule(self, consistency_fraction: float, n_generations: int) -> float:
        """The generation below which the refiner's loss includes the consistency KL.

        The first fraction of the first fit's generations; a warm start continues that
        schedule instead of restarting it.
        """
        if self.kl_until is not None:
            return self.kl_until
        return np.inf if consistency_fraction >= 1 else consistency_fraction * n_generations

    def mode(self, prompt_tuning: bool | str) -> bool | str:
        """What ``prompt_tuning`` means here: a warm start continues the mode its previous fit ended in."""
        return bool(self.state.get("searched")) if self.warm and prompt_tuning == "auto" else prompt_tuning
