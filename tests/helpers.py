"""Test helpers: a strict black box, a digits few-shot split and a loopback HTTP server."""

import threading
from http.server import ThreadingHTTPServer

import numpy as np

from skcarrot.backends import ToyBackend
from skcarrot.datasets import few_shot_split, load_digit_images

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
    X, y = load_digit_images()
    keep = y < n_classes
    Xtr, ytr, Xte, yte = few_shot_split(X[keep], y[keep], n_shots, seed=seed)
    test = np.random.RandomState(seed).choice(len(yte), min(n_test, len(yte)), replace=False)
    return Xtr, ytr, Xte[test], yte[test]


# Small, fast settings for CarrotClassifier in tests: the plain loop (the paper's protocol), no shots held back.
FAST = dict(query_budget=200, popsize=8, intrinsic_dim=16, hidden_dim=32, n_views=2, random_state=0,
            early_stopping=False, prompt_tuning=True)


def search_alone(backend, images, y, search, budget=None, n_steps=None):
    """A prompt search on its own, driven by the training loop without a refiner: screen, then whole steps.

    Returns the door's query counter. Without ``n_steps``, as many steps as the budget allows.
    """
    from skcarrot._training import CollaborativeLoop, NullRefiner, PromptModule
    from skcarrot.doors import TextDoor

    door = TextDoor(backend, search.class_names, budget=budget)
    door.start(search, images, np.asarray(y))
    loop = CollaborativeLoop(
        door=door, images=list(images), y=np.asarray(y),
        prompt=PromptModule(search, search.current(), search.coordinates()), refiner=NullRefiner(),
        rng=np.random.RandomState(0), consistency_weight=0.0, kl_until=0,
    )
    affordable = None if budget is None else door.counter.remaining // search.popsize
    steps = [s for s in (n_steps, affordable) if s is not None]
    for _ in range(min(steps)):
        loop.generation_step()
    return door.counter


class LoopbackServer:
    """A threaded HTTP server on a free 127.0.0.1 port, serving ``handler`` inside a ``with`` block.

    ``url`` is its address followed by ``path``.
    """

    def __init__(self, handler, path=""):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
