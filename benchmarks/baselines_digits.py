"""White-box baselines before and after training them as their papers do: digits and Fashion-MNIST.

    python benchmarks/baselines_digits.py [--datasets digits fashion_mnist] [--seeds 0 1 2]
                                          [--methods coop linear_probe tip_adapter] [--test-size 2000]

16 shots per class, each seed its own split (``few_shot_split``). digits: every other
image is held out. Fashion-MNIST: shots from the training split, held out a fixed
``--test-size`` subset of the test split. Prints, per setting, held-out and training
accuracy (mean ± std over seeds), fit seconds, and what the searches chose.

"Before" settings reproduce the estimators as they were: CoOp 50 epochs, no warm-up, no
weight decay, features computed once; linear probe C=1; Tip-Adapter training-free with
alpha=1, beta=5.5 (its logits are the old ones times the constant s/100, same predictions).
"""

import argparse
import time

import numpy as np

from skcarrot.tools.baselines import CoOpClassifier, LinearProbeClassifier, TipAdapterClassifier
from skcarrot.datasets import FASHION_CLASSES, few_shot_split, load_digit_images, load_fashion_mnist

SETTINGS = {
    "zeroshot": [
        ("zero-shot (hand-written prompt)", lambda s: TipAdapterClassifier(alpha=0.0, beta=1.0, fine_tune=False)),
    ],
    "coop": [
        ("CoOp before: 50 ep, no warm-up/decay/aug", lambda s: CoOpClassifier(
            max_epochs=50, warmup_epochs=0, weight_decay=0.0, augmentation="none", random_state=s)),
        ("CoOp paper schedule, no aug", lambda s: CoOpClassifier(augmentation="none", random_state=s)),
        ("CoOp paper schedule, crop (default)", lambda s: CoOpClassifier(random_state=s)),
        ("CoOp paper schedule, crop+flip (official)", lambda s: CoOpClassifier(
            augmentation="crop+flip", random_state=s)),
    ],
    "linear_probe": [
        ("linear probe before: C=1", lambda s: LinearProbeClassifier(C=1.0)),
        ("linear probe, C searched (default)", lambda s: LinearProbeClassifier(random_state=s)),
    ],
    "tip_adapter": [
        ("Tip-Adapter before: alpha=1, beta=5.5", lambda s: TipAdapterClassifier(
            alpha=1.0, beta=5.5, fine_tune=False)),
        ("Tip-Adapter, alpha/beta searched", lambda s: TipAdapterClassifier(fine_tune=False, random_state=s)),
        ("Tip-Adapter-F, searched, no aug", lambda s: TipAdapterClassifier(augmentation="none", random_state=s)),
        ("Tip-Adapter-F, searched, crop (default)", lambda s: TipAdapterClassifier(random_state=s)),
    ],
}


def load(name, test_size):
    if name == "digits":
        X, y = load_digit_images()
        return lambda seed: few_shot_split(X, y, 16, seed=seed), None
    X, y = load_fashion_mnist("train")
    Xt, yt = load_fashion_mnist("test")
    held = np.random.RandomState(0).choice(len(yt), test_size, replace=False)

    def split(seed):
        Xtr, ytr, _, _ = few_shot_split(X, y, 16, seed=seed)
        return Xtr, ytr, Xt[held], yt[held]

    return split, list(FASHION_CLASSES)


def chosen(clf):
    if hasattr(clf, "C_") and clf.search_scores_:
        return f"C={clf.C_:g}"
    if hasattr(clf, "alpha_") and clf.search_scores_:
        return f"a={clf.alpha_:g},b={clf.beta_:g}"
    return ""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", nargs="+", default=["digits", "fashion_mnist"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--test-size", type=int, default=2000)
    args = parser.parse_args()
    table = []
    for dataset in args.datasets:
        split, names = load(dataset, args.test_size)
        for seed in args.seeds:
            Xtr, ytr, Xte, yte = split(seed)
            for method in args.methods:
                for label, make in SETTINGS[method]:
                    clf = make(seed).set_params(class_names=names)
                    start = time.perf_counter()
                    clf.fit(Xtr, ytr)
                    seconds = time.perf_counter() - start
                    held, train = clf.score(Xte, yte), clf.score(Xtr, ytr)
                    table.append((dataset, label, seed, held, train, seconds, chosen(clf)))
                    print(f"{dataset} seed {seed} {label:<42} held-out {held:.4f} train {train:.4f} "
                          f"{seconds:5.1f}s {table[-1][-1]}", flush=True)
    print("\n| dataset | setting | held-out accuracy | training accuracy | fit s | chosen (per seed) |")
    print("|---|---|---|---|---|---|")
    for dataset in args.datasets:
        for method in args.methods:
            for label, _ in SETTINGS[method]:
                rows = [r for r in table if r[0] == dataset and r[1] == label]
                held = 100 * np.array([r[3] for r in rows])
                train = 100 * np.array([r[4] for r in rows])
                picks = "; ".join(r[6] for r in rows if r[6])
                print(f"| {dataset} | {label} | {held.mean():.2f} ± {held.std():.2f} | "
                      f"{train.mean():.2f} ± {train.std():.2f} | {np.mean([r[5] for r in rows]):.1f} | {picks} |")


if __name__ == "__main__":
    main()
