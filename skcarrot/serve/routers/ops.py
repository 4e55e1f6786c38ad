"""Health and Prometheus metrics, for the operator (no key needed)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from starlette.concurrency import run_in_threadpool

from ..deps import DatabaseDep, ImagesDep, MetricsDep, ScorerDep
from ..schemas import HealthResponse

router = APIRouter(tags=["operations"])


@router.get("/v1/health", response_model=HealthResponse, summary="Liveness: ledger reachable, model loaded")
async def health(db: DatabaseDep, scorer: ScorerDep, response: Response) -> HealthResponse:
    ledger_ok = await run_in_threadpool(db.ping)
    if not ledger_ok:
        response.status_code = 503
    return HealthResponse(status="ok" if ledger_ok else "degraded", ledger=ledger_ok, model_loaded=scorer.loaded)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
    summary="Prometheus metrics",
)
async def metrics(metrics: MetricsDep, images: ImagesDep) -> Response:
    metrics.images_cached.set(len(images))
    metrics.image_cache_bytes.set(images.cached_bytes)
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
