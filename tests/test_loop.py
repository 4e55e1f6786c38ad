"""The collaborative loop on its own, and the estimator's guarantees around it."""

import threading

import numpy as np
import pytest
import torch
from helpers import FAST, StrictBackend, same_global_state, scored

from skcarrot import CarrotClassifier, ToyBackend
from skcarrot._training import (
    CollaborativeLoop,
    FreshViews,
    NullPrompt,
    NullRefiner,
    PromptModule,
    RefinerModule,
    ViewPool,
    plan_generations,
)
from skcarrot.doors import EmbeddingDoor
from skcarrot.images import to_pil_images
from skcarrot.losses import consistency_kl, prompt_fitness, refiner_loss
from skcarrot.search import CMAESPromptSearch
from skcarrot.refiner import ResidualRefiner


def make_loop(digits, *, prompt=True, refine=True, fresh=False, budget=None):
    Xtr, ytr, _, _ = digits
    images = to_pil_images(Xtr)
    names = [str(c) for c in range(10)]
    backend = ToyBackend()
    zero = np.zeros(backend.context_shape, np.float32)
    if prompt:
        search = CMAESPromptSearch(backend.context_shape, 8, 0.2, 1.0, 6, 5.0, projection_seed=1, cma_seed=2)
        prompt_module = PromptModule(search, zero, None)
    else:
        prompt_module = NullPrompt(zero, None)
    rng = np.random.RandomState(0)
    refiner = NullRefiner()
    if refine:
        network = ResidualRefiner(10, 16, torch.Generator().manual_seed(0))
        views = FreshViews(images, "crop") if fresh else ViewPool(images, 3, "crop", rng)
        refiner = RefinerModule(network, torch.optim.Adam(network.parameters(), lr=1e-2), views, batch_size=16)
    return CollaborativeLoop(
        door=EmbeddingDoor(backend, names, budget=budget), images=images, y=np.asarray(ytr),
        prompt=prompt_module, refiner=refiner, rng=rng, consistency_weight=0.1, kl_until=2,
    )


# ------------------------------------------------------------ the loop alone
def test_a_generation_spends_popsize_plus_one_queries_and_sends_each_image_twice(digits):
    loop = make_loop(digits)
    n = len(loop.images)
    record = loop.generation_step()
    assert record["generation"] == 1 and record["queries"] == 6 + 1
    # the candidates see the training images once, the refiner one view of each: no diagnostic images
    assert loop.counter.images_by_purpose == {"prompt": n, "refiner": n}
    assert loop.counter.n_images_scored == 2 * n
    assert np.isfinite(record["best_fitness"]) and np.isfinite(record["refiner_loss"])
    assert not np.allclose(loop.prompt.prompt, 0.0)  # the prompt moved


def test_prompt_step_asks_scores_and_tells(digits):
    loop = make_loop(digits, refine=False)
    before = loop.prompt.search.es.countiter
    out = loop.prompt.step(loop)
    assert loop.prompt.search.es.countiter == before + 1
    assert loop.counter.n_queries == 6
    assert set(out) == {"best_fitness", "mean_fitness", "train_accuracy"}
    assert out["best_fitness"] <= out["mean_fitness"]


def test_refine_only_with_a_fixed_pool_scores_the_pool_once(digits):
    loop = make_loop(digits, prompt=False)
    for _ in range(5):
        loop.generation_step()
    assert loop.counter.n_queries == 1
    assert loop.counter.n_images_scored == 3 * len(loop.images)


def test_fresh_views_cost_one_query_per_epoch_and_differ(digits):
    loop = make_loop(digits, prompt=False, fresh=True)
    first = loop.refiner.views.epoch_views(np.random.RandomState(0))
    second = loop.refiner.views.epoch_views(np.random.RandomState(1))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, second))
    for _ in range(3):
        loop.generation_step()
    assert loop.counter.n_queries == 3 and loop.counter.n_images_scored == 3 * len(loop.images)


def test_the_gate_turns_the_consistency_loss_off(digits):
    loop = make_loop(digits)
    seen = []
    train_epoch = loop.refiner.network.train_epoch

    def spy(*args, weight, **kwargs):
        seen.append(weight)
        return train_epoch(*args, weight=weight, **kwargs)

    loop.refiner.network.train_epoch = spy
    for _ in range(4):
        loop.generation_step()
    assert seen == [0.1, 0.1, 0.0, 0.0]  # kl_until=2


def test_plan_generations_counts_every_part():
    plan = dict(prompt_tuning=True, refinement=True, popsize=8, fresh_views=False, max_iter=None)
    assert plan_generations(200, validation=False, **plan) == (22, {"start": 0, "generation": 9})
    # validation: one query for the starting model, one per generation
    assert plan_generations(200, validation=True, **plan) == (19, {"start": 1, "generation": 10})
    assert plan_generations(200, validation=False, **dict(plan, prompt_tuning=False))[1] == {"start": 1, "generation": 0}
    assert plan_generations(200, validation=False, **dict(plan, prompt_tuning=False, fresh_views=True))[1] == {
        "start": 0, "generation": 1}
    with pytest.raises(ValueError, match=r"query_budget=10 is smaller than one generation .* = 11 queries"):
        plan_generations(10, validation=True, **plan)


# ------------------------------------------------------------ the losses
def _kl(p_logits, q_logits):
    p = torch.softmax(p_logits, -1)
    q = torch.softmax(q_logits, -1)
    return (p * (p.log() - q.log())).sum(-1).mean(-1)


def test_consistency_kl_is_kl_of_target_from_input():
    a = torch.tensor([[3.0, 0.0, -1.0], [0.5, 0.2, 2.0]])
    b = torch.tensor([[0.0, 1.0, 0.0], [1.0, -2.0, 0.0]])
    torch.testing.assert_close(consistency_kl(a, b), _kl(a, b))
    assert not torch.allclose(consistency_kl(a, b), consistency_kl(b, a))  # asymmetric: direction matters


def test_prompt_fitness_pulls_the_prompt_towards_the_refined_prediction():
    y = torch.tensor([0, 2])
    logits = torch.tensor([[[3.0, 0.0, -1.0], [0.5, 0.2, 2.0]]])
    refined = torch.tensor([[[0.0, 1.0, 0.0], [1.0, -2.0, 0.0]]])
    ce = torch.nn.functional.cross_entropy(logits[0], y)
    expected = ce + 0.3 * _kl(refined[0], logits[0])  # KL(softmax(l + r(l)) || softmax(l))
    torch.testing.assert_close(prompt_fitness(logits, refined, y, 0.3)[0], expected)
    swapped = ce + 0.3 * _kl(logits[0], refined[0])
    assert not torch.allclose(prompt_fitness(logits, refined, y, 0.3)[0], swapped)


def test_refiner_loss_pulls_the_refiner_towards_the_black_box():
    y = torch.tensor([0, 2])
    logits = torch.tensor([[3.0, 0.0, -1.0], [0.5, 0.2, 2.0]])
    refined = torch.tensor([[0.0, 1.0, 0.0], [1.0, -2.0, 0.0]])
    ce = torch.nn.functional.cross_entropy(refined, y)
    expected = ce + 0.3 * _kl(logits, refined)  # KL(softmax(l) || softmax(l + r(l)))
    torch.testing.assert_close(refiner_loss(logits, refined, y, 0.3), expected)
    assert not torch.allclose(refiner_loss(logits, refined, y, 0.3), ce + 0.3 * _kl(refined, logits))


# ------------------------------------------------------------ the estimator around the loop
def _spy_weights(monkeypatch):
    seen = []
    original = ResidualRefiner.train_epoch

    def spy(self, *args, weight, **kwargs):
        seen.append(weight)
        return original(self, *args, weight=weight, **kwargs)

    monkeypatch.setattr(ResidualRefiner, "train_epoch", spy)
    return seen


def test_the_estimator_gates_the_consistency_loss_by_fraction(digits, monkeypatch):
    Xtr, ytr, _, _ = digits
    seen = _spy_weights(monkeypatch)
    CarrotClassifier(backend=ToyBackend(), consistency_fraction=0.25, max_iter=8, **FAST).fit(Xtr, ytr)
    assert seen == [0.1, 0.1] + [0.0] * 6


def test_warm_start_continues_the_consistency_schedule(digits, monkeypatch):
    Xtr, ytr, _, _ = digits
    clf = CarrotClassifier(backend=ToyBackend(), consistency_fraction=0.5, max_iter=4, warm_start=True, **FAST)
    seen = _spy_weights(monkeypatch)
    clf.fit(Xtr, ytr)
    assert seen == [0.1, 0.1, 0.0, 0.0]
    seen.clear()
    clf.fit(Xtr, ytr)  # generations 5-8: past the first fit's KL phase
    assert seen == [0.0] * 4
    assert clf.n_iter_ == 8


def test_fit_with_an_int_seed_leaves_numpys_global_state_alone(digits):
    Xtr, ytr, _, _ = digits
    np.random.seed(1234)
    before = np.random.get_state()
    CarrotClassifier(backend=ToyBackend(), **dict(FAST, early_stopping=True, fresh_views=True)).fit(Xtr, ytr)
    after = np.random.get_state()
    assert same_global_state(before, after)


@pytest.mark.parametrize("intrinsic_dim", [512, 16])
def test_fit_at_the_default_dimension_leaves_numpys_global_state_alone(digits, intrinsic_dim):
    # From dimension 300 on pycma adapts the step size by TPA, whose check draws from the global stream.
    Xtr, ytr, _, _ = digits
    np.random.seed(4321)
    before = np.random.get_state()
    params = dict(FAST, intrinsic_dim=intrinsic_dim, max_iter=6, prompt_tuning=True)
    a = CarrotClassifier(backend=ToyBackend(), **params).fit(Xtr, ytr)
    after = np.random.get_state()
    assert same_global_state(before, after)
    np.random.seed(1)  # another global state: the same fit
    np.testing.assert_array_equal(CarrotClassifier(backend=ToyBackend(), **params).fit(Xtr, ytr).prompt_z_,
                                  a.prompt_z_)


@pytest.mark.slow
def test_two_fits_in_two_threads_match_the_same_fits_in_turn(digits):
    Xtr, ytr, Xte, _ = digits

    def fit(seed):
        return CarrotClassifier(backend=ToyBackend(), **{**FAST, "random_state": seed}).fit(Xtr, ytr)

    sequential = [fit(s).predict_proba(Xte) for s in (0, 1)]
    results = {}

    def worker(seed):
        for _ in range(2):  # run twice, so the two threads overlap
            results[seed] = fit(seed).predict_proba(Xte)

    threads = [threading.Thread(target=worker, args=(s,)) for s in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    np.testing.assert_array_equal(results[0], sequential[0])
    np.testing.assert_array_equal(results[1], sequential[1])


class FailingBackend(ToyBackend):
    """Raises on the ``fail_at``-th call (and each later one)."""

    def __init__(self, fail_at=3, error=ConnectionError, n_ctx=2, dim=8, scale=10.0, seed=0):
        super().__init__(n_ctx=n_ctx, dim=dim, scale=scale, seed=seed)
        self.fail_at = fail_at
        self.error = error
        self.calls = 0

    def logits(self, images, class_names, offsets):
        self.calls += 1
        if self.calls >= self.fail_at:
            raise self.error("the network went away")
        return super().logits(images, class_names, offsets)


@pytest.mark.parametrize("error", [ConnectionError, KeyboardInterrupt])
def test_a_failed_or_interrupted_fit_leaves_the_previous_model_untouched(digits, error):
    Xtr, ytr, Xte, _ = digits
    clf = CarrotClassifier(backend=ToyBackend(), **FAST).fit(Xtr, ytr)
    before = {k: v for k, v in vars(clf).items() if k.endswith("_")}
    proba = clf.predict_proba(Xte)
    clf.set_params(backend=FailingBackend(fail_at=5, error=error), random_state=7)
    with pytest.raises(error):
        clf.fit(Xtr, ytr)
    clf.set_params(backend=ToyBackend())
    after = {k: v for k, v in vars(clf).items() if k.endswith("_")}
    assert set(after) == set(before)
    for key in before:
        if isinstance(before[key], np.ndarray):
            np.testing.assert_array_equal(after[key], before[key])
    assert after["history_"] == before["history_"] and after["n_queries_"] == before["n_queries_"]
    np.testing.assert_array_equal(clf.predict_proba(Xte), proba)


# ------------------------------------------------------------ early stopping
def test_early_stopping_holds_back_shots_and_counts_validation_queries(digits):
    Xtr, ytr, _, _ = digits
    box = StrictBackend()
    clf = CarrotClassifier(backend=box, **dict(FAST, early_stopping=True, validation_fraction=0.1, n_iter_no_change=3))
    clf.fit(Xtr, ytr)
    assert clf.n_queries_ == scored(box) <= FAST["query_budget"]
    assert clf.n_queries_by_purpose_["validation"] == 1 + clf.n_iter_  # the start, then one per generation
    assert 0 <= clf.best_generation_ <= clf.n_iter_
    # the kept model has the lowest validation loss seen (the start included)
    assert clf.validation_loss_ == min([h["validation_loss"] for h in clf.history_] + [clf.validation_loss_])
    if clf.best_generation_:
        kept = clf.history_[clf.best_generation_ - 1]
        assert (kept["validation_loss"], kept["validation_accuracy"]) == (clf.validation_loss_, clf.validation_score_)
    # one shot per class is held back (8 shots x 0.1 rounds to 1): 7 per class train the refiner
    assert clf.n_queries_by_purpose_["prompt"] == FAST["popsize"] * clf.n_iter_


def test_a_fit_that_only_hurts_falls_back_to_zero_shot(digits):
    Xtr, ytr, Xte, _ = digits
    # A refiner with a huge learning rate destroys the predictions it refines.
    params = dict(FAST, learning_rate=50.0, hidden_dim=64)
    zero_shot = CarrotClassifier(backend=ToyBackend(), prompt_tuning=False, refinement=False).fit(Xtr, ytr)
    hurt = CarrotClassifier(backend=ToyBackend(), **dict(params, prompt_tuning=False, early_stopping=False)).fit(Xtr, ytr)
    assert hurt.score(Xte, digits[3]) < zero_shot.score(Xte, digits[3])
    saved = CarrotClassifier(backend=ToyBackend(), **dict(params, prompt_tuning=False, early_stopping=True)).fit(Xtr, ytr)
    assert saved.best_generation_ == 0 and saved.refiner_weights_ is None
    np.testing.assert_allclose(saved.predict_proba(Xte), zero_shot.predict_proba(Xte))


# ------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("params", [
    dict(),
    dict(early_stopping=True, fresh_views=True, n_iter_no_change=50),
    dict(prompt_tuning=False, fresh_views=True),
])
def test_an_interrupted_fit_resumes_on_the_same_trajectory(digits, tmp_path, params):
    Xtr, ytr, Xte, _ = digits
    params = dict(FAST, **params)
    reference = CarrotClassifier(backend=ToyBackend(), **params).fit(Xtr, ytr)
    path = tmp_path / "fit.ckpt"
    clf = CarrotClassifier(backend=FailingBackend(fail_at=9), checkpoint=str(path), checkpoint_every=2, **params)
    with pytest.raises(ConnectionError):
        clf.fit(Xtr, ytr)
    assert path.exists() and not hasattr(clf, "classes_")
    clf.set_params(backend=ToyBackend())
    clf.fit(Xtr, ytr)
    np.testing.assert_array_equal(clf.predict_proba(Xte), reference.predict_proba(Xte))
    assert clf.n_queries_ == reference.n_queries_ and clf.n_images_scored_ == reference.n_images_scored_
    assert clf.n_queries_by_purpose_ == reference.n_queries_by_purpose_
    assert [h["queries"] for h in clf.history_] == [h["queries"] for h in reference.history_]
    # a finished checkpoint resumes to the same model without a single query
    box = StrictBackend()
    again = CarrotClassifier(backend=box, checkpoint=str(path), checkpoint_every=2, **params).fit(Xtr, ytr)
    assert scored(box) == 0
    np.testing.assert_array_equal(again.predict_proba(Xte), reference.predict_proba(Xte))


def test_a_checkpoint_of_another_fit_is_refused(digits, tmp_path):
    Xtr, ytr, _, _ = digits
    path = tmp_path / "fit.ckpt"
    with pytest.raises(ConnectionError):  # an unfinished run
        CarrotClassifier(backend=FailingBackend(fail_at=5), checkpoint=path, checkpoint_every=1, **FAST).fit(Xtr, ytr)
    with pytest.raises(ValueError, match="written by a fit with other images, labels or parameters"):
        CarrotClassifier(backend=ToyBackend(), checkpoint=path, **dict(FAST, popsize=6)).fit(Xtr, ytr)
    with pytest.raises(ValueError, match="written by a fit with other images"):
        CarrotClassifier(backend=ToyBackend(), checkpoint=path, **FAST).fit(Xtr[::-1], ytr[::-1])
    with pytest.raises(ValueError, match="written by a fit with other images"):  # the same indices, other labels
        CarrotClassifier(backend=ToyBackend(), checkpoint=path, **FAST).fit(Xtr, ytr + 10)
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="can not be read"):
        CarrotClassifier(backend=ToyBackend(), checkpoint=path, **FAST).fit(Xtr, ytr)


def test_a_finished_checkpoint_is_replaced_by_the_next_fit(digits, tmp_path):
    Xtr, ytr, Xte, _ = digits
    path = tmp_path / "fit.ckpt"
    clf = CarrotClassifier(backend=ToyBackend(), checkpoint=path, warm_start=True, **dict(FAST, max_iter=3))
    clf.fit(Xtr, ytr)
    clf.fit(Xtr, ytr)  # a warm continuation is another fit: it starts afresh from the model
    assert clf.n_iter_ == 6
    other = CarrotClassifier(backend=ToyBackend(), checkpoint=path, **dict(FAST, popsize=6, max_iter=2)).fit(Xtr, ytr)
    assert other.n_iter_ == 2


def test_one_shot_per_class_fits_with_the_default_early_stopping(digits):
    Xtr, ytr, Xte, _ = digits
    first = np.array([np.flatnonzero(ytr == c)[0] for c in np.unique(ytr)])
    clf = CarrotClassifier(backend=ToyBackend(), **dict(FAST, early_stopping="auto")).fit(Xtr[first], ytr[first])
    assert clf.validation_score_ is None and clf.n_queries_by_purpose_["validation"] == 0
    assert clf.predict(Xte).shape == (len(Xte),)


def test_warm_start_without_prompt_tuning_keeps_the_projection(digits):
    Xtr, ytr, _, _ = digits
    clf = CarrotClassifier(backend=ToyBackend(), warm_start=True, **dict(FAST, random_state=None, max_iter=2))
    clf.fit(Xtr, ytr)
    seed, z = clf._prompt_state["projection_seed"], clf.prompt_z_.copy()
    clf.set_params(prompt_tuning=False).fit(Xtr, ytr)
    assert clf._prompt_state["projection_seed"] == seed
    np.testing.assert_array_equal(clf.prompt_z_, z)
