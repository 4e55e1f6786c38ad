"""Torch thread count for small work: threads cost more than they save on tiny tensors."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_LOCK = threading.Lock()


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, restoring the count after.

    ``None`` leaves the count as it is.
    """
    if n is None:
        yield
        return
    with _LOCK:
        before = torch.get_num_threads()
        torch.set_num_threads(n)
    try:
        yield
    finally:
        with _LOCK:
            torch.set_num_threads(before)


def threads_for(flops: float) -> int | None:
    """One thread below about 100 MFLOP of work per call, else torch's default."""
    return 1 if flops < 1e8 else None
