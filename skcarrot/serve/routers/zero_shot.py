"""The public zero-shot-image-classification contract of hosted CLIP endpoints."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter

from .. import validation
from ..charging import CHARGED_ERRORS, ChargedRequestDep, Job
from ..schemas import LabelScore, ZeroShotRequest

router = APIRouter(tags=["zero-shot"])


@router.post(
    "/v1/zero-shot-image-classification",
    response_model=list[LabelScore],
    responses=CHARGED_ERRORS,
    summary="Zero-shot image classification, as hosted CLIP endpoints speak it; 1 query",
)
async def zero_shot_image_classification(body: ZeroShotRequest, charged: ChargedRequestDep):
    """``{"inputs": <base64 image>, "parameters": {"candidate_labels": [...], "hypothesis_template": ...}}``
    -> ``[{"label", "score"}]``, sorted by score; scores are softmax probabilities.

    Priced per call, as hosted endpoints price it: one query per call, for one
    image and up to ``max_classes`` candidate labels.

    Point ``huggingface_hub.InferenceClient(model=<this URL>, token=<key>)`` here.
    """
    settings, scorer = charged.server.settings, charged.server.scorer

    def prepare() -> Job:
        validation.require_text(scorer, ("body", "parameters"))
        template = validation.check_template(
            body.parameters.hypothesis_template, ("body", "parameters", "hypothesis_template")
        )
        labels = validation.check_labels(body.parameters.candidate_labels,
                                         ("body", "parameters", "candidate_labels"), settings)
        prompts = validation.check_prompt_sets([[template.replace("{}", label) for label in labels]],
                                               ("body", "parameters", "candidate_labels"), settings, scorer,
                                               settings.max_class_name_chars + validation.MAX_TEMPLATE_CHARS)
        _, _, image = validation.decode_upload(body.inputs, ("body", "inputs"), settings.max_image_pixels,
                                               scorer.reduce)

        def compute(remaining: int) -> list[dict]:
            probs = scorer.label_probabilities(image, prompts[0])
            order = np.argsort(-probs, kind="stable")
            return [{"label": labels[i], "score": float(probs[i])} for i in order]

        return Job(1, 1, compute, ("body", "parameters", "candidate_labels"))

    return await charged.run(prepare)
