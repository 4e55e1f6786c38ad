"""Seeded stratified splits of labelled shots: one home for every per-class draw.

- :func:`draw_per_class`: ``k`` indices of each class (few-shot training sets, benchmark draws);
- :func:`stratified_holdout`: (train, validation) indices, a fraction of each class held out;
- :func:`stratified_folds`: a fold index per shot, each class dealt round-robin over the folds.

Every draw comes from the generator it is given, so the same seed gives the same indices.
"""

from __future__ import annotations

import numpy as np

__all__ = ["draw_per_class", "stratified_folds", "stratified_holdout"]


def draw_per_class(
    y: np.ndarray, k: int, rng: np.random.RandomState, exclude: set | None = None, strict: bool = True
) -> np.ndarray:
    """``k`` indices of each class, drawn without replacement, classes in sorted order.

    Parameters
    ----------
    y : ndarray of shape (n_samples,)
        Labels.
    k : int
        Indices to draw per class.
    rng : numpy.random.RandomState
        The generator every draw comes from.
    exclude : set of int, default=None
        Indices never drawn.
    strict : bool, default=True
        A class with fewer than ``k`` indices to draw from raises; with False it gives
        all it has (and a class with none is skipped).

    Returns
    -------
    indices : ndarray of int
        Class by class, in the order drawn.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot._util.split import draw_per_class
    >>> y = np.repeat([0, 1], 5)
    >>> idx = draw_per_class(y, 2, np.random.RandomState(0))
    >>> y[idx].tolist()
    [0, 0, 1, 1]
    >>> draw_per_class(y, 6, np.random.RandomState(0))
    Traceback (most recent call last):
    ...
    ValueError: class 0 has 5 samples to draw from, fewer than the 6 asked for; ...
    """
    y = np.asarray(y)
    chosen = []
    for c in np.unique(y):
        pool = np.flatnonzero(y == c)
        if exclude:
            pool = np.asarray([i for i in pool if i not in exclude], dtype=pool.dtype)
        if len(pool) < k and strict:
            raise ValueError(
                f"class {c.item()!r} has {len(pool)} samples to draw from, fewer than the {k} asked for; "
                f"ask for at most {len(pool)} per class"
            )
        if len(pool) == 0:
            continue
        chosen.append(rng.choice(pool, min(k, len(pool)), replace=False))
    return np.concatenate(chosen).astype(np.int64) if chosen else np.zeros(0, dtype=np.int64)


def stratified_holdout(
    y: np.ndarray, fraction: float, rng: np.random.RandomState
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, validation): ``round(fraction * n_c)`` per class, at least one.

    A class with a single image keeps it for training.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot._util.split import stratified_holdout
    >>> train, val = stratified_holdout(np.repeat([0, 1], 10), 0.1, np.random.RandomState(0))
    >>> len(train), len(val), sorted(int(c) for c in np.repeat([0, 1], 10)[val])
    (18, 2, [0, 1])
    """
    validation = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        n_val = min(max(1, int(round(fraction * len(members)))), len(members) - 1)
        if n_val > 0:
            validation.extend(rng.choice(members, n_val, replace=False))
    validation = np.sort(np.asarray(validation, dtype=int))
    train = np.setdiff1d(np.arange(len(y)), validation)
    return train, validation


def stratified_folds(y: np.ndarray, k: int, rng: np.random.RandomState) -> np.ndarray:
    """A fold index per shot, each class dealt round-robin over the folds in a seeded order.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot._util.split import stratified_folds
    >>> y = np.repeat([0, 1], 4)
    >>> folds = stratified_folds(y, 2, np.random.RandomState(0))
    >>> [sorted(y[folds == f].tolist()) for f in (0, 1)]
    [[0, 0, 1, 1], [0, 0, 1, 1]]
    """
    folds = np.empty(len(y), dtype=int)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        folds[rng.permutation(members)] = np.arange(len(members)) % k
    return folds
