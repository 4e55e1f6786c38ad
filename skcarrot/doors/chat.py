"""The chat door: a prompt is a multiple-choice question, a query is one chat call.

Chat vision-language models (GPT-4o, GPT-4.1, self-hosted VLMs behind vLLM or
``skcarrot serve``) answer text, with the log-probabilities of their first token.
The door asks one question per image (:class:`~skcarrot.backends.ChatVLMBackend`):
the prompt is ``(instruction, descriptions)``, one description per class, shown as
lettered options. Every call is billed, so the door counts calls: a *query* here is
one chat call, retries included, and a cached answer is none.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from ..backends._base import QueryCounter, check_method
from ..exceptions import QueryBudgetExceededError
from ..search.instructions import DEFAULT_INSTRUCTIONS, InstructionSearch
from ._base import Door

__all__ = ["ChatCounter", "ChatDoor", "estimate_cost"]


class ChatCounter(QueryCounter):
    """The chat door's query counter: one query per chat call sent, retries included, checked before each.

    A call's every try passes :meth:`meter` ``.charge()``, which refuses (before the
    try) the one that would go past the budget; a round of calls is refused whole,
    before any is sent, when its uncached calls exceed what is left. Cached answers
    pass no meter: they cost nothing. The tokens of each answer's ``usage`` are summed.

    Examples
    --------
    >>> from skcarrot.doors.chat import ChatCounter
    >>> counter = ChatCounter(object(), budget=1)
    >>> meter = counter.meter("prompt")
    >>> meter.charge(); counter.n_queries
    1
    >>> meter.charge()
    Traceback (most recent call last):
    ...
    skcarrot.exceptions.QueryBudgetExceededError: chat call 2 would exceed the query budget of 1 (1 spent, retries included); the call was not sent: raise query_budget, or lower max_retries
    """

    _COUNTS = QueryCounter._COUNTS + ("n_input_tokens", "n_output_tokens", "n_image_tokens")

    def __init__(self, backend: Any, budget: int | None = None) -> None:
        self.backend = backend
        self.budget = budget
        self.n_queries = self.n_images_scored = self.n_pairs_scored = 0
        self.n_input_tokens = self.n_output_tokens = self.n_image_tokens = 0
        self.by_purpose: dict[str, int] = {}
        self.images_by_purpose: dict[str, int] = {}
        self._lock = threading.Lock()

    def meter(self, purpose: str) -> "_Meter":
        """What the backend calls around each call of ``purpose``."""
        return _Meter(self, purpose)

    def option_log_probs(self, images, instruction: str, options, purpose: str = "other") -> np.ndarray:
        """The backend's :meth:`~skcarrot.backends.ChatVLMBackend.option_log_probs`, metered."""
        return self.backend.option_log_probs(images, instruction, options, meter=self.meter(purpose))


class _Meter:
    def __init__(self, counter: ChatCounter, purpose: str) -> None:
        self.counter, self.purpose = counter, purpose

    def reserve(self, n_calls: int) -> None:
        c = self.counter
        remaining = c.remaining
        if remaining is not None and n_calls > remaining:
            raise QueryBudgetExceededError(
                f"scoring needs {n_calls} chat call(s), more than the {remaining} left of the query budget of "
                f"{c.budget} ({c.n_queries} spent); no call was sent"
            )

    def charge(self) -> None:
        c = self.counter
        with c._lock:
            if c.budget is not None and c.n_queries >= c.budget:
                raise QueryBudgetExceededError(
                    f"chat call {c.n_queries + 1} would exceed the query budget of {c.budget} ({c.n_queries} "
                    "spent, retries included); the call was not sent: raise query_budget, or lower max_retries"
                )
            c.n_queries += 1
            c.n_images_scored += 1
            c.n_pairs_scored += 1
            c.by_purpose[self.purpose] = c.by_purpose.get(self.purpose, 0) + 1
            c.images_by_purpose[self.purpose] = c.images_by_purpose.get(self.purpose, 0) + 1

    def record(self, usage) -> None:
        c = self.counter
        with c._lock:
            c.n_input_tokens += int(usage.get("prompt_tokens", 0))
            c.n_output_tokens += int(usage.get("completion_tokens", 0))
            c.n_image_tokens += int(usage.get("image_tokens", 0))


class ChatDoor(Door):
    """A multiple-choice question per image in, log-probabilities over the options out.

    The prompt is ``(instruction, descriptions)``; its search is
    :class:`~skcarrot.search.InstructionSearch` (successive halving over built-in
    instructions and description styles, then a local search). Scores are
    log-probabilities over the classes, so the refiner and the losses work as on
    the text door; a constant preference of the model for some option letters
    (option-position bias) is a per-class offset, which the refiner's residual learns.

    Examples
    --------
    >>> from skcarrot.backends import ChatVLMBackend
    >>> from skcarrot.doors import ChatDoor
    >>> door = ChatDoor(ChatVLMBackend("gpt-4o", cache=None), ["cat", "dog"])
    >>> door.zero_shot_prompt()
    ('What is shown in this image? Choose one option.', ('cat', 'dog'))
    >>> door.query_cost(16)
    16
    """

    name = "chat"
    method = "option_log_probs"
    # A query is one call: a fit of a few dozen shots spends some thousands.
    default_budget = 2000
    default_popsize = 4
    early_stopping_default = False
    fitted_attributes = ("instruction_", "descriptions_", "n_calls_", "n_input_tokens_", "n_output_tokens_")

    def __init__(self, backend: Any, class_names, budget: int | None = None) -> None:
        self.check(backend)
        self.backend = backend
        self.class_names = [str(name) for name in class_names]
        self.counter = ChatCounter(backend, budget=budget)

    @classmethod
    def check(cls, backend: Any) -> None:
        check_method(
            backend, "option_log_probs", "option_log_probs(images, instruction, options, meter)",
            f"backend {type(backend).__name__} does not offer the chat door: it has no "
            "'option_log_probs(images, instruction, options, meter)'; use a ChatVLMBackend, or door='auto'",
        )

    def calls_per_image(self) -> int:
        calls = getattr(self.backend, "calls_per_image", None)
        return 1 if calls is None else int(calls(len(self.class_names)))

    def query_cost(self, n_images: int) -> int:
        """Calls one prompt costs on ``n_images`` images: one per image and option group (and final)."""
        return int(n_images) * self.calls_per_image()

    def score(self, images, prompts, purpose: str) -> np.ndarray:
        """Log-probabilities ``(P, N, C)``: each prompt asked of every image."""
        images = list(images)
        return np.stack([self.counter.option_log_probs(images, instruction, list(descriptions), purpose=purpose)
                         for instruction, descriptions in prompts])

    def one(self, prompt) -> list:
        return [self.copy_prompt(prompt)]

    def copy_prompt(self, prompt) -> tuple[str, tuple[str, ...]]:
        instruction, descriptions = prompt
        return str(instruction), tuple(str(d) for d in descriptions)

    def zero_shot_prompt(self) -> tuple[str, tuple[str, ...]]:
        return DEFAULT_INSTRUCTIONS[0], tuple(self.class_names)

    def build_search(self, settings: Any, seeds: dict, start: Any) -> InstructionSearch | None:
        if not settings.prompt_tuning:
            return None
        search = InstructionSearch(self.class_names, popsize=settings.popsize,
                                   random_state=np.random.RandomState(seeds["cma"]))
        known = start.state.get("search")
        if known is not None:  # a warm start: the screening it paid for, and where it stood
            search.warm_start(known)
        return search

    def start_cost(self, search: Any, n_images: int = 0) -> int:
        """Calls of the screening on ``n_images`` shots (none when a warm start brought its result)."""
        return 0 if search is None else search.n_screening_calls(n_images, self.calls_per_image())

    def start(self, search: Any, images, y: np.ndarray) -> None:
        """Screen the candidate prompts by successive halving on the training shots (unless a warm start did)."""
        if search is not None and not search.screened_:
            search.screen(lambda imgs, prompts: self.score(imgs, prompts, "screen"), list(images), y)

    def pilot_budget(self, query_budget: int, n_images: int) -> int:
        """Calls each half's pilot of ``prompt_tuning="auto"`` may spend: a quarter of the budget in all.

        What the first stage spent (the view pool) and the pilots' held-out scoring come out
        of the same quarter, so a fit where the search does not pay spends at most 25%.
        """
        quarter = int(0.25 * query_budget) - self.counter.n_queries - self.query_cost(n_images)
        return max(0, quarter // 2)

    def fitted(self, result: Any, search: Any, seeds: dict, start: Any) -> tuple[dict, dict]:
        instruction, descriptions = self.copy_prompt(result.prompt)
        known = search.state() if search is not None else start.state.get("search")
        if known is not None:
            known = {k: v for k, v in known.items() if k != "rng"}
        state = {"prompt": (instruction, descriptions), "z": None, "search": known, "searched": known is not None}
        c = self.counter
        attributes = {"instruction_": instruction, "descriptions_": list(descriptions), "n_calls_": c.n_queries,
                      "n_input_tokens_": c.n_input_tokens, "n_output_tokens_": c.n_output_tokens}
        return attributes, state


def estimate_cost(estimator: Any, X: Any, y: Any, prices: dict | None = None) -> dict:
    """What ``estimator.fit(X, y)`` will spend on the chat door, without a call.

    The run plan of the fit (the same that ``fit`` follows) gives the calls; each call's
    tokens are the hand-written prompt's text (counted by the backend's
    ``count_tokens``) plus the image's tokens by model and detail, and one output token.
    With ``prompt_tuning="auto"`` the whole budget is the ceiling (``calls``) and
    ``calls_if_search_does_not_pay`` the floor. A cached answer costs nothing, so a
    fit that repeats questions spends less; retries spend more.

    Parameters
    ----------
    estimator : CarrotClassifier
        Unfitted or fitted; its backend must offer the chat door.
    X, y :
        As in ``fit``.
    prices : dict of str to (float, float) or None, default=None
        ``{model: (usd_per_1M_input_tokens, usd_per_1M_output_tokens)}``.

    Returns
    -------
    estimate : dict
        ``calls``, ``input_tokens``, ``output_tokens``, ``usd`` (None without a price for the model) and,
        with ``prompt_tuning="auto"``, ``calls_if_search_does_not_pay``.
    """
    from .._training import FitSettings
    from .._training.loop import QueryCosts, plan_generations
    from .._validation import check_images_and_labels, resolve_class_names
    from ..backends.embedded import resolve_backend
    from ._base import pick_door

    images, classes, y_idx = check_images_and_labels(X, y, estimator.image_range)
    names = resolve_class_names(estimator.class_names, classes)
    backend = resolve_backend(estimator.backend)
    door_type = pick_door(backend, estimator.door)
    if door_type is not ChatDoor:
        raise ValueError(f"estimate_cost prices chat calls; this estimator's backend goes through the "
                         f"{door_type.name} door")
    settings = FitSettings.resolve(estimator.get_params(deep=False), door_type)
    door = ChatDoor(backend, names, budget=settings.query_budget)
    n = len(images)
    per_image = door.query_cost(1)
    costs = QueryCosts.of(door, n, n * settings.n_views, 0)
    tuning = settings.prompt_tuning
    screening = 0
    if tuning:
        search = InstructionSearch(names, popsize=settings.popsize)
        screening = search.n_screening_calls(n, per_image)
    refine_only = (costs.pool if settings.refinement else 0)
    if tuning == "auto":
        calls = settings.query_budget
        floor = refine_only + min(2 * door.pilot_budget(settings.query_budget, n)
                                  + door.query_cost(n), int(0.25 * settings.query_budget) - refine_only)
    elif tuning or settings.refinement:
        plan = dict(refinement=settings.refinement, popsize=settings.popsize, fresh_views=settings.fresh_views,
                    validation=False, screening=screening, costs=costs)
        n_generations, parts = plan_generations(settings.query_budget, prompt_tuning=bool(tuning),
                                                max_iter=settings.max_iter, **plan)
        calls = parts["start"] + n_generations * parts["generation"]
        floor = None
    else:
        calls, floor = 0, None
    tokens_in, tokens_out = backend.estimate_tokens(*door.zero_shot_prompt())
    input_tokens = calls // per_image * tokens_in
    output_tokens = calls // per_image * tokens_out
    usd = None
    if prices and backend.model in prices:
        usd_in, usd_out = prices[backend.model]
        usd = (input_tokens * usd_in + output_tokens * usd_out) / 1e6
    out = {"calls": int(calls), "input_tokens": int(input_tokens), "output_tokens": int(output_tokens), "usd": usd}
    if floor is not None:
        out["calls_if_search_does_not_pay"] = int(floor)
    return out
