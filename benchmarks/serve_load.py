"""Loopback load test of ``skcarrot serve``, and the cost of tuning over HTTP.

    nice -n 10 python benchmarks/serve_load.py [--requests 200] [--concurrency 4] [--max-seconds 60]
                                               [--budget 8000] [--repeats 2] [--threads 1] [--db sqlite|postgresql]

Everything runs on 127.0.0.1 and stops by itself. In one run it:

1. starts ``skcarrot serve`` (the embedded model) in a subprocess, on a fresh SQLite ledger;
2. sends a fixed number of ``POST /v1/score`` requests shaped like one CARROT generation on
   digits (40 prompts x 160 images x 10 classes), from ``--concurrency`` clients, within
   ``--max-seconds``, and reports throughput and p50 / p99 latency;
3. fits the same ``CarrotClassifier(query_budget=8000, random_state=0)`` on digits (16 shots)
   in process and over HTTP, ``--repeats`` times each, alternated, and reports the ratio of the
   fastest of each (wall clock, and CPU seconds of client and server), the largest difference
   of the predicted probabilities, and that the ledger's count equals the client's.

Pixels cross once: the script also reports how many upload requests the HTTP fit made.
"""

import argparse
import concurrent.futures
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from servekit import ServerProcess, postgres_cluster  # noqa: E402

from skcarrot import CarrotClassifier, HTTPBackend  # noqa: E402
from skcarrot.backends import embedded_backend  # noqa: E402
from skcarrot.datasets import DIGIT_WORDS, few_shot_split, load_digit_images  # noqa: E402
from skcarrot.images import to_pil_images  # noqa: E402
from skcarrot.serve.ledger import Ledger  # noqa: E402


def load_test(url, key, images, names, n_requests, concurrency, max_seconds, popsize=40):
    backend = HTTPBackend(url, api_key=key)
    n_ctx, dim = backend.context_shape
    backend.logits(images, names, np.zeros((1, n_ctx, dim), np.float32))  # upload once, warm up
    rng = np.random.RandomState(0)
    offsets = [rng.normal(scale=0.05, size=(popsize, n_ctx, dim)).astype(np.float32) for _ in range(8)]
    deadline = time.perf_counter() + max_seconds
    latencies = []

    def one(i):
        if time.perf_counter() > deadline:
            return None
        start = time.perf_counter()
        backend.logits(images, names, offsets[i % len(offsets)])
        return time.perf_counter() - start

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for latency in pool.map(one, range(n_requests)):
            if latency is not None:
                latencies.append(latency)
    wall = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "seconds": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 2),
        "queries_per_s": round(len(latencies) * popsize / wall, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--budget", type=int, default=8000, help="query budget of the fits (default 8000)")
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--repeats", type=int, default=2, help="fits of each kind, alternated; the fastest counts")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch and BLAS threads of both processes (default: the libraries'); 1 compares "
                             "like with like on a machine shared with other work")
    args = parser.parse_args()
    server_env = {}
    if args.threads:
        import torch
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)
        server_env = {
            name: str(args.threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
        }

    X, y = load_digit_images()
    Xtr, ytr, Xte, yte = few_shot_split(X, y, 16, seed=0)
    names = list(DIGIT_WORDS)
    images = to_pil_images(Xtr)
    report = {"cpu_count": os.cpu_count(), "threads": args.threads}

    with tempfile.TemporaryDirectory() as tmp, \
            (postgres_cluster() if args.db == "postgresql" else _sqlite(tmp)) as db:
        ledger = Ledger(db)
        with ServerProcess(db, env=server_env) as server:
            server.start()
            load_key = ledger.create_key("load", budget=10**9)[1]
            report["load"] = load_test(server.url, load_key, images, names, args.requests, args.concurrency,
                                       args.max_seconds)
            report["load"].update(prompts=40, images=len(images), classes=len(names), concurrency=args.concurrency)
            print("load:", json.dumps(report["load"]), flush=True)

            settings = dict(query_budget=args.budget, random_state=0)
            runs = {"in_process": [], "http": []}
            for repeat in range(args.repeats):
                # alternate the two, so a burst of load from elsewhere hits both alike
                start, cpu = time.perf_counter(), time.process_time()
                local = CarrotClassifier(backend=embedded_backend(), **settings).fit(Xtr, ytr)
                runs["in_process"].append((time.perf_counter() - start, time.process_time() - cpu))
                fit_key = ledger.create_key(f"fit-{repeat}", budget=args.budget + 10)[1]
                backend = HTTPBackend(server.url, api_key=fit_key)
                start, cpu, cpu_server = time.perf_counter(), time.process_time(), _cpu_seconds(server.proc.pid)
                remote = CarrotClassifier(backend=backend, **settings).fit(Xtr, ytr)
                runs["http"].append((time.perf_counter() - start,
                                     time.process_time() - cpu + _cpu_seconds(server.proc.pid) - cpu_server))
                print(f"repeat {repeat}: in process {runs['in_process'][-1][0]:.1f} s, "
                      f"over HTTP {runs['http'][-1][0]:.1f} s", flush=True)
            t_local, cpu_local = min(runs["in_process"])
            t_http, cpu_http = min(runs["http"])
            uploads = _metric(server.url, 'skcarrot_requests_total{method="POST",route="/v1/images",status="200"}')
            scores = _metric(server.url, 'skcarrot_requests_total{method="POST",route="/v1/score",status="200"}')
            used = ledger.find_key(f"fit-{args.repeats - 1}").prompts_used
            proba_diff = float(np.abs(remote.predict_proba(Xte) - local.predict_proba(Xte)).max())
            accuracy = float(remote.score(Xte, yte))
        report["fit"] = {
            "queries": int(remote.n_queries_),
            "in_process_s": round(t_local, 2),
            "http_s": round(t_http, 2),
            "ratio": round(t_http / t_local, 3),
            "runs_s": {k: [round(w, 2) for w, _ in v] for k, v in runs.items()},
            # CPU seconds (client + server process) are steadier than wall time on a shared machine
            "in_process_cpu_s": round(cpu_local, 2),
            "http_cpu_s": round(cpu_http, 2),
            "cpu_ratio": round(cpu_http / cpu_local, 3),
            "max_abs_proba_diff": proba_diff,
            "held_out_accuracy_http": round(accuracy, 4),
            "ledger_equals_client": used == remote.n_queries_,
            "upload_requests_in_run": uploads,
            "score_requests_in_run": scores,
        }
        ledger.dispose()
    print("fit:", json.dumps(report["fit"]), flush=True)
    print(json.dumps(report, indent=2))


class _sqlite:
    def __init__(self, tmp):
        self.url = f"sqlite:///{tmp}/ledger.db"

    def __enter__(self):
        return self.url

    def __exit__(self, *exc):
        return False


def _cpu_seconds(pid):
    """User + system CPU seconds of a process so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _metric(url, line_start):
    import httpx

    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(line_start):
            return int(float(line.split()[-1]))
    return 0


if __name__ == "__main__":
    main()
