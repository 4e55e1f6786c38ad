"""Wall time of one 8000-query CARROT fit, this tree against a git revision, measured in one run.

    python benchmarks/fit_speed.py [--base 61917ee] [--pairs 3] [--budget 8000] [--seed 0]

The package at ``--base`` is unpacked into a temporary folder (``git archive``) and both
versions run the same fit, each in a fresh subprocess that imports its own copy of
``skcarrot`` (``PYTHONPATH``), base and new interleaved pair by pair (the order swapped in
every other pair), so that a machine shared with other work weighs on both alike. The fit:
``CarrotClassifier(query_budget=8000, prompt_tuning=True, early_stopping=False,
random_state=0)`` on digits, 16 shots per class (``few_shot_split(..., 16, seed=0)``), the
embedded model; the model is loaded and warmed up before the clock starts. Prints the
seconds of every run, the median ratio base / new, and whether the fits agree: the
queries spent and the largest difference of ``predict_proba`` (held-out images) and of
``prompt_offset_``.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def child(budget: int, seed: int, out: str) -> None:
    """One timed fit with whichever ``skcarrot`` is first on the path; writes its results to ``out``."""
    import skcarrot
    from skcarrot import CarrotClassifier
    from skcarrot.backends import embedded_backend
    from skcarrot.datasets import few_shot_split, load_digit_images
    from skcarrot.images import to_pil_images

    X, y = load_digit_images()
    Xtr, ytr, Xte, yte = few_shot_split(X, y, 16, seed=seed)
    box = embedded_backend()
    box.logits(to_pil_images(Xtr[:1]), ["0", "1"], np.zeros((1,) + box.context_shape))  # load and warm up
    clf = CarrotClassifier(query_budget=budget, prompt_tuning=True, early_stopping=False, random_state=seed)
    start = time.perf_counter()
    clf.fit(Xtr, ytr)
    seconds = time.perf_counter() - start
    np.savez(
        out,
        seconds=seconds,
        n_queries=clf.n_queries_,
        proba=clf.predict_proba(Xte),
        prompt_offset=np.asarray(clf.prompt_offset_),
        accuracy=clf.score(Xte, yte),
        package=str(Path(skcarrot.__file__).parent),
    )


def unpack(rev: str, into: Path) -> Path:
    """The package as it is at ``rev``, unpacked under ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "skcarrot"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def run_once(path: Path, budget: int, seed: int, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(path))
    cmd = [sys.executable, __file__, "--child", str(out), "--budget", str(budget), "--seed", str(seed)]
    subprocess.run(cmd, check=True, env=env, cwd=tempfile.gettempdir())
    with np.load(out) as data:
        return {key: data[key] for key in data.files}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="61917ee", help="git revision to compare against")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--budget", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.budget, args.seed, args.child)
        return

    with tempfile.TemporaryDirectory(prefix="skcarrot-base-") as tmp:
        tmp = Path(tmp)
        (tmp / "base").mkdir()
        versions = {"base": unpack(args.base, tmp / "base"), "new": ROOT}
        runs: dict[str, list[dict]] = {"base": [], "new": []}
        for pair in range(args.pairs):
            order = ("base", "new") if pair % 2 == 0 else ("new", "base")
            for name in order:
                result = run_once(versions[name], args.budget, args.seed, tmp / f"{name}{pair}.npz")
                if Path(str(result["package"])).parent != versions[name]:
                    raise RuntimeError(f"{name} imported skcarrot from {result['package']}")
                runs[name].append(result)
                print(f"pair {pair + 1} {name:>4}: {float(result['seconds']):6.2f} s, "
                      f"{int(result['n_queries'])} queries, accuracy {float(result['accuracy']):.4f}", flush=True)

    base_s = [float(r["seconds"]) for r in runs["base"]]
    new_s = [float(r["seconds"]) for r in runs["new"]]
    pair_ratios = [b / n for b, n in zip(base_s, new_s)]
    first = runs["base"][0]
    same_queries = all(int(r["n_queries"]) == int(first["n_queries"]) for r in runs["base"] + runs["new"])
    proba_diff = max(float(np.max(np.abs(r["proba"] - first["proba"]))) for r in runs["new"])
    offset_diff = max(float(np.max(np.abs(r["prompt_offset"] - first["prompt_offset"]))) for r in runs["new"])
    repeat_diff = max(float(np.max(np.abs(r["proba"] - first["proba"]))) for r in runs["base"])
    summary = {
        "base": args.base,
        "base_seconds": base_s,
        "new_seconds": new_s,
        "base_median_s": statistics.median(base_s),
        "new_median_s": statistics.median(new_s),
        "median_ratio": statistics.median(base_s) / statistics.median(new_s),
        "pair_ratios": pair_ratios,
        "same_n_queries": same_queries,
        "n_queries": int(first["n_queries"]),
        "max_abs_proba_diff": proba_diff,
        "max_abs_prompt_offset_diff": offset_diff,
        "base_repeat_max_abs_proba_diff": repeat_diff,
    }
    print(f"\nbase ({args.base}) median {summary['base_median_s']:.2f} s, new median {summary['new_median_s']:.2f} s: "
          f"{summary['median_ratio']:.2f}x faster (per pair: {', '.join(f'{r:.2f}x' for r in pair_ratios)})")
    print(f"same n_queries_: {same_queries} ({summary['n_queries']}); max |predict_proba diff| {proba_diff:.3g}, "
          f"max |prompt_offset_ diff| {offset_diff:.3g} (base against itself: {repeat_diff:.3g})")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
