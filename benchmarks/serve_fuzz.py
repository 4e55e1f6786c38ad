"""Fuzz every endpoint of a live ``skcarrot serve`` with the schemathesis command line.

    nice -n 10 python benchmarks/serve_fuzz.py [--max-examples 100] [--seed 0]

Starts the server (embedded model, fresh SQLite ledger) on 127.0.0.1, creates a key with a
large budget, runs ``schemathesis run <url>/openapi.json`` with valid and invalid cases
(``--mode all``) and the ``not_a_server_error`` check, then prints schemathesis's summary
(the number of operations and test cases) and the server's own count of responses by
status class. Exits non-zero if any response was a 5xx.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
from servekit import ServerProcess  # noqa: E402

from skcarrot.serve.ledger import Ledger  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-examples", type=int, default=100, help="cases per operation and phase (default 100)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = f"sqlite:///{tmp}/ledger.db"
        ledger = Ledger(db)
        key = ledger.create_key("fuzzer", budget=10**12)[1]
        ledger.dispose()
        with ServerProcess(db) as server:
            server.start()
            cmd = [
                os.path.join(os.path.dirname(sys.executable), "schemathesis"), "run", f"{server.url}/openapi.json",
                "--checks", "not_a_server_error", "--mode", "all", "--max-examples", str(args.max_examples),
                "--seed", str(args.seed), "--header", f"Authorization: Bearer {key}", "--no-color",
                "--request-timeout", "60",
            ]
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=tmp)
            metrics = httpx.get(f"{server.url}/metrics").text
    print(run.stdout[-4000:].replace(key, "<key>"))
    by_class = {}
    for line in metrics.splitlines():
        m = re.match(r'skcarrot_requests_total\{.*status="(\d)\d\d"\} ([0-9.e+]+)', line)
        if m:
            by_class[m.group(1) + "xx"] = by_class.get(m.group(1) + "xx", 0) + int(float(m.group(2)))
    print("server responses by status class:", dict(sorted(by_class.items())))
    sys.exit(1 if by_class.get("5xx", 0) else run.returncode)


if __name__ == "__main__":
    main()
