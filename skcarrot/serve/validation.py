"""Checks of what a request sends, past its schema: each refusal a 422 naming the field.

Images are decoded safely (formats by name, decompression bombs refused before
their pixels are), class names and prompts must be ones the model can read, and
arrays travel in the codec of :mod:`skcarrot.wire`.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from ..wire import WireFormatError, decode_array, image_content_id
from .config import Settings
from .errors import invalid
from .image_store import ImageStore, StoredImageUnreadable
from .scorer import Scorer

__all__ = [
    "ImageRefused",
    "open_image",
    "decode_upload",
    "check_count",
    "check_class_names",
    "check_prompt_sets",
    "check_offsets",
    "check_template",
    "check_idempotency_key",
    "require_text",
    "lookup_images",
]

# Formats a client may upload; anything else is refused before a decoder runs.
_FORMATS = ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "PPM"]


class ImageRefused(ValueError):
    """An image file that is not decoded; ``kind`` is the 422's ``type``."""

    def __init__(self, message: str, kind: str = "value_error") -> None:
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
        raise ImageRefused(f"decompression bomb refused: {exc}", bomb) from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the client's file
        raise ImageRefused(f"cannot decode the image file ({type(exc).__name__}: {exc})") from None


def decode_upload(encoded: str, loc: tuple, max_pixels: int) -> tuple[str, bytes, Image.Image]:
    """Decode one base64 image file; returns ``(content_id, file_bytes, rgb_image)``.

    Refuses (422, naming ``loc``) invalid base64, files no decoder reads, and
    images over ``max_pixels`` before their pixels are decoded.
    """
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(loc, "not valid base64; send each image file base64-encoded") from None
    if not raw:
        raise invalid(loc, "empty image file")
    try:
        rgb = open_image(raw, max_pixels)
    except ImageRefused as exc:
        raise invalid(loc, str(exc), exc.kind) from None
    return image_content_id(rgb), raw, rgb


def lookup_images(store: ImageStore, key_id: int, ids: Sequence[str]) -> list[Image.Image]:
    """The images named by ``ids``, in order; 422 naming the first unknown id."""
    try:
        found = store.fetch(key_id, ids)
    except StoredImageUnreadable as exc:
        raise invalid(("stored", exc.image_id), str(exc.cause), getattr(exc.cause, "kind", "value_error")) from None
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
        raise invalid(loc, f"cannot tokenize the {what}: {exc}") from None


def _check_text(text: str, loc: tuple, max_chars: int, empty: str, named: str) -> None:
    if not text.strip():
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
    prompts: Sequence[Sequence[str]], loc: tuple, settings: Settings, scorer: Scorer
) -> list[list[str]]:
    """Prompt sets: of one width, strings neither empty nor too long, none over the context length."""
    s = settings
    if len(prompts) > s.max_prompts_per_request:
        raise invalid(loc, f"{len(prompts)} prompt sets, more than the {s.max_prompts_per_request} allowed")
    width = len(prompts[0])
    strings: list[str] = []
    for i, prompt_set in enumerate(prompts):
        if len(prompt_set) != width:
            raise invalid(
                (*loc, i),
                f"prompt set {i} has {len(prompt_set)} strings but prompt set 0 has {width}; all must match",
            )
        if not prompt_set:
            raise invalid((*loc, i), "prompt set is empty; give one prompt string per class")
        if len(prompt_set) > s.max_classes:
            raise invalid((*loc, i), f"{len(prompt_set)} strings, more than the {s.max_classes} classes allowed")
        for j, text in enumerate(prompt_set):
            _check_text(text, (*loc, i, j), s.max_class_name_chars, "prompt string", "prompt")
        strings.extend(prompt_set)
    too_long = _tokenizable(lambda: scorer.overlong_prompts(strings), loc, "prompts")
    if too_long:
        raise invalid(loc, f"prompt {too_long[0]!r} is longer than the model's context length; shorten it")
    return [list(p) for p in prompts]


def check_offsets(value: Any, loc: tuple, settings: Settings, scorer: Scorer) -> np.ndarray:
    """Prompt offsets ``(P, n_ctx, dim)``, finite, at most ``max_prompts_per_request`` of them, as float32."""
    try:
        offsets = decode_array(value, ndim=3)
    except WireFormatError as exc:
        raise invalid(loc if exc.field is None else (*loc, exc.field), str(exc)) from None
    n_ctx, dim = scorer.context_shape
    if offsets.shape[1:] != (n_ctx, dim) or offsets.shape[0] < 1:
        raise invalid(
            loc,
            f"offsets must have shape (P, {n_ctx}, {dim}) with P >= 1, got {list(offsets.shape)}; "
            "GET /v1/info gives the context shape",
        )
    check_count(offsets.shape[0], settings.max_prompts_per_request, loc, "prompts", "; split them")
    return offsets.astype(np.float32)


def check_template(template: str, loc: tuple) -> str:
    """A hypothesis template with exactly one ``{}``, where the label goes."""
    if template.count("{}") != 1:
        raise invalid(loc, f"must contain '{{}}' exactly once (where the label goes), got {template!r}")
    return template


def check_idempotency_key(value: str | None) -> str | None:
    """The ``Idempotency-Key`` header: 1-200 printable ASCII characters, or absent."""
    if value is None:
        return None
    if not 1 <= len(value) <= 200 or not value.isascii() or not value.isprintable():
        raise invalid(("header", "Idempotency-Key"), "must be 1 to 200 printable ASCII characters (a UUID is ideal)")
    return value


def require_text(scorer: Scorer, loc: tuple) -> None:
    """422 when the served model does not read prompt strings (no text endpoints)."""
    if not scorer.text_capable:
        raise invalid(loc, "this server's model does not score prompt strings")
