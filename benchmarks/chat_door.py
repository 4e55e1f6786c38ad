"""The chat door, measured: zero-shot, refine-only, instruction search, CARROT and the default, through HTTP.

    python benchmarks/chat_door.py [--seeds 100 ... 109] [--shots 1 2 4 8 16] [--tasks digits fashion digits+fashion]
                                   [--methods ...] [--budget N | --paper-budgets] [--out bench_output/chat_door]
                                   [--markdown MD] [--plot PNG] [--summary-only]

The black box is the embedded micro chat model served by ``skcarrot serve`` (a subprocess on
127.0.0.1, fresh SQLite ledger, one key), reached through :class:`skcarrot.backends.ChatVLMBackend`
and the ``openai`` client, exactly as a hosted chat model would be. Every fit starts with an
empty answer cache, so each one pays for its own calls.

Tasks and held-out sets are those of ``when_it_pays.py`` (sklearn digits upsampled to 28x28,
Fashion-MNIST's test split, the two together as 20 classes; 600 held-out images scored by the
fitted estimator, through the same server). Methods:

- ``zeroshot``: the default instruction and class names, no refiner;
- ``refine``: refine-only (the refiner on the option log-probabilities of the default instruction);
- ``search``: instruction and class-description search only, no refiner;
- ``carrot``: both modules, with the consistency loss;
- ``default``: ``CarrotClassifier(backend=...)`` as shipped (``prompt_tuning="auto"``).

The fixed methods use ``early_stopping=False``. Each cell is one JSON file under ``--out``
(finished cells are skipped: the study resumes). The summary gives mean accuracy, calls and
tokens of each method, paired 95% intervals against refine-only and zero-shot, and the
default's bars: at least the best fixed method minus 0.5, and at most 25% of the budget where
the search does not pay (CARROT's paired interval over refine-only not above 0).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from when_it_pays import _names, interval, split  # noqa: E402  (the same tasks and splits)

TASKS = ("digits", "fashion", "digits+fashion")
FIXED = {
    "zeroshot": dict(prompt_tuning=False, refinement=False),
    "refine": dict(prompt_tuning=False, early_stopping=False),
    "search": dict(prompt_tuning=True, refinement=False, early_stopping=False),
    "carrot": dict(prompt_tuning=True, early_stopping=False),
}
METHODS = (*FIXED, "default")
KEY_ENV = "SKCARROT_CHAT_KEY"


def serve():
    """``skcarrot serve`` on a fresh ledger with one key; ``(server, url)``. The key goes to ``KEY_ENV``."""
    from servekit import ServerProcess

    from skcarrot.serve.ledger import Ledger

    db = f"sqlite:///{tempfile.mkdtemp(prefix='chat_door_')}/ledger.db"
    server = ServerProcess(db, env={"OMP_NUM_THREADS": "1"}).start()
    _, key = Ledger(db).create_key("chat-door-benchmark", budget=10**9)
    os.environ[KEY_ENV] = key
    return server, server.url


def backend(url):
    from skcarrot.backends import ChatVLMBackend

    return ChatVLMBackend(base_url=f"{url}/v1", model="skcarrot-micro-chat", api_key_env=KEY_ENV, cache=None)


def estimator(method, task, url, seed, budget):
    from skcarrot import CarrotClassifier

    params = dict(backend=backend(url), class_names=_names(task), random_state=seed)
    if budget is not None:
        params["query_budget"] = budget
    return CarrotClassifier(**params, **FIXED.get(method, {}))


def run_cell(out, url, task, shots, seed, method, budget):
    from skcarrot.doors import ChatDoor

    path = Path(out) / f"{task}_{shots}_{seed}_{method}.json"
    if path.exists():
        return json.loads(path.read_text())
    Xtr, ytr, Xte, yte = split(task, shots, seed)
    est = estimator(method, task, url, seed, budget)
    start = time.perf_counter()
    est.fit(Xtr, ytr)
    seconds = time.perf_counter() - start
    record = {
        "task": task, "shots": shots, "seed": seed, "method": method,
        "accuracy": float(est.score(Xte, yte)),
        "calls": int(est.n_calls_), "input_tokens": int(est.n_input_tokens_),
        "output_tokens": int(est.n_output_tokens_), "queries": int(est.n_queries_),
        "budget": budget if budget is not None else ChatDoor.default_budget, "seconds": seconds,
        "selection": getattr(est, "selection_", None),
        "prompt": getattr(est, "prompt_", None),
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, default=str))
    os.replace(tmp, path)
    return record


def table_of(records):
    table = {}
    for r in records:
        table.setdefault((r["task"], r["shots"]), {}).setdefault(r["method"], {})[r["seed"]] = r
    return table


def summary(table, methods):
    head = ["task", "shots", *methods]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    costs = ["| task | shots | method | calls | input tokens | output tokens |", "|---|---|---|---|---|---|"]
    diffs = ["| task | shots | method | minus refine-only | 95% interval | minus zero-shot | 95% interval | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for key in sorted(table):
        row = table[key]
        cells = []
        for m in methods:
            values = row.get(m, {})
            cells.append(f"{100 * np.mean([v['accuracy'] for v in values.values()]):.1f}" if values else "")
            if values:
                costs.append(f"| {key[0]} | {key[1]} | {m} | {np.mean([v['calls'] for v in values.values()]):,.0f} | "
                             f"{np.mean([v['input_tokens'] for v in values.values()]):,.0f} | "
                             f"{np.mean([v['output_tokens'] for v in values.values()]):,.0f} |")
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
        for m in methods:
            parts = []
            for base in ("refine", "zeroshot"):
                seeds = sorted(set(row.get(base, {})) & set(row.get(m, {})))
                if m == base or len(seeds) < 2:
                    parts += ["", ""]
                    continue
                mean, lo, hi = interval([100 * (row[m][s]["accuracy"] - row[base][s]["accuracy"]) for s in seeds])
                parts += [f"{mean:+.2f}", f"[{lo:+.2f}, {hi:+.2f}]"]
            if any(parts):
                n = len(set(row.get("refine", {})) & set(row.get(m, {})))
                diffs.append(f"| {key[0]} | {key[1]} | {m} | " + " | ".join(parts) + f" | {n} |")
    return "\n".join(lines), "\n".join(costs), "\n".join(diffs)


def bars(table):
    """The default's two bars, per (task, shots); and refine-only's gain over zero-shot."""
    lines = ["| task | shots | refine − zero-shot | best fixed | default | default's calls | search pays | "
             "accuracy bar | spending bar |", "|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(table):
        row = table[key]
        if not all(m in row for m in METHODS):
            continue
        seeds = sorted(set.intersection(*(set(row[m]) for m in METHODS)))
        if len(seeds) < 2:
            continue
        acc = {m: 100 * np.mean([row[m][s]["accuracy"] for s in seeds]) for m in METHODS}
        gain = interval([100 * (row["refine"][s]["accuracy"] - row["zeroshot"][s]["accuracy"]) for s in seeds])
        _, lo, _ = interval([100 * (row["carrot"][s]["accuracy"] - row["refine"][s]["accuracy"]) for s in seeds])
        pays = lo > 0
        best = max(acc[m] for m in FIXED)
        calls = np.mean([row["default"][s]["calls"] for s in seeds])
        cap = np.mean([row["default"][s]["budget"] for s in seeds])
        ok_acc = acc["default"] >= best - 0.5
        ok_spend = pays or calls <= 0.25 * cap
        lines.append(f"| {key[0]} | {key[1]} | {gain[0]:+.1f} [{gain[1]:+.1f}, {gain[2]:+.1f}] | {best:.1f} | "
                     f"{acc['default']:.1f} | {calls:,.0f} of {cap:,.0f} | {'yes' if pays else 'no'} | "
                     f"{'ok' if ok_acc else 'MISSED'} | {'ok' if ok_spend else 'MISSED'} |")
    return "\n".join(lines)


def plot(table, methods, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({task for task, _ in table})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for m in methods:
            xs, ys = [], []
            for shots in sorted(k for t, k in table if t == task):
                values = table[(task, shots)].get(m)
                if values:
                    xs.append(max(np.mean([v["calls"] for v in values.values()]), 1))
                    ys.append(100 * np.mean([v["accuracy"] for v in values.values()]))
            if xs:
                ax.plot(xs, ys, marker="o", label=m)
        ax.set_xscale("log")
        ax.set_title(f"{task} (chat door)")
        ax.set_xlabel("calls to the chat model (log)")
        ax.set_ylabel("held-out accuracy (%)")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(100, 110)))
    parser.add_argument("--shots", type=int, nargs="+", default=[16])
    parser.add_argument("--tasks", nargs="+", default=["digits"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--budget", type=int, default=None, help="query_budget of every fit (default: the door's)")
    parser.add_argument("--paper-budgets", action="store_true",
                        help="the paper's budget for the shots (skcarrot.tools.presets.budget_for_shots), as calls")
    parser.add_argument("--out", default="bench_output/chat_door")
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--plot", default=None)
    parser.add_argument("--summary-only", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    cells = [(t, k, s, m) for k in args.shots for s in args.seeds for t in args.tasks for m in args.methods]
    todo = [c for c in cells if not (Path(args.out) / "{}_{}_{}_{}.json".format(*c)).exists()]
    if todo and not args.summary_only:
        server, url = serve()
        try:
            print(f"{len(todo)} of {len(cells)} cells to run against {url}", flush=True)
            for i, (task, shots, seed, method) in enumerate(todo, 1):
                budget = args.budget
                if args.paper_budgets:
                    from skcarrot.tools.presets import budget_for_shots

                    budget = budget_for_shots(shots)
                r = run_cell(args.out, url, task, shots, seed, method, budget)
                print(f"[{i}/{len(todo)}] {task} {shots} shots seed {seed} {method}: {100 * r['accuracy']:.1f}% "
                      f"{r['calls']} calls {r['input_tokens']:,} in {r['output_tokens']} out tokens "
                      f"{r['seconds']:.0f}s", flush=True)
        finally:
            server.stop()
    records = [json.loads(p.read_text()) for p in Path(args.out).glob("*.json")]
    records = [r for r in records if r["seed"] in args.seeds and r["shots"] in args.shots and r["task"] in args.tasks]
    table = table_of(records)
    methods = [m for m in args.methods if any(r["method"] == m for r in records)]
    accuracy, costs, diffs = summary(table, methods)
    text = "\n\n".join([accuracy, costs, diffs, bars(table)])
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.plot:
        plot(table, methods, args.plot)


if __name__ == "__main__":
    main()
