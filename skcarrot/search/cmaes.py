"""Prompt generation module: a random projection searched by CMA-ES.

The prompt offset is ``A z``, reshaped to ``(n_ctx, dim)``: ``A`` is a fixed
Gaussian projection from a small intrinsic space of dimension ``d``, and ``z`` is
searched without derivatives by CMA-ES, one generation of ``popsize`` candidates
at a time. The black box adds the offset to its own context embeddings ``p0``.
"""

from __future__ import annotations

import contextlib
import threading
import warnings

import numpy as np

from .._util.threads import one_blas_thread

with warnings.catch_warnings():  # cma warns at import when matplotlib is absent; we never plot
    warnings.filterwarnings("ignore", message="Could not import matplotlib", category=UserWarning)
    import cma

__all__ = ["CMAESPromptSearch", "projection_matrix"]


# CMA-ES decomposes a d x d covariance every few generations (d = 512) and the projection
# multiplies (popsize, d) by (d, n_ctx * dim): one BLAS thread does each in milliseconds, while
# threads that spin on after the call (or wait for a core on a busy machine) cost far more.
# ask, tell and offsets run under skcarrot._util.threads.one_blas_thread, which a fit may hold
# throughout (skcarrot._util.threads.fit_threads): then entering it here costs a counter.
_STREAM_LOCK = threading.Lock()


@contextlib.contextmanager
def _global_stream(generator: np.random.RandomState):
    # pycma's TPA step-size rule (used from dimension 300 on) draws from numpy's global stream in
    # a consistency check after each tell. The check changes no result; lending it our own stream
    # for the call keeps the user's global state untouched (one search at a time holds it).
    with _STREAM_LOCK:
        saved = np.random.get_state()
        np.random.set_state(generator.get_state())
        try:
            yield
        finally:
            generator.set_state(np.random.get_state())
            np.random.set_state(saved)


def projection_matrix(
    intrinsic_dim: int, context_shape: tuple[int, int], std: float, seed: int
) -> np.ndarray:
    """The fixed Gaussian projection ``A`` of shape ``(intrinsic_dim, n_ctx * dim)``.

    Examples
    --------
    >>> from skcarrot.search import projection_matrix
    >>> projection_matrix(4, (2, 3), 0.2, seed=1).shape
    (4, 6)
    """
    n_out = int(np.prod(context_shape))
    rng = np.random.RandomState(seed)
    return rng.normal(0.0, std, size=(intrinsic_dim, n_out)).astype(np.float32)


class CMAESPromptSearch:
    """CMA-ES over the intrinsic prompt space, through a fixed projection.

    Parameters
    ----------
    context_shape : tuple of (int, int)
        ``(n_ctx, dim)`` of the offsets the black box accepts.
    intrinsic_dim : int
        Dimension ``d`` of the searched vector ``z``.
    projection_std : float
        Standard deviation of the entries of ``A``.
    sigma : float
        Initial CMA-ES step size.
    popsize : int
        Candidates per generation.
    bound : float or None
        Box constraint ``[-bound, bound]`` on every coordinate of ``z``; None or
        0 for none.
    projection_seed, cma_seed : int
        Seeds of ``A`` and of CMA-ES's own generator (numpy's global state is never used).
    x0 : ndarray of shape (intrinsic_dim,) or None
        Starting point; zeros (the hand-written prompt) by default.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot.search import CMAESPromptSearch
    >>> search = CMAESPromptSearch((2, 3), 5, 0.2, 1.0, 4, 5.0, projection_seed=1, cma_seed=2)
    >>> Z, offsets = search.ask()
    >>> Z.shape, offsets.shape
    ((4, 5), (4, 2, 3))
    >>> search.tell(Z, np.arange(4.0))
    >>> search.current().shape, search.coordinates().shape
    ((2, 3), (5,))
    """

    def __init__(
        self,
        context_shape: tuple[int, int],
        intrinsic_dim: int,
        projection_std: float,
        sigma: float,
        popsize: int,
        bound: float | None,
        *,
        projection_seed: int,
        cma_seed: int,
        x0: np.ndarray | None = None,
    ) -> None:
        self.context_shape = tuple(context_shape)
        self.projection_seed = int(projection_seed)  # what a warm start needs to give its z the same meaning
        self.projection = projection_matrix(intrinsic_dim, self.context_shape, projection_std, projection_seed)
        if x0 is None:
            x0 = np.zeros(intrinsic_dim)
        # CMA-ES draws from its own generator: cma's "seed" option would reseed and
        # sample numpy's global stream, which belongs to the user (and to other threads).
        self._random = np.random.RandomState(int(cma_seed))
        self._checks = np.random.RandomState(int(cma_seed) + 1)  # pycma's draws from the global stream
        opts = {
            "seed": np.nan,
            "randn": self._random.randn,
            "popsize": int(popsize),
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
            "maxiter": np.inf,
            "tolfun": 0,
            "tolfunhist": 0,
            "tolflatfitness": np.inf,
            "tolstagnation": np.inf,
            "tolx": 0,
        }
        if bound:
            opts["bounds"] = [-float(bound), float(bound)]
            x0 = np.clip(x0, -float(bound), float(bound))
        self.es = cma.CMAEvolutionStrategy(np.asarray(x0, dtype=float), float(sigma), opts)

    def ask(self) -> tuple[np.ndarray, np.ndarray]:
        """``(Z, offsets)``: the candidates ``(popsize, intrinsic_dim)`` and their prompt offsets."""
        with one_blas_thread():
            Z = np.asarray(self.es.ask())
            return Z, self.offsets(Z)

    def tell(self, solutions: np.ndarray, fitness: np.ndarray) -> None:
        """Report the fitness (lower is better) of the candidates from :meth:`ask`."""
        with one_blas_thread(), _global_stream(self._checks):
            self.es.tell(list(solutions), [float(f) for f in fitness])

    def offsets(self, Z: np.ndarray) -> np.ndarray:
        """Map intrinsic vectors ``(P, d)`` to prompt offsets ``(P, n_ctx, dim)``."""
        Z = np.atleast_2d(np.asarray(Z, dtype=np.float32))
        with one_blas_thread():
            return (Z @ self.projection).reshape((Z.shape[0],) + self.context_shape)

    def coordinates(self) -> np.ndarray:
        """The current in-bounds solution ``z``: cma's mean mapped through its boundary transform.

        With bounds, ``es.mean`` lives in cma's unbounded internal space;
        ``es.result.xfavorite`` is the same point made feasible.
        """
        return np.asarray(self.es.result.xfavorite, dtype=float).copy()

    def current(self) -> np.ndarray:
        """Prompt offset ``A z`` of the current solution, shape ``(n_ctx, dim)``."""
        return self.offsets(self.coordinates())[0]

    def can_move(self) -> bool:
        """Always: a continuous search has somewhere to go."""
        return True

    def state(self) -> dict:
        """CMA-ES's state and its generator (pickled together, they stay linked)."""
        return {"es": self.es, "random": self._random, "checks": self._checks}

    def restore(self, state: dict) -> None:
        """Continue from :meth:`state`."""
        self.es, self._random, self._checks = state["es"], state["random"], state["checks"]
