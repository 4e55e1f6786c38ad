"""``skcarrot bench``: the paper's few-shot benchmark as one resumable command.

Every finished run (dataset, shots, seed, method) is one JSON line in ``OUT/results.jsonl``;
a run already there is skipped, so an interrupted benchmark resumes where it stopped.
``OUT/summary.csv`` and ``OUT/summary.md`` give mean and standard deviation over seeds,
next to the paper's RN50 numbers where they are recorded.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections import defaultdict
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ._progress import progress_bar
from .datasets.benchmark import (
    DATASETS,
    IMAGENET_VARIANTS,
    load_benchmark,
    sample_few_shot,
)
from .presets import PRESETS, SETTINGS, preset_params

__all__ = ["METHODS", "run_bench", "make_estimator", "paper_numbers"]

#: method -> (kind, description)
METHODS = {
    "zeroshot": ("black-box", "hand-written prompt, no adaptation (0 queries)"),
    "bbt": ("black-box", "prompt-only: CMA-ES prompt search (CarrotClassifier refinement=False)"),
    "refine": ("black-box", "refine-only: residual MLP on logits (CarrotClassifier prompt_tuning=False)"),
    "carrot": ("black-box", "CARROT: prompt search + refiner + consistency loss"),
    "coop": ("white-box", "CoOp: context vectors trained through the text encoder"),
    "linear_probe": ("white-box", "logistic regression on image features"),
    "tip_adapter": ("white-box", "Tip-Adapter-F: cache model, keys fine-tuned, alpha/beta on validation shots"),
}

#: Offline datasets of tiny images: the white-box baselines train without augmentation there.
_TINY_IMAGE_DATASETS = ("digits", "fashion_mnist")

_RUN_KEYS = ("dataset", "shots", "seed", "method")


def paper_numbers() -> dict:
    """The paper's RN50 numbers shipped with skcarrot (None where not recorded).

    Examples
    --------
    >>> from skcarrot.bench import paper_numbers
    >>> paper_numbers()["zeroshot"]["eurosat"]
    37.56
    """
    text = resources.files("skcarrot").joinpath("data/paper_rn50.json").read_text()
    return json.loads(text)


def make_estimator(method: str, dataset: str, n_shots: int, seed: int, backend: Any, classnames: list,
                   budget: int | None = None):
    """The estimator of ``method`` with the dataset's preset, seeded.

    Examples
    --------
    >>> from skcarrot.bench import make_estimator
    >>> est = make_estimator("bbt", "eurosat", 4, seed=1, backend=None, classnames=["a", "b"])
    >>> est.query_budget, est.sigma, est.refinement
    (4000, 0.02, False)
    >>> make_estimator("coop", "eurosat", 4, seed=1, backend=None, classnames=["a", "b"]).augmentation
    'crop+flip'
    """
    from .baselines import CoOpClassifier, LinearProbeClassifier, TipAdapterClassifier
    from .classifier import CarrotClassifier

    if method in SETTINGS:
        params = preset_params(dataset, n_shots)
        if budget is not None:
            params["query_budget"] = budget
        _, prompt, refine = SETTINGS[method]
        return CarrotClassifier(backend=backend, class_names=classnames, prompt_tuning=prompt, refinement=refine,
                                random_state=seed, **params)
    # The official augmentation (random resized crop + flip) on the natural-image datasets; none on
    # the 8x8 and 28x28 offline sets, where crops cost 2.5-5.5x the fit time and lose accuracy
    # (docs/benchmarks.md, "White-box baselines, retrained").
    augmentation = "none" if dataset in _TINY_IMAGE_DATASETS else "crop+flip"
    if method == "coop":
        return CoOpClassifier(backend=backend, class_names=classnames, augmentation=augmentation, random_state=seed)
    if method == "linear_probe":
        return LinearProbeClassifier(backend=backend, class_names=classnames, random_state=seed)
    if method == "tip_adapter":
        return TipAdapterClassifier(backend=backend, class_names=classnames, augmentation=augmentation,
                                    random_state=seed)
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def _read_done(path: Path) -> dict[tuple, dict]:
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
                done[tuple(row[k] for k in _RUN_KEYS)] = row
            except (ValueError, KeyError):
                continue  # a line cut short by an interruption: that run is redone
    return done


def _accuracy(est, X, y, label_subset=None) -> float:
    if label_subset is None:
        return float(np.mean(est.predict(X) == y))
    # An ImageNet model scored on a class subset (-A, -R): only those classes compete.
    proba = est.predict_proba(X)
    cols = np.searchsorted(est.classes_, label_subset)
    return float(np.mean(np.argmax(proba[:, cols], axis=1) == y))


def run_bench(
    *,
    root: str | None,
    datasets: list[str],
    shots: list[int],
    seeds: list[int],
    methods: list[str],
    out: str,
    model: str | None = None,
    pretrained: str | None = None,
    budget: int | None = None,
    quiet: bool = False,
) -> list[dict]:
    """Run every (dataset, shots, seed, method) not yet in ``out/results.jsonl``; write the summary.

    Parameters
    ----------
    root : str or None
        Folder holding the dataset folders (not needed for ``digits`` / ``fashion_mnist``).
    datasets, shots, seeds, methods : lists
        The grid; see :data:`METHODS` and :data:`skcarrot.datasets.DATASETS`.
    out : str
        Output folder: ``results.jsonl``, ``summary.csv``, ``summary.md``.
    model, pretrained : str or None
        open_clip model and weights; None: the embedded model.
    budget : int or None
        Query budget of every fit; None: the paper's, by shots.
    quiet : bool
        No progress bar.

    Returns
    -------
    rows : list of dict
        Every finished run, old and new.

    Examples
    --------
    >>> import tempfile
    >>> from skcarrot.bench import run_bench
    >>> rows = run_bench(root=None, datasets=["digits"], shots=[1], seeds=[1], methods=["zeroshot"],
    ...                  out=tempfile.mkdtemp(), quiet=True)
    >>> rows[0]["method"], rows[0]["queries"]
    ('zeroshot', 0)
    """
    from .backends import OpenCLIPBackend
    from .backends.embedded import EMBEDDED_MODEL, EMBEDDED_WEIGHTS

    unknown = [d for d in datasets if d not in DATASETS]
    if unknown:
        raise ValueError(f"unknown dataset(s) {unknown}; known: {', '.join(DATASETS)}")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; known: {', '.join(METHODS)}")
    if model is None or model == EMBEDDED_MODEL:
        model, pretrained = EMBEDDED_MODEL, pretrained or EMBEDDED_WEIGHTS
    elif pretrained is None:
        pretrained = "openai"
    backend = OpenCLIPBackend(model_name=model, pretrained=pretrained)

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / "results.jsonl"
    done = _read_done(results)

    # ImageNet variants are scored by models fitted on ImageNet: group them with it.
    variants = [d for d in datasets if d in IMAGENET_VARIANTS]
    plain = [d for d in datasets if d not in IMAGENET_VARIANTS]
    jobs = []  # (fit dataset, [scored datasets])
    for d in plain:
        jobs.append((d, [d] if d != "imagenet" else ["imagenet"] + variants))
    if variants and "imagenet" not in plain:
        jobs.append(("imagenet", variants))
    todo = [
        (fit_on, scored, k, s, m)
        for fit_on, scored in jobs
        for k in shots
        for s in seeds
        for m in methods
    ]
    bar = progress_bar(sum(len(job[1]) for job in todo), "run", enabled=not quiet)
    loaded: dict[str, Any] = {}
    with open(results, "a") as sink:
        for fit_on, scored, k, seed, method in todo:
            missing = [d for d in scored if (d, k, seed, method) not in done]
            bar.update(len(scored) - len(missing))
            if not missing:
                continue
            for d in {fit_on, *missing}:
                if d not in loaded:
                    loaded[d] = load_benchmark(d, root)
            task = sample_few_shot(loaded[fit_on], k, seed)
            est = make_estimator(method, fit_on, k, seed, backend, task.classnames, budget)
            bar.set_description(f"{fit_on} {k}-shot seed {seed} {method}")
            start = time.perf_counter()
            est.fit(task.X_train, task.y_train)
            seconds = time.perf_counter() - start
            for d in missing:
                ds = loaded[d]
                X_test, y_test = ds.test
                acc = _accuracy(est, X_test, y_test, ds.label_subset)
                row = {
                    "dataset": d, "shots": k, "seed": seed, "method": method, "kind": METHODS[method][0],
                    "accuracy": round(100 * acc, 3), "queries": int(getattr(est, "n_queries_", 0)),
                    "fit_seconds": round(seconds, 3), "model": model,
                    "pretrained": os.path.basename(str(pretrained)) if pretrained else None,
                    "fitted_on": fit_on,
                }
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                done[(d, k, seed, method)] = row
                bar.update(1)
    bar.close()
    rows = [done[key] for key in sorted(done, key=lambda t: tuple(map(str, t)))]
    write_summary(rows, out_dir)
    return rows


def write_summary(rows: list[dict], out_dir: Path) -> None:
    """Mean and std over seeds per (dataset, shots, method), as CSV and Markdown, with paper numbers.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from skcarrot.bench import write_summary
    >>> out = Path(tempfile.mkdtemp())
    >>> row = dict(dataset="eurosat", shots=1, seed=1, method="zeroshot", accuracy=40.0, queries=0, fit_seconds=0.1)
    >>> write_summary([row], out)
    >>> (out / "summary.md").read_text().splitlines()[2]
    '| eurosat | 1 | zeroshot | black-box | 40.00 ± 0.00 | 1 | 0 | 0.1 | 37.56 | 37.56 | — | — |'
    """
    paper = paper_numbers()
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["dataset"], r["shots"], r["method"])].append(r)
    table = []
    for (d, k, m), rs in sorted(groups.items(), key=lambda t: (t[0][0], t[0][1], list(METHODS).index(t[0][2]))):
        accs = np.array([r["accuracy"] for r in rs])
        # The paper records zero-shot per dataset and its methods at 16 shots only.
        ref = {
            name: paper.get(name, {}).get(d) if name == "zeroshot" or k == 16 else None
            for name in ("zeroshot", "bbt", "carrot")
        }
        table.append({
            "dataset": d, "shots": k, "method": m, "kind": METHODS[m][0], "seeds": len(rs),
            "accuracy_mean": round(float(accs.mean()), 2), "accuracy_std": round(float(accs.std()), 2),
            "queries_mean": round(float(np.mean([r["queries"] for r in rs])), 1),
            "fit_seconds_mean": round(float(np.mean([r["fit_seconds"] for r in rs])), 2),
            "paper_rn50": ref.get(m),
            "paper_zeroshot": ref["zeroshot"], "paper_bbt": ref["bbt"], "paper_carrot": ref["carrot"],
        })
    fields = list(table[0]) if table else ["dataset"]
    tmp = out_dir / "summary.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(table)
    tmp.replace(out_dir / "summary.csv")
    lines = [
        "| dataset | shots | method | kind | accuracy (mean ± std) | seeds | queries | fit s | paper RN50 "
        "| paper zero-shot | paper BBT | paper CARROT |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(value):
        return "—" if value is None else f"{value:.2f}"

    for t in table:
        lines.append(
            f"| {t['dataset']} | {t['shots']} | {t['method']} | {t['kind']} | "
            f"{t['accuracy_mean']:.2f} ± {t['accuracy_std']:.2f} | {t['seeds']} | {t['queries_mean']:.0f} | "
            f"{t['fit_seconds_mean']:.1f} | {cell(t['paper_rn50'])} | {cell(t['paper_zeroshot'])} | "
            f"{cell(t['paper_bbt'])} | {cell(t['paper_carrot'])} |"
        )
    lines.append("")
    lines.append(f"Paper column: {paper['source']}")
    tmp = out_dir / "summary.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out_dir / "summary.md")


def list_text() -> str:
    """What ``skcarrot bench --list`` prints.

    Examples
    --------
    >>> from skcarrot.bench import list_text
    >>> list_text().splitlines()[0]
    'datasets:'
    """
    out = ["datasets:"]
    for d in DATASETS:
        out.append(f"  {d}{'  (test-only: scored by an ImageNet fit)' if d in IMAGENET_VARIANTS else ''}")
    out.append("methods:")
    for m, (kind, desc) in METHODS.items():
        out.append(f"  {m:<13} {kind:<10} {desc}")
    out.append("presets (CarrotClassifier parameters per dataset; budget 2000/4000/8000 for 1/2-4/8-16 shots):")
    for d, p in PRESETS.items():
        shown = {k: v for k, v in p.items() if k in ("sigma", "bound", "projection_std", "consistency_weight",
                                                    "consistency_fraction", "batch_size")}
        out.append(f"  {d:<15} " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    return "\n".join(out)
