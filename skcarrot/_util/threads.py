"""Thread counts per stage of a fit: threads cost more than they save on small work.

Two pools are pinned, each deliberately:

- numpy's BLAS (OpenBLAS) runs on one thread: :func:`one_blas_thread` around the prompt
  search (CMA-ES's covariance arithmetic and the projection ``Z @ A``). After a
  multi-threaded call OpenBLAS's workers keep spinning for a while and take a core from
  whatever runs next (the black box); one thread does this work in about the same time
  without that cost.
- torch's intra-op threads: one for small work, where every op is well under a
  millisecond. A torch op on more than one thread ends in a wait for all of them; on small
  ops, and on a machine busy with other work (where a thread may be off its core for
  milliseconds), that wait costs more than the second thread saves. Work whose size
  depends on the model (the black box's text encoding) asks :func:`threads_for`, which
  keeps torch's count for big work (e.g. RN50's text tower).

:func:`fit_threads` holds both for a whole fit, so that the small torch ops between the
stages run on one thread too and nothing is set again on every call.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

__all__ = ["fit_threads", "one_blas_thread", "threads_for", "torch_threads"]

_LOCK = threading.Lock()
_BLAS_LOCK = threading.Lock()
_blas_controller = None  # threadpoolctl's view of the loaded BLAS libraries, made on first use
_blas_limiter = None  # the limit in force while _blas_users > 0
_blas_users = 0
_torch_outer: int | None = None  # torch's count before the fits running now pinned it to one
_torch_users = 0

#: Below this many floating-point operations per call, torch work runs on one thread.
SMALL_WORK_FLOPS = 1e9


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
    """Torch threads for one call of ``flops`` operations: one below :data:`SMALL_WORK_FLOPS`.

    About a billion operations is 10-20 ms on one core, made of dozens of ops of well under
    a millisecond each: too little for a second thread to pay for its waits. Bigger work
    gets the count torch had before :func:`fit_threads` (None outside a fit: as it is).
    """
    return 1 if flops < SMALL_WORK_FLOPS else _torch_outer


def _blas():
    global _blas_controller
    if _blas_controller is None:
        from threadpoolctl import ThreadpoolController

        # Reading the loaded libraries scans the process's memory map (milliseconds): done once.
        _blas_controller = ThreadpoolController().select(user_api="blas")
    return _blas_controller


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the block with numpy's BLAS on one thread.

    The limit is process-wide: it is set when the first block enters and restored when
    the last one leaves, so blocks nest and overlap across threads at the cost of a counter.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot._util.threads import one_blas_thread
    >>> with one_blas_thread():
    ...     float(np.ones((2, 2)) @ np.ones(2) @ np.ones(2))
    4.0
    """
    global _blas_limiter, _blas_users
    with _BLAS_LOCK:
        if _blas_users == 0:
            _blas_limiter = _blas().limit(limits=1)
        _blas_users += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _blas_users -= 1
            if _blas_users == 0:
                limiter, _blas_limiter = _blas_limiter, None
                limiter.restore_original_limits()


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    # Process-wide like the BLAS limit: set by the first fit in, restored by the last one out.
    global _torch_outer, _torch_users
    with _LOCK:
        if _torch_users == 0:
            _torch_outer = torch.get_num_threads()
            torch.set_num_threads(1)
        _torch_users += 1
    try:
        yield
    finally:
        with _LOCK:
            _torch_users -= 1
            if _torch_users == 0:
                torch.set_num_threads(_torch_outer)
                _torch_outer = None


@contextlib.contextmanager
def fit_threads() -> Iterator[None]:
    """The thread policy of one fit, entered once around it.

    numpy's BLAS on one thread throughout, and torch on one thread except in the stages
    that ask :func:`threads_for` for more (they get torch's count from before the fit).
    Nests, and overlaps across threads: the counts are restored when the last fit ends.

    Examples
    --------
    >>> import torch
    >>> from skcarrot._util.threads import fit_threads, threads_for
    >>> before = torch.get_num_threads()
    >>> with fit_threads():
    ...     torch.get_num_threads(), threads_for(1e6), threads_for(1e12) == before
    (1, 1, True)
    >>> torch.get_num_threads() == before
    True
    """
    with one_blas_thread(), _one_torch_thread():
        yield
