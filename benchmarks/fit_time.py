"""Time of a full 8000-query CARROT fit on the embedded default, and where it goes.

    python benchmarks/fit_time.py [--budget 8000] [--seed 0]

The fit: ``CarrotClassifier(query_budget=8000, prompt_tuning=True, early_stopping=False)`` on
digits, 16 shots per class. Splits the wall time with exclusive timers (a part nested in
another is taken out of it): the black box (its text tower, its image features, the rest of
each ``logits`` call), CMA-ES (the covariance eigendecomposition, the projection ``Z @ A``,
setting BLAS thread limits, the rest of ask/tell), the prompts' fitness (the refiner's forward
pass and the losses), the refiner's training epochs; the rest is the estimator's own glue.
Runs against whichever ``skcarrot`` is first on the path (``PYTHONPATH=...`` for another
version); ``benchmarks/fit_speed.py`` compares two versions in one run.
"""

import argparse
import time
from collections import defaultdict

import numpy as np
import threadpoolctl
from cma import sampler

import skcarrot._training.loop as loop_module
from skcarrot import CarrotClassifier
from skcarrot.backends import OpenCLIPBackend, embedded_backend
from skcarrot.backends.openclip import _LoadedBox
from skcarrot.datasets import few_shot_split, load_digit_images
from skcarrot.images import to_pil_images
from skcarrot.refiner import ResidualRefiner
from skcarrot.search import CMAESPromptSearch

SPENT = defaultdict(float)
CALLS = defaultdict(int)
STACK = []  # [kind, start] of the parts running now, innermost last

# A part timed on its own when it runs inside another; any other nesting counts for the outer part.
NESTS = {
    "black box, rest": {"text tower", "image features"},
    "CMA-ES ask/tell, rest": {"CMA-ES eigendecomposition", "projection Z @ A", "BLAS thread limits"},
}


def timed(kind, fn):
    def wrapper(*args, **kwargs):
        if STACK and (STACK[-1][0] == kind or kind not in NESTS.get(STACK[-1][0], ())):
            return fn(*args, **kwargs)
        now = time.perf_counter()
        if STACK:  # pause the outer part
            SPENT[STACK[-1][0]] += now - STACK[-1][1]
        STACK.append([kind, now])
        CALLS[kind] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            now = time.perf_counter()
            SPENT[kind] += now - STACK.pop()[1]
            if STACK:
                STACK[-1][1] = now

    return wrapper


def patch(owner, name, kind):
    setattr(owner, name, timed(kind, getattr(owner, name)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    X, y = load_digit_images()
    Xtr, ytr, Xte, yte = few_shot_split(X, y, 16, seed=args.seed)
    box = embedded_backend()
    box.logits(to_pil_images(Xtr[:1]), ["0", "1"], np.zeros((1,) + box.context_shape))  # load and warm up

    patch(OpenCLIPBackend, "logits", "black box, rest")
    patch(_LoadedBox, "encode_prompts", "text tower")
    patch(_LoadedBox, "encode_images", "image features")
    for name in ("ask", "tell", "current", "coordinates"):
        patch(CMAESPromptSearch, name, "CMA-ES ask/tell, rest")
    patch(CMAESPromptSearch, "offsets", "projection Z @ A")
    patch(sampler.GaussFullSampler, "_decompose_C", "CMA-ES eigendecomposition")
    patch(threadpoolctl.threadpool_limits, "__init__", "BLAS thread limits")
    patch(threadpoolctl._ThreadpoolLimiter, "__init__", "BLAS thread limits")
    patch(threadpoolctl._ThreadpoolLimiter, "restore_original_limits", "BLAS thread limits")
    patch(threadpoolctl.ThreadpoolController, "__init__", "BLAS thread limits")
    patch(loop_module, "prompt_fitness", "fitness: refiner forward, CE + KL")
    patch(ResidualRefiner, "forward", "fitness: refiner forward, CE + KL")
    patch(ResidualRefiner, "train_epoch", "refiner epochs")

    clf = CarrotClassifier(query_budget=args.budget, prompt_tuning=True, early_stopping=False,
                           random_state=args.seed)
    start = time.perf_counter()
    clf.fit(Xtr, ytr)
    total = time.perf_counter() - start
    spent, n_eig = dict(SPENT), CALLS["CMA-ES eigendecomposition"]
    print(f"CARROT fit, {clf.n_queries_} queries ({clf.n_iter_} generations, {n_eig} eigendecompositions), "
          f"held-out accuracy {clf.score(Xte, yte):.3f}")
    print("| part | seconds | share |\n|---|---|---|")
    rest = total - sum(spent.values())
    for name, sec in sorted(spent.items(), key=lambda kv: -kv[1]) + [("estimator glue, views, the rest", rest)]:
        print(f"| {name} | {sec:.2f} | {100 * sec / total:.0f}% |")
    print(f"| **total** | **{total:.2f}** | 100% |")


if __name__ == "__main__":
    main()
