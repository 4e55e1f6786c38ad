"""White-box baselines on the embedded model: shapes, both class counts, learning, the searches."""

import numpy as np
import pytest
from helpers import same_global_state

from skcarrot import ToyBackend
from skcarrot.tools.baselines import CoOpClassifier, LinearProbeClassifier, TipAdapterClassifier, coop_epochs
from skcarrot.datasets import few_shot_split, load_digit_images

ESTIMATORS = [
    lambda: CoOpClassifier(max_epochs=3, random_state=0),
    lambda: LinearProbeClassifier(random_state=0),
    lambda: TipAdapterClassifier(max_epochs=2, random_state=0),
]


@pytest.fixture(scope="module")
def zero_shot(digits16):
    """The zero-shot held-out accuracy on ``digits16``."""
    Xtr, ytr, Xte, yte = digits16
    # alpha=0: the cache is switched off and Tip-Adapter is the hand-written prompt, zero-shot.
    return TipAdapterClassifier(alpha=0.0, beta=1.0, fine_tune=False).fit(Xtr, ytr).score(Xte, yte)


@pytest.mark.parametrize("make", ESTIMATORS)
@pytest.mark.parametrize("n_classes", [2, pytest.param(10, marks=pytest.mark.slow)])
def test_probabilities_have_one_column_per_class(make, n_classes):
    X, y = load_digit_images()
    keep = y < n_classes
    Xtr, ytr, Xte, yte = few_shot_split(X[keep], y[keep], 8, seed=0)
    clf = make().fit(Xtr, ytr)
    proba = clf.predict_proba(Xte)
    assert proba.shape == (len(Xte), n_classes)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(clf.predict(Xte), clf.classes_[proba.argmax(axis=1)])
    assert clf.score(Xte, yte) > 1.0 / n_classes + 0.2  # well above chance on held-out digits


def test_white_box_methods_refuse_a_black_box():
    X, y = load_digit_images()
    with pytest.raises(TypeError, match="white-box method"):
        LinearProbeClassifier(backend=ToyBackend()).fit(X[:20], y[:20])


@pytest.mark.slow
def test_coop_with_the_paper_schedule_beats_zero_shot_on_held_out_digits(digits16, zero_shot):
    Xtr, ytr, Xte, yte = digits16
    clf = CoOpClassifier(max_epochs=100, augmentation="none", random_state=0).fit(Xtr, ytr)
    assert clf.score(Xte, yte) > zero_shot + 0.08
    assert clf.loss_curve_[-1] < clf.loss_curve_[0]


def test_linear_probe_with_searched_c_beats_zero_shot_on_held_out_digits(digits16, zero_shot):
    Xtr, ytr, Xte, yte = digits16
    assert LinearProbeClassifier(random_state=0).fit(Xtr, ytr).score(Xte, yte) > zero_shot + 0.12


def test_tip_adapter_f_beats_zero_shot_on_held_out_digits(digits16, zero_shot):
    Xtr, ytr, Xte, yte = digits16
    clf = TipAdapterClassifier(augmentation="none", random_state=0).fit(Xtr, ytr)
    assert clf.score(Xte, yte) > zero_shot + 0.10
    assert clf.loss_curve_[-1] < clf.loss_curve_[0]


def test_linear_probe_picks_c_from_the_grid_on_validation_and_refits_on_all_shots(digits16):
    Xtr, ytr, _, _ = digits16
    grid = (0.01, 1.0, 100.0)
    clf = LinearProbeClassifier(Cs=grid, random_state=0).fit(Xtr, ytr)
    assert clf.C_ in grid and sorted(clf.search_scores_) == sorted(grid)
    best_accuracy = max(acc for acc, _ in clf.search_scores_.values())
    assert clf.search_scores_[clf.C_][0] == best_accuracy
    # The final model is the one a fixed C gives on all 160 shots, not on the 120 left after validation.
    refit = LinearProbeClassifier(C=clf.C_).fit(Xtr, ytr)
    np.testing.assert_allclose(clf.linear_.coef_, refit.linear_.coef_, rtol=1e-6, atol=1e-8)
    assert refit.search_scores_ == {}


def test_tip_adapter_picks_alpha_and_beta_from_the_grids_and_rebuilds_the_cache_on_all_shots(digits16):
    Xtr, ytr, _, _ = digits16
    alphas, betas = (0.5, 5.0, 30.0), (1.0, 7.0)
    clf = TipAdapterClassifier(alphas=alphas, betas=betas, fine_tune=False, random_state=0).fit(Xtr, ytr)
    assert (clf.alpha_, clf.beta_) in clf.search_scores_ and len(clf.search_scores_) == 6
    assert clf.search_scores_[(clf.alpha_, clf.beta_)][0] == max(a for a, _ in clf.search_scores_.values())
    assert clf.cache_keys_.shape[0] == len(Xtr) and clf.cache_values_.shape == (len(Xtr), 10)


def test_tip_adapter_with_fixed_alpha_and_beta_is_the_old_formula_in_the_model_units():
    X, y = load_digit_images()
    Xtr, ytr, Xte, _ = few_shot_split(X, y, 4, seed=0)
    clf = TipAdapterClassifier(alpha=1.0, beta=5.5, fine_tune=False).fit(Xtr, ytr)
    assert clf.search_scores_ == {} and clf.loss_curve_ == []
    from skcarrot.backends.embedded import resolve_backend
    from skcarrot.images import to_pil_images

    wb = resolve_backend(None).white_box()
    f = wb.image_features(to_pil_images(Xte)).numpy()
    # Official: 100 f T^T + alpha exp(-beta (1 - f K^T)) L; here everything times s / 100.
    official = 100 * f @ clf.text_features_.T + np.exp(-5.5 * (1 - f @ clf.cache_keys_.T)) @ clf.cache_values_
    np.testing.assert_allclose(clf.decision_function(Xte), official * wb.logit_scale / 100, rtol=1e-4, atol=1e-4)


def test_one_shot_per_class_falls_back_with_a_warning():
    X, y = load_digit_images()
    Xtr, ytr, _, _ = few_shot_split(X, y, 1, seed=0)
    with pytest.warns(UserWarning, match="single training image"):
        assert LinearProbeClassifier().fit(Xtr, ytr).C_ == 1.0
    with pytest.warns(UserWarning, match="single training image"):
        clf = TipAdapterClassifier(fine_tune=False).fit(Xtr, ytr)
    assert (clf.alpha_, clf.beta_) == (1.0, 1.0)


def test_coop_trains_for_the_official_epochs_by_shots_with_a_warm_up_epoch():
    assert [coop_epochs(k) for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    X, y = load_digit_images()
    Xtr, ytr, _, _ = few_shot_split(X[y < 3], y[y < 3], 1, seed=0)
    clf = CoOpClassifier(augmentation="none", random_state=0).fit(Xtr, ytr)
    assert clf.n_iter_ == 50 and len(clf.loss_curve_) == 50
    assert clf._epoch_lr(0, 50) == 1e-5
    assert clf._epoch_lr(1, 50) == pytest.approx(0.001 * (1 + np.cos(np.pi / 50)))
    assert clf._epoch_lr(49, 50) < 1e-5


@pytest.mark.slow
def test_fits_are_seeded_and_leave_the_global_random_state_alone():
    X, y = load_digit_images()
    Xtr, ytr, Xte, _ = few_shot_split(X, y, 4, seed=0)
    before = np.random.get_state()
    a = CoOpClassifier(max_epochs=3, random_state=0).fit(Xtr, ytr)
    b = CoOpClassifier(max_epochs=3, random_state=0).fit(Xtr, ytr)
    t = TipAdapterClassifier(max_epochs=2, random_state=0).fit(Xtr, ytr)
    assert same_global_state(before, np.random.get_state())  # key and position: not one draw
    np.testing.assert_array_equal(a.prompt_offset_, b.prompt_offset_)
    np.testing.assert_array_equal(t.predict(Xte), TipAdapterClassifier(max_epochs=2, random_state=0).fit(Xtr, ytr).predict(Xte))


@pytest.mark.parametrize("bad, match", [
    (dict(Cs=()), "Cs must be a non-empty"),
    (dict(Cs=(1.0, -1.0)), "Cs must be a non-empty"),
])
def test_linear_probe_refuses_a_bad_grid(bad, match):
    X, y = load_digit_images()
    with pytest.raises(ValueError, match=match):
        LinearProbeClassifier(**bad).fit(X[:40], y[:40])
