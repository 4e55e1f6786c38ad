"""Scoring: prompt offsets (the CARROT door) and full prompt strings (the text door)."""

from __future__ import annotations

from fastapi import APIRouter

from ...wire import RAW_MEDIA_TYPE, encode_array, encode_raw
from .. import validation
from ..charging import CHARGED_ERRORS, Job, RawChargedRequestDep
from ..deps import Server
from ..schemas import Array, ScoreRequest, ScoreResponse, ScoreTextRequest
from ..scorer import one_call
from .images import decode_uploads, keep_uploads

router = APIRouter(prefix="/v1", tags=["scoring"])


def _logits_job(
    server: Server,
    key_id: int,
    image_ids: list[str],
    billed: int,
    encoding: str,
    score,
    loc: tuple,
    raw: bool,
    files: list[str] | None = None,
) -> Job:
    """Look up the images; a job billed ``billed`` queries, answering ``score(images)`` as a :class:`ScoreResponse`
    (as :data:`~skcarrot.wire.RAW_MEDIA_TYPE` when ``raw`` and the encoding is base64).

    ``files``: images uploaded with the request, decoded and checked here (422) and kept once the
    request is charged (a refusal of the quota refunds the charge)."""
    uploads = decode_uploads(server, files)[1] if files else {}
    sent = {image_id: rgb for image_id, (_, rgb) in uploads.items()}
    images = validation.lookup_images(server.images, key_id, image_ids, sent)
    raw = raw and encoding == "base64"

    def compute(remaining: int) -> dict | bytes:
        if uploads:
            keep_uploads(server, key_id, uploads)
        logits = score(images)
        head = {"queries": billed, "images": len(images), "remaining": remaining, "model": server.scorer.model_id}
        if raw:
            return encode_raw(head, "logits", logits)
        return {"logits": encode_array(logits) if encoding == "base64" else logits.tolist(), **head}

    return Job(billed, len(images), compute, loc, RAW_MEDIA_TYPE if raw else "application/json")


# Bytes of images uploaded with a request that may still run in the event loop's thread.
_SMALL_UPLOAD = 1 << 16


def _small(n_prompts: int, n_images: int, n_columns: int, files: list[str] | None) -> bool:
    """Whether a request is at most one model call's worth of work, with no large upload (see ``InlinePolicy``)."""
    return one_call(n_prompts, n_images, n_columns) and sum(len(f) for f in files or ()) <= _SMALL_UPLOAD


def _check_image_ids(server: Server, ids: list[str]) -> None:
    limit = server.settings.max_images_per_request
    validation.check_count(len(ids), limit, ("body", "image_ids"), "images", "; split them")


_RAW_ANSWER = {
    "description": "The logits and what the request cost: as JSON, or, when the request's `Accept` header names "
    f"`{RAW_MEDIA_TYPE}` and its `encoding` is `base64`, as one line of that JSON (whose `logits` gives only its "
    "`shape` and `dtype`), a newline, then the logits' raw bytes (little-endian, C order)",
    "content": {RAW_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
}


def _scoring_route(path: str, summary: str):
    return router.post(path, response_model=ScoreResponse, responses={200: _RAW_ANSWER, **CHARGED_ERRORS},
                       summary=summary)


@_scoring_route("/score", "Logits (P, N, C) of uploaded images under P prompt offsets; P queries per 100 classes")
async def score(body: ScoreRequest, charged: RawChargedRequestDep):
    """Score every image against every class name under each prompt offset.

    Each of the ``P`` offsets is one query for up to ``classes_per_query`` class
    names (100 by default), whatever the images: ``C`` class names cost
    ``P x ceil(C / classes_per_query)`` queries (at most ``max_classes``). The
    price is linear in the offsets, so sending them together or apart costs the
    same. Charged before the model runs; at most ``max_logits_per_request``
    logits (``P x N x C``) per request.
    """
    server = charged.server
    settings, scorer = server.settings, server.scorer

    def prepare() -> Job:
        _check_image_ids(server, body.image_ids)
        names = validation.check_class_names(body.class_names, ("body", "class_names"), settings, scorer)
        offsets = validation.check_offsets(body.offsets, ("body", "offsets"), settings, scorer)
        validation.check_work(len(offsets), len(body.image_ids), len(names), settings)
        billed = len(offsets) * -(-len(names) // settings.classes_per_query)
        return _logits_job(server, charged.key.id, body.image_ids, billed, body.encoding,
                           lambda images: scorer.score(images, names, offsets), ("body", "offsets"), charged.raw,
                           body.images)

    n_prompts = (body.offsets.shape or [0])[0] if isinstance(body.offsets, Array) else len(body.offsets)
    small = _small(n_prompts, len(body.image_ids), len(body.class_names), body.images)
    return await charged.run(prepare, "/v1/score", small)


@_scoring_route(
    "/score-text",
    "Logits (P, N, L) of uploaded images against P prompt sets of full strings; one query per string",
)
async def score_text(body: ScoreTextRequest, charged: RawChargedRequestDep):
    """Score every image against every string of each prompt set (one full prompt per class).

    Each string scored is one query: ``P`` prompt sets of ``L`` strings cost
    ``P x L``, however they are packed into sets or requests. At most
    ``max_logits_per_request`` logits (``P x N x L``) per request.
    """
    server = charged.server
    settings, scorer = server.settings, server.scorer

    def prepare() -> Job:
        validation.require_text(scorer, ("body", "prompts"))
        _check_image_ids(server, body.image_ids)
        prompts = validation.check_prompt_sets(body.prompts, ("body", "prompts"), settings, scorer)
        validation.check_work(len(prompts), len(body.image_ids), len(prompts[0]), settings)
        strings = sum(len(p) for p in prompts)
        return _logits_job(server, charged.key.id, body.image_ids, strings, body.encoding,
                           lambda images: scorer.score_text(images, prompts), ("body", "prompts"), charged.raw,
                           body.images)

    small = _small(len(body.prompts), len(body.image_ids), len(body.prompts[0]), body.images)
    return await charged.run(prepare, "/v1/score-text", small)
