"""Early stopping: CARROT with and without it, on digits and Fashion-MNIST, 16 shots, three seeds.

    python benchmarks/early_stopping.py [--seeds 0 1 2] [--budget 8000] [--n-test 2000]

Fashion-MNIST is in-domain for the embedded model (pretrained on its training images), so
its zero-shot accuracy is already high and a 16-shot fit can only lose there; digits is
cross-dataset transfer within handwritten digits, where fitting gains about 17 points.
Every row spends at most ``--budget`` queries; validation queries are counted in it.
"""

import argparse
import time

import numpy as np

from skcarrot import CarrotClassifier
from skcarrot.datasets import FASHION_CLASSES, few_shot_split, load_digit_images, load_fashion_mnist

SETTINGS = {
    "zero-shot": dict(prompt_tuning=False, refinement=False),
    "CARROT": dict(early_stopping=False),
    "CARROT + early stopping (n_iter_no_change=20)": dict(early_stopping=True, n_iter_no_change=20),
    "CARROT + early stopping (n_iter_no_change=50)": dict(early_stopping=True, n_iter_no_change=50),
    "CARROT + best-on-validation, no stop": dict(early_stopping=True, n_iter_no_change=10**6),
}


def datasets(n_test, seed):
    X, y = load_digit_images()
    yield "digits", None, few_shot_split(X, y, 16, seed=seed)
    Xtr_all, ytr_all = load_fashion_mnist("train")
    Xte, yte = load_fashion_mnist("test")
    keep = np.random.RandomState(1000 + seed).choice(len(yte), n_test, replace=False)
    Xtr, ytr, _, _ = few_shot_split(Xtr_all, ytr_all, 16, seed=seed)
    yield "fashion_mnist", list(FASHION_CLASSES), (Xtr, ytr, Xte[keep], yte[keep])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=8000)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), help="a subset of the settings")
    args = parser.parse_args()
    settings = {name: SETTINGS[name] for name in args.settings}
    rows = []
    for seed in args.seeds:
        for dataset, names, (Xtr, ytr, Xte, yte) in datasets(args.n_test, seed):
            for label, params in settings.items():
                start = time.perf_counter()
                clf = CarrotClassifier(class_names=names, query_budget=args.budget, random_state=seed, **params)
                clf.fit(Xtr, ytr)
                acc = clf.score(Xte, yte)
                rows.append(dict(dataset=dataset, seed=seed, setting=label, acc=acc, queries=clf.n_queries_,
                                 best=getattr(clf, "best_generation_", 0), gens=clf.n_iter_,
                                 seconds=time.perf_counter() - start))
                r = rows[-1]
                print(f"{dataset:13s} seed {seed} {label:<46} {acc:.3f} {r['queries']:5d} queries "
                      f"kept generation {r['best']}/{r['gens']} {r['seconds']:.1f}s", flush=True)
    print(f"\n| dataset | setting | held-out accuracy (mean ± std, {len(args.seeds)} seeds) | vs zero-shot | queries |")
    print("|---|---|---|---|---|")
    for dataset in ("digits", "fashion_mnist"):
        zero = np.mean([r["acc"] for r in rows if r["dataset"] == dataset and r["setting"] == "zero-shot"])
        for label in settings:
            accs = np.array([r["acc"] for r in rows if r["dataset"] == dataset and r["setting"] == label])
            queries = np.mean([r["queries"] for r in rows if r["dataset"] == dataset and r["setting"] == label])
            print(f"| {dataset} | {label} | {100 * accs.mean():.1f} ± {100 * accs.std():.1f} | "
                  f"{100 * (accs.mean() - zero):+.1f} | {queries:.0f} |")


if __name__ == "__main__":
    main()
