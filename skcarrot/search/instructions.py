"""Prompt generation module for the chat door: a discrete search over the instruction and the class descriptions.

A chat model's prompt is a question: an *instruction* and one *description* per
class, shown as lettered options. Nothing continuous reaches the model, so the
search is discrete and derivative-free, in two parts:

1. **Screening by successive halving** (Jamieson & Talwalkar, AISTATS 2016): every
   candidate of a built-in pool (each instruction wording x each description style)
   is scored on a small, class-balanced subset of the training shots; the better half
   (``1 / eta``) goes on to a subset ``eta`` times larger, and so on until a few
   remain. A candidate costs one call per image it sees, so most candidates are
   dropped after a few calls; the images a survivor already saw are not asked again.
2. **Local search** behind the :class:`~skcarrot.search.PromptSearch` protocol: each
   generation asks the current prompt and ``popsize - 1`` neighbours (another
   screened instruction, or another description of one class), scored on all shots;
   the best one (the current one on ties) becomes current.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn.utils import check_random_state

__all__ = ["DEFAULT_INSTRUCTIONS", "DESCRIPTION_STYLES", "InstructionSearch", "description_variants",
           "screening_cost"]

#: The built-in instruction wordings: the first is the chat door's hand-written prompt.
DEFAULT_INSTRUCTIONS = (
    "What is shown in this image? Choose one option.",
    "Which of the following options best describes the image?",
    "Look at the image carefully and pick the option that matches it.",
    "Classify this image into one of the categories below.",
    "What is the main subject of this picture?",
    "Which option names what you see in the image?",
)
#: Description styles, each with one ``{}`` for the class name (the first: the name alone).
DESCRIPTION_STYLES = ("{}", "a photo of a {}", "the {}")
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def description_variants(name: str, styles: Sequence[str] = DESCRIPTION_STYLES) -> list[str]:
    """The descriptions tried for class ``name``: each style around it, and for a digit its spoken forms.

    Examples
    --------
    >>> from skcarrot.search.instructions import description_variants
    >>> description_variants("3")
    ['3', 'a photo of a 3', 'the 3', 'the digit 3', 'the number three']
    >>> description_variants("cat")[:2]
    ['cat', 'a photo of a cat']
    """
    out = [style.format(name) for style in styles]
    if name.strip().isdigit() and len(name.strip()) == 1:
        out += [f"the digit {name.strip()}", f"the number {_NUMBER_WORDS[int(name)]}"]
    return list(dict.fromkeys(out))


def _rungs(n_candidates: int, n_images: int, n_classes: int, eta: int, keep: int) -> list[tuple[int, int]]:
    """``(candidates, images)`` of each rung of successive halving; the last rung's survivors are kept."""
    counts = [n_candidates]
    while counts[-1] > keep:
        counts.append(max(keep, math.ceil(counts[-1] / eta)))
    n_rungs = len(counts) - 1  # rungs scored; the last count is what survives
    rungs = []
    for r in range(n_rungs):
        shots = n_images // eta ** (n_rungs - 1 - r)
        rungs.append((counts[r], int(min(n_images, max(shots, n_classes)))))
    return rungs


def screening_cost(n_candidates: int, n_images: int, n_classes: int, calls_per_image: int, eta: int = 2,
                   keep: int = 2) -> int:
    """Calls successive halving spends: each rung's candidates on the images they had not seen yet.

    Examples
    --------
    >>> from skcarrot.search.instructions import screening_cost
    >>> screening_cost(18, 16, 2, 1)
    98
    """
    total, seen = 0, 0
    for count, shots in _rungs(n_candidates, n_images, n_classes, eta, keep):
        total += count * (shots - seen) * calls_per_image
        seen = shots
    return total


def _balanced_order(y: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """Shot indices interleaved class by class (each class shuffled), so every prefix is near-balanced."""
    per_class = [rng.permutation(np.flatnonzero(y == c)).tolist() for c in np.unique(y)]
    order = []
    while any(per_class):
        for members in per_class:
            if members:
                order.append(members.pop(0))
    return np.array(order, dtype=int)


class InstructionSearch:
    """Successive halving over instructions x description styles, then a local search on all shots.

    Parameters
    ----------
    class_names : sequence of str
    instructions : sequence of str, default=DEFAULT_INSTRUCTIONS
        Instruction wordings; the first is the starting one.
    variants : sequence of sequence of str or None, default=None
        Descriptions tried per class (the first: the starting one); None:
        :func:`description_variants` of each name.
    popsize : int, default=4
        Prompts asked per generation, the current one included.
    eta : int, default=2
        Successive halving keeps ``1 / eta`` of the candidates per rung and grows the subset ``eta``-fold.
    keep : int, default=2
        Candidates screening stops at.
    random_state : int, RandomState or None, default=None

    Attributes
    ----------
    screened_ : bool
        Whether screening ran (or a warm start brought its result).
    instruction_ranking_ : list of int
        Instructions by screening loss, best first (those the local search moves among).
    screen_losses_ : dict of (int, int) to float
        Each screened candidate's mean cross-entropy on the last subset it saw.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot.search import InstructionSearch
    >>> search = InstructionSearch(["cat", "dog"], popsize=3, random_state=0)
    >>> search.current()
    ('What is shown in this image? Choose one option.', ('cat', 'dog'))
    >>> handle, prompts = search.ask()
    >>> len(prompts), prompts[0] == search.current()
    (3, True)
    >>> search.tell(handle, np.array([1.0, 0.5, 2.0]))
    >>> search.current() == prompts[1]
    True
    """

    def __init__(self, class_names: Sequence[str], *, instructions: Sequence[str] = DEFAULT_INSTRUCTIONS,
                 variants: Sequence[Sequence[str]] | None = None, popsize: int = 4, eta: int = 2, keep: int = 2,
                 random_state: Any = None) -> None:
        self.class_names = [str(n) for n in class_names]
        self.instructions = [str(i) for i in instructions]
        if not self.instructions:
            raise ValueError("give at least one instruction")
        if variants is None:
            variants = [description_variants(n) for n in self.class_names]
        self.variants = [list(dict.fromkeys(str(v) for v in vs)) for vs in variants]
        if len(self.variants) != len(self.class_names) or any(not vs for vs in self.variants):
            raise ValueError(f"variants must hold at least one description for each of the "
                             f"{len(self.class_names)} classes")
        if popsize < 2:
            raise ValueError(f"popsize must be >= 2 (the current prompt and a neighbour), got {popsize}")
        if eta < 2:
            raise ValueError(f"eta must be >= 2, got {eta}")
        self.popsize = int(popsize)
        self.eta = int(eta)
        self.keep = max(1, int(keep))
        self.rng = check_random_state(random_state)
        self.coordinates_ = np.zeros(1 + len(self.class_names), dtype=int)
        self.instruction_ranking_ = list(range(len(self.instructions)))
        self.screen_losses_: dict = {}
        self.screened_ = False

    # -- prompts ------------------------------------------------------------------------------
    @property
    def n_styles(self) -> int:
        """Description styles screened: the fewest variants any class has (a style is one index for every class)."""
        return min(len(vs) for vs in self.variants)

    def pool(self) -> list[np.ndarray]:
        """Screening's candidates: every instruction with every style applied to all classes."""
        n_classes = len(self.class_names)
        return [np.array([i] + [s] * n_classes) for i in range(len(self.instructions)) for s in range(self.n_styles)]

    def prompt(self, coordinates: Sequence[int]) -> tuple[str, tuple[str, ...]]:
        """``(instruction, descriptions)`` of ``coordinates`` (instruction index, then one description index a class)."""
        coordinates = [int(c) for c in coordinates]
        return (self.instructions[coordinates[0]],
                tuple(self.variants[c][k] for c, k in enumerate(coordinates[1:])))

    # -- screening ------------------------------------------------------------------------------
    def n_screening_calls(self, n_images: int, calls_per_image: int) -> int:
        """Calls :meth:`screen` spends on ``n_images`` shots (0 when nothing is left to screen)."""
        if self.screened_ or len(self.pool()) <= 1:
            return 0
        return screening_cost(len(self.pool()), n_images, len(self.class_names), calls_per_image, self.eta, self.keep)

    def screen(self, score: Callable[[list, list], np.ndarray], images: Sequence[Any], y: np.ndarray) -> None:
        """Successive halving on nested, class-balanced subsets of the shots.

        ``score(images, prompts)`` returns log-probabilities ``(P, n, C)``; each rung asks
        only the images its survivors had not seen, and ranks them by the mean
        cross-entropy over every image seen so far.
        """
        y = np.asarray(y)
        pool = self.pool()
        if self.screened_ or len(pool) <= 1:
            self.screened_ = True
            return
        order = _balanced_order(y, self.rng)
        rungs = _rungs(len(pool), len(y), len(self.class_names), self.eta, self.keep)
        alive = list(range(len(pool)))
        losses = {k: np.empty(0) for k in alive}
        seen = 0
        for count, shots in rungs:
            new = order[seen:shots]
            if len(new):
                log_probs = score([images[i] for i in new], [self.prompt(pool[k]) for k in alive])
                for row, k in enumerate(alive):
                    losses[k] = np.concatenate([losses[k], -log_probs[row, np.arange(len(new)), y[new]]])
            seen = shots
            ranked = sorted(alive, key=lambda k: (float(losses[k].mean()), k))
            survivors = max(self.keep, math.ceil(count / self.eta))
            alive = ranked[:survivors]
        self.screen_losses_ = {tuple(int(v) for v in pool[k][:2]): float(losses[k].mean()) for k in losses
                               if len(losses[k])}
        best = pool[alive[0]]
        self.coordinates_ = best.copy()
        ranking = []
        for k in sorted(losses, key=lambda k: (float(losses[k].mean()) if len(losses[k]) else np.inf, k)):
            if int(pool[k][0]) not in ranking:
                ranking.append(int(pool[k][0]))
        # the local search moves among the better half of the instructions, best first
        self.instruction_ranking_ = ranking[:max(1, math.ceil(len(ranking) / self.eta))]
        self.screened_ = True

    # -- ask / tell ---------------------------------------------------------------------------
    def _neighbours(self) -> list[np.ndarray]:
        out = []
        current = self.coordinates_
        for i in self.instruction_ranking_:
            if i != current[0]:
                move = current.copy()
                move[0] = i
                out.append(move)
        for c, vs in enumerate(self.variants):
            for k in range(len(vs)):
                if k != current[1 + c]:
                    move = current.copy()
                    move[1 + c] = k
                    out.append(move)
        return out

    def can_move(self) -> bool:
        """Whether any neighbour exists (more than one instruction or description to choose)."""
        return bool(self._neighbours())

    def ask(self) -> tuple[list[np.ndarray], list[tuple[str, tuple[str, ...]]]]:
        """The current prompt and ``popsize - 1`` distinct neighbours (fewer when fewer exist)."""
        neighbours = self._neighbours()
        n = min(self.popsize - 1, len(neighbours))
        picked = [neighbours[i] for i in sorted(self.rng.choice(len(neighbours), n, replace=False))] if n else []
        handle = [self.coordinates_.copy()] + picked
        return handle, [self.prompt(c) for c in handle]

    def tell(self, handle: Sequence[np.ndarray], fitness: np.ndarray) -> None:
        """Move to the best of the prompts asked (lower fitness is better; the current one wins ties)."""
        fitness = np.asarray(fitness, dtype=float)
        if fitness.shape != (len(handle),):
            raise ValueError(f"fitness must have shape ({len(handle)},), got {fitness.shape}")
        self.coordinates_ = np.array(handle[int(np.argmin(fitness))], dtype=int)

    def current(self) -> tuple[str, tuple[str, ...]]:
        return self.prompt(self.coordinates_)

    def coordinates(self) -> np.ndarray:
        return self.coordinates_.copy()

    def warm_start(self, state: dict) -> None:
        """Start from a previous fit's search: its screening result and its place, nothing paid again."""
        self.restore({**state, "rng": self.rng})

    def state(self) -> dict:
        return {"coordinates": self.coordinates_.copy(), "ranking": list(self.instruction_ranking_),
                "losses": dict(self.screen_losses_), "screened": self.screened_, "rng": self.rng}

    def restore(self, state: dict) -> None:
        self.coordinates_ = np.array(state["coordinates"], dtype=int)
        self.instruction_ranking_ = list(state["ranking"])
        self.screen_losses_ = dict(state["losses"])
        self.screened_ = bool(state["screened"])
        self.rng = state["rng"]
