"""Held-out accuracy on sklearn digits, 16 shots, 8000 queries, three seeds, the four methods.

    python benchmarks/learning_digits.py [--budget 8000] [--seeds 0 1 2] [--inputs arrays pil paths]

Each seed draws its own 16-shot split; the rest of the 1797 digits is held out. ``--inputs``
feeds the same images as uint8 arrays, PIL images or PNG file paths.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from skcarrot import CarrotClassifier
from skcarrot.datasets import few_shot_split, load_digit_images
from skcarrot.tools.presets import METHODS


def as_input(X, kind, folder):
    if kind == "arrays":
        return X
    if kind == "pil":
        return [Image.fromarray(x) for x in X]
    paths = []
    for x in X:
        p = Path(folder) / f"{len(list(Path(folder).iterdir()))}.png"
        Image.fromarray(x).save(p)
        paths.append(str(p))
    return paths


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=int, default=8000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--inputs", nargs="+", default=["arrays"], choices=["arrays", "pil", "paths"])
    args = parser.parse_args()
    X, y = load_digit_images()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for kind in args.inputs:
            for seed in args.seeds:
                Xtr, ytr, Xte, yte = few_shot_split(X, y, 16, seed=seed)
                Xtr_in, Xte_in = as_input(Xtr, kind, folder), as_input(Xte, kind, folder)
                for name, (prompt, refine) in METHODS.items():
                    start = time.perf_counter()
                    clf = CarrotClassifier(
                        query_budget=args.budget, prompt_tuning=prompt, refinement=refine, random_state=seed
                    ).fit(Xtr_in, ytr)
                    acc = clf.score(Xte_in, yte)
                    rows.append((kind, seed, name, acc, clf.n_queries_, time.perf_counter() - start))
                    print(f"{kind:6s} seed {seed} {name:<18} {acc:.3f} {clf.n_queries_:5d} queries "
                          f"{rows[-1][-1]:.1f}s", flush=True)
    print(f"\n| method | held-out accuracy (mean over {len(args.seeds)} seeds) | gain over zero-shot |")
    print("|---|---|---|")
    zero = np.mean([r[3] for r in rows if r[2] == "zero-shot"])
    for name in METHODS:
        acc = np.mean([r[3] for r in rows if r[2] == name])
        print(f"| {name} | {100 * acc:.1f}% | {100 * (acc - zero):+.1f} |")


if __name__ == "__main__":
    main()
