"""The published schema states this server's own limits, so what it promises is what it accepts.

The request models (:mod:`skcarrot.serve.schemas`) say what any server takes;
:func:`openapi_schema` adds what this one takes (its :class:`Settings`: lengths,
counts, the context shape of its model, the largest offset) and the refusals
any operation may answer. Everything the schema states is checked again, with
the same limits, by :mod:`skcarrot.serve.validation` (a 422 naming the field),
so a request the schema calls valid is refused only for what no schema can
state: an image id this key never uploaded, bytes that are no image, array data
that does not fill its shape, text longer than the model's context, work over
``max_logits_per_request``.
"""

from __future__ import annotations

from typing import Any

from .config import Settings
from .schemas import BASE64_PATTERN

__all__ = ["openapi_schema", "COMMON_ERRORS", "IDEMPOTENCY_KEY_PATTERN", "IDEMPOTENCY_ACK_PATTERN", "SEMANTIC_REFUSALS"]

#: An ``Idempotency-Key``: 1 to 200 printable ASCII characters, not starting or ending with a space.
IDEMPOTENCY_KEY_PATTERN = r"^[!-~](?:[ -~]{0,198}[!-~])?$"

#: An ``Idempotency-Ack``: up to 64 keys without spaces or commas, comma-separated.
IDEMPOTENCY_ACK_PATTERN = r"^(?:[!-+\x2D-~]{1,200}(?:,[!-+\x2D-~]{1,200}){0,63})?$"

#: The ``type`` of each 422 a request valid under the schema may still get (what no schema can state).
SEMANTIC_REFUSALS = frozenset(
    {
        "value_error.unknown_image",  # ids are per key, and exist once uploaded
        "value_error.image",  # base64 of bytes that no image decoder reads
        "value_error.decompression_bomb",  # an image over max_image_pixels, known once its header is read
        "value_error.array_data",  # array data that does not fill its shape
        "value_error.shape",  # an Array's shape is not (P, n_ctx, dim) of the served model, or too large
        "value_error.ragged",  # prompt sets of different lengths
        "value_error.context_length",  # text longer than the model's context, in tokens
        "value_error.too_much_work",  # prompts x images x classes over max_logits_per_request
        "value_error.idempotency_conflict",  # a key reused with another body
        "value_error.image_quota",  # the key's image storage is full
        "value_error.text_endpoints",  # a model that reads no prompt strings
    }
)

_ERROR = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}

#: Refusals any operation may answer, before or whatever its route.
COMMON_ERRORS: dict[str, dict[str, Any]] = {
    "413": {"description": "Request body over max_body_bytes", **_ERROR},
    "431": {"description": "Request headers over max_header_bytes", **_ERROR},
    "503": {"description": "The ledger's database is unreachable or full; nothing was charged, see Retry-After",
            **_ERROR},
}


def _resolve(schema: dict, node: dict) -> dict:
    ref = node.get("$ref")
    if ref is None:
        return node
    return schema["components"]["schemas"][ref.rsplit("/", 1)[-1]]


def _model(schema: dict, name: str) -> dict | None:
    """The component of a request model (FastAPI names it ``Name`` or ``Name-Input``)."""
    components = schema.get("components", {}).get("schemas", {})
    return components.get(f"{name}-Input") or components.get(name)


def _prop(schema: dict, model: str, name: str) -> dict | None:
    component = _model(schema, model)
    if component is None:
        return None
    prop = component.get("properties", {}).get(name)
    return None if prop is None else _resolve(schema, prop)


def _nested_offsets(node: dict) -> dict | None:
    """The nested-lists branch of an offsets field (``anyOf`` of an Array and lists)."""
    for option in node.get("anyOf", [node]):
        if option.get("type") == "array":
            return option
    return None


def openapi_schema(base: dict, settings: Settings, context_shape: tuple[int, int]) -> dict:
    """``base`` (FastAPI's schema) with ``settings``' limits and the common refusals added; changed in place."""
    s = settings
    names = s.max_class_name_chars

    def limit(model: str, prop: str, **constraints) -> dict | None:
        node = _prop(base, model, prop)
        if node is not None:
            node.update(constraints)
        return node

    limit("Array", "data", pattern=BASE64_PATTERN)
    limit("Array", "shape", minItems=3, maxItems=3)  # offsets (P, n_ctx, dim) and logits (P, N, C)
    limit("UploadRequest", "images", maxItems=s.max_images_per_request)
    limit("MissingRequest", "ids", maxItems=4 * s.max_images_per_request)
    for model in ("ScoreRequest", "ScoreTextRequest"):
        limit(model, "image_ids", maxItems=s.max_images_per_request)
        inline = _prop(base, model, "images")
        for option in [] if inline is None else inline.get("anyOf", [inline]):
            if option.get("type") == "array":
                option["maxItems"] = s.max_images_per_request
    classes = limit("ScoreRequest", "class_names", maxItems=s.max_classes)
    if classes is not None:
        classes["items"]["maxLength"] = names
    offsets = _prop(base, "ScoreRequest", "offsets")
    nested = None if offsets is None else _nested_offsets(offsets)
    if nested is not None:
        n_ctx, dim = context_shape
        nested.update(minItems=1, maxItems=s.max_prompts_per_request)
        nested["items"].update(minItems=n_ctx, maxItems=n_ctx)
        nested["items"]["items"].update(minItems=dim, maxItems=dim)
        nested["items"]["items"]["items"].update(minimum=-s.max_offset_abs, maximum=s.max_offset_abs)
    prompts = limit("ScoreTextRequest", "prompts", maxItems=s.max_prompts_per_request)
    if prompts is not None:
        prompts["items"]["maxItems"] = s.max_classes
        prompts["items"]["items"]["maxLength"] = names
    labels = limit("ZeroShotParameters", "candidate_labels", maxItems=s.max_classes)
    if labels is not None:
        labels["items"]["maxLength"] = names
    for path in base.get("paths", {}).values():
        for operation in path.values():
            responses = operation.setdefault("responses", {})
            for status, answer in COMMON_ERRORS.items():
                responses.setdefault(status, answer)
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "header" and parameter.get("name", "").lower() == "idempotency-key":
                    parameter["schema"] = {
                        "type": "string", "minLength": 1, "maxLength": 200, "pattern": IDEMPOTENCY_KEY_PATTERN,
                        "title": "Idempotency-Key",
                    }
                if parameter.get("in") == "header" and parameter.get("name", "").lower() == "idempotency-ack":
                    parameter["schema"] = {
                        "type": "string", "maxLength": 64 * 201, "pattern": IDEMPOTENCY_ACK_PATTERN,
                        "title": "Idempotency-Ack",
                    }
    return base
