"""The chat door end to end: ChatVLMBackend and the openai client against skcarrot serve's micro chat model."""

import numpy as np
import pytest

from servekit import thread_server
from skcarrot import CarrotClassifier, ChatVLMBackend
from skcarrot.datasets import few_shot_split, load_digit_images
from skcarrot.doors import ChatDoor
from skcarrot.serve import Settings, create_app
from skcarrot.serve.chat.model import chat_text

KEY_ENV = "SKCARROT_TEST_CHAT_E2E_KEY"
NAMES = [str(d) for d in range(10)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    app = create_app(Settings(db_url=f"sqlite:///{tmp_path_factory.mktemp('e2e')}/ledger.db"))
    key_id, key = app.state.server.ledger.create_key("e2e", budget=100_000)
    with thread_server(app) as base, pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, key)
        yield app, f"{base}/v1", key_id


@pytest.fixture(scope="module")
def digits():
    X, y = load_digit_images()
    Xtr, ytr, Xte, yte = few_shot_split(X, y, 16, seed=3)
    return Xtr, ytr, Xte[:250], yte[:250]


def chat_backend(url, **kw):
    return ChatVLMBackend(base_url=url, api_key_env=KEY_ENV, **{"cache": None, **kw})


def spent(app, key_id):
    return app.state.server.ledger.usage(key_id).prompts_used


@pytest.mark.slow
def test_refine_only_beats_zero_shot_on_held_out_digits_and_the_ledger_agrees(served, digits):
    app, url, key_id = served
    Xtr, ytr, Xte, yte = digits
    zero = CarrotClassifier(backend=chat_backend(url), class_names=NAMES, prompt_tuning=False, refinement=False,
                            random_state=0).fit(Xtr, ytr)
    refine = CarrotClassifier(backend=chat_backend(url), class_names=NAMES, prompt_tuning=False,
                              early_stopping=False, random_state=0)
    estimate = refine.estimate_cost(Xtr, ytr)
    before = spent(app, key_id)
    refine.fit(Xtr, ytr)
    # the ledger charged what the client counted: one query a call
    assert spent(app, key_id) - before == refine.n_calls_ == refine.n_queries_ == len(ytr) * ChatDoor.default_n_views
    # usage adds up: every call carried the same text and one 85-token image
    engine = app.state.chat_engine
    text = refine.backend.user_text(refine.prompt_[0], refine.prompt_[1])
    per_call = engine.count(chat_text([("user", text)])) + 85
    assert refine.n_input_tokens_ == per_call * refine.n_calls_ and refine.n_output_tokens_ == refine.n_calls_
    # the estimate, before any call, within 10% of the usage
    assert estimate["calls"] == refine.n_calls_
    assert abs(estimate["input_tokens"] - refine.n_input_tokens_) <= 0.1 * refine.n_input_tokens_
    assert refine.score(Xte, yte) >= zero.score(Xte, yte) + 0.03


def test_a_second_fit_with_the_cache_on_makes_no_call(served, digits, tmp_path):
    app, url, key_id = served
    Xtr, ytr, _, _ = digits
    keep = ytr < 3
    params = dict(class_names=NAMES[:3], prompt_tuning=False, n_views=2, max_iter=5, random_state=0)
    first = CarrotClassifier(backend=chat_backend(url, cache=str(tmp_path / "a.sqlite")), **params)
    first.fit(Xtr[keep], ytr[keep])
    before = spent(app, key_id)
    second = CarrotClassifier(backend=chat_backend(url, cache=str(tmp_path / "a.sqlite")), **params)
    second.fit(Xtr[keep], ytr[keep])
    assert first.n_calls_ == 2 * keep.sum() and second.n_calls_ == 0 and spent(app, key_id) == before
    assert np.array_equal(first.predict_proba(Xtr[keep]), second.predict_proba(Xtr[keep]))


@pytest.mark.slow
def test_the_chat_door_at_its_defaults(served, digits, tmp_path, monkeypatch):
    """CarrotClassifier(backend=ChatVLMBackend(...)) as shipped: 8000 calls, prompt_tuning="auto", the cache on."""
    app, url, key_id = served
    Xtr, ytr, Xte, yte = digits
    monkeypatch.setenv("SKCARROT_CACHE_DIR", str(tmp_path))
    backend = ChatVLMBackend(base_url=url, api_key_env=KEY_ENV)  # every other parameter at its default
    clf = CarrotClassifier(backend=backend, class_names=NAMES, random_state=0)
    before = spent(app, key_id)
    clf.fit(Xtr, ytr)
    assert clf.door_ == "chat" and clf.selection_["choice"] in ("zero-shot", "refine-only", "carrot")
    # the ledger charged the calls; queries also count answers a fit read twice from the cache
    assert spent(app, key_id) - before == clf.n_calls_ <= clf.n_queries_ <= 8000
    # the few-shot search ran at the defaults (2 shots a class, 16 here), and the dry run counts its questions
    assert "prompt searched on 2 shots a class" in clf.selection_["reason"]
    if clf.selection_["choice"] != "carrot":  # the search did not pay: at most a quarter of the budget
        assert clf.n_calls_ <= 2000 and clf.estimate_cost(Xtr, ytr)["calls"] == clf.n_queries_
    assert (tmp_path / "chat-answers.sqlite").is_file()
    zero = CarrotClassifier(backend=chat_backend(url), class_names=NAMES, prompt_tuning=False, refinement=False,
                            random_state=0).fit(Xtr, ytr)
    assert clf.score(Xte, yte) >= zero.score(Xte, yte) + 0.03
    again = CarrotClassifier(backend=ChatVLMBackend(base_url=url, api_key_env=KEY_ENV), class_names=NAMES,
                             random_state=0).fit(Xtr, ytr)
    assert again.n_calls_ == 0 and again.n_queries_ == clf.n_queries_ and again.selection_ == clf.selection_
    assert np.array_equal(again.predict_proba(Xte[:20]), clf.predict_proba(Xte[:20]))
