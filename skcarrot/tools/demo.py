"""The demo: zero-shot, prompt-only, refine-only, full CARROT and the default on sklearn digits."""

from __future__ import annotations

import io
import os
import time
from typing import Any

import joblib
import numpy as np

from ..classifier import CarrotClassifier
from ..datasets import few_shot_split, load_digit_images
from .presets import METHODS

__all__ = ["digits_few_shot", "run_demo"]


def digits_few_shot(n_shots: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """sklearn digits as uint8 8x8 images: ``n_shots`` per class to train, the rest held out.

    Examples
    --------
    >>> from skcarrot.tools.demo import digits_few_shot
    >>> Xtr, ytr, Xte, yte = digits_few_shot(4, seed=0)
    >>> Xtr.shape, Xtr.dtype, len(Xte)
    ((40, 8, 8), dtype('uint8'), 1757)
    """
    X, y = load_digit_images()
    return few_shot_split(X, y, n_shots, seed=seed)


def _saved_bytes(est: Any) -> int:
    buf = io.BytesIO()
    joblib.dump(est, buf)
    return buf.tell()


def run_demo(
    backend: Any = None,
    *,
    query_budget: int = 8000,
    n_shots: int = 16,
    random_state: int = 0,
    out_dir: str = "demo_output",
    class_names: Any = None,
) -> int:
    """Fit the four methods and the default with the same budget and seed; print a table and save a plot.

    Parameters
    ----------
    backend : object or None, default=None
        The black box; None is the embedded model.
    query_budget : int, default=8000
    n_shots : int, default=16
        Training images per class; the rest of sklearn digits is held out.
    random_state : int, default=0
        Seed of the split and of every fit.
    out_dir : str, default="demo_output"
        Where the learning-curve PNG goes.
    class_names : optional
        Passed to :class:`CarrotClassifier`.

    Returns
    -------
    status : int
        0, the process exit status.

    Examples
    --------
    >>> import tempfile
    >>> from skcarrot.tools.demo import run_demo
    >>> run_demo(query_budget=43, n_shots=2, out_dir=tempfile.mkdtemp())  # doctest: +ELLIPSIS
    model: the embedded skcarrot-micro-clip
    ...
    0
    """
    Xtr, ytr, Xte, yte = digits_few_shot(n_shots, seed=random_state)
    model = "the embedded skcarrot-micro-clip" if backend is None else repr(backend)
    print(f"model: {model}")
    print(f"sklearn digits: {len(Xtr)} training images ({n_shots} per class), {len(Xte)} held out")
    print(f"query budget {query_budget}, random_state={random_state}\n")
    header = f"{'method':<20} {'held-out acc':>12} {'queries':>8} {'images':>8} {'fit s':>7} {'saved KB':>9}"
    print(header)
    print("-" * len(header))
    fitted = {}
    # The four methods by the paper's protocol, then the default, which chooses among them.
    rows = {name: dict(prompt_tuning=prompt, refinement=refine) for name, (prompt, refine) in METHODS.items()}
    rows["default (auto)"] = {}
    for name, settings in rows.items():
        clf = CarrotClassifier(
            backend=backend, class_names=class_names, query_budget=query_budget, random_state=random_state, **settings
        )
        start = time.perf_counter()
        clf.fit(Xtr, ytr)
        seconds = time.perf_counter() - start
        acc = clf.score(Xte, yte)
        fitted[name] = clf
        print(f"{name:<20} {acc:>12.3f} {clf.n_queries_:>8d} {clf.n_images_scored_:>8d} {seconds:>7.1f} "
              f"{_saved_bytes(clf) / 1024:>9.1f}")
    selection = fitted["default (auto)"].selection_
    if selection is not None:
        print(f"\nthe default chose {selection['choice']}: {selection['reason']}")
    path = _plot(fitted["CARROT"], out_dir)
    if path:
        print(f"\nlearning curve of CARROT written to {path}")
    return 0


def _plot(clf: CarrotClassifier, out_dir: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        print("\n(matplotlib is not installed: no plot)")
        return None
    os.makedirs(out_dir, exist_ok=True)
    h = clf.history_
    queries = [r["queries"] for r in h]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(queries, [r["train_accuracy"] for r in h])
    ax1.set_xlabel("queries")
    ax1.set_ylabel("training accuracy")
    ax1.set_title("CARROT: accuracy against queries")
    ax2.plot(queries, [r["best_fitness"] for r in h], label="best")
    ax2.plot(queries, [r["mean_fitness"] for r in h], label="mean")
    ax2.set_xlabel("queries")
    ax2.set_ylabel("prompt fitness (lower is better)")
    ax2.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, "learning_curve.png")
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
