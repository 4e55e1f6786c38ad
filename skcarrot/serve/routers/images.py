"""Upload images once; score them by content id afterwards."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from .. import validation
from ..deps import CurrentKey, ImagesDep, SettingsDep
from ..schemas import ErrorResponse, MissingRequest, MissingResponse, UploadRequest, UploadResponse

router = APIRouter(prefix="/v1/images", tags=["images"])

_ERRORS = {401: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, 422: {"model": ErrorResponse}}


@router.post(
    "",
    response_model=UploadResponse,
    responses=_ERRORS,
    summary="Upload images; returns their content ids",
)
async def upload_images(
    body: UploadRequest, settings: SettingsDep, images: ImagesDep, key: CurrentKey
) -> UploadResponse:
    """Decode, check and keep each image under its content id: the sha256 of its RGB pixels
    (see :func:`skcarrot.wire.image_content_id`). Not charged."""

    def upload() -> UploadResponse:
        validation.check_count(len(body.images), settings.max_images_per_request, ("body", "images"), "images")
        ids: list[str] = []
        uploads = {}
        for i, encoded in enumerate(body.images):
            image_id, raw, rgb = validation.decode_upload(encoded, ("body", "images", i), settings.max_image_pixels)
            ids.append(image_id)
            uploads.setdefault(image_id, (raw, rgb))
        # all or nothing: a bad image refuses the whole request before anything is kept
        return UploadResponse(ids=ids, stored=images.keep(key.id, uploads))

    return await run_in_threadpool(upload)


@router.post("/missing", response_model=MissingResponse, responses=_ERRORS, summary="Which ids are not uploaded yet")
async def missing_images(
    body: MissingRequest, settings: SettingsDep, images: ImagesDep, key: CurrentKey
) -> MissingResponse:
    """Those of ``ids`` this key has not uploaded (a client uploads only these)."""
    validation.check_count(len(body.ids), settings.max_images_per_request * 4, ("body", "ids"), "ids")
    wanted = list(dict.fromkeys(body.ids))
    known = set(await run_in_threadpool(images.known, key.id, wanted))
    return MissingResponse(missing=[i for i in wanted if i not in known])
