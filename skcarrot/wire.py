"""What crosses the network, written once for both sides: image content ids and the array codecs.

Arrays travel in JSON (:func:`encode_array`: raw bytes in base64) or, for an
answer whose client accepts it, as :data:`RAW_MEDIA_TYPE` (:func:`encode_raw`:
one line of JSON, then the array's bytes as they are). Images are hashed by
:func:`hash_pixels`, the one pixel digest (also used in-process by the backends'
feature cache and the fit fingerprint).

The client (:class:`~skcarrot.backends.HTTPBackend`) and the server
(``skcarrot serve``) both import this module; neither imports the other. Errors
are plain :class:`ValueError` (:class:`WireFormatError`, which names the field
at fault); the server turns them into 422 answers.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
from typing import Any

import numpy as np

__all__ = [
    "RAW_MEDIA_TYPE",
    "WireFormatError",
    "accepts_raw",
    "decode_array",
    "decode_raw",
    "encode_array",
    "encode_raw",
    "hash_pixels",
    "image_tokens",
    "image_content_id",
    "png_base64",
]

#: Media type of an answer as one line of JSON, a newline, then the raw bytes of the array it
#: describes (see :func:`encode_raw`); a client asks for it in its ``Accept`` header.
RAW_MEDIA_TYPE = "application/x-skcarrot-raw"

#: Most items an array on the wire may hold.
MAX_ARRAY_ITEMS = 50_000_000

# Bytes of pixels hashed at a time by image_content_id.
_HASH_BAND_BYTES = 1 << 22


class WireFormatError(ValueError):
    """An array or image on the wire is malformed; ``field`` names the part at fault.

    ``field`` is ``"shape"`` or ``"data"`` for the parts of an encoded array,
    None for the value as a whole.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def image_content_id(image: Any) -> str:
    """Content id of an image: sha256 of its RGB pixels and size, hex.

    Client and server compute it from pixels, not file bytes, so any lossless
    encoding of the same image has the same id.

    Parameters
    ----------
    image : PIL.Image.Image

    Returns
    -------
    content_id : str
        64 hex digits.

    Examples
    --------
    >>> from PIL import Image
    >>> from skcarrot.wire import image_content_id
    >>> a = image_content_id(Image.new("RGB", (4, 4)))
    >>> a == image_content_id(Image.new("L", (4, 4))), len(a)
    (True, 64)
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    width, height = rgb.size
    return hash_pixels(hashlib.sha256(), rgb, f"skcarrot-rgb {width}x{height}\n").hexdigest()


def hash_pixels(digest: Any, image: Any, header: str) -> Any:
    """Feed ``header``, then the image's raw pixel bytes as held (mode unchanged), into ``digest``.

    The one way an image's pixels are hashed: the content id, the backends' feature
    cache and the fit fingerprint differ only in their digest and header. A large
    image is fed a band of rows at a time, never copied whole (the digest is the same).

    Parameters
    ----------
    digest : hashlib hash object
        Updated in place, e.g. ``hashlib.sha256()``.
    image : PIL.Image.Image
    header : str
        Fed first, UTF-8 encoded.

    Returns
    -------
    digest : hashlib hash object
        The same object, for chaining.

    Examples
    --------
    >>> import hashlib
    >>> from PIL import Image
    >>> from skcarrot.wire import hash_pixels
    >>> img = Image.new("L", (3, 2), 7)
    >>> hash_pixels(hashlib.sha256(), img, "L").hexdigest() == hashlib.sha256(b"L" + bytes([7] * 6)).hexdigest()
    True
    """
    digest.update(header.encode())
    width, height = image.size
    rows = max(1, _HASH_BAND_BYTES // (4 * max(1, width)))  # at most 4 bytes a pixel in the modes images come in
    if rows >= height:
        digest.update(image.tobytes())
    else:
        for top in range(0, height, rows):
            digest.update(image.crop((0, top, width, min(height, top + rows))).tobytes())
    return digest


def png_base64(image: Any) -> str:
    """An image as base64 of a lossless RGB PNG (fast compression).

    Examples
    --------
    >>> from PIL import Image
    >>> from skcarrot.wire import png_base64
    >>> png_base64(Image.new("L", (2, 2)))[:8]
    'iVBORw0K'
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def encode_array(arr: np.ndarray) -> dict[str, Any]:
    """An array as a JSON-ready ``{"shape", "dtype", "data"}``, float32 when that is exact.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot.wire import encode_array
    >>> encode_array(np.array([[0.5, 1.0]]))["dtype"]
    'float32'
    >>> encode_array(np.array([0.1]))["dtype"]
    'float64'
    """
    arr = np.asarray(arr, dtype=np.float64)
    small = arr.astype(np.float32)
    # open_clip models compute in float32: sending float32 then halves the bytes, losing nothing
    if np.array_equal(small, arr):
        raw, dtype = small.astype("<f4").tobytes(), "float32"
    else:
        raw, dtype = arr.astype("<f8").tobytes(), "float64"
    return {"shape": list(arr.shape), "dtype": dtype, "data": base64.b64encode(raw).decode("ascii")}


def _exact(arr: Any) -> np.ndarray:
    """``arr`` as little-endian float32 when that loses nothing, else as float64."""
    arr = np.asarray(arr)
    if arr.dtype == np.float32:
        return arr.astype("<f4", copy=False)
    arr = arr.astype(np.float64, copy=False)
    small = arr.astype(np.float32)
    return small.astype("<f4", copy=False) if np.array_equal(small, arr) else arr.astype("<f8", copy=False)


def encode_raw(head: dict[str, Any], field: str, arr: np.ndarray) -> bytes:
    r"""``head`` with the array ``arr`` at ``field``, as :data:`RAW_MEDIA_TYPE` bytes.

    The first line is ``head`` as JSON, where ``field`` holds the array's
    ``{"shape", "dtype"}``; after its newline come the array's bytes (little
    endian, C order), float32 when that is exact, like :func:`encode_array`.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot.wire import encode_raw
    >>> encode_raw({"queries": 1}, "logits", np.array([[0.5, 1.0]]))
    b'{"queries":1,"logits":{"shape":[1,2],"dtype":"float32"}}\n\x00\x00\x00?\x00\x00\x80?'
    """
    arr = np.ascontiguousarray(_exact(arr))
    dtype = "float32" if arr.dtype.itemsize == 4 else "float64"
    line = json.dumps({**head, field: {"shape": list(arr.shape), "dtype": dtype}}, separators=(",", ":"))
    return line.encode() + b"\n" + arr.tobytes()


def decode_raw(body: bytes, field: str, max_items: int = MAX_ARRAY_ITEMS) -> dict[str, Any]:
    """The head of a :data:`RAW_MEDIA_TYPE` body, with its array (read-only) at ``field``.

    Raises
    ------
    WireFormatError
        No head line, a head that is not a JSON object describing ``field``, or
        bytes that do not fill the array's shape.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot.wire import decode_raw, encode_raw
    >>> decode_raw(encode_raw({"queries": 1}, "logits", np.eye(2)), "logits")["logits"].tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    line, newline, data = bytes(body).partition(b"\n")
    try:
        head = json.loads(line) if newline else None
    except ValueError:
        head = None
    spec = head.get(field) if isinstance(head, dict) else None
    if not isinstance(spec, dict) or "shape" not in spec or "dtype" not in spec:
        raise WireFormatError(f"not a {RAW_MEDIA_TYPE} body: no JSON line describing {field!r}")
    try:
        shape = [int(s) for s in spec["shape"]]
    except (TypeError, ValueError):
        raise WireFormatError(f"shape {spec['shape']!r} is not a list of integers", "shape") from None
    if any(s < 0 for s in shape) or int(np.prod(shape, dtype=np.int64)) > max_items:
        raise WireFormatError(f"shape {shape} is negative or has more than {max_items} items", "shape")
    if spec["dtype"] not in ("float32", "float64"):
        raise WireFormatError(f"dtype must be 'float32' or 'float64', got {spec['dtype']!r}", "dtype")
    itemsize = 4 if spec["dtype"] == "float32" else 8
    needed = int(np.prod(shape, dtype=np.int64)) * itemsize
    if len(data) != needed:
        raise WireFormatError(f"data holds {len(data)} bytes but shape {shape} of {spec['dtype']} needs {needed}",
                              "data")
    head[field] = np.frombuffer(data, dtype="<f4" if itemsize == 4 else "<f8").reshape(shape)
    return head


def accepts_raw(accept: str | None) -> bool:
    """Whether an ``Accept`` header names :data:`RAW_MEDIA_TYPE` (with a non-zero ``q``).

    Examples
    --------
    >>> from skcarrot.wire import accepts_raw
    >>> accepts_raw("application/x-skcarrot-raw, application/json;q=0.5"), accepts_raw("application/json")
    (True, False)
    >>> accepts_raw("application/x-skcarrot-raw;q=0")
    False
    """
    if not accept or RAW_MEDIA_TYPE not in accept:
        return False
    for item in accept.split(","):
        media, *params = (part.strip() for part in item.split(";"))
        if media.lower() != RAW_MEDIA_TYPE:
            continue
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    return float(value) > 0
                except ValueError:
                    return False
        return True
    return False


def _part(value: Any, name: str) -> Any:
    return value[name] if isinstance(value, dict) else getattr(value, name)


def decode_array(
    value: Any, ndim: int | None = None, *, max_items: int = MAX_ARRAY_ITEMS, finite: bool = True
) -> np.ndarray:
    """An encoded array (``{"shape", "dtype", "data"}``, as a dict or an object) or nested lists.

    Parameters
    ----------
    value : dict, object with ``shape``, ``dtype``, ``data``, or nested lists
    ndim : int or None, default=None
        Dimensions expected (None: any).
    max_items : int, default=50_000_000
        Most items the shape may ask for; checked before anything is decoded.
    finite : bool, default=True
        Refuse NaN and infinity.

    Returns
    -------
    arr : ndarray
        ``float32`` data stays float32 (read-only view of the bytes); lists give float64.

    Raises
    ------
    WireFormatError
        A wrong number of dimensions, too many items, invalid base64, a data
        length that does not match the shape, or a non-finite value.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot.wire import decode_array, encode_array
    >>> decode_array(encode_array(np.eye(2)), ndim=2).tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    >>> decode_array([[1.0, float("nan")]])
    Traceback (most recent call last):
    ...
    skcarrot.wire.WireFormatError: contains NaN or infinity (first at index [0, 1]); every value must be finite
    """
    if isinstance(value, list):
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (ValueError, TypeError):
            raise WireFormatError(
                f"nested lists are ragged; expected a rectangular array of {ndim or 'some'} dimensions"
            ) from None
        if ndim is not None and arr.ndim != ndim:
            raise WireFormatError(f"expected {ndim} dimensions, got an array of shape {list(arr.shape)}")
    else:
        shape = [int(s) for s in _part(value, "shape")]
        dtype = _part(value, "dtype")
        if ndim is not None and len(shape) != ndim:
            raise WireFormatError(f"expected {ndim} dimensions, got shape {shape}", "shape")
        if any(s < 0 for s in shape):
            raise WireFormatError(f"shape {shape} has a negative size", "shape")
        n_items = int(np.prod(shape, dtype=np.int64))
        if n_items > max_items:
            raise WireFormatError(f"shape {shape} has {n_items} items, more than the {max_items} allowed", "shape")
        if dtype not in ("float32", "float64"):
            raise WireFormatError(f"dtype must be 'float32' or 'float64', got {dtype!r}", "dtype")
        try:
            raw = base64.b64decode(_part(value, "data"), validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise WireFormatError("data is not valid base64", "data") from None
        itemsize = 4 if dtype == "float32" else 8
        if len(raw) != n_items * itemsize:
            raise WireFormatError(
                f"data holds {len(raw)} bytes but shape {shape} of {dtype} needs {n_items * itemsize}", "data"
            )
        arr = np.frombuffer(raw, dtype="<f4" if itemsize == 4 else "<f8").reshape(shape)
    if finite and not np.all(np.isfinite(arr)):
        bad = [int(i) for i in np.argwhere(~np.isfinite(arr))[0]]
        raise WireFormatError(f"contains NaN or infinity (first at index {bad}); every value must be finite")
    return arr


_BASE_TOKENS, _TILE_TOKENS, _TILE = 85, 170, 512


def image_tokens(width: int, height: int, detail: str = "low") -> int:
    """Tokens an image is billed, as OpenAI bills its tile models: 85 at low detail, 85 + 170 a 512-px tile at high.

    ``"auto"`` is billed as ``"low"`` for images up to 512 pixels a side, as ``"high"`` above.

    Examples
    --------
    >>> from skcarrot.wire import image_tokens
    >>> image_tokens(28, 28), image_tokens(1024, 1024, "high"), image_tokens(28, 28, "auto")
    (85, 765, 85)
    """
    if detail == "auto":
        detail = "low" if max(width, height) <= _TILE else "high"
    if detail == "low":
        return _BASE_TOKENS
    scale = min(1.0, 2048 / max(width, height))
    w, h = width * scale, height * scale
    scale = min(1.0, 768 / min(w, h))
    w, h = w * scale, h * scale
    return _BASE_TOKENS + _TILE_TOKENS * math.ceil(w / _TILE) * math.ceil(h / _TILE)
