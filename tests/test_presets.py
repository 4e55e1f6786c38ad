"""Each dataset preset against the official configuration files and training scripts."""

import math

import pytest

from skcarrot import CarrotClassifier
from skcarrot.tools.bench import make_estimator, paper_numbers
from skcarrot.tools.presets import PRESETS, budget_for_shots, preset_params

# Transcribed from the official per-dataset configs (RN50, 16 shots) and scripts:
# sigma, bound (0 = none), projection std, consistency weight, n (KL during the first
# budget / n queries), refiner batch size and hidden width.
OFFICIAL = {
    "caltech101": (1.0, 5, 0.2, 0.1, 4, 256, 256),
    "dtd": (0.02, 5, 1.0, 0.001, 1, 256, 256),
    "eurosat": (0.02, 5, 1.0, 0.01, 1, 256, 256),
    "fgvc_aircraft": (0.02, 0, 0.2, 0.1, 4, 256, 256),
    "food101": (1.0, 0, 0.2, 1.0, 1, 256, 256),
    # the ImageNet script keeps torch's default Linear(512, .) init instead of its config's std 1
    "imagenet": (1.0, 0, 1 / math.sqrt(3 * 512), 0.0, 1, 256, 512),
    "oxford_flowers": (1.0, 5, 0.2, 0.1, 4, 256, 256),
    "oxford_pets": (0.02, 5, 0.2, 0.1, 1, 64, 256),
    "stanford_cars": (1.0, 5, 0.2, 0.1, 4, 256, 256),
    "sun397": (1.0, 5, 0.2, 0.1, 4, 256, 256),
    "ucf101": (1.0, 5, 0.2, 0.1, 4, 256, 256),
}
# Budget by shots: 8000 for 8-16, 4000 for 2-4, 2000 for 1; the ImageNet script: 4000 for 2-16.
OFFICIAL_BUDGETS = {"default": {1: 2000, 2: 4000, 4: 4000, 8: 8000, 16: 8000},
                    "imagenet": {1: 2000, 2: 4000, 4: 4000, 8: 4000, 16: 4000}}


@pytest.mark.parametrize("dataset", sorted(OFFICIAL))
def test_preset_matches_the_official_values(dataset):
    sigma, bound, std, weight, n, batch, hidden = OFFICIAL[dataset]
    p = PRESETS[dataset]
    assert p["sigma"] == sigma
    assert p["bound"] == (bound or None)
    assert p["projection_std"] == pytest.approx(std, rel=1e-9)
    assert p["consistency_weight"] == weight
    assert p["consistency_fraction"] == 1 / n
    assert p["batch_size"] == batch and p["hidden_dim"] == hidden
    assert (p["popsize"], p["intrinsic_dim"], p["learning_rate"]) == (40, 512, 1e-3)
    # RandomResizedCrop(scale 0.5-1) + horizontal flip, drawn fresh every epoch
    assert p["augmentation"] == "crop+flip" and p["fresh_views"] is True
    assert p["early_stopping"] is False  # the paper reports the last generation
    budgets = OFFICIAL_BUDGETS.get(dataset, OFFICIAL_BUDGETS["default"])
    for shots, budget in budgets.items():
        assert budget_for_shots(shots, dataset) == budget == preset_params(dataset, shots)["query_budget"]
    CarrotClassifier(**p)._validate_params()  # every preset is a valid set of parameters


def test_imagenet_projection_std_is_about_0_026():
    assert PRESETS["imagenet"]["projection_std"] == pytest.approx(0.0255, abs=5e-4)


def test_the_benchmark_builds_estimators_from_presets():
    est = make_estimator("carrot", "imagenet", 16, seed=1, backend=None, classnames=["a", "b"])
    assert (est.query_budget, est.hidden_dim, est.fresh_views) == (4000, 512, True)


def test_paper_numbers_hold_zero_shot_bbt_and_carrot_for_every_dataset():
    paper = paper_numbers()
    for method in ("zeroshot", "bbt", "carrot"):
        assert set(OFFICIAL) <= set(paper[method])
    mean = sum(paper["carrot"][d] for d in OFFICIAL) / len(OFFICIAL)
    assert mean == pytest.approx(paper["averages_16_shots"]["carrot"], abs=0.01)
