"""The chat door (what chat APIs offer): a prompt is an instruction and one option text per class."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backends._base import check_method
from ..backends.remote.chat import DEFAULT_INSTRUCTION
from ..search.instructions import INSTRUCTIONS, InstructionSearch, description_variants
from ._base import Door

__all__ = ["ChatDoor"]


class ChatDoor(Door):
    """An instruction and lettered options in, the letters' log-probabilities out; one call per image.

    A prompt is ``(instruction, descriptions)``. Scoring it on ``N`` images costs ``N`` calls
    times the option groups of the classes (see
    :class:`~skcarrot.backends.ChatVLMBackend`). A query here is a question asked: a call
    (a retry too), or an answer the backend's cache already held, which costs no call and
    counts all the same, so the plan does not depend on the cache. The budget caps queries,
    so calls never pass it; ``n_calls_`` counts the calls sent.
    The prompt search is :class:`~skcarrot.search.instructions.InstructionSearch`, whose
    successive halving of instructions runs in :meth:`start`.

    Examples
    --------
    >>> from skcarrot.backends import ChatVLMBackend
    >>> from skcarrot.doors import ChatDoor
    >>> door = ChatDoor(ChatVLMBackend(cache=None), ["0", "1"])
    >>> door.zero_shot_prompt()
    ('Which option describes the image? Answer with the letter.', ['0', '1'])
    >>> door.query_cost(160)
    160
    """

    name = "chat"
    method = "option_log_probs"
    # The paper's 8,000 queries, as calls: 50 prompts on 160 shots, about $4.80 on gpt-4o at low
    # detail (0.0006 $ a call). The view pool is a call a view: 2 views a shot (320 at 16 shots of 10
    # classes); on digits at 16 shots (seeds 100-104) 2 views trained the refiner as well as 8.
    default_budget = 8000
    default_n_views = 2
    default_popsize = 4
    early_stopping_default = False
    pilot_share_includes_start = True
    # The default's step 0: the search alone on 2 shots a class (720 calls at the defaults) finds the
    # descriptions and instruction the refiner then trains on.
    few_shot_search_shots = 2
    fitted_attributes = ("prompt_", "n_calls_", "n_input_tokens_", "n_output_tokens_")

    def __init__(self, backend: Any, class_names, budget: int | None = None) -> None:
        super().__init__(backend, class_names, budget)
        self._calls0 = backend.n_calls_
        self._tokens0 = (backend.n_input_tokens_, backend.n_output_tokens_)

    @classmethod
    def check(cls, backend: Any) -> None:
        check_method(
            backend, "option_log_probs", "option_log_probs(images, instruction, descriptions, max_calls)",
            f"backend {type(backend).__name__} does not offer the chat door: it has no "
            "'option_log_probs(images, instruction, descriptions, max_calls)'; use a ChatVLMBackend",
        )

    def query_cost(self, n_images: int) -> int:
        return n_images * self.backend.calls_per_image(len(self.class_names))

    def score(self, images, prompts, purpose: str) -> np.ndarray:
        """Log-probabilities ``(P, N, C)``; each prompt's queries counted as they are asked.

        A query is a question asked: a call (a retry too) or an answer read from the cache.
        Counting cached answers keeps a fit's plan and choices the same whatever the cache
        held, so a refit on the same shots makes the same decisions and no call.
        """
        counter, backend = self.counter, self.backend
        out = []
        for instruction, descriptions in prompts:
            calls, cached = backend.n_calls_, backend.n_cached_
            try:
                out.append(backend.option_log_probs(images, instruction, descriptions, max_calls=counter.remaining))
            finally:
                asked = (backend.n_calls_ - calls) + (backend.n_cached_ - cached)
                counter.charge(asked, len(images), purpose)
        return np.stack(out)

    def one(self, prompt) -> list:
        return [self.copy_prompt(prompt)]

    def copy_prompt(self, prompt) -> tuple:
        instruction, descriptions = prompt
        return str(instruction), [str(d) for d in descriptions]

    def zero_shot_prompt(self) -> tuple:
        instruction = getattr(self.backend, "instruction", None) or DEFAULT_INSTRUCTION
        return instruction, list(self.class_names)

    def build_search(self, settings: Any, seeds: dict, start: Any) -> InstructionSearch | None:
        if not settings.prompt_tuning:
            return None
        known = start.state  # a warm start's screened instructions and categoricals; {} on a fresh fit
        search = InstructionSearch(
            self.class_names, instructions=known.get("instructions") or INSTRUCTIONS,
            descriptions=known.get("candidates") or [description_variants(n) for n in self.class_names],
            calls_per_image=self.backend.calls_per_image(len(self.class_names)),
            screened=bool(known.get("instructions")), popsize=settings.popsize,
            random_state=np.random.RandomState(seeds["cma"]),
        )
        if known.get("logits") is not None:
            search.warm_start(known["logits"])
        return search

    def start_cost(self, search: Any, y: np.ndarray | None = None) -> int:
        return 0 if search is None or y is None else search.n_screening_calls(y)

    def start(self, search: Any, images, y: np.ndarray) -> None:
        """Successive halving of the instructions on the training shots (unless a warm start brought them)."""
        if search is not None and not search.screened_:
            search.screen(lambda imgs, prompts: self.score(imgs, prompts, "screen"), images, y,
                          np.random.RandomState(search.rng.randint(2**31 - 1)))

    def fitted(self, result: Any, search: Any, seeds: dict, start: Any) -> tuple[dict, dict]:
        prompt = self.copy_prompt(result.prompt)
        if search is not None:
            known = {"instructions": list(search.instructions), "candidates": [list(c) for c in search.candidates_],
                     "logits": [theta.copy() for theta in search.logits_]}
        else:
            known = {k: start.state.get(k) for k in ("instructions", "candidates", "logits")}
        backend = self.backend
        attributes = {"prompt_": prompt, "n_calls_": backend.n_calls_ - self._calls0,
                      "n_input_tokens_": backend.n_input_tokens_ - self._tokens0[0],
                      "n_output_tokens_": backend.n_output_tokens_ - self._tokens0[1]}
        searched = search is not None or bool(start.state.get("searched"))  # what a warm start continues
        return attributes, {"prompt": prompt, "z": None, "searched": searched, **known}
