"""Prompt generation module for the text-level door: a policy gradient over words.

The search is black-box discrete prompt learning (BDPL; Diao et al., "Black-box
Prompt Learning for Pre-trained Language Models", TMLR 2023): every slot of the
prompt (each class's wording, and optionally the template) is drawn from its own
categorical distribution; ``popsize`` prompt sets are sampled per step and scored
in one call (``popsize`` queries), and the distributions' logits move along the
variance-reduced REINFORCE estimate (the batch's mean loss as baseline).

A policy gradient over a whole tokenizer vocabulary needs far too many queries,
so, as BDPL first builds a small task-specific candidate vocabulary, the search
first *screens* words: one query scores many candidate prompt strings as extra
columns next to the classes' own prompts. A softmax over more strings keeps the
ratios between them, so the log-probabilities of one query give every candidate's
score relative to the classes' own prompts; repeating those prompts in each
screening query makes queries comparable. Each class then keeps its own name and
the few words that lower the training cross-entropy most when they replace it, each by
more than ``screen_margin`` standard errors (see :func:`screening_margin`).

Queries are counted honestly: a screening prompt set with more strings than
classes is still one query, and its images scored are counted as usual.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from statistics import NormalDist
from typing import Any

import numpy as np
from sklearn.utils import check_random_state

from .._util.math import logsumexp, softmax
from ..backends._template import DEFAULT_TEMPLATE

__all__ = ["TextPromptSearch", "coordinate_losses", "cross_entropy_fitness", "screening_margin", "tokenizer_words"]

#: Signature of a fitness: log-probabilities ``(P, n_images, n_classes)`` and labels -> ``(P,)``, lower is better.
Fitness = Callable[[np.ndarray, np.ndarray], np.ndarray]


def tokenizer_words(min_length: int = 3, max_length: int = 12) -> list[str]:
    """Whole-word, lowercase alphabetic tokens of open_clip's tokenizer vocabulary.

    The vocabulary file ships with open_clip (the BPE of CLIP's tokenizer), so
    nothing is downloaded. Each word is one token of CLIP-style models.

    Parameters
    ----------
    min_length, max_length : int, default=3, 12
        Length bounds, in characters.

    Returns
    -------
    words : list of str
        Sorted.

    Examples
    --------
    >>> from skcarrot.search.words import tokenizer_words
    >>> words = tokenizer_words()
    >>> len(words) > 20_000, "seven" in words, all(w.isalpha() for w in words)
    (True, True, True)
    """
    from open_clip.tokenizer import SimpleTokenizer

    encoder = SimpleTokenizer().encoder
    words = set()
    for token in encoder:
        if token.endswith("</w>"):
            word = token[: -len("</w>")]
            if word.isascii() and word.isalpha() and word.islower() and min_length <= len(word) <= max_length:
                words.add(word)
    return sorted(words)


def cross_entropy_fitness(log_probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mean cross-entropy of each prompt set on the labelled images (lower is better).

    Parameters
    ----------
    log_probs : ndarray of shape (P, n_images, n_classes)
        Log-probabilities, e.g. from :meth:`skcarrot.backends.QueryCounter.log_probabilities`.
    y : ndarray of shape (n_images,)
        Class indices.

    Returns
    -------
    fitness : ndarray of shape (P,)

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot.search.words import cross_entropy_fitness
    >>> cross_entropy_fitness(np.log(np.full((2, 3, 2), 0.5)), np.array([0, 1, 1])).round(4)
    array([0.6931, 0.6931])
    """
    log_probs = np.asarray(log_probs, dtype=np.float64)
    y = np.asarray(y)
    return -log_probs[:, np.arange(len(y)), y].mean(axis=1)


def coordinate_losses(base: np.ndarray, candidates: np.ndarray, y: np.ndarray, c: int,
                      per_image: bool = False) -> np.ndarray:
    """Training cross-entropy when each candidate column replaces class ``c``'s column.

    Parameters
    ----------
    base : ndarray of shape (n_images, n_classes)
        Log-probabilities (or logits) of the classes' current prompts.
    candidates : ndarray of shape (n_images, n_candidates)
        Candidates' scores on the same scale (same query frame).
    y : ndarray of shape (n_images,)
    c : int
    per_image : bool, default=False
        Return each image's loss instead of the mean.

    Returns
    -------
    losses : ndarray of shape (n_candidates,), or (n_images, n_candidates) per image

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot.search.words import coordinate_losses
    >>> base = np.log(np.array([[0.5, 0.5], [0.5, 0.5]]))
    >>> coordinate_losses(base, base[:, [0]] + np.array([[2.0], [-2.0]]), np.array([0, 1]), 0) < 0.69
    array([ True])
    """
    others = np.delete(base, c, axis=1)
    rest = logsumexp(others, axis=1)  # (N,)
    total = np.logaddexp(rest[:, None], candidates)  # (N, M)
    is_c = (y == c)[:, None]
    true = np.where(is_c, candidates, base[np.arange(len(y)), y][:, None])
    losses = total - true
    return losses if per_image else losses.mean(axis=0)


#: Chance, over all the words and classes screened together, that one word is kept for a gain it owes to
#: the shots alone (a one-sided Bonferroni bound).
_SCREEN_ALPHA = 0.05


def screening_margin(n_words: int, n_classes: int, alpha: float = _SCREEN_ALPHA) -> float:
    """Standard errors by which a word must lower the training loss when ``n_words`` words are tried on ``n_classes``.

    Screening tries every word on every class, and the best of thousands of tries lowers the
    loss of a few shots by chance; the margin grows with the number of tries so that the chance
    of keeping any such word stays ``alpha``.

    Examples
    --------
    >>> from skcarrot.search.words import screening_margin
    >>> round(screening_margin(200, 10), 2), round(screening_margin(1, 1), 2)
    (4.06, 1.64)
    """
    tries = max(int(n_words) * int(n_classes), 1)
    return NormalDist().inv_cdf(1.0 - alpha / tries)


def _reliable_gains(base: np.ndarray, candidate_scores: np.ndarray, y: np.ndarray, n_classes: int,
                    margin: float) -> np.ndarray:
    """A lower confidence bound on each word's drop of training loss for each class, ``(C, n_words)``.

    Each image's loss drop is one observation: the bound is their mean less ``margin``
    standard errors, so a word must help most shots, not a few.
    """
    log_probs = base - logsumexp(base, axis=1)[:, None]
    current = -log_probs[np.arange(len(y)), y]  # (N,)
    bounds = []
    for c in range(n_classes):
        drop = current[:, None] - coordinate_losses(base, candidate_scores, y, c, per_image=True)  # (N, M)
        spread = drop.std(axis=0, ddof=1) / np.sqrt(len(y)) if len(y) > 1 else np.inf
        bounds.append(drop.mean(axis=0) - margin * spread)
    return np.stack(bounds)


class TextPromptSearch:
    """BDPL over each class's wording (and optionally the template), after screening words.

    Parameters
    ----------
    class_names : sequence of str
        The classes' own names, in column order; each stays a candidate of its class.
    templates : sequence of str, default=("a photo of a {}.",)
        Templates with one ``{}``; with more than one, the template is searched too.
        Screening uses the first.
    candidates : sequence of sequence of str or None, default=None
        Candidate wordings per class, to skip screening; the class's own name is
        put first when missing.
    vocabulary : sequence of str or None, default=None
        Words to screen; None for :func:`tokenizer_words`.
    n_words : int or None, default=None
        Screen a random subset of this many words (None: all of them).
    n_candidates : int, default=8
        Words kept per class after screening, besides the class's own name (fewer
        when fewer words lower the training loss). Each word goes to one class at most.
    strings_per_query : int or None, default=None
        Most strings in one screening query, the classes' own prompts included
        (hosted endpoints cap candidate labels); None for one query in all.
    screen_margin : float or None, default=2.0
        Standard errors by which a word must lower the training loss to be kept;
        None for :func:`screening_margin` of the words and classes screened (the
        chance that any word is kept for a gain it owes to the shots alone stays 5%).
    popsize : int, default=10
        Prompt sets sampled per step (queries per step).
    learning_rate : float, default=1.0
        Step on the categoricals' logits.
    random_state : int, RandomState instance or None, default=None
        Seeds the word subset and the sampling; a RandomState is used as given
        (never numpy's global state when an int or a RandomState is given).

    Attributes
    ----------
    candidates_ : list of list of str
        Candidate wordings per class (after :meth:`screen`, or as given).
    logits_ : list of ndarray
        Logits of each slot's categorical (classes, then the template if searched).

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot.search.words import TextPromptSearch
    >>> search = TextPromptSearch(["cat", "dog"], candidates=[["cat", "kitten"], ["dog", "puppy"]],
    ...                           popsize=4, random_state=0)
    >>> choices, prompt_sets = search.ask()
    >>> len(prompt_sets), len(prompt_sets[0])
    (4, 2)
    >>> search.tell(choices, np.arange(4.0))
    >>> search.current()
    ['a photo of a cat.', 'a photo of a dog.']
    """

    def __init__(
        self,
        class_names: Sequence[str],
        *,
        templates: Sequence[str] = (DEFAULT_TEMPLATE,),
        candidates: Sequence[Sequence[str]] | None = None,
        vocabulary: Sequence[str] | None = None,
        n_words: int | None = None,
        n_candidates: int = 8,
        strings_per_query: int | None = None,
        screen_margin: float | None = 2.0,
        popsize: int = 10,
        learning_rate: float = 1.0,
        random_state: Any = None,
    ) -> None:
        self.class_names = [str(n) for n in class_names]
        if len(self.class_names) < 2:
            raise ValueError(f"need at least two class names, got {self.class_names}")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class names must be distinct, got {self.class_names}")
        self.templates = [str(t) for t in templates]
        if not self.templates:
            raise ValueError("give at least one template")
        for t in self.templates:
            if t.count("{}") != 1:
                raise ValueError(f"a template must contain '{{}}' exactly once, got {t!r}")
        if popsize < 2:
            raise ValueError(f"popsize must be >= 2 (the baseline is the batch mean), got {popsize}")
        n_classes = len(self.class_names)
        if strings_per_query is not None and strings_per_query <= n_classes:
            raise ValueError(
                f"strings_per_query={strings_per_query} leaves no room for candidates next to the "
                f"{n_classes} classes' own prompts; give at least {n_classes + 1}"
            )
        self.vocabulary = vocabulary
        self.n_words = n_words
        self.n_candidates = int(n_candidates)
        self.strings_per_query = strings_per_query
        self.screen_margin = screen_margin
        self.popsize = int(popsize)
        self.learning_rate = float(learning_rate)
        self.rng = check_random_state(random_state)
        self.candidates_: list[list[str]] = [[name] for name in self.class_names]
        if candidates is not None:
            self._set_candidates(candidates)
        self.screened_ = candidates is not None

    # -- candidates ---------------------------------------------------------------------------
    def _set_candidates(self, candidates: Sequence[Sequence[str]]) -> None:
        candidates = [list(dict.fromkeys(str(w) for w in words)) for words in candidates]
        if len(candidates) != len(self.class_names):
            raise ValueError(
                f"candidates has {len(candidates)} lists but there are {len(self.class_names)} classes"
            )
        out = []
        for name, words in zip(self.class_names, candidates):
            out.append([name] + [w for w in words if w != name])
        self.candidates_ = out
        self.logits_ = [np.zeros(len(words)) for words in out]
        if len(self.templates) > 1:
            self.logits_.append(np.zeros(len(self.templates)))

    def class_prompts(self) -> list[str]:
        """The classes' own names in the first template: the hand-written (zero-shot) prompt set."""
        return [self.templates[0].format(name) for name in self.class_names]

    def screening_words(self) -> list[str]:
        """The words :meth:`screen` scores (a seeded subset when ``n_words`` is set)."""
        words = tokenizer_words() if self.vocabulary is None else [str(w) for w in self.vocabulary]
        own = set(self.class_names)
        words = [w for w in dict.fromkeys(words) if w not in own]
        if self.n_words is not None and self.n_words < len(words):
            pick = np.sort(self.rng.choice(len(words), self.n_words, replace=False))
            words = [words[i] for i in pick]
        return words

    def n_screening_queries(self, n_words: int | None = None) -> int:
        """Queries :meth:`screen` spends for ``n_words`` words (default: :meth:`screening_words`)."""
        if n_words is None:
            n_words = len(self.screening_words()) if self.n_words is None else self.n_words
        if n_words == 0:
            return 0
        if self.strings_per_query is None:
            return 1
        return math.ceil(n_words / (self.strings_per_query - len(self.class_names)))

    def screen(
        self, counter: Any, images: Sequence[Any], y: np.ndarray, purpose: str = "screen"
    ) -> list[list[str]]:
        """Score candidate words through the door and keep the best few per class.

        Each screening query is one prompt set: the classes' own prompts then a
        chunk of candidate prompts (the first template around each word). Its
        log-probabilities, less the log-sum-exp over the classes' own prompts,
        put every candidate on one scale across queries.

        Parameters
        ----------
        counter : QueryCounter
            The black box behind its counter (``log_probabilities``); spends :meth:`n_screening_queries` queries.
        images : sequence of PIL.Image.Image
            Training images.
        y : ndarray of shape (n_images,)
            Class indices.
        purpose : str, default="screen"
            Accounting label.

        Returns
        -------
        candidates : list of list of str
            :attr:`candidates_`: per class, its own name then the words kept.
        """
        y = np.asarray(y)
        words = self.screening_words()
        own = self.class_prompts()
        n_classes = len(own)
        chunk = len(words) if self.strings_per_query is None else self.strings_per_query - n_classes
        base = None
        scores = []
        for start in range(0, len(words), max(chunk, 1)):
            strings = [self.templates[0].format(w) for w in words[start : start + chunk]]
            log_probs = counter.log_probabilities(images, [own + strings], purpose=purpose)[0]
            own_total = logsumexp(log_probs[:, :n_classes], axis=1)[:, None]
            if base is None:
                base = log_probs[:, :n_classes] - own_total
            scores.append(log_probs[:, n_classes:] - own_total)
        kept: list[list[str]] = [[] for _ in range(n_classes)]
        if scores:
            candidate_scores = np.concatenate(scores, axis=1)  # (N, n_words)
            margin = self.screen_margin
            if margin is None:
                margin = screening_margin(len(words), n_classes)
            gains = _reliable_gains(base, candidate_scores, y, n_classes, margin)  # (C, n_words)
            # Each word serves the class it helps most, so no two classes can pick one wording.
            owner = gains.argmax(axis=0)
            for c in range(n_classes):
                mine = np.flatnonzero((owner == c) & (gains[c] > 0))
                best = mine[np.argsort(-gains[c, mine], kind="stable")][: self.n_candidates]
                kept[c] = [words[i] for i in best]
        self._set_candidates(kept)
        self.screened_ = True
        return self.candidates_

    # -- ask / tell ---------------------------------------------------------------------------
    def _slots(self) -> list[np.ndarray]:
        if not hasattr(self, "logits_"):
            self._set_candidates([[] for _ in self.class_names])
        return self.logits_

    def ask(self) -> tuple[np.ndarray, list[list[str]]]:
        """Sample ``popsize`` prompt sets: ``(choices, prompt_sets)``, choice indices ``(popsize, n_slots)``."""
        slots = self._slots()
        choices = np.stack(
            [self.rng.choice(len(theta), size=self.popsize, p=softmax(theta)) for theta in slots], axis=1
        )
        return choices, self.prompt_sets(choices)

    def prompt_sets(self, choices: np.ndarray) -> list[list[str]]:
        """The prompt strings of each row of ``choices``: one string per class."""
        choices = np.atleast_2d(np.asarray(choices, dtype=int))
        n_classes = len(self.class_names)
        out = []
        for row in choices:
            template = self.templates[row[n_classes]] if len(self.templates) > 1 else self.templates[0]
            out.append([template.format(self.candidates_[c][row[c]]) for c in range(n_classes)])
        return out

    def tell(self, choices: np.ndarray, fitness: np.ndarray) -> None:
        """Move each categorical along the variance-reduced policy gradient (lower fitness is better).

        The advantage of each sample is its fitness minus the batch mean, divided
        by the batch's standard deviation so one learning rate fits any loss scale.
        """
        choices = np.asarray(choices, dtype=int)
        fitness = np.asarray(fitness, dtype=np.float64)
        if fitness.shape != (len(choices),):
            raise ValueError(f"fitness must have shape ({len(choices)},), got {fitness.shape}")
        spread = fitness.std()
        if len(fitness) < 2 or spread == 0 or not np.isfinite(spread):
            return  # no signal: every sample scored the same
        advantage = (fitness - fitness.mean()) / spread
        for s, theta in enumerate(self._slots()):
            probs = softmax(theta)
            onehot = np.eye(len(theta))[choices[:, s]]
            gradient = (advantage[:, None] * (onehot - probs)).sum(axis=0) / (len(fitness) - 1)
            theta -= self.learning_rate * gradient

    def coordinates(self) -> np.ndarray:
        """The most probable choice of every slot, shape ``(n_slots,)``."""
        return np.array([int(np.argmax(theta)) for theta in self._slots()])

    def current(self) -> list[str]:
        """The most probable prompt set: one readable prompt string per class."""
        return self.prompt_sets(self.coordinates()[np.newaxis])[0]

    def warm_start(self, logits: Sequence[np.ndarray]) -> None:
        """Start the categoricals from another search's :attr:`logits_` (same candidates)."""
        for theta, old in zip(self._slots(), logits):
            theta[:] = old

    def can_move(self) -> bool:
        """Whether some slot has more than one choice (after screening, some word was kept)."""
        return any(len(theta) > 1 for theta in self._slots())

    def state(self) -> dict:
        """Candidates, categoricals, generator and whether screening ran."""
        self._slots()
        return {"candidates": self.candidates_, "logits": self.logits_, "rng": self.rng, "screened": self.screened_}

    def restore(self, state: dict) -> None:
        """Continue from :meth:`state`."""
        self.candidates_, self.logits_ = state["candidates"], state["logits"]
        self.rng, self.screened_ = state["rng"], state["screened"]
