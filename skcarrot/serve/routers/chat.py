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
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ..charging import CHARGED_ERRORS, ChargedRequestDep, Job
from ..deps import CurrentKey
from ..errors import ApiError
from ..validation import ImageRefused, open_image

router = APIRouter(tags=["chat"])

#: Most of each thing one chat request may hold.
MAX_MESSAGES = 16
MAX_PARTS = 32
MAX_TEXT_CHARS = 4000
MAX_IMAGE_BYTES = 4 * 1024 * 1024
MAX_COMPLETION_TOKENS = 16
MAX_TOP_LOGPROBS = 20
MAX_LOGPROB_TOKEN_IDS = 64


class ChatError(ApiError):
    """A refusal in OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status_code: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None) -> None:
        super().__init__(status_code, message, headers=headers)
        self.error = {"message": message, "type": kind, "param": param, "code": code}

    def body(self) -> dict[str, Any]:
        return {"error": self.error}


def openai_error(status_code: int, body: dict, headers: dict | None = None) -> ChatError:
    """The OpenAI-shaped twin of one of the server's own refusals (for the chat routes)."""
    detail = body.get("detail")
    if isinstance(detail, list) and detail:
        first = detail[0]
        loc = [str(x) for x in first.get("loc", []) if x != "body"]
        return ChatError(400, str(first.get("msg", "invalid request")), param=".".join(loc) or None,
                         code=str(first.get("type", "invalid_value")))
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


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "image_url"]
    text: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    image_url: ImageURL | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's chat request this server reads; others are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(max_length=200)
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    n: int = 1
    temperature: float | None = Field(default=None, ge=0, le=2)
    seed: int | None = None
    logprob_token_ids: list[int] | None = Field(default=None, max_length=MAX_LOGPROB_TOKEN_IDS)


def _models_list(engine) -> dict:
    return {"object": "list", "data": [{"id": engine.model_id, "object": "model", "created": 0, "owned_by": "skcarrot"}]}


def _engine(request: Request):
    engine = getattr(request.app.state, "chat_engine", None)
    if engine is None:
        raise ChatError(404, "this server serves no chat model (it was started with the chat model off)",
                        code="model_not_found")
    return engine


@router.get("/v1/models", summary="The chat models served (OpenAI's list shape)")
async def list_models(request: Request, key: CurrentKey) -> dict:
    return _models_list(_engine(request))


def _decode_image(url: str, where: str, max_pixels: int):
    if not url.startswith("data:"):
        raise ChatError(400, f"{where}: only data URLs are accepted (data:image/png;base64,...); this server "
                        "fetches no URL", param=where, code="invalid_image_url")
    head, _, data = url.partition(",")
    if ";base64" not in head:
        raise ChatError(400, f"{where}: the data URL must be base64 (data:image/png;base64,...)", param=where,
                        code="invalid_image_url")
    if len(data) > 4 * MAX_IMAGE_BYTES // 3 + 4:
        raise ChatError(413, f"{where}: the image is over {MAX_IMAGE_BYTES} bytes; send a smaller image",
                        param=where, code="image_too_large")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ChatError(400, f"{where}: not valid base64", param=where, code="invalid_image_url") from None
    try:
        return open_image(raw, max_pixels)
    except ImageRefused as exc:
        raise ChatError(400, f"{where}: {exc}", param=where, code="invalid_image") from None


def _parse(body: ChatCompletionRequest, engine, max_pixels: int):
    """``(chat, details, n_images)``: the messages as the engine reads them."""
    chat, details, n_images = [], [], 0
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
                    if part.text is None:
                        raise ChatError(400, f"{where}: a text part needs 'text'", param=where)
                    parts.append(part.text)
                else:
                    if part.image_url is None:
                        raise ChatError(400, f"{where}: an image_url part needs 'image_url'", param=where)
                    n_images += 1
                    if n_images > engine.max_images:
                        raise ChatError(400, f"more than {engine.max_images} images in one request",
                                        param=where, code="too_many_images")
                    parts.append(_decode_image(part.image_url.url, f"{where}.image_url.url", max_pixels))
                    details.append(part.image_url.detail)
        chat.append(("system" if message.role == "developer" else message.role, parts))
    return chat, details, n_images


@router.post("/v1/chat/completions", responses=CHARGED_ERRORS,
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
        raise ChatError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
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
        if not body.logprobs or any(t < 0 or t >= vocab for t in token_ids):
            raise ChatError(400, f"logprob_token_ids need logprobs=true and ids in [0, {vocab})",
                            param="logprob_token_ids")

    def prepare() -> Job:
        chat, details, n_images = _parse(body, engine, settings.max_image_pixels)
        try:
            engine.positions(chat)
        except ValueError as exc:
            raise ChatError(400, str(exc), param="messages", code="context_length_exceeded") from None

        def compute(remaining: int) -> dict:
            try:
                done = engine.complete([chat], max_tokens=max_tokens, top_logprobs=top,
                                       logprob_token_ids=token_ids, details=details)[0]
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
