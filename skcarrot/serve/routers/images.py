"""Upload images once; score them by content id afterwards."""

from __future__ import annotations

from fastapi import APIRouter
from PIL import Image
from starlette.concurrency import run_in_threadpool

from .. import validation
from ..charging import revoked_error
from ..deps import CallerDigest, CurrentKey, ImagesDep, Server, ServerDep
from ..errors import ApiError, invalid
from ..image_store import ImageQuotaExceeded
from ..schemas import ErrorResponse, MissingRequest, MissingResponse, UploadRequest, UploadResponse

__all__ = ["router", "decode_uploads", "keep_uploads"]

router = APIRouter(prefix="/v1/images", tags=["images"])

_ERRORS = {401: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, 422: {"model": ErrorResponse}}
_UPLOAD_ERRORS = {
    **_ERRORS,
    402: {"model": ErrorResponse, "description": "The key has no budget left: uploads would serve nothing"},
    422: {"model": ErrorResponse, "description": "Invalid image, or the key's image quota is full; `loc` names "
          "the field"},
    429: {"model": ErrorResponse, "description": "Too many requests of this key at once; see Retry-After"},
    507: {"model": ErrorResponse, "description": "The server's image storage is full; see Retry-After"},
}


def _quota_error(exc: ImageQuotaExceeded, settings) -> ApiError:
    if exc.scope == "key":
        return invalid(
            ("body", "images"),
            f"these images need {exc.needed} more bytes, and this key's images already take {exc.used} of the "
            f"{exc.limit} allowed (max_image_bytes_per_key in GET /v1/info); images expire "
            f"{settings.image_ttl_s / 3600:g} h after their upload",
            "value_error.image_quota",
        )
    return ApiError(
        507,
        f"the server's image storage is full ({exc.used} of {exc.limit} bytes); retry later",
        headers={"Retry-After": "60"},
        max_image_bytes_total=exc.limit,
    )


def decode_uploads(server: Server, files: list[str]) -> tuple[list[str], dict[str, tuple[bytes, Image.Image]]]:
    """Decode and check base64 image files (422 naming ``body.images.i``); their content ids, in order,
    and ``{content_id: (file_to_store, rgb_image)}``."""
    settings = server.settings
    validation.check_count(len(files), settings.max_images_per_request, ("body", "images"), "images")
    ids: list[str] = []
    uploads: dict[str, tuple[bytes, Image.Image]] = {}
    for i, encoded in enumerate(files):
        image_id, stored, rgb = validation.decode_upload(
            encoded, ("body", "images", i), settings.max_image_pixels, server.scorer.reduce
        )
        ids.append(image_id)
        uploads.setdefault(image_id, (stored, rgb))
    return ids, uploads


def keep_uploads(server: Server, key_id: int, uploads: dict[str, tuple[bytes, Image.Image]]) -> int:
    """Keep decoded uploads for the key, within its quota and the server's (422, 507); how many were new."""
    try:
        return server.images.keep(key_id, uploads)
    except ImageQuotaExceeded as exc:
        server.metrics.refusals.labels("image_quota").inc()
        raise _quota_error(exc, server.settings) from None


@router.post(
    "",
    response_model=UploadResponse,
    responses=_UPLOAD_ERRORS,
    summary="Upload images; returns their content ids",
)
async def upload_images(
    body: UploadRequest, server: ServerDep, key: CurrentKey, digest: CallerDigest
) -> UploadResponse:
    """Decode, check and keep each image under its content id: the sha256 of its RGB pixels
    (see :func:`skcarrot.wire.image_content_id`). Not charged, but counted against the key's
    image quota (``max_image_bytes_per_key``); a key with no budget left cannot upload.

    Images are kept as the model reads them (reduced to its input size when larger), for
    ``image_ttl_s`` after their upload, and only the key that uploaded one can score it."""
    settings = server.settings

    def upload() -> UploadResponse:
        validation.check_count(len(body.images), settings.max_images_per_request, ("body", "images"), "images")
        record, current_hash = server.ledger.current(key.id)
        if record.revoked or (digest is not None and current_hash != digest):
            raise revoked_error()
        if record.remaining <= 0:
            raise ApiError(
                402,
                f"this key has no budget left ({record.budget} spent): images it uploads could not be scored; "
                "ask the model owner for more budget",
                remaining=0,
                budget=record.budget,
                requested=0,
            )
        # all or nothing: a bad image refuses the whole request before anything is kept
        ids, uploads = decode_uploads(server, body.images)
        return UploadResponse(ids=ids, stored=keep_uploads(server, key.id, uploads))

    async with server.slots.hold(key.id):
        return await run_in_threadpool(upload)


@router.post("/missing", response_model=MissingResponse, responses=_ERRORS, summary="Which ids are not uploaded yet")
async def missing_images(
    body: MissingRequest, server: ServerDep, images: ImagesDep, key: CurrentKey
) -> MissingResponse:
    """Those of ``ids`` this key has not uploaded (or whose upload expired): a client uploads only these."""
    validation.check_count(len(body.ids), server.settings.max_images_per_request * 4, ("body", "ids"), "ids")
    wanted = list(dict.fromkeys(body.ids))
    known = set(await run_in_threadpool(images.known, key.id, wanted))
    return MissingResponse(missing=[i for i in wanted if i not in known])
