"""``skcarrot bench``: the paper's few-shot benchmark as one resumable command.

Every finished cell (dataset, shots, seed, method) is one JSON file in ``OUT/cells/``, written
atomically; a cell already there is skipped, so an interrupted benchmark resumes where it
stopped. The cells run one after another here, or as tasks on a Dask cluster (``scheduler``,
``workers``): each cell is seeded on its own, so the numbers are the same either way.
``OUT/results.jsonl`` (every row), ``OUT/summary.csv`` and ``OUT/summary.md`` (mean and
standard deviation over seeds, next to the paper's RN50 numbers where they are recorded) are
rebuilt from the cell files at the end of every run. An output folder of an earlier version,
with rows in ``results.jsonl`` only, is resumed from those rows.
"""

from __future__ import annotations

import csv
import json
import os
import threading
import time
import uuid
import warnings
from collections import OrderedDict, defaultdict
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .._util.progress import progress_bar
from ..datasets.benchmark import (
    DATASETS,
    IMAGENET_VARIANTS,
    load_benchmark,
    sample_few_shot,
)
from ..backends.models import open_model
from .presets import PRESETS, SETTINGS, preset_params

__all__ = ["METHODS", "BenchError", "cell_path", "make_estimator", "paper_numbers", "plan_cells", "read_cells",
           "run_bench", "run_cell", "write_summary"]

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

#: Subfolder of the output folder holding one result file per cell.
_CELLS = "cells"


def paper_numbers() -> dict:
    """The paper's RN50 numbers shipped with skcarrot (None where not recorded).

    Examples
    --------
    >>> from skcarrot.tools.bench import paper_numbers
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
    >>> from skcarrot.tools.bench import make_estimator
    >>> est = make_estimator("bbt", "eurosat", 4, seed=1, backend=None, classnames=["a", "b"])
    >>> est.query_budget, est.sigma, est.refinement
    (4000, 0.02, False)
    >>> make_estimator("coop", "eurosat", 4, seed=1, backend=None, classnames=["a", "b"]).augmentation
    'crop+flip'
    """
    from .baselines import CoOpClassifier, LinearProbeClassifier, TipAdapterClassifier
    from ..classifier import CarrotClassifier

    if method in SETTINGS:
        params = preset_params(dataset, n_shots)
        if budget is not None:
            params["query_budget"] = budget
        _, prompt, refine = SETTINGS[method]
        params.update(prompt_tuning=prompt, refinement=refine)
        return CarrotClassifier(backend=backend, class_names=classnames, random_state=seed, **params)
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


def cell_path(out: str | Path, dataset: str, shots: int, seed: int, method: str) -> Path:
    """The result file of one (dataset, shots, seed, method) cell under ``out``.

    Examples
    --------
    >>> from skcarrot.tools.bench import cell_path
    >>> cell_path("paper", "eurosat", 16, 1, "carrot").as_posix()
    'paper/cells/eurosat-16shot-seed1-carrot.json'
    """
    return Path(out) / _CELLS / f"{dataset}-{shots}shot-seed{seed}-{method}.json"


def _write_cell(out_dir: Path, row: dict) -> Path:
    """Write one cell's row atomically: a reader sees the whole file or none."""
    path = cell_path(out_dir, *(row[k] for k in _RUN_KEYS))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(row, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_cells(out: str | Path) -> dict[tuple, dict]:
    """Every finished cell under ``out``: (dataset, shots, seed, method) -> row.

    Examples
    --------
    >>> import tempfile
    >>> from skcarrot.tools.bench import read_cells
    >>> read_cells(tempfile.mkdtemp())
    {}
    """
    done = {}
    folder = Path(out) / _CELLS
    if folder.is_dir():
        for path in sorted(folder.glob("*.json")):
            try:
                row = json.loads(path.read_text())
                done[tuple(row[k] for k in _RUN_KEYS)] = row
            except (OSError, ValueError, KeyError, TypeError):
                continue  # unreadable: that cell is redone
    return done


def _read_done(path: Path) -> dict[tuple, dict]:
    """The rows of a ``results.jsonl`` written by earlier versions (one JSON line per run)."""
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


def _migrate_results_jsonl(out_dir: Path) -> None:
    """An output folder of an earlier version (``results.jsonl``, no ``cells/``): one file per row."""
    if (out_dir / _CELLS).is_dir():
        return
    for row in _read_done(out_dir / "results.jsonl").values():
        _write_cell(out_dir, row)
    (out_dir / _CELLS).mkdir(exist_ok=True)


def _write_results_jsonl(rows: list[dict], out_dir: Path) -> None:
    tmp = out_dir / f".results.jsonl.{os.getpid()}.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, out_dir / "results.jsonl")


def _accuracy(est, X, y, label_subset=None) -> float:
    if label_subset is None:
        return float(np.mean(est.predict(X) == y))
    # An ImageNet model scored on a class subset (-A, -R): only those classes compete.
    proba = est.predict_proba(X)
    cols = np.searchsorted(est.classes_, label_subset)
    return float(np.mean(np.argmax(proba[:, cols], axis=1) == y))


def plan_cells(datasets: list[str], shots: list[int], seeds: list[int], methods: list[str]) -> list[tuple]:
    """The fits of a grid, in run order: ``(fit dataset, scored datasets, shots, seed, method)``.

    One fit scores one dataset, except an ImageNet fit, which also scores the ImageNet
    variants of the grid (those are test-only).

    Examples
    --------
    >>> from skcarrot.tools.bench import plan_cells
    >>> plan_cells(["eurosat", "imagenet_a"], [1], [1, 2], ["zeroshot"])
    [('eurosat', ('eurosat',), 1, 1, 'zeroshot'), ('eurosat', ('eurosat',), 1, 2, 'zeroshot'), \
('imagenet', ('imagenet_a',), 1, 1, 'zeroshot'), ('imagenet', ('imagenet_a',), 1, 2, 'zeroshot')]
    """
    variants = [d for d in datasets if d in IMAGENET_VARIANTS]
    plain = [d for d in datasets if d not in IMAGENET_VARIANTS]
    jobs = []  # (fit dataset, (scored datasets))
    for d in plain:
        jobs.append((d, (d,) if d != "imagenet" else ("imagenet", *variants)))
    if variants and "imagenet" not in plain:
        jobs.append(("imagenet", tuple(variants)))
    return [(fit_on, scored, k, s, m) for fit_on, scored in jobs for k in shots for s in seeds for m in methods]


class _DatasetCache(OrderedDict):
    """The last few loaded datasets of a process (an ImageNet fit needs up to five at once)."""

    def __init__(self, size: int | None = None):
        super().__init__()
        self.size = size

    def get_dataset(self, name: str, root: str | None):
        key = (name, root)
        if key in self:
            self.move_to_end(key)
        else:
            self[key] = load_benchmark(name, root)
            while self.size is not None and len(self) > self.size:
                self.popitem(last=False)
        return self[key]


#: Datasets loaded by a worker process, kept across the cells it runs.
_WORKER_DATASETS = _DatasetCache(size=6)


def run_cell(cell: tuple, *, root: str | None, out: str | Path, model: str | None = None,
             pretrained: str | None = None, budget: int | None = None, datasets=None) -> list[dict]:
    """Fit one cell of the grid, score it, and write its result file(s); returns the rows.

    ``cell`` is ``(fit dataset, scored datasets, shots, seed, method)`` (see :func:`plan_cells`).
    Everything a cell needs is derived from these and the seed, so a cell gives the same
    numbers in any process, in any order.

    Examples
    --------
    >>> import tempfile
    >>> from skcarrot.tools.bench import run_cell
    >>> [row] = run_cell(("digits", ("digits",), 1, 1, "zeroshot"), root=None, out=tempfile.mkdtemp())
    >>> row["method"], row["queries"], row["fitted_on"]
    ('zeroshot', 0, 'digits')
    """
    fit_on, scored, k, seed, method = cell
    backend = open_model(model, pretrained)  # weights: a per-process cache
    model, pretrained = backend.model_name, backend.pretrained
    if datasets is None:
        datasets = _DatasetCache()
    fit_set = datasets.get_dataset(fit_on, root)
    task = sample_few_shot(fit_set, k, seed)
    est = make_estimator(method, fit_on, k, seed, backend, task.classnames, budget)
    start = time.perf_counter()
    est.fit(task.X_train, task.y_train)
    seconds = time.perf_counter() - start
    rows = []
    for d in scored:
        ds = datasets.get_dataset(d, root)
        X_test, y_test = ds.test
        acc = _accuracy(est, X_test, y_test, ds.label_subset)
        row = {
            "dataset": d, "shots": k, "seed": seed, "method": method, "kind": METHODS[method][0],
            "accuracy": round(100 * acc, 3), "queries": int(getattr(est, "n_queries_", 0)),
            "fit_seconds": round(seconds, 3), "model": model,
            "pretrained": os.path.basename(str(pretrained)) if pretrained else None,
            "fitted_on": fit_on,
        }
        _write_cell(Path(out), row)
        rows.append(row)
    return rows


def _run_cell_on_worker(cell: tuple, torch_threads: int | None = None, **kwargs) -> list[dict]:
    """A cluster task: one cell, with torch limited to the worker's threads (or ``torch_threads``)."""
    import torch

    if torch_threads is None:
        from distributed import get_worker

        torch_threads = max(1, int(get_worker().state.nthreads))
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    return run_cell(cell, datasets=_WORKER_DATASETS, **kwargs)


class BenchError(RuntimeError):
    """Some cells failed on the cluster; the others are saved and a rerun retries the failed ones."""


def _cell_name(cell: tuple) -> str:
    fit_on, _, k, seed, method = cell
    return f"{fit_on} {k}-shot seed {seed} {method}"


def _run_on_cluster(client, todo: list[tuple], *, out_dir: Path, bar, resources: dict | None,
                    torch_threads: int | None, **kwargs) -> tuple[dict, list]:
    """Submit one task per cell; save and count the cells as they finish, whatever their order."""
    from distributed import as_completed

    if resources:
        offered = [w.get("resources", {}) for w in client.scheduler_info().get("workers", {}).values()]
        if offered and not any(all(r.get(name, 0) >= amount for name, amount in resources.items()) for r in offered):
            warnings.warn(f"no worker of the cluster offers the resources {resources}: the cells wait for one that does",
                          stacklevel=3)
    futures = {}
    for cell in todo:
        fit_on, _, k, seed, method = cell
        key = f"skcarrot-bench-{fit_on}-{k}shot-seed{seed}-{method}-{uuid.uuid4().hex[:8]}"
        future = client.submit(_run_cell_on_worker, cell, torch_threads=torch_threads, out=str(out_dir),
                               key=key, pure=False, resources=resources or None, **kwargs)
        futures[future] = cell
    finished, errors = {}, []
    for future in as_completed(futures):
        cell = futures.pop(future)
        try:
            rows = future.result()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # a failing (or cancelled) cell does not stop the others
            errors.append((cell, exc))
            bar.update(len(cell[1]))
            continue
        finally:
            future.release()
        for row in rows:
            key = tuple(row[k] for k in _RUN_KEYS)
            if not cell_path(out_dir, *key).exists():  # workers without the client's filesystem
                _write_cell(out_dir, row)
            finished[key] = row
        bar.set_description(_cell_name(cell))
        bar.update(len(rows))
    return finished, errors


def _parse_resources(resources) -> dict | None:
    if not resources:
        return None
    if isinstance(resources, dict):
        return {str(k): float(v) for k, v in resources.items()}
    parsed = {}
    for item in resources:
        name, sep, amount = str(item).partition("=")
        try:
            parsed[name.strip()] = float(amount) if sep else 1.0
        except ValueError:
            raise ValueError(f"resource {item!r} should be NAME=AMOUNT, e.g. GPU=1") from None
        if not name.strip():
            raise ValueError(f"resource {item!r} should be NAME=AMOUNT, e.g. GPU=1")
    return parsed


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
    scheduler: str | None = None,
    workers: int | None = None,
    client=None,
    resources=None,
    torch_threads: int | None = None,
) -> list[dict]:
    """Run every (dataset, shots, seed, method) cell not yet in ``out/cells/``; write the summary.

    Parameters
    ----------
    root : str or None
        Folder holding the dataset folders (not needed for ``digits`` / ``fashion_mnist``).
    datasets, shots, seeds, methods : lists
        The grid; see :data:`METHODS` and :data:`skcarrot.datasets.DATASETS`.
    out : str
        Output folder: ``cells/`` (one JSON file per cell), ``results.jsonl`` (every row),
        ``summary.csv``, ``summary.md``.
    model, pretrained : str or None
        open_clip model and weights; None: the embedded model.
    budget : int or None
        Query budget of every fit; None: the paper's, by shots.
    quiet : bool
        No progress bar.
    scheduler : str or None
        Address of a running Dask scheduler (``tcp://host:8786``): the cells run on its workers.
    workers : int or None
        Start a Dask ``LocalCluster`` of this many worker processes (one thread each) for the cells.
    client : distributed.Client or None
        A Dask client to run the cells on (instead of ``scheduler`` / ``workers``).
    resources : dict, list of "NAME=AMOUNT" or None
        Dask resources each cell holds while it runs (e.g. ``{"GPU": 1}``); only workers
        that declare them run cells.
    torch_threads : int or None
        torch threads of a cell on a worker; None: the worker's thread count.
        (Without a cluster, torch keeps its own setting.)

    Without ``scheduler``, ``workers`` or ``client`` the cells run one after another in this
    process. Either way each cell is seeded on its own, so the numbers are the same.

    Returns
    -------
    rows : list of dict
        Every finished run, old and new.

    Raises
    ------
    BenchError
        When cells failed on a cluster (the others are saved, and the summary written).

    Examples
    --------
    >>> import tempfile
    >>> from skcarrot.tools.bench import run_bench
    >>> rows = run_bench(root=None, datasets=["digits"], shots=[1], seeds=[1], methods=["zeroshot"],
    ...                  out=tempfile.mkdtemp(), quiet=True)
    >>> rows[0]["method"], rows[0]["queries"]
    ('zeroshot', 0)
    """
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown:
        raise ValueError(f"unknown dataset(s) {unknown}; known: {', '.join(DATASETS)}")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; known: {', '.join(METHODS)}")
    if sum(x is not None for x in (scheduler, workers, client)) > 1:
        raise ValueError("give at most one of scheduler, workers and client")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    resources = _parse_resources(resources)
    open_model(model, pretrained, check=True)  # a name that can not be loaded fails before any cell runs

    out_dir = Path(out).resolve()  # workers may not share this process's working directory
    out_dir.mkdir(parents=True, exist_ok=True)
    _migrate_results_jsonl(out_dir)
    done = read_cells(out_dir)

    plan = plan_cells(datasets, shots, seeds, methods)
    todo = []  # each fit with the datasets it has yet to score
    for fit_on, scored, k, seed, method in plan:
        missing = tuple(d for d in scored if (d, k, seed, method) not in done)
        if missing:
            todo.append((fit_on, missing, k, seed, method))
    total = sum(len(c[1]) for c in plan)
    bar = progress_bar(total, "run", enabled=not quiet)
    bar.update(total - sum(len(c[1]) for c in todo))
    kwargs = dict(root=None if root is None else os.path.abspath(root), model=model, pretrained=pretrained,
                  budget=budget)
    errors = []
    try:
        if todo and (scheduler is not None or workers is not None or client is not None):
            with _dask_client(scheduler, workers, client, resources) as dask_client:
                finished, errors = _run_on_cluster(dask_client, todo, out_dir=out_dir, bar=bar,
                                                   resources=resources, torch_threads=torch_threads, **kwargs)
            done.update(finished)
        else:
            loaded = _DatasetCache()
            for cell in todo:
                bar.set_description(_cell_name(cell))
                for row in run_cell(cell, out=out_dir, datasets=loaded, **kwargs):
                    done[tuple(row[k] for k in _RUN_KEYS)] = row
                    bar.update(1)
    finally:
        bar.close()
    rows = [done[key] for key in sorted(done, key=lambda t: tuple(map(str, t)))]
    _write_results_jsonl(rows, out_dir)
    write_summary(rows, out_dir)
    if errors:
        _, first_exc = errors[0]
        raise BenchError(
            f"{len(errors)} cell(s) failed (the others are saved in {out_dir}; rerun to retry these): "
            + ", ".join(_cell_name(c) for c, _ in errors[:5]) + (", ..." if len(errors) > 5 else "")
            + f"; first error: {type(first_exc).__name__}: {first_exc}"
        ) from first_exc
    return rows


@contextmanager
def _dask_client(scheduler: str | None, workers: int | None, client, resources: dict | None):
    """The client to submit cells to: the one given, one connected to ``scheduler``, or a LocalCluster's
    (whose workers then offer ``resources``)."""
    if client is not None:
        yield client
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise ImportError(f"{exc}; running the benchmark on a cluster needs: pip install 'dask[distributed]'") from exc
    if scheduler is not None:
        with Client(scheduler) as connected:
            yield connected
        return
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      resources=resources) as cluster:
        with Client(cluster) as connected:
            yield connected


def write_summary(rows: list[dict], out_dir: Path) -> None:
    """Mean and std over seeds per (dataset, shots, method), as CSV and Markdown, with paper numbers.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from skcarrot.tools.bench import write_summary
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
    >>> from skcarrot.tools.bench import list_text
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
