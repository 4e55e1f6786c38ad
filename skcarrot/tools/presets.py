"""Named settings of CarrotClassifier: the four methods, and per-dataset presets of the official code.

Dataset presets follow the authors' per-dataset configuration files and training scripts
(RN50): CMA-ES step size ``sigma``, ``bound`` (0 there: none), projection std, consistency
weight, the fraction of the budget that uses the consistency loss (``1/n`` there), the
refiner's batch size and hidden width, and the augmentation: RandomResizedCrop (scale
0.5-1) and horizontal flip drawn fresh every epoch. The query budget follows the scripts:
8000 for 8 and 16 shots, 4000 for 2 and 4, 2000 for 1; the ImageNet script uses 4000 for
2-16 shots. The ImageNet script also ignores its config's projection std and keeps the
default initialisation of a torch ``Linear(512, ...)`` layer, uniform with std
``1 / sqrt(3 * 512)``, about 0.026.
"""

from __future__ import annotations

import math

__all__ = ["METHODS", "PRESETS", "SETTINGS", "budget_for_shots", "preset_params"]

#: The four CarrotClassifier settings: short name -> (display name, prompt_tuning, refinement).
SETTINGS = {
    "zeroshot": ("zero-shot", False, False),
    "bbt": ("prompt-only (BBT)", True, False),
    "refine": ("refine-only", False, True),
    "carrot": ("CARROT", True, True),
}

#: Display name -> (prompt_tuning, refinement).
METHODS = {label: (prompt, refine) for label, prompt, refine in SETTINGS.values()}

# Shared by every official config and script.
_COMMON = {
    "popsize": 40,
    "intrinsic_dim": 512,
    "learning_rate": 1e-3,
    "hidden_dim": 256,
    "batch_size": 256,
    "augmentation": "crop+flip",
    "fresh_views": True,
    # The paper's protocol: every generation of the search, no selection.
    "prompt_tuning": True,
    # The paper reports the model after the last generation, with no validation shots held back.
    "early_stopping": False,
}

#: Projection std of the ImageNet script: torch's default Linear init for 512 inputs.
IMAGENET_PROJECTION_STD = 1.0 / math.sqrt(3 * 512)

#: dataset -> CarrotClassifier parameters.
PRESETS: dict[str, dict] = {
    name: {**_COMMON, **values}
    for name, values in {
        "caltech101": dict(sigma=1.0, bound=5.0, projection_std=0.2, consistency_weight=0.1, consistency_fraction=0.25),
        "dtd": dict(sigma=0.02, bound=5.0, projection_std=1.0, consistency_weight=0.001, consistency_fraction=1.0),
        "eurosat": dict(sigma=0.02, bound=5.0, projection_std=1.0, consistency_weight=0.01, consistency_fraction=1.0),
        "fgvc_aircraft": dict(sigma=0.02, bound=None, projection_std=0.2, consistency_weight=0.1, consistency_fraction=0.25),
        "food101": dict(sigma=1.0, bound=None, projection_std=0.2, consistency_weight=1.0, consistency_fraction=1.0),
        "imagenet": dict(sigma=1.0, bound=None, projection_std=IMAGENET_PROJECTION_STD, consistency_weight=0.0,
                         consistency_fraction=1.0, hidden_dim=512),
        "oxford_flowers": dict(sigma=1.0, bound=5.0, projection_std=0.2, consistency_weight=0.1, consistency_fraction=0.25),
        "oxford_pets": dict(sigma=0.02, bound=5.0, projection_std=0.2, consistency_weight=0.1, consistency_fraction=1.0,
                            batch_size=64),
        "stanford_cars": dict(sigma=1.0, bound=5.0, projection_std=0.2, consistency_weight=0.1, consistency_fraction=0.25),
        "sun397": dict(sigma=1.0, bound=5.0, projection_std=0.2, consistency_weight=0.1, consistency_fraction=0.25),
        "ucf101": dict(sigma=1.0, bound=5.0, projection_std=0.2, consistency_weight=0.1, consistency_fraction=0.25),
    }.items()
}


def budget_for_shots(n_shots: int, dataset: str | None = None) -> int:
    """The official query budget for ``n_shots`` per class (and ``dataset``, for ImageNet).

    Examples
    --------
    >>> from skcarrot.tools.presets import budget_for_shots
    >>> [budget_for_shots(k) for k in (1, 2, 4, 8, 16)]
    [2000, 4000, 4000, 8000, 8000]
    >>> [budget_for_shots(k, "imagenet") for k in (1, 2, 4, 8, 16)]
    [2000, 4000, 4000, 4000, 4000]
    """
    if n_shots >= 8:
        return 4000 if dataset == "imagenet" else 8000
    if n_shots >= 2:
        return 4000
    return 2000


def preset_params(dataset: str, n_shots: int) -> dict:
    """CarrotClassifier parameters for a dataset and shot count (defaults where no preset).

    Examples
    --------
    >>> from skcarrot.tools.presets import preset_params
    >>> p = preset_params("eurosat", 4)
    >>> p["query_budget"], p["sigma"], p["consistency_weight"], p["fresh_views"]
    (4000, 0.02, 0.01, True)
    """
    return {**PRESETS.get(dataset, {}), "query_budget": budget_for_shots(n_shots, dataset)}
