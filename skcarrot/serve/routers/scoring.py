"""Scoring: prompt offsets (the CARROT door) and full prompt strings (the text door)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from ..charging import charged_call, fingerprint
from ..deps import Server, current_key, get_server, idempotency_key
from ..errors import invalid
from ..ledger import KeyRecord
from ..model import encode_array
from ..schemas import ErrorResponse, ScoreRequest, ScoreResponse, ScoreTextRequest

router = APIRouter(prefix="/v1", tags=["scoring"])

_ERRORS = {
    401: {"model": ErrorResponse, "description": "Missing or unknown key"},
    402: {"model": ErrorResponse, "description": "Query budget exhausted; the body gives `remaining`"},
    413: {"model": ErrorResponse, "description": "Body too large"},
    422: {"model": ErrorResponse, "description": "Invalid request; `loc` names the field"},
    429: {"model": ErrorResponse, "description": "Rate limited; see Retry-After"},
}


def _logits_payload(logits, encoding: str, n_queries: int, n_images: int, remaining: int, model_id: str) -> dict:
    return {
        "logits": encode_array(logits) if encoding == "base64" else logits.tolist(),
        "queries": n_queries,
        "images": n_images,
        "remaining": remaining,
        "model": model_id,
    }


def _check_image_count(server: Server, ids: list[str]) -> None:
    limit = server.settings.max_images_per_request
    if len(ids) > limit:
        raise invalid(("body", "image_ids"), f"{len(ids)} images, more than the {limit} allowed per request; split them")


def _score(server: Server, key: KeyRecord, body: ScoreRequest, idem: str | None, digest: str):
    model = server.model
    _check_image_count(server, body.image_ids)
    names = model.check_class_names(body.class_names, ("body", "class_names"))
    offsets = model.check_offsets(body.offsets, ("body", "offsets"))
    images = model.images(body.image_ids, key.id, server.ledger)
    n_prompts, n_images = len(offsets), len(images)

    def compute(remaining: int) -> dict:
        logits = model.score(images, names, offsets)
        return _logits_payload(logits, body.encoding, n_prompts, n_images, remaining, model.model_id)

    return charged_call(server, key, n_prompts, n_images, idem, digest, compute)


@router.post(
    "/score",
    response_model=ScoreResponse,
    responses=_ERRORS,
    summary="Logits (P, N, C) of uploaded images under P prompt offsets; P queries",
)
async def score(
    request: Request,
    body: ScoreRequest,
    server: Annotated[Server, Depends(get_server)],
    key: Annotated[KeyRecord, Depends(current_key)],
    idem: Annotated[str | None, Depends(idempotency_key)],
):
    """Score every image against every class name under each prompt offset.

    Each of the ``P`` offsets is one query, charged before the model runs.
    """
    digest = fingerprint(request.url.path, await request.body())
    return await run_in_threadpool(_score, server, key, body, idem, digest)


def _score_text(server: Server, key: KeyRecord, body: ScoreTextRequest, idem: str | None, digest: str):
    model = server.model
    if not model.text_capable:
        raise invalid(("body", "prompts"), "this server's model does not score prompt strings")
    _check_image_count(server, body.image_ids)
    prompts = model.check_prompt_sets(body.prompts, ("body", "prompts"))
    images = model.images(body.image_ids, key.id, server.ledger)
    n_prompts, n_images = len(prompts), len(images)

    def compute(remaining: int) -> dict:
        logits = model.score_text(images, prompts)
        return _logits_payload(logits, body.encoding, n_prompts, n_images, remaining, model.model_id)

    return charged_call(server, key, n_prompts, n_images, idem, digest, compute)


@router.post(
    "/score-text",
    response_model=ScoreResponse,
    responses=_ERRORS,
    summary="Logits (P, N, C) of uploaded images against P prompt sets of full strings; P queries",
)
async def score_text(
    request: Request,
    body: ScoreTextRequest,
    server: Annotated[Server, Depends(get_server)],
    key: Annotated[KeyRecord, Depends(current_key)],
    idem: Annotated[str | None, Depends(idempotency_key)],
):
    """Score every image against every string of each prompt set (one full prompt per class).

    Each prompt set is one query.
    """
    digest = fingerprint(request.url.path, await request.body())
    return await run_in_threadpool(_score_text, server, key, body, idem, digest)
