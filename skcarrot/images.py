"""Turning user input into images, and augmented views of them.

Whatever the user passes (file paths, PIL images, arrays), what crosses the door
is a list of RGB :class:`PIL.Image.Image`.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["to_pil_images", "augmented_views", "flat_width", "AUGMENTATIONS"]

#: Names accepted by ``augmentation``.
AUGMENTATIONS = ("crop", "crop+flip", "flip", "none")


def _array_to_pil(arr: np.ndarray, where: str) -> Image.Image:
    arr = np.asarray(arr)
    if arr.dtype == object:
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{where}: {exc}") from exc
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{where}: Complex data not supported as an image")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"{where}: image array has non-numeric dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[np.newaxis, :]
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(
            f"{where}: an image array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {arr.shape}"
        )
    if arr.size == 0:
        raise ValueError(f"{where}: empty image of shape {arr.shape}")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{where}: image contains NaN or infinity")
        if arr.min() < 0 or arr.max() > 1:
            warnings.warn(
                "float images are read as intensities in [0, 1]; values outside were "
                "clipped (pass uint8 arrays for 0-255 data)",
                UserWarning,
                stacklevel=4,
            )
        arr = np.rint(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(arr))
    return img.convert("RGB")


def _one_to_pil(item: Any, index: int) -> Image.Image:
    where = f"image {index}"
    if isinstance(item, Image.Image):
        try:
            return item.convert("RGB")
        except Exception as exc:  # truncated files opened lazily, odd modes
            raise ValueError(f"{where}: cannot read PIL image ({exc})") from exc
    if isinstance(item, (str, os.PathLike)):
        path = os.fspath(item)
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise ValueError(f"{where}: cannot read image file {path!r} ({exc})") from exc
    if isinstance(item, (bytes, bytearray)):
        raise ValueError(f"{where}: raw bytes are not an image; pass a path, PIL image or array")
    try:
        arr = np.asarray(item)
    except Exception as exc:
        raise ValueError(f"{where}: cannot interpret {type(item).__name__} as an image") from exc
    return _array_to_pil(arr, where)


def to_pil_images(X: Any) -> list[Image.Image]:
    """Coerce a batch of images to a list of RGB PIL images.

    Parameters
    ----------
    X : sequence or ndarray
        Either a sequence of images, each a file path, a :class:`PIL.Image.Image`
        or an ``HxW`` / ``HxWxC`` array, or one array of shape ``(N, H, W)`` or
        ``(N, H, W, C)``. A 2-D array ``(N, F)`` is read as ``N`` images of one
        row of ``F`` pixels. Integer arrays are 0-255 intensities; float arrays
        are intensities in [0, 1] (values outside are clipped, with a warning).

    Returns
    -------
    images : list of PIL.Image.Image
        One RGB image per input.

    Raises
    ------
    ValueError
        If ``X`` is empty or not a batch, or an image cannot be read; the message
        names the index of the offending image.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot.images import to_pil_images
    >>> imgs = to_pil_images(np.zeros((2, 8, 8), dtype=np.uint8))
    >>> len(imgs), imgs[0].size, imgs[0].mode
    (2, (8, 8), 'RGB')
    """
    if isinstance(X, (str, os.PathLike, Image.Image)):
        raise ValueError(
            "expected a batch of images (a sequence or an (N, H, W[, C]) array), "
            f"got a single {type(X).__name__}; wrap it in a list"
        )
    if hasattr(X, "toarray") or type(X).__module__.startswith("scipy.sparse"):
        raise TypeError("sparse input is not supported: pass images as dense arrays, PIL images or paths")
    if hasattr(X, "iloc") or hasattr(X, "to_numpy"):  # pandas Series / DataFrame
        X = X.to_numpy()
    elif not isinstance(X, (list, tuple, np.ndarray)) and hasattr(X, "__array__"):
        X = np.asarray(X)
    if isinstance(X, np.ndarray) and X.dtype != object:
        if X.ndim < 2:
            raise ValueError(
                f"Reshape your data: expected a batch of images, an array of shape (N, H, W[, C]) or (N, F), "
                f"got shape {X.shape}; reshape a single image with X[np.newaxis]"
            )
        if X.ndim == 2 and X.shape[1] == 0:
            raise ValueError(f"0 feature(s) (shape={X.shape}) while a minimum of 1 is required.")
        if X.ndim > 4:
            raise ValueError(f"expected an array of shape (N, H, W[, C]), got shape {X.shape}")
        items: Sequence[Any] = list(X)
    else:
        try:
            items = list(X)
        except TypeError as exc:
            raise ValueError(
                f"expected a sequence of images, got {type(X).__name__}"
            ) from exc
    if len(items) == 0:
        raise ValueError("expected at least one image, got an empty batch")
    return [_one_to_pil(item, i) for i, item in enumerate(items)]


def flat_width(X: Any) -> int | None:
    """Width ``F`` when ``X`` is a batch of flat rows (a 2-D array or a list of 1-D rows), else None.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot.images import flat_width
    >>> flat_width(np.zeros((3, 5))), flat_width([[0, 1], [2, 3]]), flat_width(np.zeros((3, 4, 4)))
    (5, 2, None)
    """
    if isinstance(X, np.ndarray):
        return X.shape[1] if X.ndim == 2 and X.dtype != object else None
    if isinstance(X, (list, tuple)) and X:
        first = X[0]
        if isinstance(first, (list, tuple)) or (isinstance(first, np.ndarray) and first.ndim == 1):
            if all(np.isscalar(v) for v in first):
                return len(first)
    return None


def _random_resized_crop(
    img: Image.Image,
    rng: np.random.RandomState,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Image.Image:
    width, height = img.size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w + 1)
            top = rng.randint(0, height - h + 1)
            break
    else:  # central crop fallback, as torchvision does
        w, h = width, height
        left, top = 0, 0
    return img.resize((width, height), Image.BICUBIC, box=(left, top, left + w, top + h))


def _augment_one(img: Image.Image, augmentation: str, rng: np.random.RandomState) -> Image.Image:
    if "crop" in augmentation:
        img = _random_resized_crop(img, rng)
    if "flip" in augmentation and rng.uniform() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img


def augmented_views(
    images: Sequence[Image.Image],
    n_views: int,
    augmentation: str | Callable[[Image.Image, np.random.RandomState], Image.Image],
    rng: np.random.RandomState,
) -> list[list[Image.Image]]:
    """Make a fixed pool of views of each image: the image itself plus augmentations.

    Parameters
    ----------
    images : sequence of PIL.Image.Image
        The training images.
    n_views : int
        Views per image, the original included (``n_views=1``: no augmentation).
    augmentation : {"crop", "crop+flip", "flip", "none"} or callable
        ``"crop"``: random resized crop (scale 0.5-1, aspect 3/4-4/3), resized
        back to the image's size. ``"flip"``: horizontal flip with probability
        1/2. A callable ``f(image, rng) -> image`` is used as it is.
    rng : numpy.random.RandomState
        Source of all randomness.

    Returns
    -------
    views : list of list of PIL.Image.Image
        ``views[v][i]`` is view ``v`` of image ``i``; ``views[0]`` are the originals.

    Examples
    --------
    >>> import numpy as np
    >>> from PIL import Image
    >>> from skcarrot.images import augmented_views
    >>> img = Image.new("RGB", (8, 8))
    >>> views = augmented_views([img, img], 3, "crop", np.random.RandomState(0))
    >>> len(views), len(views[0]), views[2][1].size
    (3, 2, (8, 8))
    """
    if isinstance(augmentation, str) and augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {AUGMENTATIONS} or a callable, got {augmentation!r}")
    views = [list(images)]
    for _ in range(n_views - 1):
        if callable(augmentation):
            views.append([augmentation(img, rng) for img in images])
        else:
            views.append([_augment_one(img, augmentation, rng) for img in images])
    return views
