"""Checks of what a request sends, past its schema: each refusal a 422 naming the field.

Images are decoded safely (formats by name, decompression bombs refused before
their pixels are), class names and prompts must be ones the model can read, and
arrays travel in the codec of :mod:`skcarrot.wire`.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import threading
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from ..wire import WireFormatError, decode_array, image_content_id
from .config import Settings
from .errors import invalid
from .image_store import ImageStore, StoredImageUnreadable
from .openapi import IDEMPOTENCY_ACK_PATTERN, IDEMPOTENCY_KEY_PATTERN
from .scorer import Scorer

#: ``type`` of the 422 for an image file that does not decode.
UNDECODABLE = "value_error.image"
#: ``type`` of the 422 for a request over ``max_logits_per_request``.
TOO_MUCH_WORK = "value_error.too_much_work"

__all__ = [
    "ImageRefused",
    "open_image",
    "open_reduced",
    "decode_upload",
    "check_count",
    "check_class_names",
    "check_prompt_sets",
    "check_offsets",
    "check_template",
    "check_labels",
    "check_idempotency_key",
    "check_acknowledgements",
    "check_work",
    "require_text",
    "lookup_images",
    "UNDECODABLE",
    "TOO_MUCH_WORK",
    "MAX_TEMPLATE_CHARS",
]

# Formats a client may upload; anything else is refused before a decoder runs.
_FORMATS = ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "PPM"]

# The header formats the schema states (see skcarrot.serve.openapi), matched whole.
_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN.replace("$", r"\Z"))
_ACKS = re.compile(IDEMPOTENCY_ACK_PATTERN.replace("$", r"\Z"))

# Images being decoded at once, in the whole process.
_DECODING = threading.BoundedSemaphore(2)

# An image of at least this many pixels is large: once it is reduced, the memory its
# decoding took is handed back to the operating system.
_LARGE_PIXELS = 1 << 20


def _libc_trim():
    try:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        trim = None
    return trim


_TRIM = _libc_trim()


def _give_back_memory() -> None:
    """Return freed heap memory to the operating system (glibc's ``malloc_trim``; elsewhere nothing).

    A decoded image of 4096 x 4096 pixels takes tens of MiB in blocks that the C
    allocator would otherwise keep, in each thread's arena, long after it is freed.
    """
    if _TRIM is not None:
        _TRIM(0)


# What a decoder's message may say about this process's objects (``<_io.BytesIO object at 0x...>``).
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def _scrubbed(exc: Exception) -> str:
    text = _OBJECT_REPR.sub("the file", str(exc))
    return text[:200]


class ImageRefused(ValueError):
    """An image file that is not decoded; ``kind`` is the 422's ``type``."""

    def __init__(self, message: str, kind: str = UNDECODABLE) -> None:
        super().__init__(message)
        self.kind = kind


def open_image(raw: bytes, max_pixels: int) -> Image.Image:
    """Decode one image file to RGB, refusing images over ``max_pixels`` before their pixels are decoded.

    Raises
    ------
    ImageRefused
        A file no allowed decoder reads, an image without pixels, or a
        decompression bomb (``kind`` ``"value_error.decompression_bomb"``).

    Examples
    --------
    >>> import io
    >>> from PIL import Image
    >>> from skcarrot.serve.validation import open_image
    >>> png = io.BytesIO()
    >>> Image.new("L", (100, 100)).save(png, format="PNG")
    >>> open_image(png.getvalue(), max_pixels=10_000).mode
    'RGB'
    >>> open_image(png.getvalue(), max_pixels=9_999)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    skcarrot.serve.validation.ImageRefused: image is 100x100 = 10000 pixels, more than the 9999 allowed (...)
    """
    bomb = "value_error.decompression_bomb"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw), formats=_FORMATS)
            width, height = img.size
            if width < 1 or height < 1:
                raise ImageRefused(f"image has no pixels ({width}x{height})")
            if width * height > max_pixels:
                raise ImageRefused(
                    f"image is {width}x{height} = {width * height} pixels, more than the {max_pixels} allowed "
                    "(a decompression bomb, or simply too large: resize it before uploading)",
                    bomb,
                )
            img.seek(0)
            return img.convert("RGB")
    except ImageRefused:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRefused(f"decompression bomb refused: {_scrubbed(exc)}", bomb) from None
    except Image.UnidentifiedImageError:
        raise ImageRefused(f"not an image file in an accepted format ({', '.join(_FORMATS)})") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the client's file
        raise ImageRefused(f"cannot decode the image file ({type(exc).__name__}: {_scrubbed(exc)})") from None


def open_reduced(raw: bytes, max_pixels: int, reduce) -> tuple[Image.Image, tuple[int, int]]:
    """Decode one image file within the process's bound on images decoded at once, and reduce it there.

    Returns ``(reduce(rgb), (width, height))``: the image as a model reads it, and the size it
    was sent at. Only the reduced image outlives the decoding, so a request holds its images
    at the model's size, whatever size they were sent at. Raises :class:`ImageRefused` as
    :func:`open_image`.
    """
    with _DECODING:
        rgb = open_image(raw, max_pixels)
        size = rgb.size
        small = reduce(rgb)
        del rgb
    if size[0] * size[1] >= _LARGE_PIXELS:
        _give_back_memory()  # the full-size pixels are gone: let the process shrink again
    return small, size


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def decode_upload(
    encoded: str, loc: tuple, max_pixels: int, reduce=None
) -> tuple[str, bytes, Image.Image]:
    """Decode one base64 image file; returns ``(content_id, file_to_store, rgb_image)``.

    Refuses (422, naming ``loc``) invalid base64, files no decoder reads, and
    images over ``max_pixels`` before their pixels are decoded. The content id
    is that of the image as sent; ``reduce(rgb)`` (the model's own resize and
    crop) gives the image kept, stored as a PNG when it is smaller than the one
    sent, else the file as sent.
    """
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(loc, "not valid base64; send each image file base64-encoded") from None
    if not raw:
        raise invalid(loc, "empty image file")
    # Decoding holds the image's full pixels (up to max_pixels x 3 bytes) until it is reduced:
    # a few at a time in the whole process, so memory stays bounded however many requests come.
    with _DECODING:
        try:
            rgb = open_image(raw, max_pixels)
        except ImageRefused as exc:
            raise invalid(loc, str(exc), exc.kind) from None
        large = rgb.size[0] * rgb.size[1] >= _LARGE_PIXELS
        content_id = image_content_id(rgb)
        if reduce is not None:
            small = reduce(rgb)
            if small is not rgb:
                rgb = small
                raw = _png(small)
    if large and rgb.size[0] * rgb.size[1] < _LARGE_PIXELS:
        _give_back_memory()  # the full-size pixels are gone: let the process shrink again
    return content_id, raw, rgb


def lookup_images(
    store: ImageStore, key_id: int, ids: Sequence[str], sent: Mapping[str, Image.Image] | None = None
) -> list[Image.Image]:
    """The images named by ``ids``, in order; 422 naming the first unknown id.

    ``sent``: images uploaded with the request itself, by content id (not looked up).
    """
    try:
        found = store.fetch(key_id, [i for i in ids if i not in sent] if sent else ids)
    except StoredImageUnreadable as exc:
        raise invalid(("stored", exc.image_id), str(exc.cause), getattr(exc.cause, "kind", "value_error")) from None
    found.update(sent or {})
    unknown = [(i, image_id) for i, image_id in enumerate(ids) if image_id not in found]
    if unknown:
        index, first = unknown[0]
        raise invalid(
            ("body", "image_ids", index),
            f"{len(unknown)} unknown image id(s), first {first} at index {index}; upload the images "
            "with POST /v1/images first (ids are per key)",
            "value_error.unknown_image",
        )
    return [found[i] for i in ids]


def check_count(n: int, limit: int, loc: tuple, noun: str, advice: str = "") -> None:
    """422 when ``n`` items are more than the ``limit`` allowed per request."""
    if n > limit:
        raise invalid(loc, f"{n} {noun}, more than the {limit} allowed per request{advice}")


def _tokenizable(tokenize, loc: tuple, what: str) -> Any:
    try:
        return tokenize()
    except Exception as exc:  # noqa: BLE001 - whatever the tokenizer chokes on is the client's text
        raise invalid(loc, f"cannot tokenize the {what}: {_scrubbed(exc)}", "value_error.context_length") from None


def _check_text(text: str, loc: tuple, max_chars: int, empty: str, named: str) -> None:
    if not text:
        raise invalid(loc, f"{empty} is empty")
    if len(text) > max_chars:
        raise invalid(loc, f"{named} has {len(text)} characters, more than {max_chars}")


def check_class_names(names: Sequence[str], loc: tuple, settings: Settings, scorer: Scorer) -> list[str]:
    """Class names: not too many, none empty or too long, all readable by the model's tokenizer."""
    check_count(len(names), settings.max_classes, loc, "class names")
    for j, name in enumerate(names):
        _check_text(name, (*loc, j), settings.max_class_name_chars, "class name", "class name")
    _tokenizable(lambda: scorer.tokenize_class_names(names), loc, "class names")
    return list(names)


def check_prompt_sets(
    prompts: Sequence[Sequence[str]], loc: tuple, settings: Settings, scorer: Scorer, max_chars: int | None = None
) -> list[list[str]]:
    """Prompt sets: of one width, strings neither empty nor longer than ``max_chars`` (default
    ``max_class_name_chars``), none over the context length."""
    s = settings
    max_chars = s.max_class_name_chars if max_chars is None else max_chars
    if len(prompts) > s.max_prompts_per_request:
        raise invalid(loc, f"{len(prompts)} prompt sets, more than the {s.max_prompts_per_request} allowed")
    width = len(prompts[0])
    strings: list[str] = []
    for i, prompt_set in enumerate(prompts):
        if len(prompt_set) != width:
            raise invalid(
                (*loc, i),
                f"prompt set {i} has {len(prompt_set)} strings but prompt set 0 has {width}; all must match",
                "value_error.ragged",
            )
        if not prompt_set:
            raise invalid((*loc, i), "prompt set is empty; give one prompt string per class")
        if len(prompt_set) > s.max_classes:
            raise invalid((*loc, i), f"{len(prompt_set)} strings, more than the {s.max_classes} classes allowed")
        for j, text in enumerate(prompt_set):
            _check_text(text, (*loc, i, j), max_chars, "prompt string", "prompt")
        strings.extend(prompt_set)
    too_long = _tokenizable(lambda: scorer.overlong_prompts(strings), loc, "prompts")
    if too_long:
        raise invalid(loc, f"prompt {too_long[0][:80]!r} is longer than the model's context length; shorten it",
                      "value_error.context_length")
    return [list(p) for p in prompts]


def check_offsets(value: Any, loc: tuple, settings: Settings, scorer: Scorer) -> np.ndarray:
    """Prompt offsets ``(P, n_ctx, dim)``: at most ``max_prompts_per_request``, finite, none larger
    than ``max_offset_abs`` in absolute value; as float32."""
    n_ctx, dim = scorer.context_shape
    try:
        offsets = decode_array(value, ndim=3)
    except WireFormatError as exc:
        kind = {"data": "value_error.array_data", "shape": "value_error.shape"}.get(exc.field, "value_error")
        raise invalid(loc if exc.field is None else (*loc, exc.field), str(exc), kind) from None
    if offsets.shape[1:] != (n_ctx, dim) or offsets.shape[0] < 1:
        raise invalid(
            loc,
            f"offsets must have shape (P, {n_ctx}, {dim}) with P >= 1, got {list(offsets.shape)}; "
            "GET /v1/info gives the context shape",
            "value_error.shape",
        )
    check_count(offsets.shape[0], settings.max_prompts_per_request, loc, "prompts", "; split them")
    largest = float(np.max(np.abs(offsets))) if offsets.size else 0.0
    if largest > settings.max_offset_abs:
        bad = [int(i) for i in np.argwhere(np.abs(offsets) > settings.max_offset_abs)[0]]
        raise invalid(
            loc,
            f"offset {largest:.3g} (first at index {bad}) is larger in absolute value than the "
            f"{settings.max_offset_abs:g} allowed (max_offset_abs in GET /v1/info); the model would only overflow",
            "value_error.offset_too_large",
        )
    return offsets.astype(np.float32)


def check_work(n_prompts: int, n_images: int, n_columns: int, settings: Settings) -> None:
    """422 when a request asks for more than ``max_logits_per_request`` logits (prompts x images x classes)."""
    work = int(n_prompts) * int(n_images) * int(n_columns)
    limit = settings.max_logits_per_request
    if work > limit:
        raise invalid(
            ("body",),
            f"{n_prompts} prompts x {n_images} images x {n_columns} classes = {work} logits, more than the "
            f"{limit} allowed per request (max_logits_per_request in GET /v1/info); split the prompts or the images",
            TOO_MUCH_WORK,
        )


#: Longest hypothesis template of the zero-shot contract.
MAX_TEMPLATE_CHARS = 64


def check_template(template: str, loc: tuple) -> str:
    """A hypothesis template with exactly one ``{}``, where the label goes, of at most 64 characters."""
    if template.count("{}") != 1:
        raise invalid(loc, f"must contain '{{}}' exactly once (where the label goes), got {template[:80]!r}")
    if len(template) > MAX_TEMPLATE_CHARS:
        raise invalid(loc, f"template has {len(template)} characters, more than {MAX_TEMPLATE_CHARS}")
    return template


def check_labels(labels: Sequence[str], loc: tuple, settings: Settings) -> list[str]:
    """Candidate labels: at most ``max_classes``, each 1 to ``max_class_name_chars`` characters."""
    check_count(len(labels), settings.max_classes, loc, "candidate labels")
    for j, label in enumerate(labels):
        _check_text(label, (*loc, j), settings.max_class_name_chars, "label", "label")
    return list(labels)


def check_idempotency_key(value: str | None) -> str | None:
    """The ``Idempotency-Key`` header: 1-200 printable ASCII characters (no space at either end), or absent."""
    if value is None:
        return None
    if not _KEY.match(value):
        raise invalid(("header", "Idempotency-Key"), "must be 1 to 200 printable ASCII characters (a UUID is ideal)")
    return value


def check_acknowledgements(value: str | None) -> list[str]:
    """The ``Idempotency-Ack`` header: up to 64 ``Idempotency-Key`` values (no spaces), comma-separated."""
    if value is None or value == "":
        return []
    if not _ACKS.match(value):
        raise invalid(
            ("header", "Idempotency-Ack"),
            "must be up to 64 comma-separated keys of 1 to 200 printable ASCII characters, without spaces",
        )
    return value.split(",")


def require_text(scorer: Scorer, loc: tuple) -> None:
    """422 when the served model does not read prompt strings (no text endpoints)."""
    if not scorer.text_capable:
        raise invalid(loc, "this server's model does not score prompt strings", "value_error.text_endpoints")
