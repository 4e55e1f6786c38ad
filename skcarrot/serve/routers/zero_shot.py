"""The public zero-shot-image-classification contract of hosted CLIP endpoints."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from ..charging import charged_call, fingerprint
from ..deps import Server, current_key, get_server, idempotency_key
from ..errors import invalid
from ..ledger import KeyRecord
from ..schemas import ErrorResponse, LabelScore, ZeroShotRequest

router = APIRouter(tags=["zero-shot"])


def _zero_shot(server: Server, key: KeyRecord, body: ZeroShotRequest, idem: str | None, digest: str):
    model = server.model
    if not model.text_capable:
        raise invalid(("body", "parameters"), "this server's model does not score prompt strings")
    template = body.parameters.hypothesis_template
    if template.count("{}") != 1:
        raise invalid(
            ("body", "parameters", "hypothesis_template"),
            f"must contain '{{}}' exactly once (where the label goes), got {template!r}",
        )
    labels = body.parameters.candidate_labels
    prompts = model.check_prompt_sets([[template.replace("{}", label) for label in labels]],
                                      ("body", "parameters", "candidate_labels"))
    image_id, raw, image = model.decode_upload(body.inputs, ("body", "inputs"))

    def compute(remaining: int) -> list[dict]:
        logits = model.score_text([image], prompts)[0, 0]
        z = np.exp(logits - logits.max())
        probs = z / z.sum()
        order = np.argsort(-probs, kind="stable")
        return [{"label": labels[i], "score": float(probs[i])} for i in order]

    return charged_call(server, key, 1, 1, idem, digest, compute)


@router.post(
    "/v1/zero-shot-image-classification",
    response_model=list[LabelScore],
    responses={401: {"model": ErrorResponse}, 402: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
               422: {"model": ErrorResponse}, 429: {"model": ErrorResponse}},
    summary="Zero-shot image classification, as hosted CLIP endpoints speak it; 1 query",
)
async def zero_shot_image_classification(
    request: Request,
    body: ZeroShotRequest,
    server: Annotated[Server, Depends(get_server)],
    key: Annotated[KeyRecord, Depends(current_key)],
    idem: Annotated[str | None, Depends(idempotency_key)],
):
    """``{"inputs": <base64 image>, "parameters": {"candidate_labels": [...], "hypothesis_template": ...}}``
    -> ``[{"label", "score"}]``, sorted by score; scores are softmax probabilities.

    Point ``huggingface_hub.InferenceClient(model=<this URL>, token=<key>)`` here.
    """
    digest = fingerprint(request.url.path, await request.body())
    return await run_in_threadpool(_zero_shot, server, key, body, idem, digest)
