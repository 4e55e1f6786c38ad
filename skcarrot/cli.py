"""skcarrot command line.

    skcarrot demo [--budget N] [--shots K] [--seed S] [--out DIR]
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
    >>> main(["--version"])  # doctest: +SKIP
    skcarrot 0.1.0
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
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(query_budget=args.budget, n_shots=args.shots, random_state=args.seed, out_dir=args.out)
    parser.print_help()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
