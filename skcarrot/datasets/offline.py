"""Image datasets that load offline (re-exported by :mod:`skcarrot.datasets`).

- :func:`load_digit_images`: scikit-learn's 8x8 handwritten digits as uint8 images.
- :func:`load_opencv_digits`: 5000 handwritten digits, 20x20, from OpenCV's sample
  data (Debian/Ubuntu: ``apt-get install opencv-doc``).
- :func:`load_fashion_mnist`: Fashion-MNIST, 28x28 (Debian/Ubuntu:
  ``apt-get install dataset-fashion-mnist``).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from .._util.split import draw_per_class

__all__ = [
    "DIGIT_WORDS",
    "FASHION_CLASSES",
    "load_digit_images",
    "load_opencv_digits",
    "load_fashion_mnist",
    "few_shot_split",
]

#: English names of the digits 0-9.
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: Fashion-MNIST class names, in label order.
FASHION_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)

OPENCV_DIGITS_PATH = "/usr/share/doc/opencv-doc/examples/data/digits.png"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``(1797, 8, 8)`` uint8 images (ink bright), and labels.

    Examples
    --------
    >>> from skcarrot.datasets import load_digit_images
    >>> X, y = load_digit_images()
    >>> X.shape, X.dtype, int(X.max()), len(set(y))
    ((1797, 8, 8), dtype('uint8'), 255, 10)
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.rint(d.images * (255.0 / 16.0)).astype(np.uint8), d.target.copy()


def load_opencv_digits(path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's 5000 handwritten digits: ``(5000, 20, 20)`` uint8 images and labels.

    The file is a 2000x1000 sheet, 100 columns by 50 rows of 20x20 digits, five
    rows per digit 0..9.

    Parameters
    ----------
    path : path-like or None
        The ``digits.png`` sheet; by default where Debian's ``opencv-doc`` puts it.

    Raises
    ------
    FileNotFoundError
        If the sheet is missing; the message says how to install it.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from PIL import Image
    >>> from skcarrot.datasets import load_opencv_digits
    >>> sheet = os.path.join(tempfile.mkdtemp(), "digits.png")  # a blank sheet of the same layout
    >>> Image.fromarray(np.zeros((1000, 2000), dtype=np.uint8)).save(sheet)
    >>> X, y = load_opencv_digits(sheet)
    >>> X.shape, int(y[0]), int(y[-1])
    ((5000, 20, 20), 0, 9)
    """
    from PIL import Image

    path = Path(path or OPENCV_DIGITS_PATH)
    if not path.is_file():
        raise FileNotFoundError(
            f"OpenCV digits sheet not found at {path}; install it with "
            "'apt-get install opencv-doc' or pass path=<digits.png>"
        )
    sheet = np.asarray(Image.open(path).convert("L"))
    if sheet.shape != (1000, 2000):
        raise ValueError(f"{path}: expected a 1000x2000 sheet, got {sheet.shape}")
    cells = sheet.reshape(50, 20, 100, 20).transpose(0, 2, 1, 3).reshape(5000, 20, 20)
    labels = np.repeat(np.arange(10), 500)
    return np.ascontiguousarray(cells), labels


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images ``(N, 28, 28)`` uint8 and labels.

    Parameters
    ----------
    split : {"train", "test"}
    root : path-like or None
        Folder with the four ``*-idx*-ubyte.gz`` files; by default where Debian's
        ``dataset-fashion-mnist`` puts them.

    Examples
    --------
    >>> import tempfile
    >>> from skcarrot.datasets import load_fashion_mnist
    >>> try:
    ...     X, y = load_fashion_mnist("test", root=tempfile.mkdtemp())
    ... except FileNotFoundError as exc:
    ...     print(str(exc).split(";")[0].split(" not found")[0])
    Fashion-MNIST file t10k-images-idx3-ubyte.gz
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root or FASHION_MNIST_DIR)
    prefix = "train" if split == "train" else "t10k"
    images, labels = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    for p in (images, labels):
        if not p.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST file {p.name} not found in {root}; install it with "
                "'apt-get install dataset-fashion-mnist' or pass root=<folder>"
            )
    return _read_idx(images).copy(), _read_idx(labels).astype(np.int64)


def few_shot_split(
    X: np.ndarray, y: np.ndarray, n_shots: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``n_shots`` per class to train (seeded), every other sample held out.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot.datasets import few_shot_split
    >>> Xtr, ytr, Xte, yte = few_shot_split(np.arange(20), np.repeat([0, 1], 10), 3, seed=0)
    >>> len(Xtr), len(Xte), sorted(set(Xtr) & set(Xte))
    (6, 14, [])
    """
    X, y = np.asarray(X), np.asarray(y)
    train = draw_per_class(y, n_shots, np.random.RandomState(seed))
    test = np.setdiff1d(np.arange(len(y)), train)
    return X[train], y[train], X[test], y[test]
