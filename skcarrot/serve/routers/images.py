"""Upload images once; score them by content id afterwards."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from ..deps import Server, current_key, get_server
from ..errors import invalid
from ..ledger import KeyRecord
from ..schemas import ErrorResponse, MissingRequest, MissingResponse, UploadRequest, UploadResponse

router = APIRouter(prefix="/v1/images", tags=["images"])

_ERRORS = {401: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, 422: {"model": ErrorResponse}}


def _upload(server: Server, key: KeyRecord, body: UploadRequest) -> UploadResponse:
    limit = server.settings.max_images_per_request
    if len(body.images) > limit:
        raise invalid(("body", "images"), f"{len(body.images)} images, more than the {limit} allowed per request")
    decoded: dict[str, bytes] = {}
    ids: list[str] = []
    pixels = {}
    for i, encoded in enumerate(body.images):
        image_id, raw, rgb = server.model.decode_upload(encoded, ("body", "images", i))
        ids.append(image_id)
        decoded.setdefault(image_id, raw)
        pixels[image_id] = rgb
    # all or nothing: a bad image refuses the whole request before anything is kept
    known = set(server.ledger.known_images(key.id, list(decoded)))
    server.ledger.add_images(key.id, {k: v for k, v in decoded.items() if k not in known})
    for image_id, rgb in pixels.items():
        server.model.remember(image_id, rgb)
    return UploadResponse(ids=ids, stored=len(set(decoded) - known))


@router.post(
    "",
    response_model=UploadResponse,
    responses=_ERRORS,
    summary="Upload images; returns their content ids",
)
async def upload_images(
    body: UploadRequest,
    server: Annotated[Server, Depends(get_server)],
    key: Annotated[KeyRecord, Depends(current_key)],
) -> UploadResponse:
    """Decode, check and keep each image under its content id: the sha256 of its RGB pixels
    (see :func:`skcarrot.backends.http.image_content_id`). Not charged."""
    return await run_in_threadpool(_upload, server, key, body)


@router.post("/missing", response_model=MissingResponse, responses=_ERRORS, summary="Which ids are not uploaded yet")
async def missing_images(
    body: MissingRequest,
    server: Annotated[Server, Depends(get_server)],
    key: Annotated[KeyRecord, Depends(current_key)],
) -> MissingResponse:
    """Those of ``ids`` this key has not uploaded (a client uploads only these)."""
    limit = server.settings.max_images_per_request * 4
    if len(body.ids) > limit:
        raise invalid(("body", "ids"), f"{len(body.ids)} ids, more than the {limit} allowed per request")
    known = set(await run_in_threadpool(server.ledger.known_images, key.id, list(dict.fromkeys(body.ids))))
    return MissingResponse(missing=[i for i in dict.fromkeys(body.ids) if i not in known])
