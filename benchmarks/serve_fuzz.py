"""Fuzz every endpoint of a live ``skcarrot serve`` from its OpenAPI schema, with every schemathesis check.

    nice -n 10 python benchmarks/serve_fuzz.py [--max-examples 100]

Starts the server (embedded model, fresh SQLite ledger, default limits) on 127.0.0.1, creates
a key with a large budget, uploads three images, then runs every built-in schemathesis check
(no server error, documented statuses, content types and headers, response schemas, invalid
data rejected, valid data accepted, missing headers and authentication) on ``--max-examples``
valid and as many invalid cases of every operation, derandomised; valid cases name the
uploaded images so they reach the model. A valid request refused only for what no schema can
state (an unknown image id, bytes that are no image, ...) is counted apart, not as a failure.
Prints the cases, the server's responses by status class and the failures; exits non-zero on
any failure or 5xx.
"""

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import schemathesis  # noqa: E402
from servekit import ServerProcess, auth, fuzz_every_operation, noise_image  # noqa: E402

from skcarrot.serve.ledger import Ledger  # noqa: E402
from skcarrot.wire import png_base64  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-examples", type=int, default=100, help="cases per operation and mode (default 100)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = f"sqlite:///{tmp}/ledger.db"
        ledger = Ledger(db)
        key = ledger.create_key("fuzzer", budget=10**12)[1]
        ledger.dispose()
        with ServerProcess(db) as server:
            server.start()
            files = [png_base64(noise_image(seed, 12)) for seed in range(3)]
            ids = httpx.post(f"{server.url}/v1/images", json={"images": files}, headers=auth(key)).json()["ids"]
            schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
            report = fuzz_every_operation(schema, auth(key), ids, files, args.max_examples)
            metrics = httpx.get(f"{server.url}/metrics").text
    by_class = {}
    for line in metrics.splitlines():
        m = re.match(r'skcarrot_requests_total\{.*status="(\d)\d\d"\} ([0-9.e+]+)', line)
        if m:
            by_class[m.group(1) + "xx"] = by_class.get(m.group(1) + "xx", 0) + int(float(m.group(2)))
    statuses = report["statuses"]
    summary = {
        "operations": report["operations"],
        "cases": len(statuses),
        "cases_by_status_class": {f"{c}xx": sum(1 for s in statuses if s // 100 == c) for c in (2, 4, 5)},
        "server_responses_by_status_class": dict(sorted(by_class.items())),
        "failures": len(report["failures"]),
        "valid_requests_refused_for_what_no_schema_states": report["semantic_refusals"],
    }
    for line in report["failures"][:20]:
        print(line.replace(key, "<key>"))
    print(json.dumps(summary, indent=2))
    sys.exit(1 if report["failures"] or by_class.get("5xx", 0) else 0)


if __name__ == "__main__":
    main()
