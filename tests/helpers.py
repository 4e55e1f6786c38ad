"""Test helpers: a strict black box and a digits few-shot split."""

import numpy as np
from sklearn.datasets import load_digits

from skcarrot.backends import ToyBackend

MICRO = "skcarrot-micro-test"


class StrictBackend:
    """A black box with exactly two members; any other attribute raises.

    It counts the prompts it scores, so tests can compare with ``n_queries_``.
    """

    def __init__(self, inner=None):
        object.__setattr__(self, "_inner", inner if inner is not None else ToyBackend())
        object.__setattr__(self, "_scored", [0])

    def __getattribute__(self, name):
        if name in ("context_shape", "logits") or (name.startswith("__") and name.endswith("__")):
            return object.__getattribute__(self, name)
        raise AttributeError(f"StrictBackend exposes no {name!r}")

    @property
    def context_shape(self):
        return object.__getattribute__(self, "_inner").context_shape

    def logits(self, images, class_names, offsets):
        object.__getattribute__(self, "_scored")[0] += len(offsets)
        return object.__getattribute__(self, "_inner").logits(images, class_names, offsets)


def scored(backend):
    """Prompts a StrictBackend has scored so far."""
    return object.__getattribute__(backend, "_scored")[0]


def digits_split(n_shots=8, n_classes=10, seed=0, n_test=200):
    """Few-shot train and held-out test split of sklearn digits as uint8 8x8 arrays."""
    d = load_digits()
    X = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)
    y = d.target
    rng = np.random.RandomState(seed)
    train = np.concatenate(
        [rng.choice(np.flatnonzero(y == c), n_shots, replace=False) for c in range(n_classes)]
    )
    rest = np.setdiff1d(np.flatnonzero(y < n_classes), train)
    test = rng.choice(rest, min(n_test, len(rest)), replace=False)
    return X[train], y[train], X[test], y[test]


# Small, fast settings for CarrotClassifier in tests.
FAST = dict(query_budget=200, popsize=8, intrinsic_dim=16, hidden_dim=32, n_views=2, random_state=0)
