"""Where does the prompt search pay? Every method, both doors, 1-16 shots, in-domain and shifted test sets.

    python benchmarks/when_it_pays.py [--seeds 100 ... 109] [--shots 1 2 4 8 16] [--jobs 2]
                                      [--out bench_output/when_it_pays] [--methods ...] [--plot PNG]
                                      [--markdown MD] [--summary-only] [--before DIR]

Tasks (embedded model, offline data):

- ``digits``: sklearn's 8x8 digits, upsampled to 28x28 (bilinear) like Fashion-MNIST; shots from
  them, the rest held out (600 scored).
- ``fashion``: Fashion-MNIST's test split (the model was pretrained on the training split): shots
  and 600 held-out images drawn from it.
- ``digits+fashion``: the two together, 20 classes.
- Shifts: the estimators fitted on clean ``digits`` / ``fashion`` shots are also scored on their
  held-out images rotated by 30 degrees, blurred (Gaussian, radius 1.5), with Gaussian noise (sd 40 of 255), and shrunk
  to 60% inside the frame (``digits@rotate``, ``fashion@blur``, ...): the shots come from one
  domain, the test from another.

Methods follow the paper's protocol (all shots train, the last generation, ``early_stopping=False``,
the paper's budget for the number of shots): ``zeroshot``, ``prompt`` (prompt-only), ``refine``
(refine-only), ``carrot``, ``linear_probe`` (white-box reference), the same on the text door
(``text_prompt``, ``text_refine``, ``text_carrot``, budget "auto"), and ``default``
(``CarrotClassifier()`` with its defaults but the budget). Each cell (task, shots, seed, method) is one JSON
file under ``--out``; finished cells are skipped, so the study resumes. The summary prints mean
accuracy and paired 95% intervals of every method against refine-only, per task and shots;
``--before DIR`` compares the default, seed by seed, with an earlier version's cells in ``DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

TASKS = ("digits", "fashion", "digits+fashion")
SHIFTS = ("rotate", "blur", "noise", "shrink")
EMBEDDING = {
    "zeroshot": dict(prompt_tuning=False, refinement=False),
    "prompt": dict(prompt_tuning=True, refinement=False, early_stopping=False),
    "refine": dict(prompt_tuning=False, early_stopping=False),
    "carrot": dict(prompt_tuning=True, early_stopping=False),
}
TEXT = {
    "text_prompt": dict(prompt_tuning=True, refinement=False, early_stopping=False),
    "text_refine": dict(prompt_tuning=False, early_stopping=False),
    "text_carrot": dict(prompt_tuning=True, early_stopping=False),
}
METHODS = (*EMBEDDING, *TEXT, "linear_probe", "default", "text_default")
N_TEST = 600


def _names(task):
    from skcarrot.datasets import FASHION_CLASSES

    digits = [str(i) for i in range(10)]
    return {"digits": digits, "fashion": list(FASHION_CLASSES), "digits+fashion": digits + list(FASHION_CLASSES)}[task]


def _pool(task):
    """All images and labels of a task, as uint8 arrays ``(N, H, W)`` (digits upsampled to 28x28)."""
    from PIL import Image

    from skcarrot.datasets import load_digit_images, load_fashion_mnist
    from skcarrot.images import to_pil_images

    def digits():
        X, y = load_digit_images()
        big = np.stack([np.asarray(img.convert("L").resize((28, 28), Image.BILINEAR)) for img in to_pil_images(X)])
        return big, y

    def fashion():
        X, y = load_fashion_mnist("test")
        keep = np.random.RandomState(0).choice(len(y), 3000, replace=False)
        return X[keep], y[keep]

    if task == "digits":
        return digits()
    if task == "fashion":
        return fashion()
    (Xd, yd), (Xf, yf) = digits(), fashion()
    return np.concatenate([Xd, Xf]), np.concatenate([yd, yf + 10])


def shift(X, kind, seed=0):
    """Held-out images of another domain: rotated, blurred, noisy or shrunk."""
    from PIL import Image, ImageFilter

    if kind == "noise":
        noisy = X.astype(float) + np.random.RandomState(seed).normal(0, 40, X.shape)
        return np.clip(noisy, 0, 255).astype(np.uint8)
    out = []
    for x in X:
        img = Image.fromarray(x)
        if kind == "rotate":
            img = img.rotate(30, resample=Image.BILINEAR)
        elif kind == "blur":
            img = img.filter(ImageFilter.GaussianBlur(1.5))
        elif kind == "shrink":
            h, w = x.shape
            small = img.resize((int(w * 0.6), int(h * 0.6)), Image.BILINEAR)
            img = Image.new("L", (w, h))
            img.paste(small, ((w - small.size[0]) // 2, (h - small.size[1]) // 2))
        out.append(np.asarray(img))
    return np.stack(out)


def split(task, shots, seed):
    from skcarrot.datasets import few_shot_split

    X, y = _pool(task)
    Xtr, ytr, Xte, yte = few_shot_split(X, y, shots, seed=seed)
    keep = np.random.RandomState(seed).choice(len(yte), min(N_TEST, len(yte)), replace=False)
    return Xtr, ytr, Xte[keep], yte[keep]


def estimator(method, task, shots, seed):
    from skcarrot import CarrotClassifier
    from skcarrot.backends import OpenCLIPTextBackend
    from skcarrot.tools.baselines import LinearProbeClassifier
    from skcarrot.tools.presets import budget_for_shots

    names = _names(task)
    budget = budget_for_shots(shots)
    if method == "linear_probe":
        return LinearProbeClassifier(class_names=names, random_state=seed)
    if method == "default":
        return CarrotClassifier(class_names=names, query_budget=budget, random_state=seed)
    if method == "text_default":
        return CarrotClassifier(backend=OpenCLIPTextBackend(), class_names=names, random_state=seed)
    if method in EMBEDDING:
        return CarrotClassifier(class_names=names, query_budget=budget, random_state=seed, **EMBEDDING[method])
    return CarrotClassifier(backend=OpenCLIPTextBackend(), class_names=names, random_state=seed, **TEXT[method])


def run_cell(out, task, shots, seed, method):
    import torch

    torch.set_num_threads(1)
    path = Path(out) / f"{task}_{shots}_{seed}_{method}.json"
    if path.exists():
        return json.loads(path.read_text())
    Xtr, ytr, Xte, yte = split(task, shots, seed)
    est = estimator(method, task, shots, seed)
    start = time.perf_counter()
    est.fit(Xtr, ytr)
    seconds = time.perf_counter() - start
    accuracy = {task: float(est.score(Xte, yte))}
    if task != "digits+fashion":
        for kind in SHIFTS:
            accuracy[f"{task}@{kind}"] = float(est.score(shift(Xte, kind, seed), yte))
    record = {
        "task": task, "shots": shots, "seed": seed, "method": method, "accuracy": accuracy,
        "queries": int(getattr(est, "n_queries_", 0)), "images": int(getattr(est, "n_images_scored_", 0)),
        "seconds": seconds, "selection": getattr(est, "selection_", None),
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)
    return record


def interval(diffs):
    from scipy import stats

    diffs = np.asarray(diffs, dtype=float)
    mean = diffs.mean()
    if len(diffs) < 2:
        return mean, np.nan, np.nan
    half = stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / np.sqrt(len(diffs))
    return mean, mean - half, mean + half


def load(out):
    return [json.loads(p.read_text()) for p in Path(out).glob("*.json")]


def summary(records, methods):
    """Mean accuracy (points), queries, and the paired difference against refine-only per (test set, shots)."""
    table = {}
    for r in records:
        for test, acc in r["accuracy"].items():
            table.setdefault((test, r["shots"]), {}).setdefault(r["method"], {})[r["seed"]] = (
                100 * acc, r["queries"], r["images"])
    lines = ["| test set | shots | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    diffs = ["| test set | shots | method | minus refine-only | 95% interval | seeds |", "|---|---|---|---|---|---|"]
    for (test, shots) in sorted(table, key=lambda k: (k[0], k[1])):
        row = table[(test, shots)]
        cells = []
        for m in methods:
            if m not in row:
                cells.append("")
                continue
            acc = np.array([v[0] for v in row[m].values()])
            queries = np.mean([v[1] for v in row[m].values()])
            cells.append(f"{acc.mean():.1f} ({queries:.0f} q)")
        lines.append(f"| {test} | {shots} | " + " | ".join(cells) + " |")
        base = row.get("refine", {})
        for m in methods:
            if m == "refine" or m not in row:
                continue
            seeds = sorted(set(base) & set(row[m]))
            if len(seeds) < 2:
                continue
            mean, lo, hi = interval([row[m][s][0] - base[s][0] for s in seeds])
            diffs.append(f"| {test} | {shots} | {m} | {mean:+.2f} | [{lo:+.2f}, {hi:+.2f}] | {len(seeds)} |")
    return "\n".join(lines), "\n".join(diffs), table


def bar(table, default="default", refine="refine", carrot="carrot", budget=None):
    """The default against the paper-protocol methods: accuracy >= max(refine, CARROT) - 0.5, and its spending.

    The search "pays" on a test set where CARROT beats refine-only with a paired 95% interval above 0; where
    it does not, the default should spend at most a quarter of the budget.
    """
    from skcarrot.tools.presets import budget_for_shots

    lines = [f"| test set | shots | {refine} | {carrot} | {default} | queries ({default}) | search pays | "
             "accuracy bar | spending bar |", "|---|---|---|---|---|---|---|---|---|"]
    passed = failed = 0
    for (test, shots) in sorted(table, key=lambda k: (k[0], k[1])):
        row = table[(test, shots)]
        if not all(m in row for m in (refine, carrot, default)):
            continue
        seeds = sorted(set(row[refine]) & set(row[carrot]) & set(row[default]))
        if len(seeds) < 2:
            continue
        acc = {m: np.mean([row[m][s][0] for s in seeds]) for m in (refine, carrot, default)}
        queries = np.mean([row[default][s][1] for s in seeds])
        cap = budget(shots) if budget else budget_for_shots(shots)
        _, lo, _ = interval([row[carrot][s][0] - row[refine][s][0] for s in seeds])
        pays = lo > 0
        ok_acc = acc[default] >= max(acc[refine], acc[carrot]) - 0.5
        ok_spend = pays or queries <= 0.25 * cap + 1
        passed += int(ok_acc) + int(ok_spend)
        failed += int(not ok_acc) + int(not ok_spend)
        lines.append(f"| {test} | {shots} | {acc[refine]:.1f} | {acc[carrot]:.1f} | {acc[default]:.1f} | "
                     f"{queries:.0f} of {cap} | {'yes' if pays else 'no'} | {'ok' if ok_acc else 'MISSED'} | "
                     f"{'ok' if ok_spend else 'MISSED'} |")
    lines.append(f"\n{passed} checks met, {failed} missed")
    return "\n".join(lines)


def compact(table, methods):
    """One row per (test set, shots): mean accuracy of each method; the default's queries; CARROT - refine-only."""
    head = ["test set", "shots", *methods, "CARROT − refine-only (95% interval)", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (test, shots) in sorted(table, key=lambda k: (k[0].split("@")[0], "@" in k[0], k[0], k[1])):
        row = table[(test, shots)]
        cells = []
        for m in methods:
            values = row.get(m, {})
            if not values:
                cells.append("")
                continue
            acc = np.mean([v[0] for v in values.values()])
            queries = np.mean([v[1] for v in values.values()])
            cells.append(f"{acc:.1f}" + (f" ({queries:.0f} q)" if m in ("default", "text_default") else ""))
        seeds = sorted(set(row.get("carrot", {})) & set(row.get("refine", {})))
        if len(seeds) >= 2:
            mean, lo, hi = interval([row["carrot"][s][0] - row["refine"][s][0] for s in seeds])
            cells += [f"{mean:+.1f} [{lo:+.1f}, {hi:+.1f}]", str(len(seeds))]
        else:
            cells += ["", str(len(seeds))]
        lines.append(f"| {test} | {shots} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def versus(table, new="default", old="default_before"):
    """The default against an earlier version of it, seed by seed: mean accuracies and the paired difference."""
    lines = [f"| test set | shots | {old} | {new} | difference (95% interval) | seeds |", "|---|---|---|---|---|---|"]
    for (test, shots) in sorted(table, key=lambda k: (k[0].split("@")[0], "@" in k[0], k[0], k[1])):
        row = table[(test, shots)]
        seeds = sorted(set(row.get(new, {})) & set(row.get(old, {})))
        if len(seeds) < 2:
            continue
        mean, lo, hi = interval([row[new][s][0] - row[old][s][0] for s in seeds])
        lines.append(f"| {test} | {shots} | {np.mean([row[old][s][0] for s in seeds]):.1f} | "
                     f"{np.mean([row[new][s][0] for s in seeds]):.1f} | {mean:+.1f} [{lo:+.1f}, {hi:+.1f}] | "
                     f"{len(seeds)} |")
    return "\n".join(lines)


def plot(table, methods, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tests = ["digits", "fashion", "digits+fashion", "digits@rotate", "fashion@rotate", "digits@shrink"]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    for ax, test in zip(axes.ravel(), tests):
        for m in methods:
            xs, ys = [], []
            for shots in (1, 2, 4, 8, 16):
                row = table.get((test, shots), {}).get(m)
                if row:
                    xs.append(max(np.mean([v[1] for v in row.values()]), 0.5))
                    ys.append(np.mean([v[0] for v in row.values()]))
            if xs:
                ax.plot(xs, ys, marker="o", label=m)
        ax.set_xscale("log")
        ax.set_title(f"{test} (1 to 16 shots)")
        ax.set_xlabel("queries spent (log; 0 drawn at 0.5)")
        ax.set_ylabel("held-out accuracy (%)")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(100, 110)))
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="bench_output/when_it_pays")
    parser.add_argument("--plot", default=None)
    parser.add_argument("--summary-only", action="store_true")
    parser.add_argument("--before", default=None,
                        help="cells of an earlier version's default (same layout): compared seed by seed")
    parser.add_argument("--markdown", default=None, help="write the compact table and the bars to this file")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    cells = [(args.out, t, k, s, m) for k in args.shots for s in args.seeds for t in args.tasks for m in args.methods]
    todo = [c for c in cells if not (Path(args.out) / f"{c[1]}_{c[2]}_{c[3]}_{c[4]}.json").exists()]
    if not args.summary_only and todo:
        print(f"{len(todo)} of {len(cells)} cells to run", flush=True)
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = {pool.submit(run_cell, *c): c for c in todo}
            for i, future in enumerate(as_completed(futures), 1):
                try:
                    r = future.result()
                except Exception as exc:  # one failed cell does not stop the study; a rerun retries it
                    print(f"[{i}/{len(todo)}] {futures[future][1:]} failed: {exc!r}", flush=True)
                    continue
                print(f"[{i}/{len(todo)}] {r['task']} {r['shots']} shots seed {r['seed']} {r['method']}: "
                      f"{100 * r['accuracy'][r['task']]:.1f}% {r['queries']} q {r['seconds']:.1f}s", flush=True)
    records = [r for r in load(args.out) if r["method"] in args.methods and r["seed"] in args.seeds
               and r["shots"] in args.shots]
    if args.before:
        records += [dict(r, method=r["method"] + "_before") for r in load(args.before)
                    if r["method"] in ("default", "text_default") and r["seed"] in args.seeds
                    and r["shots"] in args.shots]
    methods = [m for m in args.methods if any(r["method"] == m for r in records)]
    means, diffs, table = summary(records, methods)
    print(means)
    print()
    print(diffs)
    print()
    print(bar(table))
    print()
    print(bar(table, "text_default", "text_refine", "text_carrot", budget=lambda shots: 250))
    before = ""
    if args.before:
        before = "\n\n" + versus(table) + "\n\n" + versus(table, "text_default", "text_default_before")
        print(before)
    if args.markdown:
        Path(args.markdown).write_text(compact(table, methods) + "\n\n" + bar(table) + "\n\n"
                                       + bar(table, "text_default", "text_refine", "text_carrot",
                                             budget=lambda shots: 250) + before + "\n")
    if args.plot:
        plot(table, methods, args.plot)


if __name__ == "__main__":
    main()
