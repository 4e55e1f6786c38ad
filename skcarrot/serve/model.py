"""The served model: decoding uploads safely, caching images, scoring.

This is the far side of the door. Pixels arrive once, as encoded image files,
and are kept (decoded, in memory; encoded, in the ledger) under their content
id; scoring requests name images by id, so a generation's prompts never resend
pixels, and the model's own cache keeps each image's features.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from ..backends.http import image_content_id
from .errors import ApiError, invalid
from .settings import Settings

__all__ = ["ModelService", "decode_array", "encode_array"]

logger = logging.getLogger("skcarrot.serve")

# Formats a client may upload; anything else is refused before a decoder runs.
_FORMATS = ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "PPM"]


def decode_array(value: Any, loc: tuple, ndim: int, max_items: int = 50_000_000) -> np.ndarray:
    """An :class:`~skcarrot.serve.schemas.Array` or nested lists as a finite float array.

    Raises a 422 naming ``loc`` for a wrong dimension count, a data length that
    does not match the shape, invalid base64 or NaN / infinity.
    """
    if isinstance(value, list):
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (ValueError, TypeError):
            raise invalid(loc, f"nested lists are ragged; expected a rectangular array of {ndim} dimensions") from None
        if arr.ndim != ndim:
            raise invalid(loc, f"expected {ndim} dimensions, got an array of shape {list(arr.shape)}")
    else:
        shape = [int(s) for s in value.shape]
        if len(shape) != ndim:
            raise invalid((*loc, "shape"), f"expected {ndim} dimensions, got shape {shape}")
        n_items = int(np.prod(shape, dtype=np.int64))
        if n_items > max_items:
            raise invalid((*loc, "shape"), f"shape {shape} has {n_items} items, more than the {max_items} allowed")
        try:
            raw = base64.b64decode(value.data, validate=True)
        except (binascii.Error, ValueError):
            raise invalid((*loc, "data"), "data is not valid base64") from None
        itemsize = 4 if value.dtype == "float32" else 8
        if len(raw) != n_items * itemsize:
            raise invalid(
                (*loc, "data"),
                f"data holds {len(raw)} bytes but shape {shape} of {value.dtype} needs {n_items * itemsize}",
            )
        arr = np.frombuffer(raw, dtype="<f4" if itemsize == 4 else "<f8").reshape(shape)
    if not np.all(np.isfinite(arr)):
        bad = [int(i) for i in np.argwhere(~np.isfinite(arr))[0]]
        raise invalid(loc, f"contains NaN or infinity (first at index {bad}); every value must be finite")
    return arr


def encode_array(arr: np.ndarray) -> dict[str, Any]:
    """An array as a JSON-ready :class:`~skcarrot.serve.schemas.Array`, float32 when that is exact.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot.serve.model import encode_array
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


class ModelService:
    """The model behind the door, with its image cache.

    Parameters
    ----------
    settings : Settings
    """

    def __init__(self, settings: Settings) -> None:
        from ..backends.embedded import embedded_backend
        from ..backends.openclip import OpenCLIPBackend

        self.settings = settings
        if settings.backend is not None:
            backend = settings.backend
        elif settings.model_name is None:
            backend = embedded_backend(template=settings.template, device=settings.device)
        else:
            backend = OpenCLIPBackend(
                model_name=settings.model_name,
                pretrained=settings.pretrained,
                template=settings.template,
                device=settings.device,
            )
        self.backend = backend
        self.text_capable = isinstance(backend, OpenCLIPBackend)
        params = backend.get_params() if hasattr(backend, "get_params") else {}
        self.model_name = str(params.get("model_name", type(backend).__name__))
        pretrained = params.get("pretrained")
        self.pretrained = None if pretrained is None else str(pretrained)
        self.template = str(params.get("template", settings.template))
        tag = "random-init" if self.pretrained is None else os.path.basename(self.pretrained)
        self.model_id = f"{self.model_name}:{tag}" if self.text_capable else self.model_name
        self._context_shape: tuple[int, int] | None = None
        self._images: OrderedDict[str, Image.Image] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def context_shape(self) -> tuple[int, int]:
        """``(n_ctx, dim)``; loads the model on first use."""
        if self._context_shape is None:
            n_ctx, dim = self.backend.context_shape
            self._context_shape = (int(n_ctx), int(dim))
        return self._context_shape

    @property
    def loaded(self) -> bool:
        return self._context_shape is not None

    # -- images -------------------------------------------------------------------------

    def decode_upload(self, encoded: str, loc: tuple) -> tuple[str, bytes, Image.Image]:
        """Decode one base64 image file; returns ``(content_id, file_bytes, rgb_image)``.

        Refuses (422, naming ``loc``) invalid base64, files no decoder reads, and
        images over ``max_image_pixels`` before their pixels are decoded.
        """
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise invalid(loc, "not valid base64; send each image file base64-encoded") from None
        if not raw:
            raise invalid(loc, "empty image file")
        return (*self._decode_bytes(raw, loc),)

    def _decode_bytes(self, raw: bytes, loc: tuple) -> tuple[str, bytes, Image.Image]:
        limit = self.settings.max_image_pixels
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(raw), formats=_FORMATS)
                width, height = img.size
                if width < 1 or height < 1:
                    raise invalid(loc, f"image has no pixels ({width}x{height})")
                if width * height > limit:
                    raise invalid(
                        loc,
                        f"image is {width}x{height} = {width * height} pixels, more than the {limit} allowed "
                        "(a decompression bomb, or simply too large: resize it before uploading)",
                        "value_error.decompression_bomb",
                    )
                img.seek(0)
                rgb = img.convert("RGB")
        except ApiError:
            raise
        except Image.DecompressionBombError as exc:
            raise invalid(loc, f"decompression bomb refused: {exc}", "value_error.decompression_bomb") from None
        except Image.DecompressionBombWarning as exc:
            raise invalid(loc, f"decompression bomb refused: {exc}", "value_error.decompression_bomb") from None
        except Exception as exc:  # noqa: BLE001 - any decoder failure is the client's file
            raise invalid(loc, f"cannot decode the image file ({type(exc).__name__}: {exc})") from None
        return image_content_id(rgb), raw, rgb

    def remember(self, image_id: str, image: Image.Image) -> None:
        with self._lock:
            self._images[image_id] = image
            self._images.move_to_end(image_id)
            while len(self._images) > self.settings.image_cache_size:
                self._images.popitem(last=False)

    def images(self, ids: Sequence[str], key_id: int, ledger: Any) -> list[Image.Image]:
        """The images named by ``ids``, from memory or the ledger; 422 naming unknown ids."""
        found: dict[str, Image.Image] = {}
        with self._lock:
            for image_id in ids:
                img = self._images.get(image_id)
                if img is not None:
                    found[image_id] = img
                    self._images.move_to_end(image_id)
        wanted = [i for i in dict.fromkeys(ids) if i not in found]
        if wanted:
            # Another process (or this one before a restart) may have stored them.
            stored = ledger.load_images(key_id, wanted)
            for image_id, raw in stored.items():
                _, _, img = self._decode_bytes(raw, ("stored", image_id))
                found[image_id] = img
                self.remember(image_id, img)
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

    # -- scoring ------------------------------------------------------------------------

    def check_class_names(self, names: Sequence[str], loc: tuple) -> list[str]:
        s = self.settings
        if len(names) > s.max_classes:
            raise invalid(loc, f"{len(names)} class names, more than the {s.max_classes} allowed per request")
        for j, name in enumerate(names):
            if not name.strip():
                raise invalid((*loc, j), "class name is empty")
            if len(name) > s.max_class_name_chars:
                raise invalid((*loc, j), f"class name has {len(name)} characters, more than {s.max_class_name_chars}")
        if self.text_capable:
            try:
                self.backend._box().tokens_for(list(names))
            except Exception as exc:  # noqa: BLE001 - whatever the tokenizer chokes on is the client's text
                raise invalid(loc, f"cannot tokenize the class names: {exc}") from None
        return list(names)

    def check_prompt_sets(self, prompts: Sequence[Sequence[str]], loc: tuple) -> list[list[str]]:
        s = self.settings
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
                if not text.strip():
                    raise invalid((*loc, i, j), "prompt string is empty")
                if len(text) > s.max_class_name_chars:
                    raise invalid((*loc, i, j), f"prompt has {len(text)} characters, more than {s.max_class_name_chars}")
            strings.extend(prompt_set)
        if self.text_capable:
            box = self.backend._box()
            distinct = list(dict.fromkeys(strings))
            try:
                tokens = box.tokenizer(distinct)
            except Exception as exc:  # noqa: BLE001 - whatever the tokenizer chokes on is the client's text
                raise invalid(loc, f"cannot tokenize the prompts: {exc}") from None
            too_long = [t for t, row in zip(distinct, tokens) if int(row[-1]) != 0]
            if too_long:
                raise invalid(loc, f"prompt {too_long[0]!r} is longer than the model's context length; shorten it")
        return [list(p) for p in prompts]

    def check_offsets(self, value: Any, loc: tuple) -> np.ndarray:
        offsets = decode_array(value, loc, ndim=3)
        n_ctx, dim = self.context_shape
        if offsets.shape[1:] != (n_ctx, dim) or offsets.shape[0] < 1:
            raise invalid(
                loc,
                f"offsets must have shape (P, {n_ctx}, {dim}) with P >= 1, got {list(offsets.shape)}; "
                "GET /v1/info gives the context shape",
            )
        if offsets.shape[0] > self.settings.max_prompts_per_request:
            raise invalid(
                loc,
                f"{offsets.shape[0]} prompts, more than the {self.settings.max_prompts_per_request} allowed "
                "per request; split them",
            )
        return offsets.astype(np.float32)

    def score(self, images: Sequence[Image.Image], class_names: Sequence[str], offsets: np.ndarray) -> np.ndarray:
        out = np.asarray(self.backend.logits(images, list(class_names), offsets), dtype=np.float64)
        expected = (len(offsets), len(images), len(class_names))
        if out.shape != expected or not np.all(np.isfinite(out)):
            raise RuntimeError(f"the model returned logits of shape {out.shape} (expected {expected}) or non-finite")
        return out

    def score_text(self, images: Sequence[Image.Image], prompts: Sequence[Sequence[str]]) -> np.ndarray:
        from ..backends.text import score_prompt_sets

        if not self.text_capable:
            raise ApiError(404, "this server's model does not score prompt strings (not an open_clip model)")
        return np.asarray(score_prompt_sets(self.backend, images, prompts), dtype=np.float64)
