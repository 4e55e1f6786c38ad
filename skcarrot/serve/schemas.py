"""Request and response bodies: the OpenAPI schema built from them is the contract.

Arrays travel either as JSON nested lists or as :class:`Array`, raw
little-endian bytes in base64 (exact, and about 4x smaller than JSON text).
Nothing is ever unpickled.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "Array",
    "UploadRequest",
    "UploadResponse",
    "MissingRequest",
    "MissingResponse",
    "ScoreRequest",
    "ScoreTextRequest",
    "ScoreResponse",
    "ZeroShotParameters",
    "ZeroShotRequest",
    "LabelScore",
    "InfoResponse",
    "UsageResponse",
    "HealthResponse",
    "ErrorResponse",
]

ImageId = Annotated[
    str,
    Field(pattern=r"^[0-9a-f]{64}$", description="Content id of an uploaded image (sha256, hex), from /v1/images"),
]
Nested3 = list[list[list[float]]]

#: Standard base64 (RFC 4648, with padding, no whitespace).
BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"

#: A hypothesis template: exactly one ``{}``.
TEMPLATE_PATTERN = r"^(?:[^{]|\{+[^{}])*\{*\{\}(?:[^{]|\{+[^{}])*\{*$"

ImageFile = Annotated[str, Field(min_length=4, pattern=BASE64_PATTERN, description="base64 of an encoded image file")]
Text = Annotated[str, Field(min_length=1)]


_INLINE_IMAGES = (
    "Images to upload with this request, as POST /v1/images would (base64 of encoded image files, not "
    "charged, kept within the key's image quota): `image_ids` may name them. Saves a request when a few "
    "images are new"
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Array(_Strict):
    """An n-dimensional array as raw little-endian bytes, base64-encoded."""

    shape: list[Annotated[int, Field(ge=0, le=1_000_000)]] = Field(
        ..., min_length=1, max_length=4, description="Dimensions, C order"
    )
    dtype: Literal["float32", "float64"] = Field(..., description="Little-endian IEEE float")
    # base64 is checked where the array is decoded (a 422 naming the field); the schema states it
    data: str = Field(..., description="base64 of the raw bytes, C order")


class UploadRequest(_Strict):
    """Images to cache on the server, each an encoded image file (PNG, JPEG, ...) in base64."""

    images: list[ImageFile] = Field(..., min_length=1, description="base64 of encoded image files")


class UploadResponse(BaseModel):
    """Content ids of the uploaded images, in order; send these instead of pixels."""

    ids: list[str]
    stored: int = Field(..., description="How many were new to this key")


class MissingRequest(_Strict):
    """Content ids to look up."""

    ids: list[ImageId] = Field(..., min_length=1)


class MissingResponse(BaseModel):
    """Those of the ids this key has not uploaded yet."""

    missing: list[str]


class ScoreRequest(_Strict):
    """Score uploaded images x class names under each prompt offset: one query per prompt."""

    image_ids: list[ImageId] = Field(..., min_length=1)
    class_names: list[Text] = Field(..., min_length=1, description="One name per class, in column order")
    offsets: Array | Nested3 = Field(
        ..., description="Prompt offsets (P, n_ctx, dim): an Array (float32 or float64) or nested lists"
    )
    encoding: Literal["base64", "json"] = Field(
        "base64", description="How the logits come back: an Array, or nested lists"
    )
    images: list[ImageFile] | None = Field(None, min_length=1, description=_INLINE_IMAGES)


class ScoreTextRequest(_Strict):
    """Score uploaded images against full prompt strings: one query per string scored."""

    image_ids: list[ImageId] = Field(..., min_length=1)
    prompts: list[Annotated[list[Text], Field(min_length=1)]] = Field(
        ...,
        min_length=1,
        description="P prompt sets, each one full prompt string per class (all of one length)",
    )
    encoding: Literal["base64", "json"] = "base64"
    images: list[ImageFile] | None = Field(None, min_length=1, description=_INLINE_IMAGES)


class ScoreResponse(BaseModel):
    """Logits (P, N, C) and what the request cost."""

    logits: Array | Nested3
    queries: int = Field(
        ..., description="Queries billed: prompt offsets (/v1/score) or strings (/v1/score-text) scored"
    )
    images: int = Field(..., description="Images scored")
    remaining: int = Field(..., description="Queries left in the key's budget")
    model: str = Field(..., description="Id of the model that scored")


class ZeroShotParameters(BaseModel):
    candidate_labels: list[Text] = Field(..., min_length=1)
    hypothesis_template: str = Field(
        "This is a photo of {}.", max_length=64, pattern=TEMPLATE_PATTERN,
        description="Prompt with one '{}' for the label",
    )


class ZeroShotRequest(BaseModel):
    """The zero-shot-image-classification contract of hosted CLIP endpoints."""

    inputs: ImageFile
    parameters: ZeroShotParameters


class LabelScore(BaseModel):
    label: str
    score: float = Field(..., description="Softmax probability over the candidate labels")


class ModelInfo(BaseModel):
    id: str
    name: str
    pretrained: str | None
    template: str
    context_shape: list[int] = Field(..., description="(n_ctx, dim) of the prompt offsets accepted")
    text_endpoints: bool = Field(..., description="Whether /v1/score-text and zero-shot are served")


class Limits(BaseModel):
    """The server's limits (see :class:`skcarrot.serve.Settings`)."""

    max_body_bytes: int
    max_header_bytes: int
    max_images_per_request: int
    max_prompts_per_request: int
    max_classes: int
    max_logits_per_request: int = Field(..., description="Most logits (prompts x images x classes) per request")
    max_offset_abs: float = Field(..., description="Largest absolute value of a prompt offset")
    max_image_pixels: int
    max_class_name_chars: int
    rate_window_s: float
    max_concurrent_per_key: int = Field(..., description="Requests of one key at work at once (per server process)")
    image_ttl_s: float = Field(..., description="How long an uploaded image is kept")
    max_image_bytes_per_key: int = Field(..., description="Bytes of stored images per key")
    answer_ttl_s: float = Field(..., description="How long an unacknowledged answer is kept for retries")
    idempotency_ttl_s: float = Field(..., description="How long a retry of a charged request is never charged again")


class InfoResponse(BaseModel):
    model: ModelInfo
    limits: Limits
    version: str


class UsageResponse(BaseModel):
    name: str
    budget: int
    prompts_used: int = Field(..., description="Queries charged so far (each endpoint's unit: see the docs)")
    images_used: int = Field(..., description="Images scored so far")
    requests: int = Field(..., description="Charged requests so far")
    remaining: int
    rate_limit: int | None = Field(..., description="Queries per rate window; null: unlimited")
    rate_window_s: float
    image_bytes: int = Field(..., description="Bytes of this key's stored images")
    max_image_bytes: int = Field(..., description="The key's image quota, in bytes")


class HealthResponse(BaseModel):
    status: Literal["ok", "degraded"]
    ledger: bool
    model_loaded: bool


class ErrorResponse(BaseModel):
    detail: str | list[dict]
