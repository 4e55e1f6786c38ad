"""What the model is and what the calling key has spent."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from ... import __version__
from ..deps import CurrentKey, LedgerDep, ScorerDep, SettingsDep
from ..schemas import ErrorResponse, InfoResponse, Limits, UsageResponse

router = APIRouter(prefix="/v1", tags=["account"])


@router.get("/info", response_model=InfoResponse, responses={401: {"model": ErrorResponse}},
            summary="The served model, its context shape and the server's limits")
async def info(settings: SettingsDep, scorer: ScorerDep, key: CurrentKey) -> InfoResponse:
    s = settings
    n_ctx, dim = await run_in_threadpool(lambda: scorer.context_shape)
    return InfoResponse(
        model={
            "id": scorer.model_id,
            "name": scorer.model_name,
            "pretrained": scorer.pretrained,
            "template": scorer.template,
            "context_shape": [n_ctx, dim],
            "text_endpoints": scorer.text_capable,
        },
        limits={name: getattr(s, name) for name in Limits.model_fields},
        version=__version__,
    )


@router.get("/usage", response_model=UsageResponse, responses={401: {"model": ErrorResponse}},
            summary="Budget and spending of the calling key")
async def usage(settings: SettingsDep, ledger: LedgerDep, key: CurrentKey) -> UsageResponse:
    record = await run_in_threadpool(ledger.usage, key.id)
    return UsageResponse(
        name=record.name,
        budget=record.budget,
        prompts_used=record.prompts_used,
        images_used=record.images_used,
        requests=record.requests,
        remaining=record.remaining,
        rate_limit=record.rate_limit,
        rate_window_s=settings.rate_window_s,
        image_bytes=record.image_bytes,
        max_image_bytes=settings.max_image_bytes_per_key,
    )
