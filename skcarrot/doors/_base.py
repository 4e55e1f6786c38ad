"""The door protocol and the registry that turns ``door="auto"`` or a name into a door."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..backends import QueryCounter

__all__ = ["Door", "door_named", "fitted_attribute_names", "pick_door", "register_door"]

_DOORS: dict[str, type["Door"]] = {}


class Door:
    """One kind of access to a black box, behind the fit's query counter.

    Subclasses set the class attributes and implement the methods below; the
    estimator and the training loop use nothing else.

    Parameters
    ----------
    backend : object
        The black box; :meth:`check` refuses one that does not offer this door.
    class_names : sequence of str
        The classes' names, in column order.
    budget : int or None, default=None
        Most queries the door's :attr:`counter` lets through (None: unlimited).

    Attributes
    ----------
    name : str
        The door's name, the value of ``CarrotClassifier(door=...)`` and of ``door_``.
    method : str
        The backend member that offers the door; ``door="auto"`` picks the first
        registered door whose member the backend has.
    default_budget, default_popsize, default_n_views : int
        What ``query_budget="auto"``, ``popsize="auto"`` and ``n_views="auto"`` mean here.
    early_stopping_default : bool
        What ``early_stopping="auto"`` means here.
    fitted_attributes : tuple of str
        The estimator attributes :meth:`fitted` writes (the other doors' are set to None).
    pilot_share_includes_start : bool
        Whether ``prompt_tuning="auto"``'s pilot of the prompt search gets a quarter of the
        budget less what its first stage spent (True where that stage is costly: the chat door
        pays a call per view), so a fit where the search does not pay spends at most a quarter.
    few_shot_search_shots : int
        Shots a class on which ``prompt_tuning="auto"`` first searches the prompt alone, for
        the refiner to train on (0: it does not; see :mod:`skcarrot._training.selection`).
        Worth it where a query costs a call per image, so a search on a few shots is cheap;
        it counts in the pilot's quarter, so it asks for ``pilot_share_includes_start``.
    counter : QueryCounter
        The backend behind the fit's budget: every query of the fit goes through it.
    """

    name: ClassVar[str]
    method: ClassVar[str]
    default_budget: ClassVar[int]
    default_popsize: ClassVar[int]
    early_stopping_default: ClassVar[bool]
    fitted_attributes: ClassVar[tuple[str, ...]] = ()
    pilot_share_includes_start: ClassVar[bool] = False
    default_n_views: ClassVar[int] = 8
    few_shot_search_shots: ClassVar[int] = 0

    def __init__(self, backend: Any, class_names, budget: int | None = None) -> None:
        self.check(backend)
        self.backend = backend
        self.class_names = [str(name) for name in class_names]
        self.counter = QueryCounter(backend, budget=budget)

    # -- what the backend must offer -------------------------------------------------------
    @classmethod
    def offers(cls, backend: Any) -> bool:
        """Whether ``backend`` has this door's member (a cheap test: nothing is called)."""
        return hasattr(backend, cls.method)

    @classmethod
    def check(cls, backend: Any) -> None:
        """Raise ``TypeError`` naming what ``backend`` lacks to offer this door."""
        raise NotImplementedError

    # -- prompts and scores ----------------------------------------------------------------
    def score(self, images, prompts, purpose: str) -> np.ndarray:
        """Scores ``(P, N, C)`` of ``images`` under each of ``P`` prompts: logits or log-probabilities."""
        raise NotImplementedError

    def one(self, prompt) -> Any:
        """The ``prompts`` holding the single ``prompt``."""
        raise NotImplementedError

    def copy_prompt(self, prompt) -> Any:
        """A copy of ``prompt`` that later steps can not change."""
        raise NotImplementedError

    def zero_shot_prompt(self) -> Any:
        """The hand-written prompt (a zero offset, or the template around each name)."""
        raise NotImplementedError

    # -- the prompt search -----------------------------------------------------------------
    def query_cost(self, n_images: int) -> int:
        """Queries one prompt costs, scored on ``n_images`` images: what the run plan counts in.

        One here: a call scores a prompt on every image it carries. A door whose black box
        bills each image (or each part of a call) apart returns more.
        """
        return 1

    def build_search(self, settings: Any, seeds: dict, start: Any) -> Any:
        """The prompt search of this fit (None without prompt tuning); spends no query.

        ``settings`` is the fit's :class:`~skcarrot._training.FitSettings`,
        ``seeds`` its seeds (read, never changed), ``start`` the
        :class:`~skcarrot._training.StartingPoint` (``start.state`` is what this
        door's :meth:`fitted` recorded of the fit a warm start continues; ``{}`` on a fresh fit).
        """
        raise NotImplementedError

    def start_cost(self, search: Any, y: np.ndarray | None = None) -> int:
        """Queries :meth:`start` spends before the first generation, on the shots of labels ``y``."""
        return 0

    def start(self, search: Any, images, y: np.ndarray) -> None:
        """Work the search needs on the training shots before its first generation."""

    # -- what the fit leaves behind ----------------------------------------------------------
    def fitted(self, result: Any, search: Any, seeds: dict, start: Any) -> tuple[dict, dict]:
        """``(attributes, state)`` of a finished fit.

        ``attributes`` maps names of :attr:`fitted_attributes` to values;
        ``state`` holds ``"prompt"`` and ``"z"`` (what predict and a warm start
        read) and whatever else this door's warm start needs.
        """
        raise NotImplementedError


def register_door(door: type[Door]) -> type[Door]:
    """Make ``door`` available as ``CarrotClassifier(door=door.name)`` (and to ``"auto"``, after the others).

    Examples
    --------
    >>> from skcarrot.doors import door_named
    >>> door_named("text").name
    'text'
    """
    _DOORS[door.name] = door
    return door


def door_named(name: str) -> type[Door]:
    """The registered door called ``name``."""
    try:
        return _DOORS[name]
    except KeyError:
        raise ValueError(f"unknown door {name!r}; the doors are {['auto', *_DOORS]}") from None


def pick_door(backend: Any, door: str = "auto") -> type[Door]:
    """The door of a fit: the one named, or with ``"auto"`` the first registered that ``backend`` offers.

    Raises
    ------
    TypeError
        ``backend`` does not offer the door asked for (the message names what it
        lacks), or with ``"auto"`` offers none.

    Examples
    --------
    >>> from skcarrot.backends import OpenCLIPTextBackend, ToyBackend
    >>> from skcarrot.doors import pick_door
    >>> pick_door(ToyBackend()).name, pick_door(OpenCLIPTextBackend()).name
    ('embedding', 'text')
    >>> pick_door(OpenCLIPTextBackend(), "embedding")
    Traceback (most recent call last):
    ...
    TypeError: backend OpenCLIPTextBackend does not offer the embedding door: ...
    """
    if door == "auto":
        offered = [d for d in _DOORS.values() if d.offers(backend)]
        chosen = offered[0] if offered else next(iter(_DOORS.values()))
    else:
        chosen = door_named(door)
    chosen.check(backend)
    return chosen


def fitted_attribute_names() -> list[str]:
    """Every door's fitted attributes, in registration order."""
    return [name for door in _DOORS.values() for name in door.fitted_attributes]
