"""Bounded resources: what a key may make the server hold (images, answers, work, headers, turns)."""

import asyncio
import base64
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from servekit import DIM, N_CTX, auth, noise_image, offsets_array, thread_server, upload  # noqa: E402

from skcarrot import HTTPBackend  # noqa: E402
from skcarrot.backends import ToyBackend  # noqa: E402
from skcarrot.serve import Settings, create_app  # noqa: E402
from skcarrot.serve import scorer as scorer_module  # noqa: E402
from skcarrot.serve.db import Database  # noqa: E402
from skcarrot.serve.errors import ApiError  # noqa: E402
from skcarrot.serve.image_store import ImageStore  # noqa: E402
from skcarrot.serve.ledger import Ledger  # noqa: E402
from skcarrot.wire import png_base64  # noqa: E402


def _app(tmp_path, **limits):
    return create_app(Settings(db_url=f"sqlite:///{tmp_path / 'ledger.db'}", **limits))


def _large(seed, size=1024):
    """A large image that compresses well (so it fits in a small request): a gradient, tinted by ``seed``."""
    ramp = np.linspace(0, 255, size, dtype=np.float64)
    pixels = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)), np.full((size, size), seed)], -1)
    return Image.fromarray(pixels.astype(np.uint8))


def _usage(client, key):
    return client.get("/v1/usage", headers=auth(key)).json()


def test_large_images_are_kept_at_the_model_input_size_with_the_same_logits(tmp_path):
    app = _app(tmp_path)
    _, key = app.state.server.ledger.create_key("big", budget=10)
    big = _large(7)
    with TestClient(app) as client:
        ids = upload(client, key, big)
        usage = _usage(client, key)
        # the embedded model reads 32 x 32 pixels: that is what is kept, on disk and in memory
        assert usage["image_bytes"] < 32 * 32 * 3 + 1024
        assert app.state.server.images.cached_bytes == 32 * 32 * 3
        r = client.post("/v1/score", headers=auth(key), json={
            "image_ids": ids, "class_names": ["one", "two"], "offsets": offsets_array(2, 0.01), "encoding": "json"})
        assert r.status_code == 200, r.text
    direct = app.state.server.scorer.backend.logits([big], ["one", "two"], np.full((2, N_CTX, DIM), 0.01, np.float32))
    np.testing.assert_allclose(np.asarray(r.json()["logits"]), direct, rtol=1e-6, atol=1e-6)


def test_uploads_past_the_key_quota_are_refused_naming_the_limit(tmp_path):
    app = _app(tmp_path, max_image_bytes_per_key=6_000)
    _, key = app.state.server.ledger.create_key("quota", budget=10)
    with TestClient(app) as client:
        upload(client, key, noise_image(1, 24), noise_image(2, 24))  # about 1.8 KB each
        before = _usage(client, key)["image_bytes"]
        r = client.post("/v1/images", headers=auth(key),
                        json={"images": [png_base64(noise_image(s, 24)) for s in range(3, 7)]})
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["type"] == "value_error.image_quota"
        assert "max_image_bytes_per_key" in r.json()["detail"][0]["msg"]
        assert _usage(client, key)["image_bytes"] == before  # all or nothing
        assert client.get("/v1/info", headers=auth(key)).json()["limits"]["max_image_bytes_per_key"] == 6_000


def test_images_expire_after_their_retention(tmp_path):
    app = _app(tmp_path, image_ttl_s=1.0)
    _, key = app.state.server.ledger.create_key("brief", budget=10)
    payload = {"class_names": ["one", "two"], "offsets": offsets_array(1)}
    with TestClient(app) as client:
        ids = upload(client, key, noise_image(3))
        assert client.post("/v1/score", headers=auth(key), json={"image_ids": ids, **payload}).status_code == 200
        time.sleep(1.2)
        r = client.post("/v1/score", headers=auth(key), json={"image_ids": ids, **payload})
        assert r.status_code == 422 and r.json()["detail"][0]["type"] == "value_error.unknown_image"
        assert client.post("/v1/images/missing", json={"ids": ids}, headers=auth(key)).json()["missing"] == ids
        app.state.server.images.prune()
        assert _usage(client, key)["image_bytes"] == 0


def test_a_key_with_no_budget_left_cannot_upload(tmp_path):
    app = _app(tmp_path)
    _, key = app.state.server.ledger.create_key("broke", budget=0)
    with TestClient(app) as client:
        r = client.post("/v1/images", headers=auth(key), json={"images": [png_base64(_large(1, 2048))]})
        assert r.status_code == 402 and r.json()["remaining"] == 0
        assert _usage(client, key)["image_bytes"] == 0 and len(app.state.server.images) == 0


def test_the_image_cache_is_bounded_in_bytes_per_key_and_in_total(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'ledger.db'}")
    one = 8 * 8 * 3
    store = ImageStore(db, decode=lambda raw: Image.open(io.BytesIO(raw)).convert("RGB"),
                       cache_bytes=3 * one, cache_bytes_per_key=2 * one)
    for key_id in (1, 2):
        for seed in range(5):
            store.remember(key_id, f"{seed:064d}", noise_image(seed))
            assert store.cached_bytes <= 3 * one
    assert store.cached_bytes == 3 * one and len(store) == 3
    assert sum(1 for (k, _) in store._images if k == 2) == 2  # at most two of one key's


def test_work_per_request_is_capped_published_and_split_by_the_client(tmp_path):
    app = _app(tmp_path, max_logits_per_request=100)
    _, key = app.state.server.ledger.create_key("work", budget=100)
    images = [noise_image(s) for s in range(10)]
    names = [f"class {i}" for i in range(5)]
    with TestClient(app) as client:
        assert client.get("/v1/info", headers=auth(key)).json()["limits"]["max_logits_per_request"] == 100
        ids = upload(client, key, *images)
        r = client.post("/v1/score", headers=auth(key),
                        json={"image_ids": ids, "class_names": names, "offsets": offsets_array(3)})
        assert r.status_code == 422 and r.json()["detail"][0]["type"] == "value_error.too_much_work"
        assert "max_logits_per_request" in r.json()["detail"][0]["msg"] and _usage(client, key)["prompts_used"] == 0
    offsets = np.random.RandomState(0).normal(scale=0.05, size=(5, N_CTX, DIM)).astype(np.float32)
    with thread_server(app) as url:
        backend = HTTPBackend(url, api_key=key)
        out = backend.logits(images, names, offsets)  # 5 x 10 x 5 = 250 logits: three requests of two prompts
    np.testing.assert_allclose(out, app.state.server.scorer.backend.logits(images, names, offsets), atol=1e-5)
    assert backend.n_billed_ == 5 == app.state.server.ledger.find_key("work").prompts_used


def _answer_bytes(app, key):
    ledger = app.state.server.ledger
    return ledger.answers.stored_bytes(ledger.find_key(key).id)


def test_acknowledged_answers_are_dropped_and_a_retry_of_one_is_free(tmp_path):
    app = _app(tmp_path)
    ledger = app.state.server.ledger
    _, key = ledger.create_key("acks", budget=100)
    with TestClient(app) as client:
        ids = upload(client, key, noise_image(4))
        body = {"image_ids": ids, "class_names": ["one", "two"], "offsets": offsets_array(2, 0.02), "encoding": "json"}
        first = client.post("/v1/score", json=body, headers=auth(key, **{"Idempotency-Key": "a"}))
        assert _answer_bytes(app, "acks") == len(first.content)
        body_b = {**body, "offsets": offsets_array(1)}
        second = client.post("/v1/score", json=body_b,
                             headers=auth(key, **{"Idempotency-Key": "b", "Idempotency-Ack": "a"}))
        assert _answer_bytes(app, "acks") == len(second.content)  # a's answer is gone, b's is kept
        retry = client.post("/v1/score", json=body, headers=auth(key, **{"Idempotency-Key": "a"}))
        assert retry.status_code == 200
        assert retry.json()["logits"] == first.json()["logits"]
        assert _usage(client, key)["prompts_used"] == 3  # the retry was not charged


def test_stored_answers_are_capped_per_key_and_expire(tmp_path):
    app = _app(tmp_path, max_answer_bytes_per_key=3_000, answer_ttl_s=3600)
    ledger = app.state.server.ledger
    _, key = ledger.create_key("capped", budget=1000)
    with TestClient(app) as client:
        ids = upload(client, key, noise_image(5))
        sizes = []
        for i in range(6):
            body = {"image_ids": ids, "class_names": ["one", "two"], "offsets": offsets_array(2, 0.01 * i),
                    "encoding": "json"}
            r = client.post("/v1/score", json=body, headers=auth(key, **{"Idempotency-Key": f"k{i}"}))
            sizes.append(len(r.content))
            assert _answer_bytes(app, "capped") <= 3_000
        assert _answer_bytes(app, "capped") >= sizes[-1]  # the newest stays
        body = {"image_ids": ids, "class_names": ["one", "two"], "offsets": offsets_array(2, 0.0), "encoding": "json"}
        again = client.post("/v1/score", json=body, headers=auth(key, **{"Idempotency-Key": "k0"}))
        assert again.status_code == 200 and _usage(client, key)["prompts_used"] == 12  # dropped, yet free
        ledger.answers.prune(now=time.time() + 3601)
        assert _answer_bytes(app, "capped") == 0


def test_httpbackend_acknowledges_its_answers_so_at_most_the_last_is_stored(tmp_path):
    app = _app(tmp_path)
    _, key = app.state.server.ledger.create_key("client", budget=10_000)
    images = [noise_image(s) for s in range(16)]
    offsets = np.zeros((10, N_CTX, DIM), np.float32)
    with thread_server(app) as url:
        backend = HTTPBackend(url, api_key=key)
        for i in range(8):
            backend.logits(images, ["one", "two", "three"], offsets + 0.01 * i)
    one_answer = len(base64.b64encode(np.zeros(10 * 16 * 3, np.float32).tobytes())) + 300
    assert 0 < _answer_bytes(app, "client") <= one_answer


def test_answers_wait_in_memory_and_only_those_not_acknowledged_in_time_are_written(tmp_path):
    app = _app(tmp_path, answer_hold_s=0.3)
    ledger = app.state.server.ledger
    key_id, key = ledger.create_key("held", budget=100)
    answers = ledger.answers

    def written():
        return answers.stored_bytes(key_id) - answers.held_bytes(key_id)

    with TestClient(app) as client:
        ids = upload(client, key, noise_image(7))
        body = {"image_ids": ids, "class_names": ["one", "two"], "offsets": offsets_array(2, 0.02), "encoding": "json"}
        first = client.post("/v1/score", json=body, headers=auth(key, **{"Idempotency-Key": "a"}))
        assert answers.held_bytes(key_id) == len(first.content) and written() == 0
        replay = client.post("/v1/score", json=body, headers=auth(key, **{"Idempotency-Key": "a"}))
        assert replay.content == first.content and replay.headers["Idempotent-Replayed"] == "true"
        body_b = {**body, "offsets": offsets_array(1)}
        acked = auth(key, **{"Idempotency-Key": "b", "Idempotency-Ack": "a"})
        second = client.post("/v1/score", json=body_b, headers=acked)
        assert answers.held_bytes(key_id) == len(second.content) and written() == 0  # a's never reached the ledger
        deadline = time.monotonic() + 10
        while answers.held_bytes(key_id) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert answers.held_bytes(key_id) == 0 and written() == len(second.content)  # not acknowledged in time
        third = client.post("/v1/score", json=body, headers=auth(key, **{"Idempotency-Key": "c"}))
        assert _usage(client, key)["prompts_used"] == 5
    # the server stopped: what it held is written down, and a new one replays it
    with TestClient(_app(tmp_path)) as restarted:
        again = restarted.post("/v1/score", json=body, headers=auth(key, **{"Idempotency-Key": "c"}))
        assert again.content == third.content and again.headers["Idempotent-Replayed"] == "true"
        assert _usage(restarted, key)["prompts_used"] == 5


def test_oversized_headers_are_refused_with_431(tmp_path):
    app = _app(tmp_path, max_header_bytes=4096)
    with TestClient(app) as client:
        r = client.get("/v1/info", headers={"Authorization": "Bearer " + "x" * 100_000})
        assert r.status_code == 431 and r.json()["max_header_bytes"] == 4096
        assert client.get("/v1/health").status_code == 200
    from skcarrot.tools.cli import uvicorn_limits

    assert uvicorn_limits(Settings(db_url="sqlite://"))["h11_max_incomplete_event_size"] < 64 * 1024


def test_a_small_request_waits_for_one_piece_of_a_large_one_not_all_of_it(monkeypatch):
    calls = []

    class Slow(ToyBackend):
        def logits(self, images, class_names, offsets):
            calls.append(len(offsets))
            time.sleep(0.05)
            return super().logits(images, class_names, offsets)

    monkeypatch.setattr(scorer_module, "_LOGITS_PER_CALL", 100)
    scorer = scorer_module.Scorer(backend=Slow())
    images, names = [noise_image(0)], [f"c{i}" for i in range(10)]
    large = threading.Thread(target=scorer.score, args=(images, names, np.zeros((80, 2, 8))))
    large.start()
    while not calls:
        time.sleep(0.005)
    start = time.perf_counter()
    small = scorer.score(images, names, np.zeros((1, 2, 8)))
    waited = time.perf_counter() - start
    large.join()
    assert small.shape == (1, 1, 10)
    assert calls.count(10) == 8 and calls.index(1) <= 2  # in turn, between two pieces of the large one
    assert waited < 0.5


def test_one_key_holds_a_bounded_number_of_turns():
    from skcarrot.serve.concurrency import KeySlots

    slots = KeySlots(per_key=1, max_waiting=1)

    async def scenario():
        entered = asyncio.Event()
        release = asyncio.Event()

        async def hold():
            async with slots.hold(7):
                entered.set()
                await release.wait()

        first = asyncio.create_task(hold())
        await entered.wait()
        second = asyncio.create_task(hold())  # waits its turn
        await asyncio.sleep(0.01)
        with pytest.raises(ApiError) as refused:
            async with slots.hold(7):
                pass
        async with slots.hold(8):  # another key is not held up
            pass
        release.set()
        await asyncio.gather(first, second)
        return refused.value

    refused = asyncio.run(scenario())
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert slots._keys == {}


def test_a_ledger_of_an_earlier_version_is_migrated(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE skcarrot_keys (id INTEGER PRIMARY KEY AUTOINCREMENT, name VARCHAR(200) NOT NULL UNIQUE,
            key_hash VARCHAR(64) NOT NULL UNIQUE, budget BIGINT NOT NULL, rate_limit BIGINT, prompts_used BIGINT
            NOT NULL, images_used BIGINT NOT NULL, requests BIGINT NOT NULL, window_start FLOAT NOT NULL,
            window_used BIGINT NOT NULL, revoked BOOLEAN NOT NULL, created_at FLOAT NOT NULL);
        CREATE TABLE skcarrot_requests (key_id INTEGER NOT NULL, idempotency_key VARCHAR(200) NOT NULL,
            fingerprint VARCHAR(64) NOT NULL, done BOOLEAN NOT NULL, n_prompts BIGINT NOT NULL, n_images BIGINT
            NOT NULL, response BLOB, created_at FLOAT NOT NULL, PRIMARY KEY (key_id, idempotency_key));
        CREATE TABLE skcarrot_images (key_id INTEGER NOT NULL, image_id VARCHAR(64) NOT NULL, png BLOB NOT NULL,
            created_at FLOAT NOT NULL, PRIMARY KEY (key_id, image_id));
        INSERT INTO skcarrot_keys VALUES (1, 'old', 'h', 10, NULL, 0, 0, 0, 0, 0, 0, 0);
        INSERT INTO skcarrot_images VALUES (1, 'a', x'0102030405', 1e12);
        INSERT INTO skcarrot_requests VALUES (1, 'r', 'f', 1, 1, 1, x'7b7d', 1e12);
    """)
    conn.commit()
    conn.close()
    ledger = Ledger(f"sqlite:///{path}")
    assert ledger.find_key("old").image_bytes == 5
    assert ledger.answers.stored_bytes(1) == 2
    ledger.dispose()
