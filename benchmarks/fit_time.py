"""Time of a full 8000-query CARROT fit on the embedded default, and where it goes.

    python benchmarks/fit_time.py [--budget 8000] [--seed 0]

Splits the wall time into the black box (every ``logits`` call), CMA-ES (ask/tell and the
projection) and the refiner (its training epochs); the rest is the estimator's own glue.
"""

import argparse
import time
from collections import defaultdict

import numpy as np

from skcarrot import CarrotClassifier
from skcarrot.backends import embedded_backend
from skcarrot.datasets import few_shot_split, load_digit_images
from skcarrot.images import to_pil_images
from skcarrot.search import CMAESPromptSearch
from skcarrot.refiner import ResidualRefiner

SPENT = defaultdict(float)


DEPTH = defaultdict(int)


def timed(kind, fn):
    # Nested calls of one kind (current() calls coordinates() and offsets()) are timed once.
    def wrapper(*args, **kwargs):
        DEPTH[kind] += 1
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            DEPTH[kind] -= 1
            if DEPTH[kind] == 0:
                SPENT[kind] += time.perf_counter() - start

    return wrapper


class TimedBox:
    def __init__(self, inner):
        self.inner = inner
        self.context_shape = inner.context_shape

    def logits(self, images, class_names, offsets):
        return timed("black box", self.inner.logits)(images, class_names, offsets)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name in ("ask", "tell", "offsets", "coordinates", "current"):
        setattr(CMAESPromptSearch, name, timed("CMA-ES", getattr(CMAESPromptSearch, name)))
    ResidualRefiner.train_epoch = timed("refiner", ResidualRefiner.train_epoch)

    X, y = load_digit_images()
    Xtr, ytr, Xte, yte = few_shot_split(X, y, 16, seed=args.seed)
    box = TimedBox(embedded_backend())
    box.inner.logits(to_pil_images(Xtr[:1]), ["0", "1"], np.zeros((1,) + box.context_shape))  # warm up
    SPENT.clear()
    start = time.perf_counter()
    clf = CarrotClassifier(backend=box, query_budget=args.budget, random_state=args.seed).fit(Xtr, ytr)
    total = time.perf_counter() - start
    print(f"CARROT fit, {clf.n_queries_} queries ({clf.n_iter_} generations), held-out accuracy "
          f"{clf.score(Xte, yte):.3f}")
    print("| part | seconds | share |\n|---|---|---|")
    rest = total - sum(SPENT.values())
    for name, sec in list(SPENT.items()) + [("estimator glue", rest)]:
        print(f"| {name} | {sec:.2f} | {100 * sec / total:.0f}% |")
    print(f"| **total** | **{total:.2f}** | 100% |")


if __name__ == "__main__":
    main()
