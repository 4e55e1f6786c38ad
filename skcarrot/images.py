"""Turning user input into images, and augmented views of them.

Whatever the user passes (file paths, PIL images, arrays), what crosses the door
is a list of RGB :class:`PIL.Image.Image`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["to_pil_images", "augmented_views", "augment_all", "flat_width", "intensity_scale", "AUGMENTATIONS"]

#: Names accepted by ``augmentation``.
AUGMENTATIONS = ("crop", "crop+flip", "flip", "none")


_HOW_TO_PASS = (
    "pass uint8 arrays for 0-255 data, uint16 for 16-bit data, floats scaled to [0, 1], "
    "or give the range with image_range=(black, white)"
)


def intensity_scale(arr: np.ndarray, where: str) -> float:
    """The value of white in ``arr``, read from its dtype and its values.

    uint8 is 0-255 and uint16 is 0-65535 whatever the values; bool is 0/1.
    Other integer and float arrays are read by their values: all within [0, 1]
    is intensity in [0, 1], a maximum in (127, 255] is 0-255. Anything else
    (negative values, a maximum above 255, or one in (1, 127] such as 0-16
    data) is ambiguous and raises, saying how to pass the image.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot.images import intensity_scale
    >>> intensity_scale(np.zeros(3, np.uint16), "image 0"), intensity_scale(np.array([0.2, 0.9]), "image 0")
    (65535.0, 1.0)
    >>> intensity_scale(np.array([0.0, 16.0]), "image 3")
    Traceback (most recent call last):
    ...
    ValueError: image 3: values in [0, 16] are neither intensities in [0, 1] nor 0-255; ...
    """
    if arr.dtype == bool:
        return 1.0
    if arr.dtype == np.uint8:
        return 255.0
    if arr.dtype == np.uint16:
        return 65535.0
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise ValueError(f"{where}: image contains NaN or infinity")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0:
        raise ValueError(
            f"{where}: image has negative values (min {lo:g}); intensities can not be negative: {_HOW_TO_PASS}"
        )
    if hi <= 1.0:
        return 1.0
    if 127.0 < hi <= 255.0:
        return 255.0
    raise ValueError(
        f"{where}: values in [{lo:g}, {hi:g}] are neither intensities in [0, 1] nor 0-255; {_HOW_TO_PASS}"
    )


def _array_to_pil(arr: np.ndarray, where: str, value_range: tuple[float, float] | None = None) -> Image.Image:
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
    if value_range is None:
        value_range = (0.0, intensity_scale(arr, where))
    black, white = value_range
    if arr.dtype != np.uint8 or (black, white) != (0.0, 255.0):
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            raise ValueError(f"{where}: image contains NaN or infinity")
        unit = (arr.astype(np.float64) - black) / (white - black)
        arr = np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(arr))
    return img.convert("RGB")


def _pil_to_rgb(img: Image.Image, where: str) -> Image.Image:
    # PIL's own convert clips 16-bit and float modes at 255: read them by their range instead.
    if img.mode.startswith("I;16"):
        return _array_to_pil(np.asarray(img).astype(np.uint16), where, (0.0, 65535.0))
    if img.mode == "I":
        arr = np.asarray(img)
        # 16-bit PNG and TIFF files open as 32-bit integers on some platforms; an image made
        # in memory (convert("I"), fromarray of int32) is read by its values, as its array is.
        if img.format in ("PNG", "TIFF") and arr.size and arr.min() >= 0 and arr.max() <= 65535:
            return _array_to_pil(arr.astype(np.uint16), where, (0.0, 65535.0))
        return _array_to_pil(arr, where)
    if img.mode == "F":
        return _array_to_pil(np.asarray(img), where)
    return img.convert("RGB")


def _one_to_pil(item: Any, index: int, value_range: tuple[float, float] | None = None) -> Image.Image:
    where = f"image {index}"
    if isinstance(item, Image.Image):
        try:
            return _pil_to_rgb(item, where)
        except ValueError:
            raise
        except Exception as exc:  # truncated files opened lazily, odd modes
            raise ValueError(f"{where}: cannot read PIL image ({exc})") from exc
    if isinstance(item, (str, os.PathLike)):
        path = os.fspath(item)
        try:
            with Image.open(path) as img:
                img.load()
                return _pil_to_rgb(img, f"{where} ({path!r})")
        except (OSError, Image.DecompressionBombError) as exc:
            raise ValueError(f"{where}: cannot read image file {path!r} ({exc})") from exc
    if isinstance(item, (bytes, bytearray)):
        raise ValueError(f"{where}: raw bytes are not an image; pass a path, PIL image or array")
    try:
        arr = np.asarray(item)
    except Exception as exc:
        raise ValueError(f"{where}: cannot interpret {type(item).__name__} as an image") from exc
    return _array_to_pil(arr, where, value_range)


def to_pil_images(X: Any, image_range: tuple[float, float] | None = None) -> list[Image.Image]:
    """Coerce a batch of images to a list of RGB PIL images.

    Parameters
    ----------
    X : sequence or ndarray
        Either a sequence of images, each a file path, a :class:`PIL.Image.Image`
        or an ``HxW`` / ``HxWxC`` array, or one array of shape ``(N, H, W)`` or
        ``(N, H, W, C)``. A 2-D array ``(N, F)`` is read as ``N`` images of one
        row of ``F`` pixels. Each format is read by its true range: uint8
        0-255, uint16 (and 16-bit files and PIL ``I;16`` images) 0-65535, bool
        0/1; other integer and float arrays by their values, intensities in
        [0, 1] or 0-255, judged over the whole batch (see
        :func:`intensity_scale`). An ambiguous range (negative values, a
        maximum above 255, or a maximum such as 16 that is neither 1 nor near
        255) raises and says how to pass it.

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
    X = _as_batch(X)
    value_range = None
    if image_range is not None:
        black, white = (float(v) for v in image_range)
        if not (np.isfinite(black) and np.isfinite(white) and white > black):
            raise ValueError(f"image_range must be (black, white) with black < white, got {image_range!r}")
        value_range = (black, white)
    if isinstance(X, np.ndarray) and X.dtype.kind in "US":  # an array of file paths
        X = X.astype(object)
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
        numeric = np.issubdtype(X.dtype, np.number) or X.dtype == bool
        if value_range is None and X.size and numeric and not np.issubdtype(X.dtype, np.complexfloating):
            value_range = (0.0, _batch_scale(X, X))
    else:
        try:
            items = list(X)
        except TypeError as exc:
            raise ValueError(
                f"expected a sequence of images, got {type(X).__name__}"
            ) from exc
        if value_range is None:
            value_range = _list_scale(items)
    if len(items) == 0:
        raise ValueError("expected at least one image, got an empty batch")
    return [_one_to_pil(item, i, value_range) for i, item in enumerate(items)]


def _batch_scale(images, values: np.ndarray) -> float:
    # One reading for the whole batch, so a dark image of a 0-255 batch is not read as [0, 1].
    try:
        return intensity_scale(values, "X")
    except ValueError:
        for i, image in enumerate(images):  # name the first image at fault when one is
            if image.dtype.kind == "f" and not np.all(np.isfinite(image)) or image.min() < 0:
                intensity_scale(image, f"image {i}")
        raise


def _list_scale(items: list) -> tuple[float, float] | None:
    # A list of numeric arrays of one dtype is one batch too: read it once, like a stacked array.
    arrays = [item for item in items if isinstance(item, np.ndarray)]
    if len(arrays) != len(items) or not arrays or len({a.dtype for a in arrays}) != 1:
        return None
    dtype = arrays[0].dtype
    if not (np.issubdtype(dtype, np.number) or dtype == bool) or np.issubdtype(dtype, np.complexfloating):
        return None
    if any(a.size == 0 for a in arrays):
        return None
    return (0.0, _batch_scale(arrays, np.concatenate([a.ravel() for a in arrays])))


def _as_batch(X: Any) -> Any:
    if hasattr(X, "iloc") or hasattr(X, "to_numpy"):  # pandas Series / DataFrame
        return X.to_numpy()
    if not isinstance(X, (list, tuple, np.ndarray)) and hasattr(X, "__array__"):
        return np.asarray(X)
    return X


def flat_width(X: Any) -> int | None:
    """Width ``F`` when ``X`` is a batch of flat rows (a 2-D array or a list of 1-D rows), else None.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot.images import flat_width
    >>> flat_width(np.zeros((3, 5))), flat_width([[0, 1], [2, 3]]), flat_width(np.zeros((3, 4, 4)))
    (5, 2, None)
    """
    X = _as_batch(X)
    if isinstance(X, np.ndarray):
        return X.shape[1] if X.ndim == 2 and X.dtype.kind not in "OUS" else None
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
        views.append(augment_all(images, augmentation, rng))
    return views


def augment_all(
    images: Sequence[Image.Image],
    augmentation: str | Callable[[Image.Image, np.random.RandomState], Image.Image],
    rng: np.random.RandomState,
) -> list[Image.Image]:
    """One fresh augmented view of each image (the paper's per-epoch augmentation).

    Examples
    --------
    >>> import numpy as np
    >>> from PIL import Image
    >>> from skcarrot.images import augment_all
    >>> [v.size for v in augment_all([Image.new("RGB", (8, 8))] * 2, "crop+flip", np.random.RandomState(0))]
    [(8, 8), (8, 8)]
    >>> augment_all([Image.new("RGB", (8, 8))], lambda img, rng: np.asarray(img), np.random.RandomState(0))
    Traceback (most recent call last):
    ...
    TypeError: augmentation <lambda> returned ndarray for image 0; it must return a PIL.Image.Image ...
    """
    if not callable(augmentation):
        return [_augment_one(img, augmentation, rng) for img in images]
    out = []
    for i, img in enumerate(images):
        view = augmentation(img, rng)
        if not isinstance(view, Image.Image):
            name = getattr(augmentation, "__name__", type(augmentation).__name__)
            raise TypeError(
                f"augmentation {name} returned {type(view).__name__} for image {i}; it must return a "
                "PIL.Image.Image (wrap an array with PIL.Image.fromarray)"
            )
        out.append(view.convert("RGB"))
    return out
