"""Scoring: prompt offsets (the CARROT door) and full prompt strings (the text door)."""

from __future__ import annotations

from fastapi import APIRouter

from ...wire import encode_array
from .. import validation
from ..charging import CHARGED_ERRORS, ChargedRequestDep, Job
from ..deps import Server
from ..schemas import ScoreRequest, ScoreResponse, ScoreTextRequest

router = APIRouter(prefix="/v1", tags=["scoring"])


def _logits_job(
    server: Server, key_id: int, image_ids: list[str], billed: int, encoding: str, score, loc: tuple
) -> Job:
    """Look up the images; a job billed ``billed`` queries, answering ``score(images)`` as a :class:`ScoreResponse`."""
    images = validation.lookup_images(server.images, key_id, image_ids)

    def compute(remaining: int) -> dict:
        logits = score(images)
        return {
            "logits": encode_array(logits) if encoding == "base64" else logits.tolist(),
            "queries": billed,
            "images": len(images),
            "remaining": remaining,
            "model": server.scorer.model_id,
        }

    return Job(billed, len(images), compute, loc)


def _check_image_ids(server: Server, ids: list[str]) -> None:
    limit = server.settings.max_images_per_request
    validation.check_count(len(ids), limit, ("body", "image_ids"), "images", "; split them")


def _scoring_route(path: str, summary: str):
    return router.post(path, response_model=ScoreResponse, responses=CHARGED_ERRORS, summary=summary)


@_scoring_route("/score", "Logits (P, N, C) of uploaded images under P prompt offsets; P queries")
async def score(body: ScoreRequest, charged: ChargedRequestDep):
    """Score every image against every class name under each prompt offset.

    Each of the ``P`` offsets is one query, whatever the images and class names
    (at most ``max_classes``): the price is linear in the offsets, so sending
    them together or apart costs the same. Charged before the model runs; at
    most ``max_logits_per_request`` logits (``P x N x C``) per request.
    """
    server = charged.server
    settings, scorer = server.settings, server.scorer

    def prepare() -> Job:
        _check_image_ids(server, body.image_ids)
        names = validation.check_class_names(body.class_names, ("body", "class_names"), settings, scorer)
        offsets = validation.check_offsets(body.offsets, ("body", "offsets"), settings, scorer)
        validation.check_work(len(offsets), len(body.image_ids), len(names), settings)
        return _logits_job(server, charged.key.id, body.image_ids, len(offsets), body.encoding,
                           lambda images: scorer.score(images, names, offsets), ("body", "offsets"))

    return await charged.run(prepare)


@_scoring_route(
    "/score-text",
    "Logits (P, N, L) of uploaded images against P prompt sets of full strings; one query per string",
)
async def score_text(body: ScoreTextRequest, charged: ChargedRequestDep):
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
                           lambda images: scorer.score_text(images, prompts), ("body", "prompts"))

    return await charged.run(prepare)
