"""``python -m skcarrot``: the command line."""

from .cli import main

raise SystemExit(main())
