"""The doors as strategies: picking one, refusing a backend that lacks it, and a third door plugged in."""

import pickle

import numpy as np
import pytest
from helpers import FAST

from skcarrot import CarrotClassifier
from skcarrot.backends import OpenCLIPTextBackend, ToyBackend, embedded_backend
from skcarrot.doors import Door, EmbeddingDoor, TextDoor, pick_door, register_door
from skcarrot.doors._base import _DOORS
from skcarrot.search import CMAESPromptSearch, PromptSearch, TextPromptSearch


class TemperatureDoor(Door):
    """A third, toy door: the prompt is one temperature that divides the embedding door's zero-shot logits."""

    name = "temperature"
    method = "logits"
    default_budget = 60
    default_popsize = 4
    early_stopping_default = False
    fitted_attributes = ("temperature_",)

    @classmethod
    def check(cls, backend):
        if not callable(getattr(backend, "logits", None)):
            raise TypeError(f"backend {type(backend).__name__} has no 'logits'")

    def __init__(self, backend, class_names, budget=None):
        super().__init__(backend, class_names, budget)
        self.zero = np.zeros((1, *backend.context_shape), dtype=np.float32)

    def score(self, images, prompts, purpose):
        prompts = np.asarray(prompts, dtype=float).reshape(-1)
        logits = self.counter.logits(images, self.class_names, np.repeat(self.zero, len(prompts), 0), purpose=purpose)
        return logits / np.exp(prompts)[:, None, None]

    def one(self, prompt):
        return np.asarray([prompt])

    def copy_prompt(self, prompt):
        return float(prompt)

    def zero_shot_prompt(self):
        return 0.0

    def build_search(self, settings, seeds, previous):
        return TemperatureSearch(settings.popsize, seeds["cma"]) if settings.prompt_tuning else None

    def fitted(self, result, search, seeds, previous):
        return {"temperature_": float(np.exp(result.prompt))}, {"prompt": float(result.prompt), "z": None}


class TemperatureSearch:
    """Random search over the log-temperature: the smallest search that keeps the protocol."""

    def __init__(self, popsize, seed):
        self.popsize, self.rng, self.best, self.best_fitness = popsize, np.random.RandomState(seed), 0.0, np.inf

    def ask(self):
        candidates = self.best + self.rng.normal(0.0, 0.5, size=self.popsize)
        return candidates, candidates

    def tell(self, handle, fitness):
        if np.min(fitness) < self.best_fitness:
            self.best, self.best_fitness = float(handle[np.argmin(fitness)]), float(np.min(fitness))

    def current(self):
        return self.best

    def coordinates(self):
        return np.array([self.best])

    def can_move(self):
        return True

    def state(self):
        return dict(vars(self))

    def restore(self, state):
        vars(self).update(state)


@pytest.fixture
def temperature_door():
    register_door(TemperatureDoor)
    yield TemperatureDoor
    _DOORS.pop(TemperatureDoor.name)


def test_a_third_door_is_one_class_and_one_registration(temperature_door, digits):
    Xtr, ytr, Xte, _ = digits
    assert isinstance(TemperatureSearch(4, 0), PromptSearch)
    clf = CarrotClassifier(backend=ToyBackend(), door="temperature", random_state=0, hidden_dim=16).fit(Xtr, ytr)
    assert clf.door_ == "temperature" and clf.n_queries_ <= 60 and clf.temperature_ > 0
    # the other doors' attributes say the fit did not go through them
    assert clf.prompt_offset_ is None and clf.prompt_ is None
    proba = clf.predict_proba(Xte)
    np.testing.assert_allclose(proba.sum(1), 1.0)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(clf)).predict_proba(Xte), proba)
    # "auto" still picks the first door the backend offers
    assert pick_door(ToyBackend()) is EmbeddingDoor


def test_auto_picks_the_offered_door_and_an_explicit_door_is_kept():
    assert pick_door(ToyBackend()) is EmbeddingDoor
    assert pick_door(OpenCLIPTextBackend()) is TextDoor
    backend = embedded_backend()  # an OpenCLIPBackend: offers both doors
    assert pick_door(backend) is EmbeddingDoor and pick_door(backend, "text") is TextDoor


def test_the_embedding_door_refuses_a_text_only_backend_naming_what_it_lacks(digits):
    Xtr, ytr, _, _ = digits
    with pytest.raises(TypeError, match=r"OpenCLIPTextBackend does not offer the embedding door.*'logits"):
        CarrotClassifier(backend=OpenCLIPTextBackend(), door="embedding").fit(Xtr, ytr)
    with pytest.raises(TypeError, match=r"ToyBackend does not offer the text door.*'text_scores"):
        CarrotClassifier(backend=ToyBackend(), door="text").fit(Xtr, ytr)
    with pytest.raises(ValueError, match=r"unknown door 'txt'.*'embedding', 'text'"):
        CarrotClassifier(backend=ToyBackend(), door="txt").fit(Xtr, ytr)


def test_a_backend_with_both_doors_fits_through_the_text_door_when_asked(digits):
    Xtr, ytr, Xte, _ = digits
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    params = dict(class_names=names, query_budget=40, popsize=4, random_state=0)
    both = CarrotClassifier(backend=embedded_backend(), door="text", **params).fit(Xtr, ytr)
    text_only = CarrotClassifier(backend=OpenCLIPTextBackend(), **params).fit(Xtr, ytr)
    assert both.door_ == "text" and both.prompt_offset_ is None and len(both.prompt_) == 10
    assert both.prompt_ == text_only.prompt_ and both.n_queries_ == text_only.n_queries_
    np.testing.assert_allclose(both.predict_proba(Xte), text_only.predict_proba(Xte), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("make", [
    lambda: CMAESPromptSearch((2, 3), 6, 0.2, 1.0, 4, 5.0, projection_seed=1, cma_seed=2),
    lambda: TextPromptSearch(["cat", "dog"], candidates=[["kitten", "tabby"], ["puppy"]], popsize=4, random_state=0),
])
def test_a_restored_search_continues_on_the_same_trajectory(make):
    first = make()
    handle, _ = first.ask()
    first.tell(handle, np.arange(4.0))
    saved = pickle.loads(pickle.dumps(first.state()))
    second = make()
    second.restore(saved)
    (h1, c1), (h2, c2) = first.ask(), second.ask()
    np.testing.assert_array_equal(np.asarray(h1), np.asarray(h2))
    assert np.array_equal(np.asarray(c1), np.asarray(c2))
    first.tell(h1, np.arange(4.0))
    second.tell(h2, np.arange(4.0))
    np.testing.assert_array_equal(np.asarray(first.coordinates()), np.asarray(second.coordinates()))


# ------------------------------------------------ a door that bills every image apart
class PerImageDoor(TemperatureDoor):
    """A toy door whose black box bills every image of a call apart, as one-image-per-call chat APIs do."""

    name = "per-image"

    def query_cost(self, n_images):
        return n_images

    def score(self, images, prompts, purpose):
        return np.concatenate([super(PerImageDoor, self).score([img], prompts, purpose) for img in images], axis=1)


@pytest.fixture
def per_image_door():
    register_door(PerImageDoor)
    yield PerImageDoor
    _DOORS.pop(PerImageDoor.name)


def test_the_run_plan_counts_in_the_doors_units_and_spends_the_budget_exactly(per_image_door, digits):
    Xtr, ytr, _, _ = digits
    n = len(ytr)
    budget = 3 * (2 + 1) * n + 5  # three generations of two prompts and one refiner epoch, and a little over
    clf = CarrotClassifier(backend=ToyBackend(), door="per-image", query_budget=budget, popsize=2,
                           prompt_tuning=True, hidden_dim=8, random_state=0).fit(Xtr, ytr)
    assert clf.n_iter_ == 3 and clf.n_queries_ == 3 * 3 * n <= budget
    # refine-only: one query a view of the pool, once
    clf = CarrotClassifier(backend=ToyBackend(), door="per-image", query_budget=budget, popsize=2, n_views=2,
                           prompt_tuning=False, hidden_dim=8, random_state=0).fit(Xtr, ytr)
    assert clf.n_queries_ == 2 * n
    with pytest.raises(ValueError, match=rf"popsize=2 prompts x {n} queries .* = {3 * n} queries"):
        CarrotClassifier(backend=ToyBackend(), door="per-image", query_budget=3 * n - 1, popsize=2,
                         prompt_tuning=True, random_state=0).fit(Xtr, ytr)
