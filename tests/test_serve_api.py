"""The server's contract, in process: auth, charging, idempotency, limits and 4xx, never 5xx."""

import base64
import io
import json
import threading

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from skcarrot.wire import png_base64 as _png_base64, image_content_id  # noqa: E402
from skcarrot.serve import Settings, create_app  # noqa: E402
from skcarrot.serve.ledger import Ledger, hash_key  # noqa: E402

N_CTX, DIM = 4, 64  # the embedded model's context shape


def _image(seed=0, size=8):
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8))


def _offsets(p, value=0.0):
    arr = np.full((p, N_CTX, DIM), value, dtype="<f4")
    return {"shape": list(arr.shape), "dtype": "float32", "data": base64.b64encode(arr.tobytes()).decode()}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    db = tmp_path_factory.mktemp("ledger") / "ledger.db"
    settings = Settings(db_url=f"sqlite:///{db}", max_body_bytes=2_000_000, max_classes=50,
                        max_image_pixels=512 * 512, rate_window_s=30.0)
    app = create_app(settings)
    with TestClient(app) as client:
        yield app, client, str(db)


@pytest.fixture
def key(served, request):
    app, _, _ = served
    _, key = app.state.server.ledger.create_key(request.node.name[:150], budget=1000)
    return key


def _auth(key, **extra):
    return {"Authorization": f"Bearer {key}", **extra}


def _upload(client, key, *images):
    r = client.post("/v1/images", json={"images": [_png_base64(img) for img in images]}, headers=_auth(key))
    assert r.status_code == 200, r.text
    return r.json()["ids"]


def _score(client, key, ids, p=2, names=("one", "two"), idem=None, **body):
    headers = _auth(key, **({"Idempotency-Key": idem} if idem else {}))
    payload = {"image_ids": ids, "class_names": list(names), "offsets": _offsets(p), **body}
    return client.post("/v1/score", json=payload, headers=headers)


def _loc_of(response):
    return [tuple(d["loc"]) for d in response.json()["detail"]]


def test_upload_returns_pixel_content_ids(served, key):
    _, client, _ = served
    img = _image(1)
    ids = _upload(client, key, img, img.convert("L").convert("RGB"))
    assert ids[0] == image_content_id(img)
    r = client.post("/v1/images/missing", json={"ids": [ids[0], "0" * 64]}, headers=_auth(key))
    assert r.json() == {"missing": ["0" * 64]}


def test_score_returns_logits_and_charges_one_query_per_prompt(served, key):
    app, client, _ = served
    ids = _upload(client, key, _image(2), _image(3))
    r = _score(client, key, ids, p=3, names=("one", "two", "three"))
    assert r.status_code == 200, r.text
    body = r.json()
    logits = np.frombuffer(base64.b64decode(body["logits"]["data"]), "<f4").reshape(body["logits"]["shape"])
    assert logits.shape == (3, 2, 3)
    assert (body["queries"], body["images"], body["remaining"]) == (3, 2, 997)
    direct = app.state.server.scorer.backend.logits([_image(2), _image(3)], ["one", "two", "three"],
                                                   np.zeros((3, N_CTX, DIM), np.float32))
    np.testing.assert_allclose(logits, direct, rtol=1e-5, atol=1e-5)
    usage = client.get("/v1/usage", headers=_auth(key)).json()
    assert (usage["prompts_used"], usage["images_used"], usage["requests"]) == (3, 2, 1)


def test_json_offsets_and_json_logits_agree_with_base64(served, key):
    _, client, _ = served
    ids = _upload(client, key, _image(4))
    raw = _score(client, key, ids).json()["logits"]
    as_json = _score(client, key, ids, offsets=np.zeros((2, N_CTX, DIM)).tolist(), encoding="json").json()["logits"]
    np.testing.assert_array_equal(
        np.frombuffer(base64.b64decode(raw["data"]), "<f4").reshape(raw["shape"]), np.asarray(as_json)
    )


def test_unknown_or_missing_key_is_401_and_never_charged(served, key):
    _, client, _ = served
    r = client.get("/v1/usage")
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    r = client.post("/v1/score", json={}, headers=_auth("skc_wrong"))
    assert r.status_code == 401
    assert "skc_wrong" not in r.text


def test_over_budget_is_402_with_the_remaining_budget(served):
    app, client, _ = served
    _, key = app.state.server.ledger.create_key("small", budget=5)
    ids = _upload(client, key, _image(5))
    assert _score(client, key, ids, p=4).status_code == 200
    r = _score(client, key, ids, p=2)
    assert r.status_code == 402
    assert (r.json()["remaining"], r.json()["requested"], r.json()["budget"]) == (1, 2, 5)
    assert client.get("/v1/usage", headers=_auth(key)).json()["prompts_used"] == 4


def test_rate_limit_is_429_with_retry_after(served):
    app, client, _ = served
    _, key = app.state.server.ledger.create_key("rated", budget=100, rate_limit=3)
    ids = _upload(client, key, _image(6))
    assert _score(client, key, ids, p=3).status_code == 200
    r = _score(client, key, ids, p=1)
    assert r.status_code == 429
    assert 1 <= int(r.headers["Retry-After"]) <= 30
    assert _score(client, key, ids, p=4).status_code == 422  # could never pass: not worth a retry
    assert client.get("/v1/usage", headers=_auth(key)).json()["prompts_used"] == 3


def test_idempotent_retry_is_answered_from_the_ledger_and_charged_once(served, key):
    app, client, db = served
    ids = _upload(client, key, _image(7))
    first = _score(client, key, ids, p=2, idem="req-1")
    again = _score(client, key, ids, p=2, idem="req-1")
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.content == first.content
    # also after a restart: a new application on the same ledger file
    with TestClient(create_app(Settings(db_url=f"sqlite:///{db}"))) as restarted:
        after = _score(restarted, key, ids, p=2, idem="req-1")
    assert after.content == first.content
    assert client.get("/v1/usage", headers=_auth(key)).json()["prompts_used"] == 2


def test_reused_idempotency_key_with_another_body_is_422(served, key):
    _, client, _ = served
    ids = _upload(client, key, _image(8))
    assert _score(client, key, ids, p=1, idem="same").status_code == 200
    r = _score(client, key, ids, p=2, idem="same")
    assert r.status_code == 422 and _loc_of(r) == [("header", "Idempotency-Key")]


def test_an_attempt_charged_but_never_answered_is_rerun_without_a_second_charge(served, key):
    app, client, _ = served
    ids = _upload(client, key, _image(9))
    body = {"image_ids": ids, "class_names": ["one", "two"], "offsets": _offsets(2)}
    raw = json.dumps(body).encode()
    from skcarrot.serve.idempotency import fingerprint

    ledger = app.state.server.ledger
    key_id = ledger.authenticate(key).id
    # what a server killed between charge and answer leaves behind
    ledger.begin_charge(key_id, 2, 1, "killed", fingerprint("/v1/score", raw))
    r = client.post("/v1/score", content=raw, headers=_auth(key, **{"Idempotency-Key": "killed",
                                                                      "Content-Type": "application/json"}))
    assert r.status_code == 200
    assert client.get("/v1/usage", headers=_auth(key)).json()["prompts_used"] == 2


@pytest.mark.parametrize(
    "change, loc",
    [
        (dict(offsets={"shape": [2, 3, DIM], "dtype": "float32", "data": ""}), ("body", "offsets", "data")),
        (dict(offsets=np.zeros((2, N_CTX + 1, DIM)).tolist()), ("body", "offsets")),
        (dict(offsets=[[[1.0, 2.0], [3.0]]]), ("body", "offsets")),
        (dict(offsets={"shape": [1, N_CTX, DIM], "dtype": "float32", "data": "!!"}), ("body", "offsets", "data")),
        (dict(image_ids=["f" * 64]), ("body", "image_ids", 0)),
        (dict(image_ids=["not-a-sha"]), ("body", "image_ids", 0)),
        (dict(class_names=[f"c{i}" for i in range(51)]), ("body", "class_names")),
        (dict(class_names=["x" * 201]), ("body", "class_names", 0)),
        (dict(encoding="pickle"), ("body", "encoding")),
    ],
    ids=["data-length", "wrong-shape", "ragged", "bad-base64", "unknown-image", "bad-id", "too-many-classes",
         "long-name", "pickle"],
)
def test_bad_score_requests_are_422_naming_the_field(served, key, change, loc):
    _, client, _ = served
    ids = _upload(client, key, _image(10))
    payload = {"image_ids": ids, "class_names": ["one", "two"], "offsets": _offsets(2), **change}
    r = client.post("/v1/score", json=payload, headers=_auth(key))
    assert r.status_code == 422, r.text
    assert loc in _loc_of(r) or any(l[: len(loc)] == loc for l in _loc_of(r)), r.text
    assert client.get("/v1/usage", headers=_auth(key)).json()["prompts_used"] == 0


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_offsets_are_422(served, key, bad):
    _, client, _ = served
    ids = _upload(client, key, _image(11))
    arr = np.zeros((1, N_CTX, DIM), "<f4")
    arr[0, 1, 2] = float(bad)
    raw = {"shape": [1, N_CTX, DIM], "dtype": "float32", "data": base64.b64encode(arr.tobytes()).decode()}
    assert _loc_of(_score(client, key, ids, offsets=raw)) == [("body", "offsets")]
    text = json.dumps({"image_ids": ids, "class_names": ["a", "b"], "offsets": arr.tolist()})  # NaN tokens
    r = client.post("/v1/score", content=text, headers=_auth(key, **{"Content-Type": "application/json"}))
    assert r.status_code == 422 and "finite" in r.text


def test_undecodable_images_and_decompression_bombs_are_422(served, key):
    _, client, _ = served
    bomb = io.BytesIO()
    Image.new("L", (4000, 4000)).save(bomb, format="PNG")  # 16 Mpx: tiny file, huge image
    cases = {
        "garbage": base64.b64encode(b"not an image at all").decode(),
        "truncated": _png_base64(_image(12))[:60],
        "bomb": base64.b64encode(bomb.getvalue()).decode(),
        "not-base64": "%%%%",
    }
    for name, encoded in cases.items():
        r = client.post("/v1/images", json={"images": [_png_base64(_image(13)), encoded]}, headers=_auth(key))
        assert r.status_code == 422, (name, r.text)
        assert _loc_of(r) == [("body", "images", 1)], name
        if name == "bomb":
            assert r.json()["detail"][0]["type"] == "value_error.decompression_bomb"
    # all or nothing: the good first image of each refused request was not kept
    missing = client.post("/v1/images/missing", json={"ids": [image_content_id(_image(13))]}, headers=_auth(key))
    assert missing.json()["missing"] == [image_content_id(_image(13))]


def test_payload_too_large_is_413(served, key):
    _, client, _ = served
    r = client.post("/v1/images", content=b"{" + b" " * 2_100_000 + b"}",
                    headers=_auth(key, **{"Content-Type": "application/json"}))
    assert r.status_code == 413 and r.json()["max_body_bytes"] == 2_000_000


def test_zero_shot_contract_returns_sorted_probabilities(served, key):
    _, client, _ = served
    labels = ["zero", "one", "two"]
    r = client.post("/v1/zero-shot-image-classification", headers=_auth(key),
                    json={"inputs": _png_base64(_image(14)), "parameters": {"candidate_labels": labels}})
    assert r.status_code == 200, r.text
    out = r.json()
    assert sorted(d["label"] for d in out) == sorted(labels)
    scores = [d["score"] for d in out]
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-6
    r = client.post("/v1/zero-shot-image-classification", headers=_auth(key),
                    json={"inputs": _png_base64(_image(14)),
                          "parameters": {"candidate_labels": labels, "hypothesis_template": "no slot"}})
    assert _loc_of(r) == [("body", "parameters", "hypothesis_template")]


def test_score_text_charges_one_query_per_string_scored(served, key):
    app, client, _ = served
    ids = _upload(client, key, _image(15), _image(16), _image(17))
    prompts = [["a photo of a one.", "a photo of a two."], ["a one.", "a two."]]
    r = client.post("/v1/score-text", json={"image_ids": ids, "prompts": prompts, "encoding": "json"},
                    headers=_auth(key))
    assert r.status_code == 200, r.text
    assert np.asarray(r.json()["logits"]).shape == (2, 3, 2) and r.json()["queries"] == 4
    r = client.post("/v1/score-text", json={"image_ids": ids, "prompts": [["a", "b"], ["c"]]}, headers=_auth(key))
    assert r.status_code == 422 and _loc_of(r) == [("body", "prompts", 1)]


def test_info_health_metrics_and_openapi(served, key):
    _, client, _ = served
    info = client.get("/v1/info", headers=_auth(key)).json()
    assert info["model"]["context_shape"] == [N_CTX, DIM]
    assert client.get("/v1/health").json() == {"status": "ok", "ledger": True, "model_loaded": True}
    assert "skcarrot_requests_total" in client.get("/metrics").text
    paths = client.get("/openapi.json").json()["paths"]
    for path in ["/v1/images", "/v1/images/missing", "/v1/score", "/v1/score-text",
                 "/v1/zero-shot-image-classification", "/v1/info", "/v1/usage", "/v1/health", "/metrics"]:
        assert path in paths


def test_the_ledger_keeps_only_a_hash_of_each_key(served, key):
    _, _, db = served
    data = open(db, "rb").read() + open(db + "-wal", "rb").read()
    assert key.encode() not in data and hash_key(key).encode() in data


def test_concurrent_charges_on_one_key_never_overspend(tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path / 'race.db'}")
    key_id, _ = ledger.create_key("race", budget=100)
    granted = []

    def spend():
        for _ in range(10):
            try:
                ledger.begin_charge(key_id, 3, 1)
                granted.append(3)
            except Exception:  # BudgetExceeded
                pass

    threads = [threading.Thread(target=spend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(granted) == 99 == ledger.usage(key_id).prompts_used


def test_any_backend_can_be_served_and_a_failing_model_is_refunded(tmp_path):
    from skcarrot.backends import ToyBackend

    class Broken(ToyBackend):
        def logits(self, images, class_names, offsets):
            if "boom" in class_names:
                raise RuntimeError("model crashed")
            return super().logits(images, class_names, offsets)

    app = create_app(Settings(db_url=f"sqlite:///{tmp_path / 'l.db'}", backend=Broken()))
    _, key = app.state.server.ledger.create_key("toy", budget=10)
    toy_offsets = {"shape": [1, 2, 8], "dtype": "float32", "data": base64.b64encode(bytes(64)).decode()}
    with TestClient(app) as client:
        ids = _upload(client, key, _image(20))
        ok = client.post("/v1/score", headers=_auth(key),
                         json={"image_ids": ids, "class_names": ["a", "b"], "offsets": toy_offsets})
        assert ok.status_code == 200 and ok.json()["model"] == "Broken"
        failed = client.post("/v1/score", headers=_auth(key),
                             json={"image_ids": ids, "class_names": ["a", "boom"], "offsets": toy_offsets})
        assert failed.status_code == 500 and "nothing was charged" in failed.text
        assert client.get("/v1/usage", headers=_auth(key)).json()["prompts_used"] == 1
        text = client.post("/v1/score-text", headers=_auth(key), json={"image_ids": ids, "prompts": [["a", "b"]]})
        assert text.status_code == 422


def test_keys_create_prints_the_key_once_and_the_ledger_keeps_its_hash(tmp_path, capsys):
    from skcarrot.tools.cli import main

    db = f"sqlite:///{tmp_path / 'keys.db'}"
    assert main(["keys", "create", "--name", "alice", "--budget", "500", "--rate-limit", "100", "--db", db]) == 0
    out = capsys.readouterr()
    key = out.out.strip()
    assert key.startswith("skc_") and key not in out.err
    record = Ledger(db).authenticate(key)
    assert (record.name, record.budget, record.rate_limit) == ("alice", 500, 100)
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("keys.db*"))  # the file and its WAL
    assert key.encode() not in stored and hash_key(key).encode() in stored
    assert main(["keys", "create", "--name", "alice", "--budget", "1", "--db", db]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["keys", "list", "--db", db]) == 0
    listing = capsys.readouterr().out
    assert "alice" in listing and key not in listing
    assert main(["serve", "--db", "mysql://nowhere/x"]) == 2
    assert "cannot open the ledger" in capsys.readouterr().err


def test_raw_answers_hold_the_json_answer_and_are_replayed_as_raw(served, key):
    from skcarrot.wire import RAW_MEDIA_TYPE, decode_array, decode_raw

    _, client, _ = served
    ids = _upload(client, key, _image(40), _image(41))
    as_json = _score(client, key, ids, p=3, idem="as-json")
    raw_headers = _auth(key, **{"Idempotency-Key": "as-raw", "Accept": f"{RAW_MEDIA_TYPE}, application/json;q=0.5"})
    body = {"image_ids": ids, "class_names": ["one", "two"], "offsets": _offsets(3)}
    raw = client.post("/v1/score", json=body, headers=raw_headers)
    assert raw.status_code == 200 and raw.headers["content-type"] == RAW_MEDIA_TYPE
    assert raw.headers["vary"] == "Accept"
    answer, expected = decode_raw(raw.content, "logits"), as_json.json()
    np.testing.assert_array_equal(answer["logits"], decode_array(expected["logits"]))
    assert (answer["queries"], answer["images"], answer["model"]) == (3, 2, expected["model"])
    again = client.post("/v1/score", json=body, headers=raw_headers)
    assert again.content == raw.content and again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["content-type"] == RAW_MEDIA_TYPE
    # the key answered raw once: asked again for JSON, it is another request
    assert _score(client, key, ids, p=3, idem="as-raw").status_code == 422
    # nested lists stay JSON, whatever the client accepts
    listed = client.post("/v1/score", json={**body, "encoding": "json"}, headers=_auth(key, Accept=RAW_MEDIA_TYPE))
    assert listed.headers["content-type"] == "application/json"
    assert client.get("/v1/usage", headers=_auth(key)).json()["prompts_used"] == 9


def test_images_sent_with_a_scoring_request_are_kept_and_scored(served, key):
    app, client, _ = served
    known, new = _image(42), _image(43)
    ids = _upload(client, key, known) + [image_content_id(new)]
    r = _score(client, key, ids, p=1, images=[_png_base64(new)])
    assert r.status_code == 200 and r.json()["images"] == 2
    assert _score(client, key, ids, p=1).status_code == 200  # kept: named by id from now on
    bad = _score(client, key, [image_content_id(_image(44))], p=1, images=["aGVsbG8="])
    assert bad.status_code == 422 and _loc_of(bad) == [("body", "images", 0)]
    missing = _score(client, key, [ids[0], image_content_id(_image(45))], p=1, images=[_png_base64(new)])
    assert missing.status_code == 422 and _loc_of(missing) == [("body", "image_ids", 1)]
    assert client.get("/v1/usage", headers=_auth(key)).json()["prompts_used"] == 2  # refusals cost nothing


def test_images_over_the_quota_sent_with_a_scoring_request_are_refused_and_refunded(tmp_path):
    app = create_app(Settings(db_url=f"sqlite:///{tmp_path / 'l.db'}", max_image_bytes_per_key=100))
    _, key = app.state.server.ledger.create_key("small-quota", budget=10)
    with TestClient(app) as client:
        img = _image(46)
        r = _score(client, key, [image_content_id(img)], p=1, images=[_png_base64(img)])
        assert r.status_code == 422 and r.json()["detail"][0]["type"] == "value_error.image_quota"
        assert client.get("/v1/usage", headers=_auth(key)).json()["prompts_used"] == 0
