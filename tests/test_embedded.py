"""The embedded micro CLIP: shipped, loaded offline, and CARROT learns on it."""

import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import same_global_state
from PIL import Image

from skcarrot import CarrotClassifier
from skcarrot.backends import embedded_backend
from skcarrot.backends.embedded import EMBEDDED_WEIGHTS
from skcarrot.datasets import load_digit_images

ROOT = Path(__file__).resolve().parent.parent


def _card_number(row_start):
    card = (ROOT / "docs" / "model_card.md").read_text()
    for line in card.splitlines():
        if line.startswith(row_start):
            return float(re.findall(r"([\d.]+)%", line)[0]) / 100
    raise AssertionError(f"no row {row_start!r} in the model card")


def test_weights_are_small_fp16_safetensors():
    from safetensors import safe_open

    path = Path(EMBEDDED_WEIGHTS)
    assert path.stat().st_size <= 8 * 1024 * 1024
    with safe_open(str(path), "pt") as f:
        dtypes = {str(f.get_tensor(k).dtype) for k in f.keys()}
    assert dtypes == {"torch.float16"}


def test_default_estimator_uses_the_embedded_model(digits16):
    Xtr, ytr, _, _ = digits16
    clf = CarrotClassifier(prompt_tuning=False, refinement=False).fit(Xtr, ytr)
    assert clf.backend is None and clf.prompt_offset_.shape == embedded_backend().context_shape


@pytest.mark.slow
def test_zero_shot_on_sklearn_digits_matches_the_model_card():
    X, y = load_digit_images()
    acc = CarrotClassifier(prompt_tuning=False, refinement=False).fit(X[:20], y[:20]).score(X, y)
    assert 0.55 <= acc <= 0.85
    assert acc == pytest.approx(_card_number("| sklearn digits"), abs=0.001)


def test_arrays_pil_and_paths_give_the_same_predictions(digits16, tmp_path):
    Xtr, ytr, Xte, _ = digits16
    clf = CarrotClassifier(query_budget=300, popsize=10, random_state=0).fit(Xtr, ytr)
    X = Xte[:40]
    paths = []
    for i, im in enumerate(X):
        p = tmp_path / f"{i}.png"
        Image.fromarray(im).save(p)
        paths.append(str(p))
    ref = clf.predict_proba(X)
    np.testing.assert_array_equal(clf.predict_proba([Image.fromarray(im) for im in X]), ref)
    np.testing.assert_array_equal(clf.predict_proba(paths), ref)


@pytest.mark.slow
def test_carrot_learns_on_held_out_digits(digits16):
    """Seeded, 16 shots, 8000 queries: every adapted method beats zero-shot on held-out digits."""
    Xtr, ytr, Xte, yte = digits16
    common = dict(query_budget=8000, random_state=0)
    score = {}
    for name, (p, r) in {"zero": (False, False), "bbt": (True, False), "refine": (False, True), "full": (True, True)}.items():
        score[name] = CarrotClassifier(prompt_tuning=p, refinement=r, **common).fit(Xtr, ytr).score(Xte, yte)
    assert score["full"] >= score["zero"] + 0.15, score
    assert score["bbt"] >= score["zero"] + 0.10, score
    assert score["refine"] >= score["zero"] + 0.12, score


def test_wheel_ships_the_weights(tmp_path):
    import subprocess
    import sys

    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
    )
    wheel = next(tmp_path.glob("skcarrot-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "skcarrot/weights/skcarrot-micro-clip.safetensors" in names
    assert "skcarrot/backends/model_configs/skcarrot-micro-clip.json" in names


@pytest.mark.slow
def test_the_default_at_its_default_settings_refines_digits_within_a_quarter_of_the_budget(digits16):
    """CarrotClassifier() as shipped (8000 queries, intrinsic_dim=512, popsize 40): staged choice on held-out digits."""
    Xtr, ytr, Xte, yte = digits16
    np.random.seed(7)
    before = np.random.get_state()
    clf = CarrotClassifier(random_state=0).fit(Xtr, ytr)
    after = np.random.get_state()
    assert same_global_state(before, after)  # TPA's draws at d=512 stay ours
    zero_shot = CarrotClassifier(prompt_tuning=False, refinement=False).fit(Xtr, ytr).score(Xte, yte)
    assert clf.selection_["choice"] == "refine-only" and clf.selection_["pilot_queries"] > 0
    assert clf.n_queries_ <= 8000 // 4 + 1
    assert clf.score(Xte, yte) > zero_shot + 0.1
