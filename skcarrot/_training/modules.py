"""The paper's two modules as peers: each owns its state and offers ``step``, ``state`` and ``restore``.

- :class:`PromptModule`, the prompt generation module: a derivative-free search
  (:class:`~skcarrot.search.PromptSearch`) asked for candidates, which the door
  scores, told their fitness with the refiner frozen. :class:`NullPrompt` is
  the module switched off: the prompt it was given, which never moves.
- :class:`RefinerModule`, the prediction refinement module: a residual MLP
  trained one epoch per generation on the scores of its views under the current
  prompt. :class:`NullRefiner` is the module switched off: the identity, or the
  weights a warm start keeps when the refiner is not trained again.

The collaborative loop (:class:`~skcarrot._training.CollaborativeLoop`) calls
``prompt.step(loop)`` then ``refiner.step(loop)``, whatever is switched on.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..losses import prompt_fitness
from ..refiner import ResidualRefiner
from .views import FreshViews, ViewPool

__all__ = ["NullPrompt", "NullRefiner", "PromptModule", "RefinerModule", "pool_scored_once"]


def pool_scored_once(prompt_moves: bool, fixed_views: bool) -> bool:
    """The view pool's one rule: whether one query scores every view once, for every epoch to read from.

    When the prompt never moves and the views come from a fixed pool, the scores of an
    epoch's views are the same whichever epoch asks, so they are bought once. The run
    plan counts that query at the start, and the refiner reads its epochs from it.

    Examples
    --------
    >>> from skcarrot._training.modules import pool_scored_once
    >>> pool_scored_once(prompt_moves=False, fixed_views=True), pool_scored_once(prompt_moves=True, fixed_views=True)
    (True, False)
    """
    return bool(fixed_views and not prompt_moves)


class PromptModule:
    """The prompt generation module: ask, score, fitness with the refiner frozen, tell.

    Parameters
    ----------
    search : skcarrot.search.PromptSearch
        The derivative-free search.
    prompt : ndarray or list of str
        The current prompt, in the door's form.
    z : ndarray or None
        The search's coordinates of ``prompt``.
    """

    def __init__(self, search: Any, prompt: Any, z: Any) -> None:
        self.search = search
        self.prompt = prompt
        self.z = z

    def moves(self) -> bool:
        """Whether the search has more than the current prompt to offer.

        It has not when, e.g., the text door's screening kept no word: every
        candidate would be the same prompt, and scoring them would buy nothing.
        """
        can_move = getattr(self.search, "can_move", None)  # optional: a search without it always moves
        return True if can_move is None else bool(can_move())

    def begin(self, start: Any) -> None:
        """After the search's own start (screening): it stands where the run begins, unless the start brought its own.

        A warm start keeps the prompt it learned; coordinates it lacks are the search's.
        """
        if start.z is None:
            self.z = self.search.coordinates()
        if start.prompt is None:
            self.prompt = self.search.current()

    def step(self, loop: Any) -> dict:
        """One generation of the search (``popsize`` prompts scored); the history fields it fills."""
        if not self.moves():
            return {}
        handle, candidates = self.search.ask()
        candidate_logits = torch.as_tensor(loop.door.score(loop.images, candidates, "prompt"), dtype=torch.float32)
        with torch.no_grad():
            refined = loop.refiner.frozen(candidate_logits)
            fitness = prompt_fitness(candidate_logits, refined, loop.y_tensor, loop.consistency_weight).numpy()
        self.search.tell(handle, fitness)
        self.prompt, self.z = self.search.current(), self.search.coordinates()
        best = int(np.argmin(fitness))
        scored = refined if refined is not None else candidate_logits
        return {
            "best_fitness": float(fitness[best]),
            "mean_fitness": float(np.mean(fitness)),
            "train_accuracy": float((scored[best].argmax(-1) == loop.y_tensor).float().mean()),
        }

    def state(self) -> dict:
        return {"search": self.search.state(), "prompt": self.prompt, "z": self.z}

    def restore(self, state: dict) -> None:
        self.search.restore(state["search"])
        self.prompt, self.z = state["prompt"], state["z"]


class NullPrompt:
    """The prompt generation module switched off: ``prompt`` stays as it is, and costs nothing.

    Examples
    --------
    >>> from skcarrot._training.modules import NullPrompt
    >>> module = NullPrompt("a prompt", None)
    >>> module.moves(), module.step(loop=None), module.prompt
    (False, {}, 'a prompt')
    """

    search = None

    def __init__(self, prompt: Any, z: Any) -> None:
        self.prompt = prompt
        self.z = z

    def moves(self) -> bool:
        return False

    def begin(self, start: Any) -> None:
        """Nothing to settle: the prompt is the one given."""

    def step(self, loop: Any) -> dict:
        return {}

    def state(self) -> dict:
        return {"prompt": self.prompt, "z": self.z}

    def restore(self, state: dict) -> None:
        self.prompt, self.z = state["prompt"], state["z"]


class RefinerModule:
    """The prediction refinement module: one epoch on this generation's views, by Adam.

    Parameters
    ----------
    network : ResidualRefiner
    optimizer : torch.optim.Optimizer
    views : ViewPool or FreshViews
        Where each epoch's views of the training images come from.
    batch_size : int
    pool_scores : ndarray of shape (n_views, n_images, n_classes) or None, default=None
        Scores of the whole fixed pool already bought (a fold of the shots reads its part).
    """

    def __init__(self, network: ResidualRefiner, optimizer: torch.optim.Optimizer, views: ViewPool | FreshViews,
                 batch_size: int, pool_scores: np.ndarray | None = None) -> None:
        self.network = network
        self.optimizer = optimizer
        self.views = views
        self.batch_size = batch_size
        self._pool_scores = pool_scores

    @classmethod
    def build(cls, settings: Any, n_classes: int, seed: int, images: list, rng: np.random.RandomState,
              weights: dict | None) -> "RefinerModule | NullRefiner":
        """The module a fit's settings ask for, starting from ``weights`` (None: a new network)."""
        if not settings.refinement:
            return NullRefiner(weights)  # a warm start without refinement keeps the refiner it has
        network = ResidualRefiner(n_classes, settings.hidden_dim, torch.Generator().manual_seed(seed))
        optimizer = torch.optim.Adam(network.parameters(), lr=settings.learning_rate)
        if weights is not None:
            network.set_weights(weights)
        network.eval()
        if settings.fresh_views:
            views = FreshViews(images, settings.augmentation)
        else:
            views = ViewPool(images, settings.n_views, settings.augmentation, rng)
        return cls(network, optimizer, views, settings.batch_size)

    def fold(self, idx: np.ndarray, seed: int) -> "RefinerModule":
        """A new refiner like this one, for the shots ``idx``, reading their part of the pool already scored."""
        network = type(self.network)(self.network.fc1.in_features, self.network.fc1.out_features,
                                     torch.Generator().manual_seed(seed))
        optimizer = torch.optim.Adam(network.parameters(), lr=self.optimizer.defaults["lr"])
        return type(self)(network, optimizer, self.views, self.batch_size, self._pool_scores[:, idx])

    def frozen(self, logits: torch.Tensor) -> torch.Tensor:
        """The refined logits, the network left as it is (for the prompt's fitness)."""
        return self.network(logits)

    def weights(self) -> dict:
        return self.network.get_weights()

    def pool_scores(self, loop: Any) -> np.ndarray:
        """Scores ``(n_views, N, C)`` of the whole fixed view pool under the current prompt (one query, once)."""
        if self._pool_scores is None:
            pool = loop.door.score(self.views.all_views(), loop.door.one(loop.prompt.prompt), "refiner")[0]
            self._pool_scores = pool.reshape(self.views.n_views, len(loop.images), -1)
        return self._pool_scores

    def epoch_logits(self, loop: Any) -> np.ndarray:
        """Scores of this epoch's view of each training image under the current prompt (one query, or none)."""
        n_images = len(loop.images)
        if pool_scored_once(loop.prompt.moves(), self.views.fixed):
            pick = self.views.pick(loop.rng, n_images)
            return self.pool_scores(loop)[pick, np.arange(n_images)]
        sent = self.views.epoch_views(loop.rng)
        return loop.door.score(sent, loop.door.one(loop.prompt.prompt), "refiner")[0]

    def step(self, loop: Any) -> dict:
        """One epoch on this epoch's views; training accuracy read off the same logits."""
        logits = self.epoch_logits(loop)
        loss = self.network.train_epoch(
            self.optimizer,
            logits,
            loop.y,
            batch_size=self.batch_size,
            weight=loop.consistency_weight if loop.use_kl() else 0.0,
            rng=loop.rng,
        )
        with torch.no_grad():
            current = self.network(torch.as_tensor(logits, dtype=torch.float32))
        return {"refiner_loss": float(loss),
                "train_accuracy": float((current.argmax(-1) == loop.y_tensor).float().mean())}

    def state(self) -> dict:
        return {"network": self.network.state_dict(), "optimizer": self.optimizer.state_dict(),
                "views": self.views, "pool_scores": self._pool_scores}

    def restore(self, state: dict) -> None:
        self.network.load_state_dict(state["network"])
        self.network.eval()
        self.optimizer.load_state_dict(state["optimizer"])
        self.views, self._pool_scores = state["views"], state["pool_scores"]


class NullRefiner:
    """The prediction refinement module switched off: the identity, or weights kept from an earlier fit.

    Examples
    --------
    >>> from skcarrot._training.modules import NullRefiner
    >>> module = NullRefiner()
    >>> module.step(loop=None), module.weights(), module.frozen(None)
    ({}, None, None)
    """

    def __init__(self, weights: dict | None = None) -> None:
        self.kept = weights

    def frozen(self, logits: torch.Tensor) -> None:
        return None  # the prompt's fitness is then the cross-entropy of the bare logits

    def weights(self) -> dict | None:
        return self.kept

    def step(self, loop: Any) -> dict:
        return {}

    def state(self) -> dict:
        return {"kept": self.kept}

    def restore(self, state: dict) -> None:
        self.kept = state["kept"]
