"""Command line: ``skcarrot demo``, ``skcarrot --version``."""
from __future__ import annotations

import argparse
import sys

from . import __version__


def main(argv: list[str] | None = None) -> int:
    """Run the ``skcarrot`` command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="skcarrot", description=__doc__)
    parser.add_argument("--version", action="version", version=f"skcarrot {__version__}")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("demo", help="fit on sklearn digits and print a held-out score")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo()
    parser.print_help()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
