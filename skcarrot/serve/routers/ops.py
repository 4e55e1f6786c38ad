"""Health and Prometheus metrics, for the operator (no key needed)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response
from starlette.concurrency import run_in_threadpool

from ..deps import Server, get_server
from ..schemas import HealthResponse

router = APIRouter(tags=["operations"])


@router.get("/v1/health", response_model=HealthResponse, summary="Liveness: ledger reachable, model loaded")
async def health(server: Annotated[Server, Depends(get_server)], response: Response) -> HealthResponse:
    ledger_ok = await run_in_threadpool(server.ledger.ping)
    if not ledger_ok:
        response.status_code = 503
    return HealthResponse(status="ok" if ledger_ok else "degraded", ledger=ledger_ok, model_loaded=server.model.loaded)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
    summary="Prometheus metrics",
)
async def metrics(server: Annotated[Server, Depends(get_server)]) -> Response:
    server.metrics.images_cached.set(len(server.model._images))
    return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
