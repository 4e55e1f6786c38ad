"""The same fit in process and over HTTP: the ratio, and where the difference goes.

    python benchmarks/http_vs_in_process.py [--budget 8000] [--repeats 3] [--threads 1] [--handwritten]
                                            [--before PATH_TO_ANOTHER_SOURCE_TREE]

Everything runs on 127.0.0.1 and stops by itself. It fits
``CarrotClassifier(query_budget=8000, prompt_tuning=True, early_stopping=False, random_state=0)``
on digits (16 shots) with the embedded model in process, then over HTTP against
``skcarrot serve`` (a subprocess, fresh SQLite ledger), ``--repeats`` times each,
alternated, after one small warm-up fit of each kind; the fastest of each counts. Both
processes run ``--threads`` torch and BLAS threads (default 1: like with like on a
machine shared with other work).

It reports the ratio of wall times (HTTP / in process), the same of CPU seconds (client
and server together), that both fits end with the same model and that the server's
ledger equals the client's count, and the HTTP fit's requests (scoring, uploads) with
what each costs on top of the model, per request:

- ``client_ms``: CPU of the client beyond the in-process fit's own work (the in-process
  fit's CPU less the model's, measured around each of its model calls);
- ``server_ms``: CPU of the server beyond the model's (as measured in process);
- ``wait_ms``: wall time neither process was working (the HTTP fit's wall time less its
  CPU seconds, the two processes taking turns; negative where they worked at once);
- ``wall_ms``: the whole difference of wall time.

With ``--before PATH`` (an unpacked ``git archive`` of an earlier commit, say) the same is
measured for that version, in the same run, from its own sources (client, server and
estimator alike). With ``--handwritten`` this tree is measured a second time with the
hand-written HTTP/1.1 client the package once had (``handwritten_http.py``) in place of
urllib3: the two transports side by side.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _cpu_seconds(pid):
    """User + system CPU seconds of a process so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _requests(url):
    """200 answers of the server so far, by route."""
    import httpx

    counts = {"/v1/score": 0, "/v1/images": 0}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        for route in counts:
            if line.startswith(f'skcarrot_requests_total{{method="POST",route="{route}",status="200"}}'):
                counts[route] = int(float(line.split()[-1]))
    return counts


def _use_the_handwritten_client():
    """Put the hand-written HTTP/1.1 client (``handwritten_http.py``) under the remote backends, for comparison."""
    import httpx

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import handwritten_http

    from skcarrot.backends.remote import _client

    class Handwritten:
        def __init__(self, url, timeout, most, alive):
            self.inner = handwritten_http.PlainClient(timeout, most, alive)

        def request(self, *args, **kwargs):
            try:
                return self.inner.request(*args, **kwargs)
            except httpx.TransportError as exc:
                raise _client.TransportError(str(exc)) from exc

    _client.Transport = Handwritten


def measure(tree, budget, repeats, threads, handwritten=False):
    """The fits of the skcarrot at ``tree`` (this process imports it): timings and counts."""
    sys.path[:0] = [tree, str(Path(tree) / "tests")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if handwritten:
        _use_the_handwritten_client()
    import numpy as np
    import torch
    from servekit import ServerProcess
    from threadpoolctl import threadpool_limits

    from skcarrot import CarrotClassifier, HTTPBackend
    from skcarrot.backends import embedded_backend
    from skcarrot.datasets import few_shot_split, load_digit_images
    from skcarrot.serve.ledger import Ledger

    torch.set_num_threads(threads)
    threadpool_limits(threads)
    X, y = load_digit_images()
    Xtr, ytr, Xte, _ = few_shot_split(X, y, 16, seed=0)
    settings = dict(query_budget=budget, prompt_tuning=True, early_stopping=False, random_state=0)

    model_cpu = [0.0]
    local_backend = embedded_backend()
    logits = local_backend.logits

    def timed_logits(*args, **kwargs):
        start = time.thread_time()
        try:
            return logits(*args, **kwargs)
        finally:
            model_cpu[0] += time.thread_time() - start

    local_backend.logits = timed_logits
    runs = {"in_process": [], "http": []}
    with tempfile.TemporaryDirectory() as tmp:
        db = f"sqlite:///{tmp}/ledger.db"
        ledger = Ledger(db)
        env = {name: str(threads) for name in _THREAD_VARIABLES}
        with ServerProcess(db, env=env, tree=tree) as server:
            server.start()
            warm = {**settings, "query_budget": 200}
            CarrotClassifier(backend=local_backend, **warm).fit(Xtr, ytr)
            CarrotClassifier(backend=HTTPBackend(server.url, api_key=ledger.create_key("warm", 10**6)[1]),
                             **warm).fit(Xtr, ytr)
            for repeat in range(repeats):
                # alternated, so a burst of load from elsewhere hits both alike
                model_cpu[0] = 0.0
                start, cpu = time.perf_counter(), time.process_time()
                local = CarrotClassifier(backend=local_backend, **settings).fit(Xtr, ytr)
                runs["in_process"].append((time.perf_counter() - start, time.process_time() - cpu, model_cpu[0]))
                name = f"fit-{repeat}"
                backend = HTTPBackend(server.url, api_key=ledger.create_key(name, budget=budget + 10)[1])
                before = _requests(server.url)
                start, cpu, served = time.perf_counter(), time.process_time(), _cpu_seconds(server.proc.pid)
                remote = CarrotClassifier(backend=backend, **settings).fit(Xtr, ytr)
                wall, client = time.perf_counter() - start, time.process_time() - cpu
                after = _requests(server.url)
                runs["http"].append((wall, client, _cpu_seconds(server.proc.pid) - served,
                                     {route: after[route] - before[route] for route in after},
                                     ledger.find_key(name).prompts_used == remote.n_queries_))
                print(f"  {Path(tree).name}: repeat {repeat}: in process {runs['in_process'][-1][0]:.2f} s, "
                      f"over HTTP {wall:.2f} s", file=sys.stderr, flush=True)
            proba_diff = float(np.abs(remote.predict_proba(Xte) - local.predict_proba(Xte)).max())
            queries = int(remote.n_queries_)
        ledger.dispose()
    return {"runs": runs, "max_abs_proba_diff": proba_diff, "queries": queries}


def summary(measured):
    """Ratios and the per-request breakdown from :func:`measure`'s runs (fastest of each kind)."""
    runs = measured["runs"]
    t_local, cpu_local, model = min(runs["in_process"])
    wall, client, server, requests, _ = min(runs["http"], key=lambda run: run[0])
    cpu_http = min(run[1] + run[2] for run in runs["http"])
    n = sum(requests.values())
    return {
        "queries": measured["queries"],
        "in_process_s": round(t_local, 2),
        "http_s": round(wall, 2),
        "ratio": round(wall / t_local, 3),
        "in_process_cpu_s": round(cpu_local, 2),
        "http_cpu_s": round(cpu_http, 2),
        "cpu_ratio": round(cpu_http / cpu_local, 3),
        "runs_s": {"in_process": [round(r[0], 2) for r in runs["in_process"]],
                   "http": [round(r[0], 2) for r in runs["http"]]},
        "requests": {"score": requests["/v1/score"], "upload": requests["/v1/images"]},
        "per_request": {
            "client_ms": round((client - (cpu_local - model)) / n * 1000, 2),
            "server_ms": round((server - model) / n * 1000, 2),
            "wait_ms": round((wall - client - server) / n * 1000, 2),
            "wall_ms": round((wall - t_local) / n * 1000, 2),
        },
        "model_cpu_s": round(model, 2),
        "max_abs_proba_diff": measured["max_abs_proba_diff"],
        "ledger_equals_client": all(run[4] for run in runs["http"]),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=8000, help="query budget of the fits (default 8000)")
    parser.add_argument("--repeats", type=int, default=3, help="fits of each kind, alternated; the fastest counts")
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads of both processes")
    parser.add_argument("--before", default=None, help="source tree of another version, measured too")
    parser.add_argument("--handwritten", action="store_true",
                        help="also measure this tree with the hand-written HTTP/1.1 client of handwritten_http.py")
    parser.add_argument("--tree", default=None, help=argparse.SUPPRESS)  # a child measuring one tree
    parser.add_argument("--with-handwritten", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tree:
        print(json.dumps(measure(args.tree, args.budget, args.repeats, args.threads, args.with_handwritten)))
        return
    here = str(Path(__file__).resolve().parent.parent)
    trees = {"now": (here, False)}
    if args.handwritten:
        trees["handwritten"] = (here, True)
    if args.before:
        trees["before"] = (str(Path(args.before).resolve()), False)
    report = {"cpu_count": os.cpu_count(), "threads": args.threads, "budget": args.budget}
    for label, (tree, handwritten) in trees.items():
        # each version in a process of its own, importing its own sources
        env = {**os.environ, "PYTHONPATH": tree, **{name: str(args.threads) for name in _THREAD_VARIABLES}}
        out = subprocess.run(
            [sys.executable, __file__, "--tree", tree, "--budget", str(args.budget), "--repeats", str(args.repeats),
             "--threads", str(args.threads)] + (["--with-handwritten"] if handwritten else []),
            env=env, cwd=tree, check=True, stdout=subprocess.PIPE, text=True,
        ).stdout
        report[label] = summary(json.loads(out.strip().splitlines()[-1]))
        print(f"{label}: {json.dumps(report[label])}", flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
