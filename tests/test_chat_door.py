"""The chat door against an OpenAI-compatible test double, through the real openai client."""

import pickle
import time

import joblib
import numpy as np
import pytest
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from chatkit import FakeChat, images_for
from skcarrot import CarrotClassifier
from skcarrot._math import log_softmax
from skcarrot.backends import ChatVLMBackend
from skcarrot.backends.remote.chat import (
    batch_calibrate,
    combine_rounds,
    option_groups,
    option_letter,
    option_scores,
)
from skcarrot.doors import ChatDoor, pick_door
from skcarrot.doors.chat import ChatCounter
from skcarrot.exceptions import (
    QueryBudgetExceededError,
    RemoteAuthenticationError,
    RemoteProtocolError,
    RemoteUnavailableError,
    RemoteValidationError,
)
from skcarrot.images import to_pil_images
from skcarrot.search import InstructionSearch, PromptSearch
from skcarrot.search.instructions import screening_cost

NAMES = ["0", "1", "2"]
FAST = dict(query_budget=300, popsize=2, n_views=2, max_iter=3, random_state=0)


def backend(fake, **kw):
    return ChatVLMBackend(fake.model, base_url=fake.url, backoff=0.0, **{"cache": None, **kw})


@pytest.fixture
def fake():
    with FakeChat(NAMES) as server:
        yield server


@pytest.fixture(scope="module")
def shots():
    y = np.repeat(np.arange(3), 3)
    return images_for(y, 3, seed=1), y


# ------------------------------------------------------------------ reading an answer
def test_option_tokens_are_one_option_whatever_their_spelling():
    assert [option_letter(t) for t in ["C", " c", "c.", "C)", "c</w>", "\u0120C", "\u2581c"]] == [2] * 7
    assert option_letter("Cat") is None and option_letter("1") is None and option_letter("") is None
    logp, floored = option_scores([("B", np.log(0.3)), (" b", np.log(0.3)), ("A", np.log(0.2))], 2)
    np.testing.assert_allclose(np.exp(logp), [0.2 / 0.8, 0.6 / 0.8])
    assert floored == 0


def test_a_missing_or_sentinel_option_gets_the_lowest_returned_less_log_two():
    alternatives = [("A", -0.1), ("The", -3.0), ("C", -9999.0)]
    logp, floored = option_scores(alternatives, 3)
    raw = np.array([-0.1, -3.0 - np.log(2), -3.0 - np.log(2)])
    np.testing.assert_allclose(logp, log_softmax(raw))
    assert floored == 2
    with pytest.raises(RemoteProtocolError, match="names an option A..C"):
        option_scores([("The", -0.1), ("It", -2.0)], 3)


@pytest.mark.parametrize("style", ["clip", "split"])
def test_letters_spelled_as_a_tokenizer_spells_them_score_as_plain_letters(fake, shots, style):
    X, _ = shots
    images = to_pil_images(X)
    plain = backend(fake).option_log_probs(images, "What?", NAMES)
    fake.letter_style = style
    np.testing.assert_allclose(backend(fake).option_log_probs(images, "What?", NAMES), plain, atol=1e-9)


def test_the_sentinel_of_a_server_reads_as_the_floor(fake, shots):
    X, y = shots
    fake.max_alternatives, fake.sentinel = 2, True
    logp = backend(fake, top_logprobs=2).option_log_probs(to_pil_images(X), "What?", NAMES)
    assert np.isfinite(logp).all() and (logp.argmax(1) == y).mean() == 1.0


# ------------------------------------------------------------------ groups of options
def test_groups_then_a_final_among_winners_equal_one_softmax_over_all_options():
    scores = np.array([0.5, 2.0, -1.0, 1.5, 0.0, 3.0, -0.5])
    groups = option_groups(7, 3)
    assert groups == [[0, 1, 2], [3, 4], [5, 6]]
    rounds = [log_softmax(scores[g]) for g in groups]
    final = log_softmax(np.array([scores[1], scores[3], scores[5]]))
    np.testing.assert_allclose(combine_rounds(rounds, groups, final, 7), log_softmax(scores))


def test_more_classes_than_one_call_shows_are_asked_in_groups(shots):
    names = [str(c) for c in range(6)]
    y = np.arange(6).repeat(2)
    images = to_pil_images(images_for(y, 6, seed=2))
    # no distractor among the top alternatives: each answer holds all its options, and no floor is needed
    with FakeChat(names, position_bias=0.0, distractor_gap=100.0) as fake:
        whole = backend(fake).option_log_probs(images, "What?", names)
        one_call = fake.requests
        grouped_backend = backend(fake, top_logprobs=4)
        grouped = grouped_backend.option_log_probs(images, "What?", names)
        # two groups of three (each answer holds its three options), then a final between the winners
        assert fake.requests - one_call == len(images) * grouped_backend.calls_per_image(6) == len(images) * 3
    assert one_call == len(images)
    np.testing.assert_allclose(grouped, whole, atol=1e-6)
    assert (whole.argmax(1) == y).all()


def test_vllm_token_ids_ask_every_option_exactly(fake, shots):
    X, y = shots
    exact = backend(fake, option_token_ids={c: 1000 + i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZ")})
    logp = exact.option_log_probs(to_pil_images(X), "What?", NAMES)
    assert fake.bodies[-1]["logprob_token_ids"] == [1000, 1001, 1002]
    np.testing.assert_allclose(logp, backend(fake).option_log_probs(to_pil_images(X), "What?", NAMES), atol=1e-9)


def test_the_request_puts_the_text_before_the_image_and_asks_one_token(fake, shots):
    X, _ = shots
    backend(fake).option_log_probs(to_pil_images(X[:1]), "Which digit?", ["zero", "one"])
    body = fake.bodies[-1]
    parts = body["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url"]
    assert parts[0]["text"].startswith("Which digit?\n\nA. zero\nB. one")
    assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,") and parts[1]["image_url"]["detail"] == "low"
    assert body["max_completion_tokens"] == 1 and body["logprobs"] is True and body["top_logprobs"] == 20
    assert body["temperature"] == 0


# ------------------------------------------------------------------ retries and the budget
def test_a_429_storm_never_takes_the_calls_past_the_budget(fake, shots):
    X, _ = shots
    fake.storm = 1000
    counter = ChatCounter(backend(fake, max_retries=100), budget=7)
    with pytest.raises(QueryBudgetExceededError, match="retries included"):
        counter.option_log_probs(to_pil_images(X[:2]), "What?", NAMES, purpose="prompt")
    assert fake.requests == counter.n_queries == 7


def test_retries_are_calls_and_honour_retry_after(fake, shots):
    X, _ = shots
    fake.errors_500 = 2
    counter = ChatCounter(backend(fake), budget=None)
    counter.option_log_probs(to_pil_images(X[:1]), "What?", NAMES, purpose="prompt")
    assert fake.requests == counter.n_queries == 3 and counter.n_input_tokens > 85
    fake.storm, fake.retry_after = 1, "1"
    start = time.perf_counter()
    counter.option_log_probs(to_pil_images(X[1:2]), "What?", NAMES, purpose="prompt")
    assert time.perf_counter() - start >= 0.95 and counter.n_queries == 5


def test_a_round_that_can_not_be_paid_is_refused_before_any_call(fake, shots):
    X, _ = shots
    counter = ChatCounter(backend(fake), budget=3)
    with pytest.raises(QueryBudgetExceededError, match="no call was sent"):
        counter.option_log_probs(to_pil_images(X[:4]), "What?", NAMES)
    assert fake.requests == 0


def test_a_fit_never_spends_past_its_budget(fake, shots):
    X, y = shots
    clf = CarrotClassifier(backend=backend(fake), **dict(FAST, query_budget=100, max_iter=None)).fit(X, y)
    assert clf.door_ == "chat" and clf.n_calls_ == clf.n_queries_ == fake.requests <= 100
    assert clf.n_input_tokens_ == fake.usage["prompt_tokens"] and clf.n_output_tokens_ == fake.requests


# ------------------------------------------------------------------ the cache
def test_the_cache_makes_a_second_fit_call_nothing(fake, shots, tmp_path):
    X, y = shots
    params = dict(FAST, prompt_tuning=True)
    first = CarrotClassifier(backend=backend(fake, cache=tmp_path / "a.sqlite"), **params).fit(X, y)
    sent = fake.requests
    second = CarrotClassifier(backend=backend(fake, cache=tmp_path / "a.sqlite"), **params).fit(X, y)
    assert sent > 0 and fake.requests == sent and second.n_calls_ == 0
    np.testing.assert_array_equal(second.predict_proba(X), first.predict_proba(X))
    # switched off, the same fit calls again
    CarrotClassifier(backend=backend(fake, cache=False), **params).fit(X, y)
    assert fake.requests > sent


def test_the_cache_keeps_at_most_cache_size_answers(fake, shots, tmp_path):
    X, _ = shots
    chat = backend(fake, cache=tmp_path / "b.sqlite", cache_size=4, max_concurrency=1)  # asked in order
    chat.option_log_probs(to_pil_images(X), "What?", NAMES)
    assert len(chat._cache()) == 4 and fake.requests == len(X)
    chat.option_log_probs(to_pil_images(X[-4:]), "What?", NAMES)  # the most recent four are kept
    assert fake.requests == len(X)


# ------------------------------------------------------------------ keys, pickles, errors
def test_pickles_hold_no_key_and_work_after_unpickling(fake, shots, monkeypatch):
    X, y = shots
    fake.key = "sk-secret-123"
    monkeypatch.setenv("FAKE_KEY", "sk-secret-123")
    chat = backend(fake, api_key_env="FAKE_KEY")
    clf = CarrotClassifier(backend=chat, **dict(FAST, prompt_tuning=False)).fit(X, y)
    for obj in (chat, clf):
        assert b"sk-secret-123" not in pickle.dumps(obj)
    again = pickle.loads(pickle.dumps(clf))
    np.testing.assert_allclose(again.predict_proba(X), clf.predict_proba(X))
    assert "sk-secret" not in repr(chat)


def test_a_wrong_key_names_the_variable(fake, shots, monkeypatch):
    X, _ = shots
    fake.key = "right"
    monkeypatch.setenv("FAKE_KEY", "wrong")
    with pytest.raises(RemoteAuthenticationError, match="FAKE_KEY"):
        backend(fake, api_key_env="FAKE_KEY").option_log_probs(to_pil_images(X[:1]), "What?", NAMES)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(RemoteAuthenticationError, match="OPENAI_API_KEY is unset"):
        ChatVLMBackend("gpt-4o", cache=None).option_log_probs(to_pil_images(X[:1]), "What?", NAMES)


@pytest.mark.parametrize("refusal", ["no_logprobs", "forbidden"])
def test_a_model_without_log_probabilities_is_named(fake, shots, refusal):
    X, _ = shots
    getattr(fake, refusal).add("o4-mini")
    chat = ChatVLMBackend("o4-mini", base_url=fake.url, cache=None)
    with pytest.raises(RemoteValidationError, match="model 'o4-mini' returns no log-probabilities.*gpt-4o"):
        chat.option_log_probs(to_pil_images(X[:1]), "What?", NAMES)
    assert fake.requests == 1  # not retried


def test_an_unknown_model_lists_the_servers_models(fake, shots):
    X, _ = shots
    with pytest.raises(RemoteValidationError, match=r"unknown model 'gpt-9'.*\['fake-vlm'\]"):
        ChatVLMBackend("gpt-9", base_url=fake.url, cache=None).option_log_probs(to_pil_images(X[:1]), "Q", NAMES)


def test_fewer_alternatives_than_options_say_what_to_ask(shots):
    names = [str(c) for c in range(8)]
    with FakeChat(names) as fake:
        fake.max_alternatives = 5
        images = to_pil_images(images_for(np.arange(8), 8))
        with pytest.raises(RemoteValidationError, match="returned 5 alternatives.*top_logprobs=5"):
            backend(fake).option_log_probs(images, "What?", names)
        logp = backend(fake, top_logprobs=5).option_log_probs(images, "What?", names)
    assert (logp.argmax(1) == np.arange(8)).mean() >= 0.75


def test_an_answer_with_no_option_says_so(fake, shots):
    X, _ = shots
    fake.chatty = True
    with pytest.raises(RemoteProtocolError, match="names an option"):
        backend(fake, top_logprobs=3).option_log_probs(to_pil_images(X[:1]), "What?", NAMES)


def test_an_image_over_the_size_limit_is_refused_before_sending(fake, shots):
    X, _ = shots
    with pytest.raises(RemoteValidationError, match="max_image_bytes=50"):
        backend(fake, max_image_bytes=50).option_log_probs(to_pil_images(X[:1]), "What?", NAMES)
    with pytest.raises(RemoteValidationError, match="max_image_pixels=10"):
        backend(fake, max_image_pixels=10).option_log_probs(to_pil_images(X[:1]), "What?", NAMES)
    assert fake.requests == 0


def test_a_slow_server_times_out_after_the_retries(fake, shots):
    X, _ = shots
    fake.delay = 1.0
    with pytest.raises(RemoteUnavailableError, match="no answer after 2 tries"):
        backend(fake, timeout=0.2, max_retries=1).option_log_probs(to_pil_images(X[:1]), "What?", NAMES)


# ------------------------------------------------------------------ the door and its search
def test_auto_picks_the_chat_door_and_the_search_offers_the_protocol(fake):
    assert pick_door(backend(fake)) is ChatDoor
    search = InstructionSearch(NAMES, random_state=0)
    assert isinstance(search, PromptSearch) and search.can_move()
    with pytest.raises(TypeError, match="does not offer the chat door"):
        pick_door(object(), "chat")


def test_screening_spends_what_start_cost_says(fake, shots):
    X, y = shots
    door = ChatDoor(backend(fake), NAMES)
    search = InstructionSearch(NAMES, random_state=0)
    planned = door.start_cost(search, len(y))
    assert planned == screening_cost(len(search.pool()), len(y), 3, 1) > 0
    door.start(search, to_pil_images(X), y)
    assert door.counter.n_queries == planned == fake.requests
    assert search.screened_ and door.start_cost(search, len(y)) == 0
    assert planned < len(search.pool()) * len(y)  # halving paid for less than every candidate on every shot


def test_the_search_finds_the_sharper_instruction(fake, shots):
    X, y = shots
    clf = CarrotClassifier(backend=backend(fake), **dict(FAST, prompt_tuning=True, refinement=False,
                                                         query_budget=250, max_iter=None)).fit(X, y)
    assert "Classify" in clf.instruction_ and len(clf.descriptions_) == 3
    assert clf.n_queries_by_purpose_["screen"] > 0


def test_estimate_cost_is_within_ten_percent_of_the_usage(fake, shots):
    X, y = shots
    clf = CarrotClassifier(backend=backend(fake), **dict(FAST, prompt_tuning=True))
    estimate = clf.estimate_cost(X, y, prices={"fake-vlm": (2.5, 10.0)})
    assert fake.requests == 0  # a dry run
    clf.fit(X, y)
    assert estimate["calls"] == clf.n_calls_
    assert abs(estimate["input_tokens"] - clf.n_input_tokens_) <= 0.1 * clf.n_input_tokens_
    assert estimate["output_tokens"] == clf.n_output_tokens_
    assert estimate["usd"] == pytest.approx((estimate["input_tokens"] * 2.5 + estimate["output_tokens"] * 10) / 1e6)


def test_option_position_bias_is_measured_and_batch_calibration_removes_it(shots):
    y = np.repeat(np.arange(3), 8)
    images = to_pil_images(images_for(y, 3, seed=3))
    with FakeChat(NAMES, position_bias=4.0, sharpness=1.0) as fake:
        logp = backend(fake).option_log_probs(images, "What?", NAMES)
    biased = np.bincount(logp.argmax(1), minlength=3)
    calibrated = np.bincount(batch_calibrate(logp).argmax(1), minlength=3)
    assert biased[0] > 8 and (batch_calibrate(logp).argmax(1) == y).mean() > (logp.argmax(1) == y).mean()
    assert calibrated.max() - calibrated.min() < biased.max() - biased.min()


# ------------------------------------------------------------------ the sklearn contract
def as_images(A):
    return np.asarray(A, dtype=np.uint8).reshape(-1, 8, 8, 3)


def test_pipeline_grid_search_cross_validation_and_joblib(fake, tmp_path):
    y = np.repeat(np.arange(3), 4)
    X = images_for(y, 3, seed=4).reshape(len(y), -1)
    to_images = FunctionTransformer(as_images)
    pipe = make_pipeline(to_images, CarrotClassifier(backend=backend(fake, cache=tmp_path / "c.sqlite"),
                                                     **dict(FAST, prompt_tuning=False)))
    scores = cross_val_score(pipe, X, y, cv=2)
    assert scores.shape == (2,) and np.all((scores >= 0) & (scores <= 1))
    grid = GridSearchCV(pipe, {"carrotclassifier__consistency_weight": [0.0, 0.1]}, cv=2).fit(X, y)
    assert np.isfinite(grid.cv_results_["mean_test_score"]).all()
    joblib.dump(grid.best_estimator_, tmp_path / "m.joblib")
    np.testing.assert_array_equal(joblib.load(tmp_path / "m.joblib").predict(X), grid.best_estimator_.predict(X))


def test_an_interrupted_fit_resumes_and_pays_nothing_twice(shots, tmp_path):
    X, y = shots
    params = dict(FAST, prompt_tuning=True, max_iter=4)
    with FakeChat(NAMES) as fake:
        # the cache answers the questions a fit repeats (the current prompt, each generation): those are paid once
        reference = CarrotClassifier(backend=backend(fake, cache=tmp_path / "ref.sqlite"), **params).fit(X, y)
        needed = fake.answered
    with FakeChat(NAMES) as fake:
        chat = backend(fake, cache=tmp_path / "d.sqlite", max_retries=0)
        clf = CarrotClassifier(backend=chat, checkpoint=tmp_path / "fit.ckpt", checkpoint_every=1, **params)
        original = fake.completion

        def failing(body):  # the server goes away halfway through the fit
            if fake.answered >= needed // 2:
                raise ConnectionResetError("the server went away")
            return original(body)

        fake.completion = failing
        with pytest.raises(RemoteUnavailableError):
            clf.fit(X, y)
        assert 0 < fake.answered < needed
        fake.completion = original
        clf.fit(X, y)
        assert fake.answered == needed  # every question answered once, over both calls to fit
    np.testing.assert_allclose(clf.predict_proba(X), reference.predict_proba(X))


# ------------------------------------------------------------------ learning
def test_the_default_fit_learns_held_out_images():
    y = np.repeat(np.arange(3), 6)
    X = images_for(y, 3, seed=5)
    yte = np.repeat(np.arange(3), 10)
    Xte = images_for(yte, 3, seed=6)
    with FakeChat(NAMES, position_bias=2.5, sharpness=1.5) as fake:
        zero = CarrotClassifier(backend=backend(fake), prompt_tuning=False, refinement=False).fit(X, y)
        clf = CarrotClassifier(backend=backend(fake), query_budget=600, n_views=2, random_state=0).fit(X, y)
        assert clf.score(Xte, yte) >= zero.score(Xte, yte) and clf.score(Xte, yte) > 0.8
        if clf.selection_["choice"] != "carrot":  # the search did not pay: at most a quarter of the budget
            assert clf.n_calls_ <= 0.25 * 600


def test_a_warm_start_keeps_its_screening_and_pays_for_no_answer_twice(fake, shots, tmp_path):
    X, y = shots
    chat = backend(fake, cache=tmp_path / "w.sqlite")
    clf = CarrotClassifier(backend=chat, **dict(FAST, prompt_tuning=True, max_iter=2)).fit(X, y)
    assert clf.n_queries_by_purpose_["screen"] > 0
    before = fake.requests
    clf.set_params(warm_start=True).fit(X, y)
    assert clf.n_queries_by_purpose_["screen"] == 0  # the screening's result came with the warm start
    # two generations would ask popsize prompts and a refiner epoch of all shots: the cache answers
    # what was asked before (the current prompt, at least), so fewer calls go out
    planned = 2 * (FAST["popsize"] * len(y) + len(y))
    assert fake.requests - before == clf.n_calls_ < planned
