"""ZeroShotHTTPBackend against a small in-test server speaking the zero-shot-image-classification contract."""

import base64
import io
import pickle
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("httpx")

from skcarrot.backends import OpenCLIPTextBackend, QueryCounter, TextBlackBox, ZeroShotHTTPBackend  # noqa: E402
from skcarrot.backends._base import log_probabilities  # noqa: E402
from skcarrot.datasets import DIGIT_WORDS  # noqa: E402

from helpers import JSONHandler, LoopbackServer  # noqa: E402

TOKEN = "test-secret"


class ZeroShotServer(LoopbackServer):
    """The embedded model behind the public contract: one image per call, softmax over the labels.

    ``fail_first`` calls answer 503 with ``Retry-After: 0``; ``delay`` slows each call
    so concurrency shows.
    """

    def __init__(self, fail_first=0, delay=0.0, token=TOKEN):
        self.door = OpenCLIPTextBackend()
        self.fail_first, self.delay, self.token = fail_first, delay, token
        self.lock = threading.Lock()
        self.calls = self.in_flight = self.max_in_flight = 0
        self.bodies = []
        server = self

        class Handler(JSONHandler):
            def do_POST(self):
                body = self.read_body()
                with server.lock:
                    server.calls += 1
                    call = server.calls
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    server.bodies.append(body)
                try:
                    time.sleep(server.delay)
                    if server.token and self.headers.get("Authorization") != f"Bearer {server.token}":
                        return self.reply(401, {"error": "invalid token"})
                    if call <= server.fail_first:
                        return self.reply(503, {"error": "loading"}, [("Retry-After", "0")])
                    params = body["parameters"]
                    labels = [params["hypothesis_template"].replace("{}", c) for c in params["candidate_labels"]]
                    image = Image.open(io.BytesIO(base64.b64decode(body["inputs"]))).convert("RGB")
                    logits = server.door.text_scores([image], [labels])[0, 0]
                    probs = np.exp(log_probabilities(logits, "logits"))
                    order = np.argsort(-probs)
                    return self.reply(200, [{"label": params["candidate_labels"][i], "score": float(probs[i])}
                                            for i in order])
                finally:
                    with server.lock:
                        server.in_flight -= 1

        super().__init__(Handler, "/zero-shot")


def prompts_of(words):
    return [f"a photo of a {w}." for w in words]


def test_scores_match_the_in_process_door(digit_images, monkeypatch):
    images, _ = digit_images
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    sets = [prompts_of(DIGIT_WORDS), prompts_of(reversed(DIGIT_WORDS))]
    with ZeroShotServer() as server:
        door = ZeroShotHTTPBackend(server.url)
        probs = door.text_scores(images[:4], sets)
    assert isinstance(door, TextBlackBox) and door.returns == "probabilities"
    local = np.exp(log_probabilities(OpenCLIPTextBackend().text_scores(images[:4], sets), "logits"))
    np.testing.assert_allclose(probs, local, atol=1e-6)
    assert server.calls == door.n_calls_ == 2 * 4  # one image and one prompt set per call
    assert server.bodies[0]["parameters"]["hypothesis_template"] == "{}"


def test_retries_honour_retry_after_then_succeed(digit_images, monkeypatch):
    images, _ = digit_images
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with ZeroShotServer(fail_first=3) as server:
        door = ZeroShotHTTPBackend(server.url, max_concurrency=1, backoff=0.001)
        probs = door.text_scores(images[:2], [prompts_of(DIGIT_WORDS[:3])])
    assert probs.shape == (1, 2, 3) and np.allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert door.n_retries_ == 3 and door.n_calls_ == server.calls == 5


def test_gives_up_after_max_retries(digit_images, monkeypatch):
    images, _ = digit_images
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with ZeroShotServer(fail_first=100) as server:
        door = ZeroShotHTTPBackend(server.url, max_concurrency=1, max_retries=2, backoff=0.001)
        with pytest.raises(ConnectionError, match="failed after 3 attempt.*HTTP 503"):
            door.text_scores(images[:1], [["a cat.", "a dog."]])
    assert server.calls == 3


def test_token_comes_from_the_environment_and_is_never_pickled(digit_images, monkeypatch):
    images, _ = digit_images
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with ZeroShotServer() as server:
        with pytest.raises(PermissionError, match="refused the token \\(401\\).*HF_TOKEN"):
            ZeroShotHTTPBackend(server.url, max_retries=0).text_scores(images[:1], [["a cat.", "a dog."]])
        monkeypatch.setenv("MY_TOKEN", TOKEN)
        assert ZeroShotHTTPBackend(server.url, token_env="MY_TOKEN").text_scores(
            images[:1], [["a cat.", "a dog."]]
        ).shape == (1, 1, 2)
        explicit = ZeroShotHTTPBackend(server.url, token=TOKEN)
        explicit.text_scores(images[:1], [["a cat.", "a dog."]])
    blob = pickle.dumps(explicit)
    assert TOKEN.encode() not in blob and TOKEN not in repr(explicit)
    assert pickle.loads(blob).token is None
    assert pickle.loads(pickle.dumps(ZeroShotHTTPBackend("u", token="t", store_token=True))).token == "t"


def test_concurrency_is_bounded(digit_images, monkeypatch):
    images, _ = digit_images
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with ZeroShotServer(delay=0.02) as server:
        ZeroShotHTTPBackend(server.url, max_concurrency=3).text_scores(images[:12], [["a cat.", "a dog."]])
    assert server.calls == 12
    assert 2 <= server.max_in_flight <= 3


def test_end_to_end_search_through_the_endpoint_stays_within_budget(digit_images, monkeypatch):
    from helpers import search_alone

    from skcarrot.search import TextPromptSearch

    images, y = digit_images
    keep = y < 3
    train, y_train = [img for img, k in zip(images, keep) if k], y[keep]
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    names = list(DIGIT_WORDS[:3])
    with ZeroShotServer() as server:
        # "ort" and "barbecue" lower the embedded model's loss on the 1s: something to search
        search = TextPromptSearch(names, vocabulary=["circle", "ort", "swan", "barbecue", "egg", "hook"],
                                  strings_per_query=6, n_candidates=2, popsize=4, screen_margin=0.0, random_state=0)
        counter = search_alone(ZeroShotHTTPBackend(server.url, max_concurrency=8), train, y_train, search, budget=13)
    assert search.n_screening_queries() == 2
    assert counter.n_queries == 2 + 2 * 4 <= 13  # two screening queries, then two steps of four
    assert server.calls == counter.n_pairs_scored == counter.n_queries * len(train)
    assert len(search.current()) == 3 and all(p.startswith("a photo of a ") for p in search.current())


def test_carrot_classifier_fits_end_to_end_through_the_endpoint(digit_images, monkeypatch):
    from skcarrot import CarrotClassifier

    images, y = digit_images
    keep = y < 3
    train, y_train = [img for img, k in zip(images, keep) if k], y[keep]
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with ZeroShotServer() as server:
        door = ZeroShotHTTPBackend(server.url, max_concurrency=8, max_labels=6)
        clf = CarrotClassifier(backend=door, class_names=list(DIGIT_WORDS[:3]), query_budget=16, popsize=4,
                               vocabulary=["circle", "stick", "swan", "snake", "egg", "hook"], random_state=0,
                               early_stopping=False, prompt_tuning=True)
        clf.fit(train, y_train)
        fit_calls = server.calls
        proba = clf.predict_proba(train)
    assert clf.door_ == "text" and clf.n_queries_ <= 16
    # screening: 6 words in chunks of 3 next to the 3 classes' own prompts = 2 queries
    assert clf.n_queries_by_purpose_["screen"] == 2
    # one image and one prompt set per call: fit calls = sum over queries of the images each scored
    assert fit_calls == clf.n_pairs_scored_ == clf.n_images_scored_
    if all(len(words) == 1 for words in clf.prompt_candidates_):  # no word kept: one query scores the view pool
        assert clf.n_queries_by_purpose_ == {"screen": 2, "prompt": 0, "refiner": 1, "validation": 0, "pilot": 0}
    else:
        assert clf.n_queries_by_purpose_["prompt"] > 0
    assert server.calls == fit_calls + len(train)  # predict: one prompt set, one call per image
    assert proba.shape == (len(train), 3) and np.allclose(proba.sum(1), 1.0)
    assert all(p.startswith("a photo of a ") for p in clf.prompt_)


def test_retry_after_as_an_http_date_sets_the_least_wait():
    import email.utils

    from skcarrot.backends.remote._client import retry_after_seconds

    door = ZeroShotHTTPBackend("http://127.0.0.1:9/none", backoff=0.001)
    wait = retry_after_seconds(email.utils.formatdate(time.time() + 30, usegmt=True))
    assert 28 <= wait <= 30
    assert 28 <= door._delay(0, wait) <= 30 * 1.1
    assert door._delay(0, retry_after_seconds("2")) >= 2.0
    assert door._delay(3, None) <= 0.008  # full jitter below backoff * 2**attempt


def test_the_client_is_built_again_in_a_forked_process():
    import os

    door = ZeroShotHTTPBackend("http://127.0.0.1:9/none")
    first = door._http()
    assert door._http() is first
    door._runtime()["pid"] = -1  # as a child process finds the state it inherited
    assert door._http() is not first and door._runtime()["pid"] == os.getpid()
    assert door.n_calls_ == 0
