"""Honest metering: prices that packing cannot lower, refusals that are not retried, charges made once."""

import base64
import threading
import time

import numpy as np
import pytest
import sqlalchemy as sa

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from servekit import DIM, N_CTX, auth, noise_image, offsets_array, score, sqlite_app, thread_server, upload  # noqa: E402

from skcarrot import HTTPBackend  # noqa: E402
from skcarrot.backends import ToyBackend, ZeroShotHTTPBackend  # noqa: E402
from skcarrot.exceptions import RemoteBackendError, RemoteUnavailableError, RemoteValidationError  # noqa: E402
from skcarrot.serve import Settings, create_app  # noqa: E402


def _app(tmp_path, **settings):
    return create_app(Settings(db_url=f"sqlite:///{tmp_path / 'ledger.db'}", **settings))


def _used(client, key):
    return client.get("/v1/usage", headers=auth(key)).json()["prompts_used"]


def test_the_text_price_depends_on_the_strings_scored_never_on_their_packing(tmp_path):
    app = _app(tmp_path)
    ledger = app.state.server.ledger
    strings = [f"a photo of the number {i}." for i in range(400)]
    packings = {
        "forty-sets-of-ten": [[strings[10 * p : 10 * p + 10] for p in range(40)]],
        "one-set-of-four-hundred": [[strings]],
        "two-requests-of-two-hundred": [[strings[:200]], [strings[200:]]],
    }
    logits = {}
    with TestClient(app) as client:
        for name, requests in packings.items():
            key = ledger.create_key(name, budget=1000)[1]
            ids = upload(client, key, noise_image(1), noise_image(2))
            parts = []
            for prompts in requests:
                r = client.post("/v1/score-text", json={"image_ids": ids, "prompts": prompts, "encoding": "json"},
                                headers=auth(key))
                assert r.status_code == 200, r.text
                parts.append(np.asarray(r.json()["logits"]).transpose(1, 0, 2).reshape(2, -1))
            logits[name] = np.concatenate(parts, axis=1)  # (images, strings), whatever the packing
            assert _used(client, key) == 400
    for name in packings:
        np.testing.assert_allclose(logits[name], logits["one-set-of-four-hundred"], atol=1e-5)


@pytest.mark.parametrize("dtype, value", [("float32", 1e20), ("float64", 1e300), ("json", 1e300)])
def test_huge_finite_offsets_are_refused_naming_the_field(tmp_path, dtype, value):
    app = _app(tmp_path)
    _, key = app.state.server.ledger.create_key("huge", budget=10)
    with TestClient(app) as client:
        ids = upload(client, key, noise_image(3))
        if dtype == "json":
            offsets = np.zeros((1, N_CTX, DIM))
            offsets[0, 2, 5] = value
            offsets = offsets.tolist()
        else:
            offsets = offsets_array(1, dtype=dtype)
            arr = np.zeros((1, N_CTX, DIM), "<f4" if dtype == "float32" else "<f8")
            arr[0, 2, 5] = value
            offsets["data"] = base64.b64encode(arr.tobytes()).decode()
        r = client.post("/v1/score", headers=auth(key),
                        json={"image_ids": ids, "class_names": ["a", "b"], "offsets": offsets})
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == ["body", "offsets"]
        assert r.json()["detail"][0]["type"] == "value_error.offset_too_large"
        assert _used(client, key) == 0


def test_a_model_failure_that_would_repeat_is_refused_once_and_never_retried(tmp_path):
    class Overflowing(ToyBackend):
        def logits(self, images, class_names, offsets):
            out = super().logits(images, class_names, offsets)
            if "overflow" in class_names:
                out[...] = np.nan
            if "crash" in class_names:
                raise RuntimeError("boom")
            return out

    app = _app(tmp_path, backend=Overflowing())
    _, key = app.state.server.ledger.create_key("failing", budget=10)
    images = [noise_image(4)]
    with thread_server(app) as url:
        backend = HTTPBackend(url, api_key=key, max_retries=5, backoff=5.0)
        with pytest.raises(RemoteValidationError, match="not finite") as refused:
            backend.logits(images, ["a", "overflow"], np.zeros((2, 2, 8), np.float32))
        assert refused.value.detail[0]["type"] == "value_error.model_output"
        calls = backend.n_calls_
        with pytest.raises(RemoteBackendError, match="model failed") as failed:
            backend.logits(images, ["a", "crash"], np.zeros((2, 2, 8), np.float32))
        assert not isinstance(failed.value, RemoteUnavailableError) and failed.value.status_code == 500
        assert backend.n_calls_ == calls + 1 and backend.n_retries_ == 0  # neither was retried
    assert app.state.server.ledger.find_key("failing").prompts_used == 0  # and neither was charged


def test_zero_shot_calls_carry_an_idempotency_key_so_a_timed_out_call_is_charged_once(tmp_path, monkeypatch):
    app = _app(tmp_path)
    scorer = app.state.server.scorer
    seen, lock = set(), threading.Lock()
    score_text = scorer.score_text

    def slow_the_first_time(images, prompts):
        key = (tuple(prompts[0]), images[0].tobytes())
        with lock:
            first = key not in seen
            seen.add(key)
        if first:
            time.sleep(0.8)  # longer than the client waits
        return score_text(images, prompts)

    monkeypatch.setattr(scorer, "score_text", slow_the_first_time)
    _, key = app.state.server.ledger.create_key("zero-shot", budget=100)
    monkeypatch.setenv("ZS_KEY", key)
    images = [noise_image(5), noise_image(6)]
    prompts = [["a photo of a one.", "a photo of a two."], ["a one.", "a two."]]
    with thread_server(app) as url:
        door = ZeroShotHTTPBackend(f"{url}/v1/zero-shot-image-classification", token_env="ZS_KEY",
                                   timeout=0.3, max_retries=8, backoff=0.2, max_concurrency=2)
        probabilities = door.text_scores(images, prompts)
    assert probabilities.shape == (2, 2, 2) and door.n_retries_ > 0
    assert app.state.server.ledger.find_key("zero-shot").prompts_used == 4  # one per call answered


def test_a_resumed_run_repeats_its_idempotency_keys_and_is_charged_once(tmp_path):
    app = _app(tmp_path)
    ledger = app.state.server.ledger
    _, key = ledger.create_key("resumed", budget=1000)
    images = [noise_image(s) for s in range(6)]
    names = ["one", "two", "three"]
    generations = [np.full((4, N_CTX, DIM), 0.01 * g, np.float32) for g in range(5)]
    with thread_server(app) as url:
        queries = {"n": 0}  # where the run stands: its query count, as a checkpoint restores it

        def run(backend, start):
            queries["n"] = 4 * start
            out = []
            with backend.idempotency_scope("fit-3f2a", position=lambda: queries["n"]):
                for offsets in generations[start:]:
                    out.append(backend.logits(images, names, offsets))
                    queries["n"] += len(offsets)
            return out

        first = run(HTTPBackend(url, api_key=key), 0)
        assert ledger.find_key("resumed").prompts_used == 20
        # another process resumes from the checkpoint of generation 2: same keys, same bodies
        resumed = run(HTTPBackend(url, api_key=key), 2)
        assert ledger.find_key("resumed").prompts_used == 20
        for a, b in zip(first[2:], resumed):
            np.testing.assert_array_equal(a, b)
        # a repeated key with another body (a run that did not repeat itself) is sent anew, and charged
        backend = HTTPBackend(url, api_key=key)
        queries["n"] = 0
        with backend.idempotency_scope("fit-3f2a", position=lambda: queries["n"]):
            backend.logits(images, names, generations[1])
        assert ledger.find_key("resumed").prompts_used == 24


def _break_the_database(app, monkeypatch, tmp_path):
    """Point the app's database at a file that cannot be opened: as unreachable as a database gets."""
    db = app.state.server.db
    broken = sa.create_engine(f"sqlite:///{tmp_path / 'no-such-folder' / 'ledger.db'}")
    working = db.engine
    monkeypatch.setattr(db, "engine", broken)
    return lambda: setattr(db, "engine", working)


def test_an_unreachable_database_is_503_with_retry_after_and_the_client_waits_through_it(tmp_path, monkeypatch):
    app = _app(tmp_path)
    ledger = app.state.server.ledger
    _, key = ledger.create_key("patient", budget=100)
    with thread_server(app) as url:
        backend = HTTPBackend(url, api_key=key, max_retries=6, backoff=0.1)
        images = [noise_image(7)]
        backend.logits(images, ["a", "b"], np.zeros((2, N_CTX, DIM), np.float32))  # key and images known
        repair = _break_the_database(app, monkeypatch, tmp_path)
        import httpx

        r = httpx.post(f"{url}/v1/score", headers=auth(key), json={
            "image_ids": backend._content_ids(images), "class_names": ["a", "b"], "offsets": offsets_array(1)})
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        assert "nothing was charged" in r.json()["detail"]
        timer = threading.Timer(1.0, repair)
        timer.start()
        out = backend.logits(images, ["a", "b"], np.zeros((3, N_CTX, DIM), np.float32))  # waits, then succeeds
        timer.join()
    assert out.shape == (3, 1, 2) and backend.n_retries_ >= 1
    assert ledger.find_key("patient").prompts_used == 5


def test_a_full_disk_is_503_with_retry_after_and_nothing_charged(tmp_path):
    app = _app(tmp_path)
    ledger = app.state.server.ledger
    _, key = ledger.create_key("full", budget=100)
    engine = app.state.server.db.engine
    limit = {"pages": None}

    @sa.event.listens_for(engine, "connect")
    def _limit(dbapi_connection, _record):
        if limit["pages"] is not None:
            dbapi_connection.execute(f"PRAGMA max_page_count = {limit['pages']}")

    with TestClient(app) as client:
        with engine.connect() as conn:
            limit["pages"] = conn.exec_driver_sql("PRAGMA page_count").scalar() + 1
        engine.dispose()
        big = [noise_image(s, 64) for s in range(8)]  # far more than one page
        from skcarrot.wire import png_base64

        r = client.post("/v1/images", headers=auth(key), json={"images": [png_base64(img) for img in big]})
        assert r.status_code == 503 and "Retry-After" in r.headers, r.text
        limit["pages"] = None
        engine.dispose()
        assert client.post("/v1/images", headers=auth(key),
                           json={"images": [png_base64(img) for img in big]}).status_code == 200
        assert _used(client, key) == 0


def test_idempotency_scope_keys_are_deterministic_short_and_printable():
    backend = HTTPBackend("http://127.0.0.1:9", api_key="skc_x")
    position = {"n": 40}
    with backend.idempotency_scope("fit-" + "ab" * 40, position=lambda: position["n"]):
        first, second = backend._next_key(), backend._next_key()
        position["n"] = 80
        third = backend._next_key()
    assert (first.rsplit(".", 2)[1:], second.rsplit(".", 2)[1:], third.rsplit(".", 2)[1:]) == (
        ["40", "0"], ["40", "1"], ["80", "0"])
    assert len(first) <= 200 and first.isascii()
    assert backend._next_key() != backend._next_key()  # outside a scope: random


def test_class_names_past_a_query_s_hundred_are_priced(tmp_path):
    with sqlite_app(tmp_path) as (app, client, _):
        _, key = app.state.server.ledger.create_key("names", budget=7)
        ids = upload(client, key, noise_image(0))
        few = score(client, key, ids, p=2, class_names=[f"c{i}" for i in range(100)])
        many = score(client, key, ids, p=2, class_names=[f"c{i}" for i in range(101)])
        assert (few.status_code, few.json()["queries"]) == (200, 2)
        assert (many.status_code, many.json()["queries"]) == (200, 4)  # 101 classes: two queries an offset
        # 1 query left: 2 offsets on 150 classes need 4, refused before the model runs, nothing charged
        refused = score(client, key, ids, p=2, class_names=[f"c{i}" for i in range(150)])
        assert refused.status_code == 402 and refused.json()["requested"] == 4
        assert app.state.server.ledger.find_key("names").prompts_used == 6


def test_a_key_holds_at_most_its_limit_of_slots_across_workers():
    from skcarrot.serve.concurrency import per_worker_slots

    for limit in range(1, 9):
        for workers in range(1, 9):
            share = per_worker_slots(limit, workers)
            assert share >= 1 and workers * share <= max(limit, workers)
