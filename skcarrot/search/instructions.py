"""The chat door's prompt search: an instruction and a description per class, discrete and derivative-free.

A chat prompt is ``(instruction, descriptions)``: the question asked, and the text of each
class's option. The search has one slot per class (its description, among a few variants of
its name) and one for the instruction (among the instructions kept by screening), each a
categorical moved by the same variance-reduced policy gradient as the text door's words
(:class:`~skcarrot.search.words.TextPromptSearch`).

Every candidate instruction costs one call per training image it is scored on, so
instructions are screened first by **successive halving**: all candidates on one shot a
class, the better half on two shots a class, and so on, until ``n_kept`` survive; only they
are ever scored on every shot, by the search itself. The cost is known before any call (:meth:`InstructionSearch.n_screening_calls`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..backends.remote.chat import DEFAULT_INSTRUCTION
from ..datasets import DIGIT_WORDS
from .words import TextPromptSearch, cross_entropy_fitness

__all__ = ["InstructionSearch", "INSTRUCTIONS", "description_variants", "halving_rounds"]

#: Instructions screened by default (the first is the zero-shot prompt's).
INSTRUCTIONS = (
    DEFAULT_INSTRUCTION,
    "What is shown in the picture? Reply with one letter.",
    "Choose the label of this image.",
    "Look at the image and pick the right option.",
    "Classify the image. Answer with a letter.",
    "Which of these is it?",
    "Select the category of the object in the photo.",
    "What does this image show? Give the letter of the answer.",
)

def description_variants(name: str) -> list[str]:
    """Wordings of a class's option, its own name first.

    Examples
    --------
    >>> from skcarrot.search.instructions import description_variants
    >>> description_variants("3")
    ['3', 'three', 'the digit 3', 'the number three']
    >>> description_variants("sandal")
    ['sandal', 'a sandal', 'the sandal']
    """
    name = str(name)
    if name in DIGIT_WORDS:
        digit = str(DIGIT_WORDS.index(name))
        return [name, digit, f"the digit {digit}", f"the number {name}"]
    if name.isdigit() and len(name) == 1:
        word = DIGIT_WORDS[int(name)]
        return [name, word, f"the digit {name}", f"the number {word}"]
    return [name, f"a {name}", f"the {name}"]


def halving_rounds(n_candidates: int, shots: np.ndarray, n_kept: int) -> list[tuple[int, int]]:
    """``[(candidates scored, shots a class)]`` of each round of successive halving.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot.search.instructions import halving_rounds
    >>> halving_rounds(8, np.array([16, 16]), 2)
    [(8, 1), (4, 2)]
    """
    rounds, alive, per_class = [], n_candidates, 1
    most = int(np.max(shots)) if len(shots) else 1
    while alive > n_kept:
        rounds.append((alive, min(per_class, most)))
        alive = max(n_kept, math.ceil(alive / 2))
        per_class *= 2
    return rounds


class InstructionSearch(TextPromptSearch):
    """BDPL over the instruction and each class's description, after successive halving of instructions.

    Parameters
    ----------
    class_names : sequence of str
        The classes' own names (each its own description's first variant).
    instructions : sequence of str, default=INSTRUCTIONS
        Candidate instructions; the first is the zero-shot prompt's.
    descriptions : sequence of sequence of str or None, default=None
        Candidate descriptions per class; None for :func:`description_variants`.
    n_kept : int, default=2
        Instructions kept by screening (the search's instruction slot).
    calls_per_image : int, default=1
        Calls one image costs under one instruction (its option groups), for the cost.
    screened : bool, default=False
        Whether the instructions given are already screened (a warm start).
    popsize, learning_rate, random_state
        As in :class:`~skcarrot.search.words.TextPromptSearch`.

    Examples
    --------
    >>> from skcarrot.search.instructions import InstructionSearch
    >>> search = InstructionSearch(["0", "1"], instructions=["Which?", "What?"], popsize=4, random_state=0)
    >>> search.current()
    ('Which?', ['0', '1'])
    >>> handle, prompts = search.ask()
    >>> len(prompts), prompts[0][0] in ("Which?", "What?")
    (4, True)
    """

    def __init__(
        self,
        class_names: Sequence[str],
        *,
        instructions: Sequence[str] = INSTRUCTIONS,
        descriptions: Sequence[Sequence[str]] | None = None,
        n_kept: int = 2,
        calls_per_image: int = 1,
        screened: bool = False,
        popsize: int = 4,
        learning_rate: float = 1.0,
        random_state: Any = None,
    ) -> None:
        names = [str(n) for n in class_names]
        if descriptions is None:
            descriptions = [description_variants(n) for n in names]
        super().__init__(names, candidates=descriptions, popsize=popsize, learning_rate=learning_rate,
                         random_state=random_state)
        self.instructions = [str(i) for i in dict.fromkeys(instructions)]
        if not self.instructions or not all(self.instructions):
            raise ValueError(f"give at least one non-empty instruction, got {list(instructions)}")
        if n_kept < 1:
            raise ValueError(f"n_kept must be >= 1, got {n_kept}")
        self.n_kept = int(n_kept)
        self.calls_per_image = int(calls_per_image)
        self.screened_ = bool(screened) or len(self.instructions) <= self.n_kept
        self._set_candidates(self.candidates_)

    def _set_candidates(self, candidates: Sequence[Sequence[str]]) -> None:
        super()._set_candidates(candidates)
        if len(getattr(self, "instructions", ())) > 1:
            self.logits_.append(np.zeros(len(self.instructions)))

    def prompt_sets(self, choices: np.ndarray) -> list[tuple[str, list[str]]]:
        """The ``(instruction, descriptions)`` of each row of ``choices``."""
        choices = np.atleast_2d(np.asarray(choices, dtype=int))
        n_classes = len(self.class_names)
        out = []
        for row in choices:
            instruction = self.instructions[row[n_classes]] if len(self.instructions) > 1 else self.instructions[0]
            out.append((instruction, [self.candidates_[c][row[c]] for c in range(n_classes)]))
        return out

    def current(self) -> tuple[str, list[str]]:
        """The most probable prompt: ``(instruction, descriptions)``."""
        return self.prompt_sets(self.coordinates()[np.newaxis])[0]

    def class_prompts(self) -> tuple[str, list[str]]:
        """The zero-shot prompt: the first instruction and the classes' own names."""
        return self.instructions[0], list(self.class_names)

    # -- screening -----------------------------------------------------------------------------
    def n_screening_calls(self, y: np.ndarray) -> int:
        """Calls :meth:`screen` spends on the shots of labels ``y`` (0 when already screened)."""
        if self.screened_:
            return 0
        counts = np.bincount(np.asarray(y, dtype=int), minlength=len(self.class_names))
        return sum(alive * int(np.minimum(counts, per_class).sum()) * self.calls_per_image
                   for alive, per_class in halving_rounds(len(self.instructions), counts, self.n_kept))

    def screen(self, score, images: Sequence[Any], y: np.ndarray, rng: np.random.RandomState) -> list[str]:
        """Successive halving of the instructions on the shots; keeps ``n_kept``.

        ``score(images, prompts)`` gives ``(P, N, C)`` log-probabilities (the door's
        counted scoring). Each round scores the survivors on a seeded subset of up to
        ``per_class`` shots of every class, ranks them by training cross-entropy, and keeps
        the better half (at least ``n_kept``), best first.
        """
        y = np.asarray(y, dtype=int)
        counts = np.bincount(y, minlength=len(self.class_names))
        order = {c: rng.permutation(np.flatnonzero(y == c)) for c in range(len(self.class_names))}
        alive = list(range(len(self.instructions)))
        for n_alive, per_class in halving_rounds(len(self.instructions), counts, self.n_kept):
            pick = np.sort(np.concatenate([order[c][:per_class] for c in order]))
            prompts = [(self.instructions[i], list(self.class_names)) for i in alive]
            fitness = cross_entropy_fitness(score([images[j] for j in pick], prompts), y[pick])
            ranked = [alive[k] for k in np.argsort(fitness, kind="stable")]
            alive = ranked[: max(self.n_kept, math.ceil(len(alive) / 2))]
        self.instructions = [self.instructions[i] for i in alive]
        self.screened_ = True
        self._set_candidates(self.candidates_)
        return self.instructions

    # -- state ---------------------------------------------------------------------------------
    def state(self) -> dict:
        out = super().state()
        out["instructions"] = list(self.instructions)
        return out

    def restore(self, state: dict) -> None:
        self.instructions = list(state["instructions"])
        super().restore(state)
