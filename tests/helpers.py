"""Test helpers: a strict black box, digits few-shot splits, miniature benchmark trees and a loopback HTTP server."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

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


def digits16_split():
    """16 shots per class of sklearn digits (seed 0), every other image held out."""
    X, y = load_digit_images()
    return few_shot_split(X, y, 16, seed=0)


def same_global_state(before, after):
    """Whether two ``np.random.get_state()`` tuples are the same state: key, position and Gaussian cache.

    Their first item is always the name ``'MT19937'``, so comparing it alone proves nothing.
    """
    return np.array_equal(before[1], after[1]) and tuple(before[2:]) == tuple(after[2:])


def save_noise_image(path, value, rng):
    """A tiny 12x12 RGB image of noise around ``value``, saved at ``path`` (folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.clip(rng.normal(value, 20, size=(12, 12, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path)


def make_split_dataset(root, name, classes, rng, per_split=(4, 2, 3)):
    """A miniature copy of a split_zhou dataset: a few tiny images per class, their noise from ``rng``."""
    from skcarrot.datasets.benchmark import SPLIT_DATASETS

    folder, image_dir, split_file = SPLIT_DATASETS[name]
    base = root / folder
    split = {}
    for part, n in zip(("train", "val", "test"), per_split):
        rows = []
        for label, cname in enumerate(classes):
            for i in range(n):
                rel = f"{cname.replace(' ', '_')}/{part}_{i}.jpg"
                save_noise_image(base / image_dir / rel, 40 + 60 * label, rng)
                rows.append([rel, label, cname])
        split[part] = rows
    (base / split_file).write_text(json.dumps(split))
    return base


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


class JSONHandler(BaseHTTPRequestHandler):
    """A quiet HTTP/1.1 request handler that reads and answers JSON; a fake server subclasses it."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def read_body(self):
        """The request body, parsed as JSON (None when empty)."""
        data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        return json.loads(data) if data else None

    def reply(self, status, body, headers=()):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


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
