"""The text door (what hosted endpoints offer): a prompt is one string per class."""

from __future__ import annotations

from numbers import Integral
from typing import Any

import numpy as np

from ..backends._base import check_method, returns_of
from ..backends._template import DEFAULT_TEMPLATE as _TEMPLATE
from ..search import TextPromptSearch
from ._base import Door

__all__ = ["TextDoor"]

# Words screened by default: a seeded subset of the tokenizer's. Measured on digits (10 seeds):
# the more words screened, the more the choice of names fits the shots and not the task
# (text-level CARROT 88.1% with 200 words, 85.8% with 4,000), and 200 words fit one call of
# a hosted endpoint.
_DEFAULT_VOCABULARY = 200
# With the refiner, a screened word must beat chance over every word and class tried (a
# Bonferroni bound, 4.1 standard errors for 200 words and 10 classes): the refiner already
# corrects what most such words seem to fix. Measured on held-out digits and digits+fashion
# splits (10 seeds, 2-16 shots): text-level CARROT 0.4-1.5 points below the refiner alone with
# a margin of two standard errors, within 0.1 of it with the bound. Without the refiner the
# words are the only lever and two standard errors keep the search's gain over zero-shot.
_PROMPT_ONLY_MARGIN = 2.0


class TextDoor(Door):
    """Prompt strings in, log-probabilities out; each class's wording searched word by word.

    Scores are log-probabilities (a log-softmax of logits when the model returns
    them), so the refiner and the losses work the same on both doors.

    Examples
    --------
    >>> from skcarrot.backends import OpenCLIPTextBackend
    >>> from skcarrot.doors import TextDoor
    >>> door = TextDoor(OpenCLIPTextBackend(), ["one", "two"])
    >>> door.zero_shot_prompt()
    ['a photo of a one.', 'a photo of a two.']
    """

    name = "text"
    method = "text_scores"
    # Every prompt set is scored image by image on hosted endpoints: a few hundred prompt sets.
    default_budget = 250
    default_popsize = 10
    early_stopping_default = False
    fitted_attributes = ("prompt_", "prompt_candidates_")

    @classmethod
    def check(cls, backend: Any) -> None:
        check_method(
            backend, "text_scores", "text_scores(images, prompts)",
            f"backend {type(backend).__name__} does not offer the text door: it has no "
            "'text_scores(images, prompts)' (and 'returns'); use door='embedding' (or 'auto')",
        )
        returns_of(backend)

    @property
    def template(self) -> str:
        return getattr(self.backend, "template", None) or _TEMPLATE

    def score(self, images, prompts, purpose: str) -> np.ndarray:
        """Log-probabilities ``(P, N, C)`` of ``images`` under each prompt set (``P`` queries)."""
        return self.counter.log_probabilities(images, [list(p) for p in prompts], purpose=purpose)

    def one(self, prompt) -> list:
        return [list(prompt)]

    def copy_prompt(self, prompt) -> list:
        return list(prompt)

    def zero_shot_prompt(self) -> list[str]:
        return [self.template.format(name) for name in self.class_names]

    def build_search(self, settings: Any, seeds: dict, start: Any) -> TextPromptSearch | None:
        if not settings.prompt_tuning:
            return None
        known = start.state  # what a warm start's search had screened and learned; {} on a fresh fit
        candidates = known.get("candidates")
        vocabulary, n_words = settings.vocabulary, None
        if vocabulary is None:
            vocabulary = _DEFAULT_VOCABULARY
        if isinstance(vocabulary, Integral):
            vocabulary, n_words = None, int(vocabulary)
        search = TextPromptSearch(
            self.class_names, templates=(self.template,), candidates=candidates, popsize=settings.popsize,
            vocabulary=vocabulary, n_words=n_words, strings_per_query=getattr(self.backend, "max_labels", None),
            screen_margin=None if settings.refinement else _PROMPT_ONLY_MARGIN,
            random_state=np.random.RandomState(seeds["cma"]),
        )
        if candidates is not None and known.get("logits") is not None:
            search.warm_start(known["logits"])
        return search

    def start_cost(self, search: Any, y: np.ndarray | None = None) -> int:
        return search.n_screening_queries() if search is not None and not search.screened_ else 0

    def start(self, search: Any, images, y: np.ndarray) -> None:
        """Screen candidate words on the training shots (unless a warm start brought them)."""
        if search is not None and not search.screened_:
            search.screen(self.counter, images, y)

    def fitted(self, result: Any, search: Any, seeds: dict, start: Any) -> tuple[dict, dict]:
        prompt = list(result.prompt)
        if search is not None:
            candidates = [list(c) for c in search.candidates_]
            logits = [theta.copy() for theta in search.logits_]
        else:  # a warm fit without prompt tuning keeps the search it had (none on a fresh fit)
            candidates, logits = start.state.get("candidates"), start.state.get("logits")
        state = {"prompt": prompt, "z": None, "candidates": candidates, "logits": logits,
                 "searched": candidates is not None}
        return {"prompt_": prompt, "prompt_candidates_": candidates}, state
