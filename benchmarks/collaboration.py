"""Does the collaboration pay? CARROT vs refine-only vs prompt-only, paired over seeds, on digits.

    python benchmarks/collaboration.py [--seeds 0 1 ... 9] [--budget 8000] [--out results.json]

Each seed draws its own 16-shot split of sklearn digits (the rest held out) and fits every
setting on it with the same ``random_state``; differences are paired by seed, with a 95%
t-interval. Variants try what the paper motivates: no consistency loss, fresh per-epoch
augmentation (the paper's), and a refiner without prompts on the same fresh views.
"""

import argparse
import json
import time

import numpy as np
from scipy import stats

from skcarrot import CarrotClassifier
from skcarrot.datasets import few_shot_split, load_digit_images

SETTINGS = {
    "prompt-only (BBT)": dict(refinement=False),
    "refine-only": dict(prompt_tuning=False),
    "refine-only, fresh views": dict(prompt_tuning=False, fresh_views=True),
    "CARROT": dict(),
    "CARROT, no consistency loss": dict(consistency_weight=0.0),
    "CARROT, fresh views": dict(fresh_views=True),
}
PAIRS = [
    ("CARROT", "refine-only"),
    ("CARROT", "prompt-only (BBT)"),
    ("CARROT", "CARROT, no consistency loss"),
    ("CARROT, fresh views", "CARROT"),
    ("CARROT, fresh views", "refine-only, fresh views"),
    ("refine-only, fresh views", "refine-only"),
]


def interval(diffs):
    diffs = np.asarray(diffs)
    mean = diffs.mean()
    if len(diffs) < 2:
        return mean, np.nan, np.nan
    half = stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / np.sqrt(len(diffs))
    return mean, mean - half, mean + half


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--budget", type=int, default=8000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    X, y = load_digit_images()
    acc = {name: {} for name in SETTINGS}
    cost = {name: [] for name in SETTINGS}
    for seed in args.seeds:
        Xtr, ytr, Xte, yte = few_shot_split(X, y, 16, seed=seed)
        for name, params in SETTINGS.items():
            start = time.perf_counter()
            clf = CarrotClassifier(query_budget=args.budget, random_state=seed, **params).fit(Xtr, ytr)
            acc[name][seed] = 100 * clf.score(Xte, yte)
            cost[name].append((clf.n_queries_, clf.n_images_scored_, time.perf_counter() - start))
            print(f"seed {seed} {name:<28} {acc[name][seed]:.2f}  {clf.n_queries_:5d} queries "
                  f"{clf.n_images_scored_:8d} images {cost[name][-1][2]:.1f}s", flush=True)
    print(f"\n| setting | held-out accuracy (mean ± std, {len(args.seeds)} seeds) | queries | images scored |")
    print("|---|---|---|---|")
    for name in SETTINGS:
        values = np.array(list(acc[name].values()))
        q, i, _ = np.mean(cost[name], axis=0)
        print(f"| {name} | {values.mean():.2f} ± {values.std(ddof=1):.2f} | {q:.0f} | {i:.0f} |")
    print("\n| paired difference | mean (points) | 95% interval | seeds better / worse |")
    print("|---|---|---|---|")
    for a, b in PAIRS:
        diffs = [acc[a][s] - acc[b][s] for s in args.seeds]
        mean, lo, hi = interval(diffs)
        print(f"| {a} − {b} | {mean:+.2f} | [{lo:+.2f}, {hi:+.2f}] | "
              f"{sum(d > 0 for d in diffs)} / {sum(d < 0 for d in diffs)} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"accuracy": acc, "cost": cost}, f, indent=1)


if __name__ == "__main__":
    main()
