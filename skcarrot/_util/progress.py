"""Progress bars (tqdm, on stderr); a disabled bar prints nothing and costs nothing."""

from __future__ import annotations

import sys


def progress_bar(total: int, unit: str, *, enabled: bool, desc: str | None = None):
    """A tqdm bar over ``total`` units, silent unless ``enabled`` (and ``total > 0``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, disable=not enabled or total <= 0)
