"""OpenAI's chat contract, for the micro chat model: ``GET /v1/models``, ``POST /v1/chat/completions``.

What the official ``openai`` client sends is accepted: a system string, user content as a string or
a list of ``text`` and ``image_url`` parts (images as ``data:`` URLs only: the server fetches
nothing), ``logprobs`` with ``top_logprobs`` up to 20, ``max_completion_tokens`` (or the older
``max_tokens``), and vLLM's ``logprob_token_ids``. Answers and errors have OpenAI's shapes. One
call is one charged query, against the same keys and ledger as the other endpoints.
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ..charging import ChargedRequestDep, Job
from ..deps import CurrentKey
from ..errors import ApiError
from ...wire import image_tokens
from ..validation import ImageRefused, open_reduced

router = APIRouter(tags=["chat"])

#: Most of each thing one chat request may hold.
MAX_MESSAGES = 16
MAX_PARTS = 32
MAX_TEXT_CHARS = 4000
MAX_IMAGE_BYTES = 4 * 1024 * 1024
MAX_COMPLETION_TOKENS = 16
MAX_TOP_LOGPROBS = 20
MAX_LOGPROB_TOKEN_IDS = 64


#: The ``code`` of each 400/404 a request valid under the schema may still get (what no schema can state).
CHAT_SEMANTIC_REFUSALS = frozenset({
    "model_not_found",  # the model id is a string; which one is served, the server says (GET /v1/models)
    "invalid_image_url",  # a URL the server does not fetch, or a data URL that is not base64
    "invalid_image",  # bytes no image decoder reads, or an image over max_image_pixels
    "image_too_large",  # an image over MAX_IMAGE_BYTES
    "too_many_images",  # more images than the model reads, across all messages
    "context_length_exceeded",  # text and images longer than the model's context, in positions
    "logprobs_required",  # top_logprobs or logprob_token_ids without logprobs=true
    "invalid_token_id",  # a logprob_token_ids entry past the model's vocabulary
})


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    """OpenAI's error shape."""

    error: OpenAIErrorBody


_OPENAI_ERROR = {"model": OpenAIError}
#: The refusals the chat routes document, in OpenAI's shape.
CHAT_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {**_OPENAI_ERROR, "description": "Invalid request; `param` names the field, `code` the reason"},
    401: {**_OPENAI_ERROR, "description": "Missing, unknown, revoked or rotated key"},
    404: {**_OPENAI_ERROR, "description": "Model not served (`model_not_found`), or no chat model on this server"},
    429: {**_OPENAI_ERROR, "description": "Rate limited or too many requests at once (see Retry-After), or the key's "
          "budget is spent (`insufficient_quota`, not worth a retry)"},
}


class ChatError(ApiError):
    """A refusal in OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status_code: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None) -> None:
        super().__init__(status_code, message, headers=headers)
        self.error = {"message": message, "type": kind, "param": param, "code": code}

    def body(self) -> dict[str, Any]:
        return {"error": self.error}


# pydantic's reasons as OpenAI names them
_CODES = {"less_than_equal": "integer_above_max_value", "greater_than_equal": "integer_below_min_value",
          "string_too_long": "string_above_max_length", "too_long": "array_above_max_length",
          "too_short": "array_below_min_length", "missing": "missing_required_parameter"}


def openai_error(status_code: int, body: dict, headers: dict | None = None) -> ChatError:
    """The OpenAI-shaped twin of one of the server's own refusals (for the chat routes)."""
    detail = body.get("detail")
    if isinstance(detail, list) and detail:
        # of a union's branches, the one that says what is wrong rather than "not a string"
        first = next((d for d in detail if not str(d.get("type", "")).endswith("_type")), detail[0])
        loc = [str(x) for x in first.get("loc", []) if x != "body"]
        param = ".".join(loc) or None
        kind = str(first.get("type", "invalid_value"))
        message = str(first.get("msg", "invalid request"))
        return ChatError(400, f"Invalid value for '{param}': {message}" if param else message, param=param,
                         code=_CODES.get(kind, kind))
    message = str(detail)
    if status_code == 401:
        return ChatError(401, f"Incorrect API key provided: {message}", code="invalid_api_key",
                         kind="authentication_error", headers=headers)
    if status_code == 402:
        # OpenAI's answer to an exhausted quota: a 429 no client should retry
        return ChatError(429, message, code="insufficient_quota", kind="insufficient_quota",
                         headers={**(headers or {}), "x-should-retry": "false"})
    if status_code == 429:
        return ChatError(429, message, code="rate_limit_exceeded", kind="requests", headers=headers)
    if status_code == 413:
        return ChatError(413, message, code="request_too_large", headers=headers)
    if status_code >= 500:
        return ChatError(status_code, message, kind="server_error", headers=headers)
    return ChatError(status_code, message, headers=headers)


class ImageURL(BaseModel):
    url: str = Field(max_length=2 * MAX_IMAGE_BYTES)
    detail: Literal["low", "high", "auto"] = "auto"


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT_CHARS)


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | Annotated[list[ContentPart], Field(max_length=MAX_PARTS)]


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's chat request this server reads; others are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(max_length=200)
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_COMPLETION_TOKENS)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_COMPLETION_TOKENS)
    n: int = Field(default=1, ge=1, le=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    seed: int | None = None
    logprob_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, max_length=MAX_LOGPROB_TOKEN_IDS)


def _models_list(engine) -> dict:
    return {"object": "list", "data": [{"id": engine.model_id, "object": "model", "created": 0, "owned_by": "skcarrot"}]}


def _engine(request: Request):
    engine = getattr(request.app.state, "chat_engine", None)
    if engine is None:
        raise ChatError(404, "this server serves no chat model (it was started with the chat model off)",
                        code="model_not_found")
    return engine


@router.get("/v1/models", responses=CHAT_ERRORS, summary="The chat models served (OpenAI's list shape)")
async def list_models(request: Request, key: CurrentKey) -> dict:
    return _models_list(_engine(request))


def _decode_image(url: str, where: str, max_pixels: int, reduce):
    """``(image as the model reads it, size it was sent at)`` of a base64 data URL."""
    if not url.startswith("data:"):
        raise ChatError(400, f"{where}: only data URLs are accepted (data:image/png;base64,...); this server "
                        "fetches no URL", param=where, code="invalid_image_url")
    head, _, data = url.partition(",")
    if ";base64" not in head:
        raise ChatError(400, f"{where}: the data URL must be base64 (data:image/png;base64,...)", param=where,
                        code="invalid_image_url")
    if len(data) > 4 * MAX_IMAGE_BYTES // 3 + 4:
        raise ChatError(400, f"{where}: the image is over {MAX_IMAGE_BYTES} bytes; send a smaller image",
                        param=where, code="image_too_large")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ChatError(400, f"{where}: not valid base64", param=where, code="invalid_image_url") from None
    try:
        return open_reduced(raw, max_pixels, reduce)
    except ImageRefused as exc:
        raise ChatError(400, f"{where}: {exc}", param=where, code="invalid_image") from None


def _parse(body: ChatCompletionRequest, engine, max_pixels: int):
    """``(chat, billed_image_tokens, n_images)``: the messages as the engine reads them."""
    chat, billed, n_images = [], 0, 0
    for i, message in enumerate(body.messages):
        parts = []
        content = message.content
        if isinstance(content, str):
            if len(content) > MAX_TEXT_CHARS:
                raise ChatError(400, f"messages[{i}].content is over {MAX_TEXT_CHARS} characters",
                                param=f"messages[{i}].content", code="string_above_max_length")
            parts.append(content)
        else:
            if len(content) > MAX_PARTS:
                raise ChatError(400, f"messages[{i}].content has {len(content)} parts, more than {MAX_PARTS}",
                                param=f"messages[{i}].content", code="array_above_max_length")
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                if part.type == "text":
                    parts.append(part.text)
                else:
                    n_images += 1
                    if n_images > engine.max_images:
                        raise ChatError(400, f"more than {engine.max_images} images in one request",
                                        param=where, code="too_many_images")
                    image, (width, height) = _decode_image(part.image_url.url, f"{where}.image_url.url",
                                                           max_pixels, engine.reduce)
                    parts.append(image)
                    billed += image_tokens(width, height, part.image_url.detail)
        chat.append(("system" if message.role == "developer" else message.role, parts))
    # every character is at least a token's worth: past this the text can not fit the context anyway,
    # and it is refused before the tokenizer spends time on it
    total = sum(len(p) for _, parts in chat for p in parts if isinstance(p, str))
    if total > MAX_TEXT_CHARS:
        raise ChatError(400, f"the messages hold {total} characters of text, more than the {MAX_TEXT_CHARS} a "
                        "request may", param="messages", code="context_length_exceeded")
    return chat, billed, n_images


@router.post("/v1/chat/completions", responses=CHAT_ERRORS,
             summary="Chat completions, as OpenAI's API speaks it; 1 query per call")
async def chat_completions(request: Request, body: ChatCompletionRequest, charged: ChargedRequestDep):
    """OpenAI's chat completion: the model's greedy answer, its log-probabilities and ``usage``.

    Point ``openai.OpenAI(base_url="<server>/v1", api_key=<key>)`` here.
    """
    engine = _engine(request)
    settings = charged.server.settings
    if body.model != engine.model_id:
        raise ChatError(404, f"The model '{body.model}' does not exist; this server serves '{engine.model_id}' "
                        "(GET /v1/models)", param="model", code="model_not_found")
    if body.n != 1:
        raise ChatError(400, "only n=1 is supported", param="n", code="unsupported_value")
    if body.top_logprobs is not None and not body.logprobs:
        raise ChatError(400, "top_logprobs needs logprobs=true", param="top_logprobs", code="logprobs_required")
    top = body.top_logprobs or 0
    if top > MAX_TOP_LOGPROBS:
        raise ChatError(400, f"Invalid value for 'top_logprobs': must be less than or equal to {MAX_TOP_LOGPROBS}.",
                        param="top_logprobs", code="integer_above_max_value")
    max_tokens = body.max_completion_tokens or body.max_tokens or MAX_COMPLETION_TOKENS
    if max_tokens > MAX_COMPLETION_TOKENS:
        raise ChatError(400, f"max_completion_tokens is at most {MAX_COMPLETION_TOKENS} on this model",
                        param="max_completion_tokens", code="integer_above_max_value")
    token_ids = body.logprob_token_ids
    if token_ids:
        vocab = len(engine.tokenizer.encoder)
        if not body.logprobs:
            raise ChatError(400, "logprob_token_ids need logprobs=true", param="logprob_token_ids",
                            code="logprobs_required")
        if any(t >= vocab for t in token_ids):
            raise ChatError(400, f"logprob_token_ids must be token ids in [0, {vocab})", param="logprob_token_ids",
                            code="invalid_token_id")

    def prepare() -> Job:
        chat, billed, n_images = _parse(body, engine, settings.max_image_pixels)
        try:
            engine.positions(chat)
        except ValueError as exc:
            raise ChatError(400, str(exc), param="messages", code="context_length_exceeded") from None

        def compute(remaining: int) -> dict:
            try:
                done = engine.complete([chat], max_tokens=max_tokens, top_logprobs=top,
                                       logprob_token_ids=token_ids, billed_images=[billed])[0]
            except ValueError as exc:
                raise ChatError(400, str(exc), param="messages", code="context_length_exceeded") from None
            logprobs = None
            if body.logprobs:
                logprobs = {"content": [
                    {"token": t.token, "logprob": t.logprob, "bytes": t.bytes,
                     "top_logprobs": [{"token": a, "logprob": lp, "bytes": b} for a, lp, b in t.top]}
                    for t in done.tokens], "refusal": None}
            return {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": engine.model_id, "system_fingerprint": f"fp_{engine.model_id}",
                "choices": [{"index": 0, "finish_reason": done.finish_reason, "logprobs": logprobs,
                             "message": {"role": "assistant", "content": done.text, "refusal": None}}],
                "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                          "total_tokens": done.prompt_tokens + done.completion_tokens,
                          "prompt_tokens_details": {"cached_tokens": 0, "image_tokens": done.image_tokens,
                                                    "text_tokens": done.prompt_tokens - done.image_tokens},
                          "completion_tokens_details": {"reasoning_tokens": 0}},
            }

        return Job(1, n_images, compute, ("body", "messages"))

    return await charged.run(prepare)
