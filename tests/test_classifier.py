import pickle
import subprocess
import sys

import joblib
import numpy as np
import pytest
import torch
from helpers import FAST, MICRO, StrictBackend, scored
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from skcarrot import CarrotClassifier, OpenCLIPBackend, ToyBackend
from skcarrot.images import to_pil_images
from skcarrot.losses import cross_entropy


@pytest.fixture(scope="module")
def fitted_micro(micro, digits):
    Xtr, ytr, _, _ = digits
    return CarrotClassifier(backend=micro, **FAST).fit(Xtr, ytr)


# ------------------------------------------------------------- query budget
@pytest.mark.parametrize(
    "prompt_tuning, refinement, budget, popsize, expected",
    [
        (True, True, 200, 8, (200 // 9) * 9),  # popsize prompts + 1 refiner query a generation
        (True, True, 100, 10, (100 // 11) * 11),
        (True, False, 203, 8, (203 // 8) * 8),  # prompt-only
        (False, True, 200, 8, 1),  # refine-only: the prompt never moves, one query serves all epochs
        (False, False, 200, 8, 0),  # zero-shot
    ],
)
def test_exact_query_counts_with_a_strict_black_box(digits, prompt_tuning, refinement, budget, popsize, expected):
    Xtr, ytr, Xte, _ = digits
    box = StrictBackend()
    params = dict(FAST, query_budget=budget, popsize=popsize, prompt_tuning=prompt_tuning, refinement=refinement)
    clf = CarrotClassifier(backend=box, **params)
    clf.fit(Xtr, ytr)
    assert clf.n_queries_ == scored(box) == expected
    assert clf.n_queries_ <= budget
    assert sum(clf.n_queries_by_purpose_.values()) == clf.n_queries_
    if clf.history_:
        assert clf.history_[-1]["queries"] == clf.n_queries_
        assert all(a["queries"] <= b["queries"] for a, b in zip(clf.history_, clf.history_[1:]))
    proba = clf.predict_proba(Xte)
    assert proba.shape == (len(Xte), 10)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert scored(box) == expected + 1  # prediction is one more prompt, not charged to fit


def test_budget_smaller_than_one_generation_is_an_error(digits):
    Xtr, ytr, _, _ = digits
    with pytest.raises(ValueError, match=r"query_budget=8 is smaller than one generation .* = 9 queries"):
        CarrotClassifier(backend=ToyBackend(), **dict(FAST, query_budget=8)).fit(Xtr, ytr)
    with pytest.raises(ValueError, match="smaller than one generation"):
        CarrotClassifier(backend=ToyBackend(), **dict(FAST, refinement=False, query_budget=7)).fit(Xtr, ytr)
    with pytest.raises(ValueError, match="smaller than one generation"):
        CarrotClassifier(backend=ToyBackend(), **dict(FAST, prompt_tuning=False, query_budget=0)).fit(Xtr, ytr)
    # zero-shot needs no budget at all
    CarrotClassifier(backend=ToyBackend(), prompt_tuning=False, refinement=False, query_budget=0).fit(Xtr, ytr)
    # exactly one generation is enough
    clf = CarrotClassifier(backend=ToyBackend(), **dict(FAST, query_budget=9)).fit(Xtr, ytr)
    assert clf.n_iter_ == 1 and clf.n_queries_ == 9


def test_max_iter_caps_generations(digits):
    Xtr, ytr, _, _ = digits
    clf = CarrotClassifier(backend=ToyBackend(), max_iter=3, **FAST).fit(Xtr, ytr)
    assert clf.n_iter_ == 3 == len(clf.history_) and clf.n_queries_ == 27
    clf = CarrotClassifier(backend=ToyBackend(), max_iter=10**6, **FAST).fit(Xtr, ytr)
    assert clf.n_queries_ <= FAST["query_budget"]


# --------------------------------------------------------------- determinism
def test_same_seed_same_model_toy(digits):
    Xtr, ytr, Xte, _ = digits
    a = CarrotClassifier(backend=ToyBackend(), **FAST).fit(Xtr, ytr).predict_proba(Xte)
    b = CarrotClassifier(backend=ToyBackend(), **FAST).fit(Xtr, ytr).predict_proba(Xte)
    c = CarrotClassifier(backend=ToyBackend(), **dict(FAST, random_state=1)).fit(Xtr, ytr).predict_proba(Xte)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_same_seed_same_model_open_clip(micro, fitted_micro, digits):
    Xtr, ytr, Xte, _ = digits
    again = CarrotClassifier(backend=OpenCLIPBackend(model_name=MICRO, pretrained=None), **FAST).fit(Xtr, ytr)
    np.testing.assert_array_equal(again.predict_proba(Xte), fitted_micro.predict_proba(Xte))
    np.testing.assert_array_equal(again.prompt_offset_, fitted_micro.prompt_offset_)


# -------------------------------------------------------------- persistence
@pytest.mark.slow
def test_joblib_round_trip_in_a_fresh_process(fitted_micro, digits, tmp_path):
    _, _, Xte, _ = digits
    path = tmp_path / "clf.joblib"
    joblib.dump(fitted_micro, path)
    assert path.stat().st_size < 1_000_000
    np.save(tmp_path / "X.npy", Xte)
    code = (
        "import joblib, numpy as np, sys;"
        f"clf = joblib.load({str(path)!r});"
        f"np.save({str(tmp_path / 'p.npy')!r}, clf.predict_proba(np.load({str(tmp_path / 'X.npy')!r})))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), fitted_micro.predict_proba(Xte))


def test_saved_estimator_holds_no_model_weights(fitted_micro):
    blob = pickle.dumps(fitted_micro)
    assert len(blob) < 1_000_000
    model_bytes = sum(p.numel() * p.element_size() for p in fitted_micro.backend._box().model.parameters())
    assert len(blob) < model_bytes / 10

    def no_tensors(obj, depth=0):
        assert not isinstance(obj, (torch.Tensor, torch.nn.Module))
        if isinstance(obj, dict) and depth < 3:
            for v in obj.values():
                no_tensors(v, depth + 1)

    no_tensors(vars(fitted_micro))


def test_clone_is_unfitted_with_same_params(fitted_micro):
    c = clone(fitted_micro)
    assert c.get_params()["query_budget"] == FAST["query_budget"]
    assert not hasattr(c, "classes_")


# ---------------------------------------------------------- sklearn tooling
def _flat_digits(digits):
    Xtr, ytr, Xte, yte = digits
    return Xtr.reshape(len(Xtr), -1), ytr, Xte.reshape(len(Xte), -1), yte


def test_pipeline_grid_search_and_cross_validation(digits):
    Xtr, ytr, _, _ = _flat_digits(digits)
    to_images = FunctionTransformer(lambda X: np.asarray(X, dtype=np.uint8).reshape(-1, 8, 8))
    pipe = make_pipeline(to_images, CarrotClassifier(backend=ToyBackend(), **dict(FAST, query_budget=60)))
    scores = cross_val_score(pipe, Xtr, ytr, cv=2)
    assert scores.shape == (2,) and np.all((scores >= 0) & (scores <= 1))
    grid = GridSearchCV(
        pipe,
        {"carrotclassifier__consistency_weight": [0.0, 0.1], "carrotclassifier__query_budget": [30, 60]},
        cv=2,
    ).fit(Xtr, ytr)
    means = grid.cv_results_["mean_test_score"]
    assert len(means) == 4 and np.all(np.isfinite(means)) and np.all((means >= 0) & (means <= 1))
    assert grid.best_params_ == grid.cv_results_["params"][int(np.argmax(means))]
    assert grid.best_estimator_[-1].n_queries_ <= grid.best_params_["carrotclassifier__query_budget"]


def test_grid_search_over_backend_parameters(digits):
    Xtr, ytr, _, _ = digits
    grid = GridSearchCV(
        CarrotClassifier(backend=ToyBackend(), **dict(FAST, query_budget=30)),
        {"backend__scale": [5.0, 20.0]},
        cv=2,
    ).fit(Xtr, ytr)
    means = grid.cv_results_["mean_test_score"]
    folds = np.stack([grid.cv_results_[f"split{i}_test_score"] for i in range(2)])
    assert np.all(np.isfinite(folds)) and np.all((folds >= 0) & (folds <= 1))
    assert means[0] != means[1]  # the backend's parameter reaches every fit: the two scales score apart
    assert grid.best_params_ == grid.cv_results_["params"][int(np.argmax(means))]
    assert grid.best_estimator_.backend.scale == grid.best_params_["backend__scale"] in (5.0, 20.0)
    assert grid.best_estimator_.n_queries_ <= 30


# ------------------------------------------------------------------- errors
def test_clear_errors(digits, tmp_path):
    Xtr, ytr, _, _ = digits
    clf = CarrotClassifier(backend=ToyBackend(), **FAST)
    with pytest.raises(ValueError, match="only one class"):
        clf.fit(Xtr[:5], np.zeros(5))
    with pytest.raises(ValueError, match="X has 80 images but y has 79 labels"):
        clf.fit(Xtr, ytr[:-1])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"image 3: cannot read image file .*bad\.png"):
        clf.fit([Xtr[0], Xtr[1], Xtr[2], str(bad)], [0, 1, 0, 1])
    with pytest.raises(ValueError, match="class_names has 3 names but y has 10 classes"):
        CarrotClassifier(backend=ToyBackend(), class_names=["a", "b", "c"], **FAST).fit(Xtr, ytr + 100)
    with pytest.raises(ValueError, match=r"class_names has no name for label\(s\) \[9\]"):
        CarrotClassifier(backend=ToyBackend(), class_names={i: str(i) for i in range(9)}, **FAST).fit(Xtr, ytr)
    with pytest.raises(ValueError, match="query_budget"):
        CarrotClassifier(backend=ToyBackend(), query_budget=-1).fit(Xtr, ytr)


def test_class_names_reach_the_prompts(digits):
    Xtr, ytr, _, _ = digits
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    seen = []

    class Recording(ToyBackend):
        def logits(self, images, class_names, offsets):
            seen.append(list(class_names))
            return super().logits(images, class_names, offsets)

    kw = dict(prompt_tuning=False, refinement=False)
    CarrotClassifier(backend=Recording(), class_names=words, **kw).fit(Xtr, ytr).predict(Xtr[:2])
    CarrotClassifier(backend=Recording(), class_names=dict(enumerate(words)), **kw).fit(Xtr, ytr).predict(Xtr[:2])
    letters = np.array(list("abcdefghij"))[ytr]
    clf = CarrotClassifier(backend=Recording(), **kw).fit(Xtr, letters)
    clf.predict(Xtr[:2])
    assert seen == [words, words, list("abcdefghij")]
    assert set(clf.predict(Xtr)) <= set("abcdefghij")


def test_warm_start_continues_and_refuses_new_classes(digits):
    Xtr, ytr, _, _ = digits
    clf = CarrotClassifier(backend=ToyBackend(), warm_start=True, **dict(FAST, query_budget=45)).fit(Xtr, ytr)
    first_iter, first_offset = clf.n_iter_, clf.prompt_offset_.copy()
    clf.fit(Xtr, ytr)
    assert clf.n_iter_ == 2 * first_iter and len(clf.history_) == clf.n_iter_
    assert clf.history_[-1]["queries"] == 2 * clf.n_queries_
    assert not np.array_equal(first_offset, clf.prompt_offset_)
    with pytest.raises(ValueError, match="warm_start can not change the classes"):
        clf.fit(Xtr[ytr < 5], ytr[ytr < 5])


def test_verbose_output(digits, capsys):
    Xtr, ytr, _, _ = digits
    CarrotClassifier(backend=ToyBackend(), **dict(FAST, query_budget=30)).fit(Xtr, ytr)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    CarrotClassifier(backend=ToyBackend(), verbose=1, **dict(FAST, query_budget=30)).fit(Xtr, ytr)
    out = capsys.readouterr()
    assert out.out == "" and "CarrotClassifier.fit" in out.err and "27/27" in out.err
    CarrotClassifier(backend=ToyBackend(), verbose=2, **dict(FAST, query_budget=30)).fit(Xtr, ytr)
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("Generation 1, queries = 9, best fitness = ")
    assert "27/27" in out.err


# ---------------------------------------------------------------- mechanics
def test_fitness_goes_down_and_learned_prompt_beats_hand_written(micro, digits):
    """On a random-init model: the search finds a prompt better on the training set."""
    Xtr, ytr, _, _ = digits
    clf = CarrotClassifier(
        backend=micro, prompt_tuning=True, refinement=False, query_budget=400, popsize=10, intrinsic_dim=32,
        random_state=0,
    ).fit(Xtr, ytr)
    best = [h["best_fitness"] for h in clf.history_]
    assert np.mean(best[-5:]) < np.mean(best[:5])
    logits = micro.logits(
        to_pil_images(Xtr), clf.class_names_, np.stack([np.zeros_like(clf.prompt_offset_), clf.prompt_offset_])
    )
    hand_written, learned = cross_entropy(torch.tensor(logits), torch.tensor(ytr)).tolist()
    assert learned < hand_written - 0.05


@pytest.mark.slow
def test_refiner_and_full_beat_zero_shot_on_toy_box():
    """Seeded learning check on held-out digits with the toy black box."""
    from helpers import digits_split

    Xtr, ytr, Xte, yte = digits_split(n_shots=16, seed=1, n_test=400)
    common = dict(backend=ToyBackend(), query_budget=1000, popsize=10, intrinsic_dim=32, random_state=0)
    zero = CarrotClassifier(prompt_tuning=False, refinement=False, **common).fit(Xtr, ytr).score(Xte, yte)
    full = CarrotClassifier(prompt_tuning=True, **common).fit(Xtr, ytr).score(Xte, yte)
    refine = CarrotClassifier(prompt_tuning=False, **common).fit(Xtr, ytr).score(Xte, yte)
    assert full > zero + 0.2
    assert refine > zero + 0.2
