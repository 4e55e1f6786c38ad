"""prompt_tuning="auto": the cheapest model that held-out shots cannot tell apart from a dearer one."""

import numpy as np
import pytest
from PIL import Image

from skcarrot import CarrotClassifier
from skcarrot.backends import OpenCLIPTextBackend

SMALL = dict(popsize=8, intrinsic_dim=8, hidden_dim=32, n_views=2, random_state=0)


def _shots(n_per_class, seed=0):
    """Two classes: dark and bright images, with noise."""
    rng = np.random.RandomState(seed)
    X = [np.clip(rng.normal(60 + 140 * c, 25, size=(8, 8)), 0, 255).astype(np.uint8)
         for c in (0, 1) for _ in range(n_per_class)]
    return np.stack(X), np.repeat([0, 1], n_per_class)


class HiddenUntilPrompted:
    """Logits carry the brightness only once the prompt offset unlocks it: the refiner alone can not."""

    context_shape = (1, 4)

    def logits(self, images, class_names, offsets):
        b = np.array([np.asarray(img.convert("L"), float).mean() / 255 - 0.5 for img in images])
        key = np.tanh(np.asarray(offsets, float).reshape(len(offsets), -1).sum(1))  # (P,)
        out = np.zeros((len(offsets), len(images), len(class_names)))
        out[:, :, 1] = 8.0 * key[:, None] * b[None, :]
        return out


class Blind:
    """The same logits for every image, whatever the prompt: nothing can beat the bare prompt."""

    context_shape = (1, 4)

    def logits(self, images, class_names, offsets):
        return np.zeros((len(offsets), len(images), len(class_names)))


def test_auto_spends_the_budget_when_the_pilot_pays():
    X, y = _shots(12)
    clf = CarrotClassifier(backend=HiddenUntilPrompted(), query_budget=400, **SMALL).fit(X, y)
    assert clf.selection_["choice"] == "carrot"
    assert clf.selection_["search_gain"] > 0 and clf.n_queries_ > 0.5 * 400
    assert clf.n_queries_ <= 400
    Xte, yte = _shots(30, seed=1)
    assert clf.score(Xte, yte) > 0.9


def test_auto_keeps_the_hand_written_prompt_when_nothing_beats_it():
    X, y = _shots(12)
    clf = CarrotClassifier(backend=Blind(), query_budget=400, **SMALL).fit(X, y)
    assert clf.selection_["choice"] == "zero-shot"
    assert clf.refiner_weights_ is None and np.all(clf.prompt_offset_ == 0) and clf.n_iter_ == 0
    assert clf.n_queries_ <= 0.25 * 400 + 1  # the pool query and the pilot, no more


@pytest.mark.slow
def test_auto_refines_the_digits_for_a_quarter_of_the_budget_at_most(digits):
    Xtr, ytr, Xte, yte = digits
    clf = CarrotClassifier(query_budget=800, popsize=8, intrinsic_dim=16, random_state=0).fit(Xtr, ytr)
    zero_shot = CarrotClassifier(prompt_tuning=False, refinement=False).fit(Xtr, ytr)
    assert clf.selection_["choice"] == "refine-only" and clf.selection_["refiner_gain"] > 0
    assert clf.n_queries_ <= 0.25 * 800 + 1
    assert clf.score(Xte, yte) > zero_shot.score(Xte, yte) + 0.1


def test_one_shot_per_class_falls_back_to_the_refiner_and_says_why(digits):
    Xtr, ytr, _, _ = digits
    first = np.array([np.flatnonzero(ytr == c)[0] for c in np.unique(ytr)])
    clf = CarrotClassifier(query_budget=400, popsize=8, intrinsic_dim=16, random_state=0).fit(Xtr[first], ytr[first])
    assert clf.selection_["choice"] == "refine-only" and "one shot" in clf.selection_["reason"]
    assert clf.n_queries_ == 1


def test_the_paper_protocol_is_one_setting_away(digits):
    Xtr, ytr, _, _ = digits
    clf = CarrotClassifier(prompt_tuning=True, query_budget=300, popsize=8, intrinsic_dim=16,
                           random_state=0).fit(Xtr, ytr)
    assert clf.selection_ is None and clf.n_queries_ == 300 // 9 * 9  # every generation, no selection
    assert clf.best_generation_ == clf.n_iter_


def test_auto_on_the_text_door_reports_its_choice(digits):
    Xtr, ytr, Xte, yte = digits
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    clf = CarrotClassifier(backend=OpenCLIPTextBackend(), class_names=names, random_state=0).fit(Xtr, ytr)
    assert clf.selection_["choice"] in {"zero-shot", "refine-only", "carrot"}
    assert clf.n_queries_ <= 250
    if clf.selection_["choice"] != "carrot":
        assert clf.n_queries_ <= 0.25 * 250 + 1
    # The text door's short schedule (22 epochs at its default budget) is trained whole: no stop is chosen.
    assert clf.selection_["refiner_epochs"] == 22 and "by held-out loss" not in clf.selection_["reason"]


def test_verbose_says_what_was_chosen_and_what_it_cost(digits, capsys):
    Xtr, ytr, _, _ = digits
    CarrotClassifier(query_budget=400, popsize=8, intrinsic_dim=16, random_state=0, verbose=1).fit(Xtr, ytr)
    out = capsys.readouterr().out
    assert "prompt_tuning='auto' chose" in out and "queries spent" in out


@pytest.mark.parametrize("prompt_tuning", ["auto", pytest.param(True, marks=pytest.mark.slow)])
def test_a_warm_start_continues_the_mode_of_the_previous_fit(digits, prompt_tuning):
    Xtr, ytr, _, _ = digits
    clf = CarrotClassifier(query_budget=300, popsize=8, intrinsic_dim=16, random_state=0, warm_start=True,
                           prompt_tuning=prompt_tuning).fit(Xtr, ytr)
    searched = clf.prompt_z_ is not None
    clf.set_params(prompt_tuning="auto").fit(Xtr, ytr)
    assert (clf.prompt_z_ is not None) == searched and clf.selection_ is None


@pytest.mark.slow
def test_the_refiner_trains_as_many_epochs_as_cross_validation_chose(digits):
    from skcarrot._training.selection import epoch_stops

    Xtr, ytr, _, _ = digits
    clf = CarrotClassifier(query_budget=800, popsize=8, intrinsic_dim=16, random_state=0).fit(Xtr, ytr)
    epochs = clf.selection_["refiner_epochs"]
    assert clf.selection_["choice"] == "refine-only" and epochs in epoch_stops(800 // 9)
    assert clf.n_iter_ == epochs and f"{epochs} of {800 // 9} epochs" in clf.selection_["reason"]
    assert clf.n_queries_ <= 0.25 * 800 + 1  # choosing the epochs costs no query


def test_the_epochs_with_the_lowest_held_out_loss_replace_the_full_schedule():
    from skcarrot._training import selection

    rng = np.random.RandomState(0)
    base = rng.uniform(0.1, 0.5, size=200)
    assert selection._good_epochs(np.stack([base + 0.2, base, base + 0.05])) == 1  # the middle stop is best
    assert selection._good_epochs(np.stack([base + 0.2, base + 0.05, base])) == 2  # the full schedule is
    assert selection.epoch_stops(195) == [24, 48, 97, 195] and selection.epoch_stops(5) == [5]
    # A schedule whose eighth is under 8 epochs is kept whole.
    assert selection.epoch_stops(64) == [8, 16, 32, 64] and selection.epoch_stops(63) == [63]
    assert selection.epoch_stops(22) == [22]


@pytest.mark.slow
def test_two_shots_a_class_judge_the_refiner_at_its_best_stop(digits, monkeypatch):
    """A fold of two shots a class trains on one, which the full schedule over-fits: the refiner is judged at its best stop."""
    from skcarrot._training import selection

    Xtr, ytr, _, _ = digits
    two = np.concatenate([np.flatnonzero(ytr == c)[:2] for c in np.unique(ytr)])
    stops_losses, calls = [], []
    good_epochs, gain = selection._good_epochs, selection._gain
    monkeypatch.setattr(selection, "_good_epochs", lambda losses: stops_losses.append(losses) or good_epochs(losses))
    monkeypatch.setattr(selection, "_gain", lambda simple, candidate: calls.append((simple, candidate))
                        or gain(simple, candidate))
    clf = CarrotClassifier(query_budget=800, popsize=8, intrinsic_dim=16, random_state=0).fit(Xtr[two], ytr[two])
    stops = selection.epoch_stops(800 // 9)
    epochs = clf.selection_["refiner_epochs"]
    assert epochs in stops and f"{epochs} of {800 // 9} epochs" in clf.selection_["reason"]
    assert clf.selection_["choice"] != "refine-only" or clf.n_iter_ == epochs
    (losses,) = stops_losses
    # The first call that weighs a refiner against something other than a refiner stop: against the bare prompt.
    judged = next(c for s, c in calls if not any(np.array_equal(s, row) for row in losses))
    np.testing.assert_array_equal(judged, losses[stops.index(epochs)])


def test_auto_with_fresh_views_says_what_to_change(digits):
    Xtr, ytr, _, _ = digits
    with pytest.raises(ValueError, match="fresh_views=True"):
        CarrotClassifier(fresh_views=True, query_budget=300, popsize=8, intrinsic_dim=16).fit(Xtr, ytr)


def test_the_presets_run_the_papers_protocol(digits):
    from skcarrot.tools.presets import preset_params

    Xtr, ytr, _, _ = digits
    params = {**preset_params("eurosat", 4), "query_budget": 100, "popsize": 8, "intrinsic_dim": 16}
    clf = CarrotClassifier(random_state=0, **params).fit(Xtr, ytr)
    assert clf.selection_ is None and clf.prompt_z_ is not None and clf.n_queries_ == 100 // 9 * 9


def test_an_explicit_max_iter_is_kept_under_auto(digits):
    Xtr, ytr, _, _ = digits
    clf = CarrotClassifier(query_budget=800, popsize=8, intrinsic_dim=16, max_iter=40, random_state=0).fit(Xtr, ytr)
    assert clf.selection_["refiner_epochs"] == 40
    assert clf.selection_["choice"] != "refine-only" or clf.n_iter_ == 40
