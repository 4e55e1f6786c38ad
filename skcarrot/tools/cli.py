"""skcarrot command line.

    skcarrot demo [--budget N] [--shots K] [--seed S] [--out DIR]
    skcarrot bench --root DIR --datasets NAME... --shots K... --seeds S... --methods NAME... --out DIR
                   [--scheduler tcp://HOST:8786 | --workers N] [--resources NAME=AMOUNT...]
    skcarrot bench --list
    skcarrot serve [--model NAME --pretrained TAG_OR_FILE] [--db URL] [--host 127.0.0.1 --port 8000] [--workers N]
    skcarrot keys create --name NAME --budget QUERIES [--rate-limit QUERIES_PER_WINDOW] [--db URL]
    skcarrot keys list [--db URL]
    skcarrot keys revoke NAME [--db URL]
    skcarrot keys rotate NAME [--db URL]
    skcarrot keys set-budget NAME QUERIES [--db URL]
    skcarrot keys top-up NAME QUERIES [--db URL]
    skcarrot --version
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from ..backends.models import DEFAULT_TEMPLATE


def main(argv: list[str] | None = None) -> int:
    """Run the ``skcarrot`` command line; returns the exit status.

    Examples
    --------
    >>> from skcarrot.tools.cli import main
    >>> main(["bench", "--list"])  # doctest: +ELLIPSIS
    datasets:
    ...
    0
    """
    parser = argparse.ArgumentParser(prog="skcarrot", description="Few-shot fine-tuning of black-box vision-language models.")
    parser.add_argument("--version", action="version", version=f"skcarrot {__version__}")
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser(
        "demo",
        help="zero-shot, prompt-only, refine-only and CARROT on sklearn digits with the embedded model",
    )
    demo.add_argument("--budget", type=int, default=8000, help="query budget of each fit (default 8000)")
    demo.add_argument("--shots", type=int, default=16, help="training images per class (default 16)")
    demo.add_argument("--seed", type=int, default=0, help="random_state of the split and the fits (default 0)")
    demo.add_argument("--out", default="demo_output", help="folder for the learning-curve PNG (default demo_output)")
    bench = sub.add_parser("bench", help="few-shot benchmark: datasets x shots x seeds x methods, resumable")
    bench.add_argument("--list", action="store_true", help="show datasets, methods and presets, then exit")
    bench.add_argument("--root", help="folder holding the dataset folders (CoOp layout)")
    bench.add_argument("--datasets", nargs="+", default=["digits"], metavar="NAME")
    bench.add_argument("--shots", nargs="+", type=int, default=[16], metavar="K")
    bench.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], metavar="S")
    bench.add_argument("--methods", nargs="+", default=["zeroshot", "bbt", "carrot"], metavar="NAME")
    bench.add_argument("--model", default=None, help="open_clip model name (default: the embedded model)")
    bench.add_argument("--pretrained", default=None, help="pretrained tag or checkpoint path")
    bench.add_argument("--budget", type=int, default=None,
                       help="query budget of every fit (default: the paper's, by shots)")
    bench.add_argument("--out", default="bench_output", help="output folder (default bench_output)")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    cluster = bench.add_mutually_exclusive_group()
    cluster.add_argument("--scheduler", default=None, metavar="ADDRESS",
                         help="run the cells on the workers of this Dask scheduler (e.g. tcp://host:8786)")
    cluster.add_argument("--workers", type=int, default=None, metavar="N",
                         help="run the cells on a local Dask cluster of N worker processes, one thread each")
    bench.add_argument("--resources", nargs="+", default=None, metavar="NAME=AMOUNT",
                       help="Dask resources each cell holds on its worker (e.g. GPU=1: one cell per GPU worker)")
    bench.add_argument("--torch-threads", type=int, default=None, metavar="N",
                       help="torch threads of a cell on a worker (default: the worker's thread count)")
    _add_serve_commands(sub)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "keys":
        return _keys(args, keys_parser=sub.choices["keys"])
    if args.command == "bench":
        from .bench import BenchError, list_text, run_bench

        if args.list:
            print(list_text())
            return 0
        try:
            rows = run_bench(root=args.root, datasets=args.datasets, shots=args.shots, seeds=args.seeds,
                             methods=args.methods, out=args.out, model=args.model, pretrained=args.pretrained,
                             budget=args.budget, quiet=args.quiet, scheduler=args.scheduler, workers=args.workers,
                             resources=args.resources, torch_threads=args.torch_threads)
        except (FileNotFoundError, ValueError, ImportError) as exc:
            print(f"skcarrot bench: error: {exc}", file=sys.stderr)
            return 2
        except BenchError as exc:
            print(f"skcarrot bench: error: {exc}", file=sys.stderr)
            return 1
        from pathlib import Path

        print(Path(args.out, "summary.md").read_text(), end="")
        print(f"{len(rows)} runs in {args.out}/cells/ (and {args.out}/results.jsonl); "
              f"summary in {args.out}/summary.md and summary.csv")
        return 0
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(query_budget=args.budget, n_shots=args.shots, random_state=args.seed, out_dir=args.out)
    parser.print_help()
    return 0


def _add_serve_commands(sub) -> None:
    serve = sub.add_parser("serve", help="serve a model behind a metered HTTP API (needs the 'serve' extra)")
    serve.add_argument("--model", default=None, help="open_clip model name (default: the embedded model)")
    serve.add_argument("--pretrained", default=None,
                       help="pretrained tag or checkpoint file of --model (default: the embedded weights, or "
                            "'openai', or the model's first tag); 'random' for random weights, with a warning")
    serve.add_argument("--template", default=DEFAULT_TEMPLATE, help=f"prompt template (default {DEFAULT_TEMPLATE!r})")
    serve.add_argument("--device", default="auto", help="torch device (default auto)")
    serve.add_argument("--chat-weights", default=None,
                       help="the chat model at /v1/chat/completions: a safetensors file of the micro chat model "
                            "(default: its shipped weights), 'random' (with a warning) or 'off' (no chat endpoint)")
    serve.add_argument("--db", default=None,
                       help="ledger URL: sqlite:///file.db (default sqlite:///skcarrot-ledger.db, or $SKCARROT_DB) "
                            "or postgresql://user@host:port/db")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--workers", type=int, default=1, help="server processes (default 1)")
    serve.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    keys = sub.add_parser("keys", help="manage API keys in the ledger")
    keys_sub = keys.add_subparsers(dest="keys_command")
    create = keys_sub.add_parser("create", help="create a key and print it (shown once; only its hash is stored)")
    create.add_argument("--name", required=True, help="unique name of the key's holder")
    create.add_argument("--budget", type=int, required=True, help="queries (prompts scored) the key may spend")
    create.add_argument("--rate-limit", type=int, default=None,
                        help="queries per rate window (default: unlimited; the window is 60 s)")
    create.add_argument("--db", default=None, help="ledger URL (as for serve)")
    listing = keys_sub.add_parser("list", help="show each key's name, budget, spending and state (never the key)")
    listing.add_argument("--db", default=None, help="ledger URL (as for serve)")
    revoke = keys_sub.add_parser("revoke", help="revoke a key: refused from the next charged request on")
    revoke.add_argument("name", help="the key's name")
    rotate = keys_sub.add_parser("rotate", help="print a new secret for a key (same account, budget and usage); "
                                               "the old secret stops working")
    rotate.add_argument("name", help="the key's name")
    set_budget = keys_sub.add_parser("set-budget", help="set a key's total budget, in queries")
    set_budget.add_argument("name", help="the key's name")
    set_budget.add_argument("budget", type=int, help="the new total budget (what was spent stays spent)")
    top_up = keys_sub.add_parser("top-up", help="add queries to a key's budget")
    top_up.add_argument("name", help="the key's name")
    top_up.add_argument("queries", type=int, help="queries to add")
    for command in (revoke, rotate, set_budget, top_up):
        command.add_argument("--db", default=None, help="ledger URL (as for serve)")


def _serve(args) -> int:
    try:
        import uvicorn

        from ..serve.config import db_url_from_env, export_worker_env, settings_from_env
        from ..serve.ledger import Ledger
    except ImportError as exc:
        print(f"skcarrot serve: error: {exc}; install the extra: pip install 'skcarrot[serve]'", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("skcarrot serve: error: --workers must be >= 1", file=sys.stderr)
        return 2
    db = db_url_from_env(args.db)
    try:
        Ledger(db).dispose()  # fail here, clearly, rather than in every worker
    except Exception as exc:  # noqa: BLE001 - any database error is reported the same way
        print(f"skcarrot serve: error: cannot open the ledger {db!r}: {exc}", file=sys.stderr)
        return 2
    from ..backends.models import open_model

    try:  # a name the server can not load fails here, before it listens, as the estimator's would
        open_model(args.model, args.pretrained, template=args.template, device=args.device, check=True)
    except (ValueError, OSError) as exc:
        print(f"skcarrot serve: error: {exc}", file=sys.stderr)
        return 2
    from ..serve.chat.engine import CHAT_OFF, CHAT_WEIGHTS

    chat = args.chat_weights
    if chat not in (CHAT_OFF, "random") and not os.path.isfile(chat or CHAT_WEIGHTS):
        print(f"skcarrot serve: error: chat model weights not found at {chat or CHAT_WEIGHTS}; pass "
              "--chat-weights FILE, 'random' or 'off'", file=sys.stderr)
        return 2
    # Each worker builds its own app from these (uvicorn --factory), so N workers share the ledger.
    export_worker_env(db_url=db, model_name=args.model, pretrained=args.pretrained, template=args.template,
                      device=args.device, chat_weights=args.chat_weights)
    if db.startswith("sqlite") and args.workers > 1:
        print("skcarrot serve: note: several workers on one SQLite file serialise their writes; "
              "use --db postgresql://... under load", file=sys.stderr)
    if args.workers > 1:
        # A key's slots are held per process: each worker gets its share of the limit, so the
        # key holds at most max(limit, workers) across them all.
        from ..serve.concurrency import per_worker_slots

        limit = settings_from_env().max_concurrent_per_key
        os.environ["SKCARROT_MAX_CONCURRENT_PER_KEY"] = str(per_worker_slots(limit, args.workers))
    uvicorn.run("skcarrot.serve.app:app_from_env", factory=True, host=args.host, port=args.port,
                workers=args.workers, log_level=args.log_level, **uvicorn_limits(settings_from_env()))
    return 0


def uvicorn_limits(settings) -> dict:
    """uvicorn's options that bound what one connection may make the server hold.

    The h11 parser buffers at most ``max_header_bytes`` of a request head (plus
    its request line), so an oversized one is dropped before it is held whole.

    Examples
    --------
    >>> from skcarrot.tools.cli import uvicorn_limits
    >>> from skcarrot.serve import Settings
    >>> uvicorn_limits(Settings(db_url="sqlite://", max_header_bytes=8192))
    {'http': 'h11', 'h11_max_incomplete_event_size': 16384}
    """
    return {"http": "h11", "h11_max_incomplete_event_size": int(settings.max_header_bytes) + 8192}


def _keys(args, keys_parser) -> int:
    try:
        from ..serve.config import db_url_from_env
        from ..serve.ledger import Ledger
    except ImportError as exc:
        print(f"skcarrot keys: error: {exc}; install the extra: pip install 'skcarrot[serve]'", file=sys.stderr)
        return 2
    if args.keys_command is None:
        keys_parser.print_help()
        return 2
    db = db_url_from_env(args.db)
    try:
        ledger = Ledger(db)
    except Exception as exc:  # noqa: BLE001
        print(f"skcarrot keys: error: cannot open the ledger {db!r}: {exc}", file=sys.stderr)
        return 2
    try:
        if args.keys_command == "create":
            try:
                _, key = ledger.create_key(args.name, budget=args.budget, rate_limit=args.rate_limit)
            except ValueError as exc:
                print(f"skcarrot keys create: error: {exc}", file=sys.stderr)
                return 2
            print(key)
            print(f"created key {args.name!r} with a budget of {args.budget} queries in {db}; it is shown only "
                  "this once (the ledger keeps its hash): give it to its holder, who sets SKCARROT_API_KEY",
                  file=sys.stderr)
            return 0
        if args.keys_command == "list":
            for record in ledger.list_keys():
                state = "revoked" if record.revoked else "active"
                print(f"{record.name}\t{state}\tbudget={record.budget}\tused={record.prompts_used}"
                      f"\tremaining={record.remaining}\timages={record.images_used}\trate_limit={record.rate_limit}"
                      f"\timage_bytes={record.image_bytes}")
            return 0
        return _change_key(args, ledger)
    finally:
        ledger.dispose()


def _change_key(args, ledger) -> int:
    """``keys revoke | rotate | set-budget | top-up``: one change to an existing key."""
    command = f"skcarrot keys {args.keys_command}"
    try:
        if args.keys_command == "revoke":
            ledger.revoke_key(args.name)
            print(f"revoked key {args.name!r}: every charged request from now on is refused", file=sys.stderr)
        elif args.keys_command == "rotate":
            print(ledger.rotate_key(args.name))
            print(f"new secret for key {args.name!r} (shown only this once); the old one no longer works",
                  file=sys.stderr)
        elif args.keys_command == "set-budget":
            record = ledger.set_budget(args.name, args.budget)
            print(f"key {args.name!r}: budget {record.budget}, {record.remaining} left", file=sys.stderr)
        else:
            record = ledger.top_up(args.name, args.queries)
            print(f"key {args.name!r}: budget {record.budget}, {record.remaining} left", file=sys.stderr)
    except (KeyError, ValueError) as exc:
        print(f"{command}: error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
