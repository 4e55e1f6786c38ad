"""The chat door: ChatVLMBackend through the real openai client, against a scripted server and our own."""

import os
import pickle

import joblib
import numpy as np
import pytest
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from chatkit import KEY, MODEL, Script, brightness_images, fake_chat_server
from skcarrot import CarrotClassifier, ChatVLMBackend
from skcarrot.backends.remote.chat import (
    DEFAULT_INSTRUCTION,
    AnswerCache,
    LogprobsUnavailableError,
    batch_calibrate,
    combine_groups,
    normalise_token,
    option_log_probs,
)
from skcarrot.exceptions import (
    QueryBudgetExceededError,
    RemoteAuthenticationError,
    RemoteProtocolError,
    RemoteUnavailableError,
    RemoteValidationError,
)
from skcarrot.images import to_pil_images

KEY_ENV = "SKCARROT_TEST_CHAT_KEY"
NAMES = [str(c) for c in range(4)]


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    server, script = fake_chat_server()
    with server:
        yield server.url, script


def backend(url, **kw):
    params = dict(model=MODEL, base_url=url, api_key_env=KEY_ENV, cache=None, max_concurrency=2, timeout=10)
    params.update(kw)
    return ChatVLMBackend(**params)


def shots(n=3, classes=4, seed=0):
    y = np.repeat(np.arange(classes), n)
    return brightness_images(y, seed=seed), y


def quick(b, **kw):
    params = dict(backend=b, class_names=NAMES, prompt_tuning=False, n_views=1, max_iter=3, random_state=0)
    params.update(kw)
    return CarrotClassifier(**params)


# -- reading the answer ---------------------------------------------------------------------------

def test_tokens_are_options_by_their_normalised_text():
    assert {normalise_token(t) for t in ["B", " B", "b", "B.", "(B)", "b\u00a0"]} == {"b"}
    lp, ok = option_log_probs([("B", np.log(0.5)), (" b", np.log(0.3)), ("A", np.log(0.1))], ["A", "B"])
    assert ok and np.allclose(np.exp(lp), [0.1 / 0.9, 0.8 / 0.9])


def test_raw_tokenizer_pieces_are_options_too():
    # CLIP's BPE ("b</w>"), GPT-2's byte-level BPE ("\u0120B"), SentencePiece ("\u2581b")
    assert {normalise_token(t) for t in ["b</w>", "\u0120B", "\u2581b", "B</w>."]} == {"b"}
    lp, ok = option_log_probs([("b</w>", np.log(0.5)), ("a</w>", np.log(0.3))], ["A", "B"])
    assert ok and np.allclose(np.exp(lp), [0.3 / 0.8, 0.5 / 0.8])


def test_option_position_bias_is_measured_and_batch_calibration_removes_it(fake):
    url, _ = fake
    X, y = shots(n=4)
    logp = backend(url).option_log_probs(to_pil_images(X), DEFAULT_INSTRUCTION, NAMES)

    def wrong_mass(scores):
        """Mean probability each option position gets on images that are not its class."""
        p = np.exp(scores)
        return np.array([p[y != j, j].mean() for j in range(len(NAMES))])

    raw, calibrated = wrong_mass(logp), wrong_mass(batch_calibrate(logp))
    assert raw[0] > 1.5 * raw[-1]  # the double prefers early letters when it is wrong, as chat models do
    assert np.ptp(calibrated) < 0.5 * np.ptp(raw)
    assert (batch_calibrate(logp).argmax(1) == y).mean() >= (logp.argmax(1) == y).mean()


def test_a_missing_option_gets_the_mass_left_never_more_than_the_least_alternative():
    # 0.9 returned; 0.1 left for two missing options: 0.05 each, under the least alternative (0.1)
    lp, _ = option_log_probs([("A", np.log(0.8)), ("B", np.log(0.1))], ["A", "B", "C", "D"])
    assert np.allclose(np.exp(lp), np.array([0.8, 0.1, 0.05, 0.05]) / 1.0)
    # nothing left: the floor is half the least alternative
    lp, _ = option_log_probs([("A", np.log(0.7)), ("B", np.log(0.3))], ["A", "B", "C"])
    assert np.allclose(np.exp(lp), np.array([0.7, 0.3, 0.15]) / 1.15)


def test_the_sentinel_is_a_missing_option():
    with_sentinel, _ = option_log_probs([("A", np.log(0.6)), ("B", np.log(0.2)), ("C", -9999.0)], ["A", "B", "C"])
    without, _ = option_log_probs([("A", np.log(0.6)), ("B", np.log(0.2))], ["A", "B", "C"])
    assert np.allclose(with_sentinel, without) and np.isfinite(with_sentinel).all()


def test_an_answer_with_no_option_is_uniform_and_said():
    lp, ok = option_log_probs([("Sure", -0.1), ("I", -2.0)], ["A", "B", "C"])
    assert not ok and np.allclose(np.exp(lp), 1 / 3)


def test_groups_are_consecutive_and_their_winners_meet_in_a_final_round():
    b = ChatVLMBackend(cache=None, top_logprobs=5)
    assert b.groups(12) == [(0, 5), (5, 10), (10, 12)] and b.calls_per_image(12) == 4
    assert b.calls_per_image(5) == 1
    assert ChatVLMBackend(cache=None, max_options=4).groups(12) == [(0, 4), (4, 8), (8, 12)]
    # group 2's winner wins the final: it ranks first although group 1's winner was surer in its group
    scores = combine_groups([np.log([0.9, 0.1]), np.log([0.6, 0.4])], np.log([0.3, 0.7]))
    assert np.isclose(np.exp(scores).sum(), 1) and np.argmax(scores) == 2
    assert np.allclose(scores[3] - scores[2], np.log(0.4 / 0.6)) and np.allclose(scores[1] - scores[0], np.log(1 / 9))
    with pytest.raises(ValueError, match="option groups"):
        ChatVLMBackend(cache=None, max_options=2).option_log_probs([None] * 1, "Which?", [str(c) for c in range(5)])


def test_classes_in_groups_are_scored_right(fake):
    url, script = fake
    images, y = shots(1, classes=12)
    lp = backend(url, max_options=5).option_log_probs(images, "Which?", [str(c) for c in range(12)])
    assert lp.shape == (12, 12) and np.allclose(np.exp(lp).sum(1), 1)
    assert (lp.argmax(1) == y).mean() >= 0.9
    assert len(script.requests) == 12 * 4  # three groups and a final round per image


# -- the sklearn contract ---------------------------------------------------------------------------

def test_the_chat_door_is_picked_and_learns_the_shots(fake):
    url, _ = fake
    X, y = shots(3)
    clf = quick(backend(url)).fit(X, y)
    X_test, y_test = shots(5, seed=1)
    assert clf.door_ == "chat" and clf.score(X_test, y_test) >= 0.9
    assert clf.n_calls_ == clf.n_queries_ == len(y) and clf.n_input_tokens_ == 120 * len(y)
    assert clf.n_output_tokens_ == len(y)
    proba = clf.predict_proba(X_test)
    assert proba.shape == (len(y_test), 4) and np.allclose(proba.sum(1), 1)


def default_fit(url, X, y, **kw):
    params = dict(backend=backend(url), class_names=NAMES, query_budget=4000, random_state=0)
    params.update(kw)
    return CarrotClassifier(**params).fit(X, y)


def test_the_default_takes_the_prompt_a_search_on_a_few_shots_found_when_held_out_shots_prefer_it(fake):
    # the model reads number words right and digits only on half the images: a wording worth finding
    url, script = fake
    script.prefers_words = True
    X, y = shots(8)
    X_test, y_test = shots(10, seed=1)
    hand = CarrotClassifier(backend=backend(url), class_names=NAMES, prompt_tuning=False, early_stopping=False,
                            random_state=0).fit(X, y)
    clf = default_fit(url, X, y)
    selection = clf.selection_
    assert selection["prompt_gain"] > 0 and "replaces" in selection["reason"] and clf.prompt_ != hand.prompt_
    assert clf.score(X_test, y_test) >= hand.score(X_test, y_test) + 0.2
    if selection["choice"] == "carrot":  # the full search starts from the hand-written prompt
        assert selection["prompt"] is None
    else:  # step 0, both view pools and any pilot fit in the quarter, and the dry run counts them
        assert tuple(clf.prompt_) == tuple(selection["prompt"])
        assert clf.n_calls_ == clf.n_queries_ <= 0.25 * 4000
        assert clf.estimate_cost(X, y)["calls"] == clf.n_calls_


def test_the_default_keeps_the_hand_written_prompt_when_the_found_one_is_no_better(fake):
    url, _ = fake  # every wording is read alike: nothing for the search to find
    X, y = shots(8)
    clf = default_fit(url, X, y)
    selection = clf.selection_
    assert selection["prompt"] is None and selection["prompt_gain"] <= 0
    assert "hand-written prompt is kept" in selection["reason"] and clf.prompt_ == (DEFAULT_INSTRUCTION, NAMES)
    # the fit's calls do not depend on the answers: the dry run counts them exactly
    assert clf.estimate_cost(X, y)["calls"] == clf.n_calls_
    assert selection["choice"] != "carrot" and clf.n_queries_ <= 0.25 * 4000


def test_the_pilot_scoring_its_held_out_half_stays_within_the_quarter(fake):
    # 4,600 calls: the few-shot search (384) and two pools (128) leave 638, 319 a half; a half's pilot
    # that planned all 319 for itself (64 screening + 3 generations of 80) would score its held-out
    # 16 shots past the quarter (1,152 of 1,150)
    url, _ = fake
    X, y = shots(8)
    clf = default_fit(url, X, y, query_budget=4600)
    assert clf.selection_["pilot_queries"] > 0 and clf.selection_["choice"] != "carrot"
    assert clf.n_queries_ <= 4600 // 4


def test_the_default_skips_the_few_shot_search_where_the_quarter_can_not_hold_it(fake):
    url, _ = fake
    X, y = shots(8)
    clf = default_fit(url, X, y, n_views=8, query_budget=1000)  # two pools of 8 views: 512 calls of 250
    assert clf.selection_["prompt"] is None and "do not fit in a quarter of the budget" in clf.selection_["reason"]
    assert clf.prompt_ == (DEFAULT_INSTRUCTION, NAMES)


def test_n_views_auto_is_two_views_at_the_chat_door(fake):
    url, _ = fake
    X, y = shots(3)
    clf = CarrotClassifier(backend=backend(url), class_names=NAMES, prompt_tuning=False, early_stopping=False,
                           max_iter=2, random_state=0)
    assert clf.get_params()["n_views"] == "auto"
    assert clf.fit(X, y).n_calls_ == 2 * len(y)  # the view pool, scored once
    assert clf.set_params(n_views=3).fit(X, y).n_calls_ == 3 * len(y)


def test_pipeline_grid_search_cross_validation_and_joblib(fake, tmp_path):
    url, _ = fake
    X, y = shots(4)
    pipe = make_pipeline(FunctionTransformer(lambda images: images), quick(backend(url)))
    assert np.mean(cross_val_score(pipe, X, y, cv=2)) >= 0.75
    grid = GridSearchCV(quick(backend(url)), {"consistency_weight": [0.0, 1.0]}, cv=2).fit(X, y)
    assert set(grid.cv_results_["param_consistency_weight"]) == {0.0, 1.0} and grid.best_score_ >= 0.75
    clf = quick(backend(url)).fit(X, y)
    joblib.dump(clf, tmp_path / "clf.joblib")
    loaded = joblib.load(tmp_path / "clf.joblib")
    assert np.array_equal(loaded.predict_proba(X), clf.predict_proba(X))


def test_pickles_hold_no_key_and_no_client(fake):
    url, _ = fake
    X, y = shots(2)
    clf = quick(backend(url)).fit(X, y)
    data = pickle.dumps(clf)
    assert KEY.encode() not in data
    copy = pickle.loads(data)
    assert copy.backend._client is None and copy.backend.n_calls_ == 0
    assert KEY not in repr(clf.backend)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_process_builds_its_own_client_and_cache_connection(fake, tmp_path):
    url, _ = fake
    X, _ = shots(1)
    images = to_pil_images(X)
    chat = backend(url, cache=str(tmp_path / "answers.sqlite"))
    parent = chat.option_log_probs(images, DEFAULT_INSTRUCTION, NAMES)
    client, cache = chat._client, chat._cache
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its calls go through a client and a connection of its own
        try:
            chat.option_log_probs(images[:1], "Another question?", NAMES)
            ok = chat._client is not client and chat._cache is not cache
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"1"
    os.waitpid(pid, 0)
    assert chat._client is client  # the parent keeps its own
    np.testing.assert_array_equal(chat.option_log_probs(images, DEFAULT_INSTRUCTION, NAMES), parent)


# -- what it costs ------------------------------------------------------------------------------------

def test_a_second_fit_on_the_same_shots_makes_no_call(fake, tmp_path):
    url, script = fake
    X, y = shots(3)
    quick(backend(url, cache=str(tmp_path / "answers.sqlite"))).fit(X, y)
    sent = len(script.requests)
    clf = quick(backend(url, cache=str(tmp_path / "answers.sqlite"))).fit(X, y)
    assert sent == len(y) and len(script.requests) == sent
    assert clf.n_calls_ == 0 and clf.backend.n_cached_ == len(y)


def test_without_the_cache_every_fit_pays(fake):
    url, script = fake
    X, y = shots(2)
    quick(backend(url, cache=None)).fit(X, y)
    quick(backend(url, cache=False)).fit(X, y)
    assert len(script.requests) == 2 * len(y)


def test_the_cache_keeps_at_most_its_size(tmp_path):
    cache = AnswerCache(str(tmp_path / "c.sqlite"), max_entries=3)
    for i in range(5):
        cache.put(f"k{i}", [["A", -float(i)]])
    cache.get("k2")  # used: kept over k3
    cache.put("k5", [])
    assert len(cache) == 3 and cache.get("k2") is not None and cache.get("k3") is None


def test_the_budget_is_never_exceeded_under_a_429_storm(fake):
    url, script = fake
    script.storm, script.retry_after = 40, "0"
    X, y = shots(3)
    with pytest.raises(QueryBudgetExceededError):
        quick(backend(url, max_retries=100), query_budget=30).fit(X, y)
    assert len(script.requests) <= 30  # retries are calls, and calls stop at the budget


def test_retries_after_429_and_5xx_are_counted_calls(fake):
    url, script = fake
    script.storm, script.errors_5xx = 3, 2
    X, y = shots(2)
    clf = quick(backend(url, max_retries=6)).fit(X, y)
    assert len(script.requests) == len(y) + 5 and clf.n_calls_ == len(y) + 5 == clf.n_queries_


def test_retry_after_is_waited_for(fake, monkeypatch):
    url, script = fake
    script.storm, script.retry_after = 1, "3"
    waits = []
    monkeypatch.setattr("skcarrot.backends.remote.chat.time.sleep", waits.append)
    b = backend(url, max_concurrency=1)
    b.option_log_probs(shots(1, classes=2)[0][:1], "Which?", ["0", "1"])
    assert waits == [3.0] and b.n_calls_ == 2


def test_a_server_that_keeps_failing_is_unavailable_after_the_retries(fake, monkeypatch):
    url, script = fake
    script.errors_5xx = 100
    monkeypatch.setattr("skcarrot.backends.remote.chat.time.sleep", lambda s: None)
    b = backend(url, max_retries=2, max_concurrency=1)
    with pytest.raises(RemoteUnavailableError, match="3 tries"):
        b.option_log_probs(shots(1, classes=2)[0][:1], "Which?", ["0", "1"])
    assert b.n_calls_ == 3


def test_an_interrupted_fit_resumes_without_paying_again(fake, tmp_path, monkeypatch):
    url, script = fake
    monkeypatch.setattr("skcarrot.backends.remote.chat.time.sleep", lambda s: None)
    X, y = shots(3)
    cache = str(tmp_path / "answers.sqlite")
    reference = quick(backend(url), n_views=2).fit(X, y)
    paid = len(script.requests)
    script.requests.clear()
    script.errors_5xx = 1000  # the fit dies part-way, after some answers were cached
    first = backend(url, cache=cache, max_retries=0, max_concurrency=1)
    original_call = first._call
    calls = {"n": 0}

    def flaky(body, allowance):
        calls["n"] += 1
        if calls["n"] <= paid // 2:
            script.errors_5xx = 0
        else:
            script.errors_5xx = 1000
        return original_call(body, allowance)

    monkeypatch.setattr(first, "_call", flaky)
    with pytest.raises(RemoteUnavailableError):
        quick(first, n_views=2, checkpoint=str(tmp_path / "fit.ckpt")).fit(X, y)
    script.errors_5xx = 0
    answered_before = script.answered
    resumed = quick(backend(url, cache=cache), n_views=2, checkpoint=str(tmp_path / "fit.ckpt")).fit(X, y)
    assert script.answered - answered_before + paid // 2 == paid  # each answer paid once in all
    assert np.array_equal(resumed.predict_proba(X), reference.predict_proba(X))


# -- bad answers and bad input -----------------------------------------------------------------------

def test_a_model_without_logprobs_says_what_to_use(fake):
    url, script = fake
    script.no_logprobs = True
    with pytest.raises(LogprobsUnavailableError, match="use a model that returns them"):
        quick(backend(url)).fit(*shots(1))


def test_fewer_alternatives_than_asked_says_what_to_set(fake):
    url, script = fake
    script.alternatives = 3
    images, _ = shots(1, classes=6)
    with pytest.raises(RemoteProtocolError, match=r"returned 3 alternatives.*top_logprobs=3"):
        backend(url).option_log_probs(images, "Which?", [str(c) for c in range(6)])
    lp = backend(url, top_logprobs=3).option_log_probs(images, "Which?", [str(c) for c in range(6)])
    assert lp.shape == (6, 6)


def test_the_sentinel_from_the_server_gets_the_floor(fake):
    url, script = fake
    script.sentinel = True
    lp = backend(url).option_log_probs(shots(1)[0], "Which?", NAMES)
    assert np.isfinite(lp).all() and np.allclose(np.exp(lp).sum(1), 1)


def test_a_model_that_answers_no_option_is_refused(fake):
    url, script = fake
    script.no_option = True
    with pytest.raises(RemoteProtocolError, match="none of 4 calls"):
        backend(url).option_log_probs(shots(1)[0], "Which?", NAMES)


def test_a_wrong_or_missing_key_names_the_variable(fake, monkeypatch):
    url, _ = fake
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    with pytest.raises(RemoteAuthenticationError, match=KEY_ENV):
        backend(url).option_log_probs(shots(1)[0], "Which?", NAMES)
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(RemoteAuthenticationError, match=f"set the environment variable {KEY_ENV}"):
        backend(url).option_log_probs(shots(1)[0], "Which?", NAMES)


def test_an_unknown_model_lists_the_models_served(fake):
    url, _ = fake
    with pytest.raises(RemoteValidationError, match=f"'gpt-9' is unknown.*it serves: {MODEL}"):
        backend(url, model="gpt-9").option_log_probs(shots(1)[0], "Which?", NAMES)


def test_an_image_over_the_size_is_refused_before_any_call(fake):
    url, script = fake
    with pytest.raises(ValueError, match="max_image_bytes"):
        backend(url, max_image_bytes=50).option_log_probs(shots(1)[0], "Which?", NAMES)
    with pytest.raises(ValueError, match="12x12 = 144 pixels, more than max_image_pixels=100"):
        backend(url, max_image_pixels=100).option_log_probs(shots(1)[0], "Which?", NAMES)
    assert script.requests == []


@pytest.mark.parametrize("params, match", [
    (dict(top_logprobs=21), "top_logprobs"), (dict(detail="huge"), "detail"), (dict(max_options=1), "max_options"),
    (dict(max_concurrency=0), "max_concurrency"), (dict(max_retries=-1), "max_retries"),
    (dict(max_image_pixels=0), "max_image_pixels"),
])
def test_bad_parameters_are_refused(params, match):
    with pytest.raises(ValueError, match=match):
        ChatVLMBackend(cache=None, **params)


def test_the_estimate_counts_what_the_fit_spends_groups_and_final_rounds_included(fake):
    url, script = fake
    X, y = shots(2, classes=6)
    names = [str(c) for c in range(6)]
    clf = quick(backend(url, max_options=4), class_names=names, n_views=2)
    estimate = clf.estimate_cost(X, y, prices={"input": 2.5, "output": 10.0})
    assert script.requests == []  # a dry run: no call
    clf.fit(X, y)
    assert estimate["calls"] == clf.n_calls_ == len(y) * 2 * 3  # two groups and a final round a view
    assert estimate["output_tokens"] == clf.n_output_tokens_
    assert np.isclose(estimate["usd"], (estimate["input_tokens"] * 2.5 + estimate["output_tokens"] * 10) / 1e6)
