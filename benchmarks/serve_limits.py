"""What one key can make ``skcarrot serve`` hold, and what it costs everyone else.

    nice -n 10 python benchmarks/serve_limits.py [--uploads 100] [--queries 1000] [--small 20]
                                                 [--before PATH_TO_ANOTHER_SOURCE_TREE]

Everything runs on 127.0.0.1 and stops by itself. Against ``skcarrot serve`` (embedded model,
fresh SQLite ledger, default limits) in a subprocess, it measures:

1. **Uploads.** The server's resident memory (``VmRSS``, and its peak ``VmHWM``) idle, then
   after ``--uploads`` uploads of distinct 4096 x 4096 PNG images (a few KB each on the wire)
   by a key with budget 0, then by a key with budget 1; the bytes the images take on disk and
   in the decoded-image cache, next to the configured caps.
2. **Stored answers.** Bytes the ledger keeps for idempotent retries after ``--queries``
   queries shaped like a CARROT generation on digits (40 prompts x 160 images x 10 classes per
   request): sent by ``HTTPBackend`` (which acknowledges each answer), and by a client that
   sends an ``Idempotency-Key`` but never acknowledges (any other client).
3. **Turns.** The latency of a 1-query request (1 prompt x 16 images x 10 classes) from one
   key, alone and while another key sends, back to back, its largest allowed request
   (256 prompts x 160 images x 100 classes, under ``max_logits_per_request``).

With ``--before PATH`` (a checkout of another version, e.g. ``git worktree`` or an unpacked
``git archive`` of an earlier commit) every measurement is repeated against that version's
server in the same run, as the baseline.
"""

import argparse
import concurrent.futures
import io
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from PIL import Image  # noqa: E402
from servekit import ServerProcess  # noqa: E402

from skcarrot import HTTPBackend  # noqa: E402
from skcarrot.datasets import DIGIT_WORDS, few_shot_split, load_digit_images  # noqa: E402
from skcarrot.images import to_pil_images  # noqa: E402
from skcarrot.serve import Settings  # noqa: E402
from skcarrot.serve.ledger import Ledger  # noqa: E402
from skcarrot.wire import encode_array  # noqa: E402

MIB = 1024 * 1024


def _memory(pid):
    """Resident and peak resident memory of a process, in MiB (Linux /proc)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024
    return round(fields["VmRSS"], 1), round(fields["VmHWM"], 1)


def _big_png(seed, size=4096):
    """A distinct size x size image that compresses to a few KB: one grey level, one pixel set by ``seed``."""
    img = Image.new("L", (size, size), 128)
    img.putpixel((seed % size, seed // size), 0)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=9)
    import base64

    return base64.b64encode(buf.getvalue()).decode()


def _metric(url, name):
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    return None


def uploads(server, ledger, n_uploads):
    url, pid = server.url, server.proc.pid
    out = {"idle": _memory(pid)}
    files = [_big_png(seed) for seed in range(n_uploads)]
    out["request_kib"] = round(len(files[0]) / 1024, 1)
    for name, budget in (("budget-0", 0), ("budget-1", 1)):
        key = ledger.create_key(f"uploader-{name}-{uuid.uuid4().hex[:6]}", budget=budget)[1]
        statuses = []

        def send(encoded, key=key):
            r = httpx.post(f"{url}/v1/images", json={"images": [encoded]},
                           headers={"Authorization": f"Bearer {key}"}, timeout=300)
            statuses.append(r.status_code)

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(send, files))
        rss, peak = _memory(pid)
        usage = httpx.get(f"{url}/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()
        out[name] = {
            "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
            "seconds": round(time.perf_counter() - start, 1),
            "rss_mib": rss,
            "peak_rss_mib": peak,
            "stored_bytes": usage.get("image_bytes"),
            "cache_bytes": _metric(url, "skcarrot_image_cache_bytes"),
        }
    defaults = Settings(db_url="sqlite://")
    out["caps"] = {
        "image_cache_bytes": defaults.image_cache_bytes,
        "image_cache_bytes_per_key": defaults.image_cache_bytes_per_key,
        "max_image_bytes_per_key": defaults.max_image_bytes_per_key,
    }
    return out


def _stored(db, key_name):
    """Bytes the ledger keeps for one key's idempotent retries: stored answers, and all its rows."""
    engine = sa.create_engine(db)
    with engine.connect() as conn:
        row = conn.execute(sa.text(
            "SELECT COALESCE(SUM(LENGTH(r.response)), 0), COUNT(*), "
            "COALESCE(SUM(LENGTH(r.idempotency_key) + LENGTH(r.fingerprint) + 40), 0) "
            "FROM skcarrot_requests r JOIN skcarrot_keys k ON k.id = r.key_id WHERE k.name = :name"
        ), {"name": key_name}).one()
    engine.dispose()
    return {"answer_bytes": int(row[0]), "rows": int(row[1]), "row_bytes": int(row[2]),
            "total_bytes": int(row[0]) + int(row[2])}


def stored_answers(server, ledger, db, n_queries, images, names, popsize=40):
    url = server.url
    rng = np.random.RandomState(0)
    n_requests = max(1, n_queries // popsize)
    generations = [rng.normal(scale=0.05, size=(popsize, 4, 64)).astype(np.float32) for _ in range(n_requests)]
    out = {"requests": n_requests, "queries": n_requests * popsize}
    # the default client: HTTPBackend acknowledges each answer with its next request
    name = f"acks-{uuid.uuid4().hex[:6]}"
    backend = HTTPBackend(url, api_key=ledger.create_key(name, budget=10**9)[1])
    for offsets in generations:
        backend.logits(images, names, offsets)
    time.sleep(0.5)  # answers are stored just after they are sent
    out["httpbackend"] = _stored(db, name)
    # a client that sends keys but never acknowledges
    name = f"no-acks-{uuid.uuid4().hex[:6]}"
    key = ledger.create_key(name, budget=10**9)[1]
    ids = HTTPBackend(url, api_key=key)._content_ids(images)
    HTTPBackend(url, api_key=key)._upload(images, ids)
    with httpx.Client(timeout=300) as client:
        for offsets in generations:
            r = client.post(f"{url}/v1/score", json={"image_ids": ids, "class_names": names,
                                                     "offsets": encode_array(offsets)},
                            headers={"Authorization": f"Bearer {key}", "Idempotency-Key": uuid.uuid4().hex})
            r.raise_for_status()
    time.sleep(0.5)  # answers are stored just after they are sent
    out["no_acks"] = _stored(db, name)
    for kind in ("httpbackend", "no_acks"):
        out[kind]["bytes_per_1000_queries"] = round(out[kind]["total_bytes"] * 1000 / out["queries"])
    return out


def turns(server, ledger, images, names, n_small):
    url = server.url
    small_key = ledger.create_key(f"small-{uuid.uuid4().hex[:6]}", budget=10**9)[1]
    large_key = ledger.create_key(f"large-{uuid.uuid4().hex[:6]}", budget=10**9)[1]
    small = HTTPBackend(url, api_key=small_key)
    large = HTTPBackend(url, api_key=large_key, timeout=600)
    small_images, small_names = images[:16], names[:10]
    large_names = [f"{names[i % len(names)]} {i}" for i in range(100)]
    one = np.zeros((1, 4, 64), np.float32)
    biggest = np.random.RandomState(1).normal(scale=0.05, size=(256, 4, 64)).astype(np.float32)
    small.logits(small_images, small_names, one)  # upload, warm up
    large.logits(images, large_names, biggest[:1])

    def latencies():
        out = []
        for i in range(n_small):
            start = time.perf_counter()
            small.logits(small_images, small_names, one + 0.001 * i)
            out.append(time.perf_counter() - start)
            time.sleep(0.05)
        return np.array(out) * 1000

    alone = latencies()
    stop, large_s = threading.Event(), []

    def flood():
        while not stop.is_set():
            start = time.perf_counter()
            large.logits(images, large_names, biggest)
            large_s.append(time.perf_counter() - start)

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    time.sleep(0.5)
    during = latencies()
    stop.set()
    thread.join(timeout=600)
    summary = lambda ms: {"p50_ms": round(float(np.percentile(ms, 50)), 1),  # noqa: E731
                          "p95_ms": round(float(np.percentile(ms, 95)), 1), "max_ms": round(float(ms.max()), 1)}
    return {
        "large_request": {"prompts": 256, "images": len(images), "classes": 100,
                          "logits": 256 * len(images) * 100, "seconds": [round(s, 2) for s in large_s]},
        "small_alone": summary(alone),
        "small_during_large": summary(during),
    }


def run_all(tree, args, images, names, label, n_uploads):
    with tempfile.TemporaryDirectory() as tmp:
        db = f"sqlite:///{tmp}/ledger.db"
        ledger = Ledger(db)
        with ServerProcess(db, tree=tree) as server:
            server.start()
            report = {"version": label}
            report["uploads"] = uploads(server, ledger, n_uploads)
            print(label, "uploads:", json.dumps(report["uploads"]), flush=True)
            report["stored_answers"] = stored_answers(server, ledger, db, args.queries, images, names)
            print(label, "stored answers:", json.dumps(report["stored_answers"]), flush=True)
            report["turns"] = turns(server, ledger, images, names, args.small)
            print(label, "turns:", json.dumps(report["turns"]), flush=True)
        ledger.dispose()
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uploads", type=int, default=100)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--small", type=int, default=20, help="1-query requests timed, alone and under load")
    parser.add_argument("--before", default=None, help="source tree of another version, measured as the baseline")
    parser.add_argument("--before-uploads", type=int, default=8,
                        help="uploads sent to the --before version (which may keep each image whole, 48 MiB apiece)")
    args = parser.parse_args()
    X, y = load_digit_images()
    Xtr, _, _, _ = few_shot_split(X, y, 16, seed=0)
    images, names = to_pil_images(Xtr), list(DIGIT_WORDS)
    reports = []
    if args.before:
        reports.append(run_all(args.before, args, images, names, "before", args.before_uploads))
    reports.append(run_all(None, args, images, names, "this version", args.uploads))
    print(json.dumps({"cpu_count": os.cpu_count(), "runs": reports}, indent=2))


if __name__ == "__main__":
    main()
