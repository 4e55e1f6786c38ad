"""Per-dataset hyperparameters of the official CARROT configs, as named presets.

Values from the authors' per-dataset configuration files (RN50, 16 shots): CMA-ES step size
``sigma``, ``bound``, projection std, consistency weight, the fraction of the budget that
uses the consistency loss (``1/n`` there) and the refiner's batch size. The query budget
follows the paper: 8000 for 8 and 16 shots, 4000 for 2 and 4, 2000 for 1.
"""

from __future__ import annotations

__all__ = ["PRESETS", "budget_for_shots", "preset_params"]

_COMMON = {"popsize": 40, "intrinsic_dim": 512, "learning_rate": 1e-3}

#: dataset -> CarrotClassifier parameters.
PRESETS: dict[str, dict] = {
    name: {**_COMMON, **values}
    for name, values in {
        "caltech101": dict(sigma=1.0, bound=5.0, projection_std=0.2, consistency_weight=0.1, consistency_fraction=0.25, batch_size=256),
        "dtd": dict(sigma=0.02, bound=5.0, projection_std=1.0, consistency_weight=0.001, consistency_fraction=1.0, batch_size=256),
        "eurosat": dict(sigma=0.02, bound=5.0, projection_std=1.0, consistency_weight=0.01, consistency_fraction=1.0, batch_size=256),
        "fgvc_aircraft": dict(sigma=0.02, bound=None, projection_std=0.2, consistency_weight=0.1, consistency_fraction=0.25, batch_size=256),
        "food101": dict(sigma=1.0, bound=None, projection_std=0.2, consistency_weight=1.0, consistency_fraction=1.0, batch_size=256),
        "imagenet": dict(sigma=1.0, bound=None, projection_std=1.0, consistency_weight=0.0, consistency_fraction=1.0, batch_size=256),
        "oxford_flowers": dict(sigma=1.0, bound=5.0, projection_std=0.2, consistency_weight=0.1, consistency_fraction=0.25, batch_size=256),
        "oxford_pets": dict(sigma=0.02, bound=5.0, projection_std=0.2, consistency_weight=0.1, consistency_fraction=1.0, batch_size=64),
        "stanford_cars": dict(sigma=1.0, bound=5.0, projection_std=0.2, consistency_weight=0.1, consistency_fraction=0.25, batch_size=256),
        "sun397": dict(sigma=1.0, bound=5.0, projection_std=0.2, consistency_weight=0.1, consistency_fraction=0.25, batch_size=256),
        "ucf101": dict(sigma=1.0, bound=5.0, projection_std=0.2, consistency_weight=0.1, consistency_fraction=0.25, batch_size=256),
    }.items()
}


def budget_for_shots(n_shots: int) -> int:
    """The paper's query budget for ``n_shots`` per class.

    Examples
    --------
    >>> from skcarrot.presets import budget_for_shots
    >>> [budget_for_shots(k) for k in (1, 2, 4, 8, 16)]
    [2000, 4000, 4000, 8000, 8000]
    """
    if n_shots >= 8:
        return 8000
    if n_shots >= 2:
        return 4000
    return 2000


def preset_params(dataset: str, n_shots: int) -> dict:
    """CarrotClassifier parameters for a dataset and shot count (defaults where no preset).

    Examples
    --------
    >>> from skcarrot.presets import preset_params
    >>> p = preset_params("eurosat", 4)
    >>> p["query_budget"], p["sigma"], p["consistency_weight"]
    (4000, 0.02, 0.01)
    """
    return {**PRESETS.get(dataset, {}), "query_budget": budget_for_shots(n_shots)}
