"""The protocol every prompt search offers, after pycma's ask / tell."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["PromptSearch"]


@runtime_checkable
class PromptSearch(Protocol):
    """A derivative-free search over prompts: the caller writes the loop.

    Methods
    -------
    ask()
        ``(handle, candidates)``: the search's own handle of this generation
        (given back to :meth:`tell`) and the candidate prompts, in the form the
        door scores (offsets ``(P, n_ctx, dim)``, or ``P`` prompt sets).
    tell(handle, fitness)
        Report the fitness (lower is better) of the candidates of ``handle``.
    current()
        The current best prompt, in the door's form.
    coordinates()
        The search's own coordinates of :meth:`current` (``z``, word choices).
    can_move()
        Optional (a search without it is taken to move). Whether :meth:`ask` can
        offer anything but :meth:`current` (False, e.g., when
        screening kept no word: every candidate would be the same prompt, and scoring
        them would spend queries for nothing).
    state() / restore(state)
        Everything the next :meth:`ask` depends on, as a picklable object, and
        back: a restored search continues on the same trajectory.

    Examples
    --------
    >>> from skcarrot.search import CMAESPromptSearch, PromptSearch, TextPromptSearch
    >>> isinstance(CMAESPromptSearch((1, 2), 3, 0.2, 1.0, 4, None, projection_seed=1, cma_seed=1), PromptSearch)
    True
    >>> isinstance(TextPromptSearch(["cat", "dog"], candidates=[[], []], random_state=0), PromptSearch)
    True
    """

    def ask(self) -> tuple[Any, Any]:
        ...  # pragma: no cover

    def tell(self, handle: Any, fitness: Any) -> None:
        ...  # pragma: no cover

    def current(self) -> Any:
        ...  # pragma: no cover

    def coordinates(self) -> Any:
        ...  # pragma: no cover

    def state(self) -> Any:
        ...  # pragma: no cover

    def restore(self, state: Any) -> None:
        ...  # pragma: no cover
