"""skcarrot command line.

    skcarrot demo [--budget N] [--shots K] [--seed S] [--out DIR]
    skcarrot bench --root DIR --datasets NAME... --shots K... --seeds S... --methods NAME... --out DIR
    skcarrot bench --list
    skcarrot --version
"""

from __future__ import annotations

import argparse
import sys

from . import __version__


def main(argv: list[str] | None = None) -> int:
    """Run the ``skcarrot`` command line; returns the exit status.

    Examples
    --------
    >>> from skcarrot.cli import main
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
    args = parser.parse_args(argv)
    if args.command == "bench":
        from .bench import list_text, run_bench

        if args.list:
            print(list_text())
            return 0
        try:
            rows = run_bench(root=args.root, datasets=args.datasets, shots=args.shots, seeds=args.seeds,
                             methods=args.methods, out=args.out, model=args.model, pretrained=args.pretrained,
                             budget=args.budget, quiet=args.quiet)
        except (FileNotFoundError, ValueError) as exc:
            print(f"skcarrot bench: error: {exc}", file=sys.stderr)
            return 2
        from pathlib import Path

        print(Path(args.out, "summary.md").read_text(), end="")
        print(f"{len(rows)} runs in {args.out}/results.jsonl; summary in {args.out}/summary.md and summary.csv")
        return 0
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(query_budget=args.budget, n_shots=args.shots, random_state=args.seed, out_dir=args.out)
    parser.print_help()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
