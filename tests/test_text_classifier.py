"""CarrotClassifier over the text-level door: the door it is given decides the mode."""

import pickle

import joblib
import numpy as np
import pytest

from skcarrot import CarrotClassifier
from skcarrot.backends import OpenCLIPTextBackend
from skcarrot.datasets import few_shot_split, load_digit_images


class CountingTextBackend(OpenCLIPTextBackend):
    """The in-process text door, counting the prompt sets and images it scores."""

    def __init__(self, backend=None):
        super().__init__(backend=backend)
        self.sets = self.images = 0

    def text_scores(self, images, prompts):
        self.sets += len(prompts)
        self.images += len(images)
        return super().text_scores(images, prompts)


@pytest.fixture(scope="module")
def split():
    X, y = load_digit_images()
    Xtr, ytr, Xte, yte = few_shot_split(X, y, 16, seed=0)
    keep = np.random.RandomState(0).choice(len(yte), 500, replace=False)
    return Xtr, ytr, Xte[keep], yte[keep]


@pytest.fixture(scope="module")
def zero_shot(split):
    Xtr, ytr, Xte, yte = split
    return CarrotClassifier(backend=OpenCLIPTextBackend(), prompt_tuning=False, refinement=False).fit(Xtr, ytr)


def test_zero_shot_on_the_text_door_is_the_hand_written_prompt(split, zero_shot):
    Xtr, ytr, Xte, yte = split
    assert zero_shot.door_ == "text" and zero_shot.n_queries_ == 0
    assert zero_shot.prompt_ == [f"a photo of a {c}." for c in range(10)]
    # the same model through the embedding door at zero offset gives the same predictions
    embedding = CarrotClassifier(prompt_tuning=False, refinement=False).fit(Xtr, ytr)
    np.testing.assert_allclose(zero_shot.predict_proba(Xte), embedding.predict_proba(Xte), atol=1e-4)


def test_text_level_carrot_learns_readable_prompts_within_budget(split, zero_shot):
    Xtr, ytr, Xte, yte = split
    door = CountingTextBackend()
    clf = CarrotClassifier(backend=door, query_budget=120, prompt_tuning=True, random_state=0).fit(Xtr, ytr)
    assert clf.n_queries_ == door.sets <= 120
    assert clf.n_images_scored_ == door.images
    assert clf.n_queries_by_purpose_["screen"] == 1  # one query screens every candidate word
    assert sum(clf.n_queries_by_purpose_.values()) == clf.n_queries_
    assert len(clf.prompt_) == 10 and all(isinstance(p, str) and p.startswith("a photo of a ") for p in clf.prompt_)
    assert clf.prompt_offset_ is None and len(clf.prompt_candidates_) == 10
    assert clf.score(Xte, yte) > zero_shot.score(Xte, yte) + 0.08  # held-out gain
    # persistence stays weights-free and predictions survive it
    again = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(again.predict_proba(Xte[:20]), clf.predict_proba(Xte[:20]))
    assert len(pickle.dumps(clf)) < 200_000


def test_text_prompt_search_alone_beats_zero_shot_and_is_seeded(split, zero_shot):
    Xtr, ytr, Xte, yte = split
    params = dict(backend=OpenCLIPTextBackend(), prompt_tuning=True, refinement=False, query_budget=81, random_state=3,
                  early_stopping=False)
    a = CarrotClassifier(**params).fit(Xtr, ytr)
    b = CarrotClassifier(**params).fit(Xtr, ytr)
    assert a.prompt_ == b.prompt_
    assert a.n_queries_ == 81  # 1 screening query + 8 steps of 10
    assert a.score(Xte, yte) > zero_shot.score(Xte, yte)


def test_the_text_door_never_sends_an_over_budget_query(split):
    Xtr, ytr, _, _ = split
    door = CountingTextBackend()
    clf = CarrotClassifier(backend=door, query_budget=30, popsize=4, prompt_tuning=True, random_state=0).fit(Xtr, ytr)
    assert door.sets == clf.n_queries_ <= 30
    with pytest.raises(ValueError, match="smaller than one generation"):
        CarrotClassifier(backend=door, query_budget=5, prompt_tuning=True, random_state=0).fit(Xtr, ytr)


def test_warm_start_keeps_the_door_and_the_candidates(split):
    Xtr, ytr, _, _ = split
    clf = CarrotClassifier(backend=OpenCLIPTextBackend(), query_budget=40, popsize=4, warm_start=True,
                           prompt_tuning=True, random_state=0).fit(Xtr, ytr)
    candidates, prompt = clf.prompt_candidates_, clf.prompt_
    clf.set_params(prompt_tuning=False).fit(Xtr, ytr)  # the refiner moves, the learned prompt stays
    assert clf.prompt_ == prompt
    clf.set_params(prompt_tuning=True).fit(Xtr, ytr)
    assert clf.prompt_candidates_ == candidates
    assert clf.n_queries_by_purpose_["screen"] == 0  # no second screening
    clf.set_params(backend=None)
    with pytest.raises(ValueError, match="can not change the door"):
        clf.fit(Xtr, ytr)


def test_joblib_round_trip_in_text_mode(split, tmp_path):
    Xtr, ytr, Xte, _ = split
    clf = CarrotClassifier(backend=OpenCLIPTextBackend(), query_budget=25, popsize=4, random_state=0).fit(Xtr, ytr)
    joblib.dump(clf, tmp_path / "m.joblib")
    np.testing.assert_array_equal(joblib.load(tmp_path / "m.joblib").predict(Xte), clf.predict(Xte))


def test_text_carrot_with_no_word_to_search_is_the_refiner_for_two_queries(split):
    """Screening keeps no word: nothing to search, so no query is spent on identical prompt sets."""
    Xtr, ytr, Xte, yte = split
    common = dict(backend=CountingTextBackend(), random_state=0, early_stopping=False)
    carrot = CarrotClassifier(prompt_tuning=True, vocabulary=["circle", "stick", "swan"], **common).fit(Xtr, ytr)
    refine = CarrotClassifier(prompt_tuning=False, **common).fit(Xtr, ytr)
    assert all(len(words) == 1 for words in carrot.prompt_candidates_)
    assert carrot.n_queries_by_purpose_ == {"screen": 1, "prompt": 0, "refiner": 1, "validation": 0, "pilot": 0}
    np.testing.assert_allclose(carrot.predict_proba(Xte), refine.predict_proba(Xte))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_text_carrot_is_not_below_the_refiner_alone_on_held_out_digits(seed):
    """Words kept by screening must beat chance over every word tried, or the search fits them to the shots."""
    X, y = load_digit_images()
    Xtr, ytr, Xte, yte = few_shot_split(X, y, 16, seed=seed)
    common = dict(backend=OpenCLIPTextBackend(), random_state=seed, early_stopping=False)
    carrot = CarrotClassifier(prompt_tuning=True, **common).fit(Xtr, ytr).score(Xte, yte)
    refine = CarrotClassifier(prompt_tuning=False, **common).fit(Xtr, ytr).score(Xte, yte)
    assert carrot >= refine - 0.005, (carrot, refine)


class NamesMatter:
    """A text door whose logits favour prompts naming each image's 'good' word (images alternate classes)."""

    returns = "logits"

    def __init__(self, good):
        self.good = good

    def text_scores(self, images, prompts):
        y = np.arange(len(images)) % len(self.good)
        out = np.zeros((len(prompts), len(images), len(prompts[0])))
        for p, prompt_set in enumerate(prompts):
            for j, s in enumerate(prompt_set):
                out[p, :, j] = np.where([self.good[c] in s for c in y], 2.0, 0.5)
        return out


def test_a_word_that_helps_every_shot_passes_the_screen_with_the_refiner():
    X = np.zeros((40, 8, 8), dtype=np.uint8)
    y = np.arange(40) % 2
    clf = CarrotClassifier(backend=NamesMatter(["kitten", "puppy"]), class_names=["cat", "dog"],
                           vocabulary=["kitten", "puppy", "box", "tree"], prompt_tuning=True, query_budget=60,
                           early_stopping=False, random_state=0).fit(X, y)
    assert clf.prompt_candidates_ == [["cat", "kitten"], ["dog", "puppy"]]
    assert clf.n_queries_by_purpose_["prompt"] > 0
    assert clf.prompt_ == ["a photo of a kitten.", "a photo of a puppy."]


@pytest.mark.parametrize("refinement", [True, False])
def test_nothing_to_search_spends_nothing_on_the_search_with_early_stopping_too(split, refinement):
    Xtr, ytr, _, _ = split
    params = dict(backend=CountingTextBackend(), vocabulary=["circle", "stick", "swan"], early_stopping=True,
                  refinement=refinement, random_state=0)
    carrot = CarrotClassifier(prompt_tuning=True, **params).fit(Xtr, ytr)
    alone = CarrotClassifier(prompt_tuning=False, **params).fit(Xtr, ytr)
    assert all(len(words) == 1 for words in carrot.prompt_candidates_)
    assert carrot.n_queries_by_purpose_["prompt"] == 0
    assert carrot.n_iter_ == alone.n_iter_  # the budget left is planned as the refiner alone plans it
    assert carrot.n_queries_ == alone.n_queries_ + carrot.n_queries_by_purpose_["screen"]
