"""HTTPBackend against a live server on loopback: same fits, exact ledgers, retries, keys."""

import concurrent.futures
import json
import pickle
import socket
import threading
import time

import numpy as np
import pytest
from helpers import FAST
from PIL import Image

pytest.importorskip("fastapi")
from servekit import noise_image, thread_server  # noqa: E402
from sklearn.base import clone  # noqa: E402

from skcarrot import CarrotClassifier, HTTPBackend, QueryBudgetExceededError  # noqa: E402
from skcarrot.backends import embedded_backend  # noqa: E402
from skcarrot.exceptions import (  # noqa: E402
    RemoteAuthenticationError,
    RemoteBudgetExceededError,
    RemoteUnavailableError,
    RemoteValidationError,
)
from skcarrot.serve import Settings, create_app  # noqa: E402


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    db = tmp_path_factory.mktemp("ledger") / "ledger.db"
    app = create_app(Settings(db_url=f"sqlite:///{db}", rate_window_s=1.0))
    with thread_server(app) as url:
        yield url, app.state.server.ledger, app


def _key(ledger, name, budget=100_000, rate_limit=None):
    return ledger.create_key(name, budget=budget, rate_limit=rate_limit)[1]


class Counting:
    """A backend wrapper that counts the prompts whose logits came back."""

    def __init__(self, inner):
        self.inner, self.answered = inner, 0

    @property
    def context_shape(self):
        return self.inner.context_shape

    def logits(self, images, class_names, offsets):
        out = self.inner.logits(images, class_names, offsets)
        self.answered += len(offsets)
        return out


def test_fit_over_http_matches_the_fit_in_process_and_the_ledger_matches_the_client(live, digits):
    url, ledger, _ = live
    Xtr, ytr, Xte, _ = digits
    key = _key(ledger, "same-fit")
    remote = CarrotClassifier(backend=HTTPBackend(url, api_key=key), **FAST).fit(Xtr, ytr)
    local = CarrotClassifier(backend=embedded_backend(), **FAST).fit(Xtr, ytr)
    assert remote.n_queries_ == local.n_queries_
    assert ledger.find_key("same-fit").prompts_used == remote.n_queries_
    np.testing.assert_allclose(remote.prompt_offset_, local.prompt_offset_, rtol=1e-5, atol=1e-6)
    proba = remote.predict_proba(Xte)  # one more query
    np.testing.assert_allclose(proba, local.predict_proba(Xte), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(remote.predict(Xte[:20]), local.predict(Xte[:20]))
    assert ledger.find_key("same-fit").prompts_used == remote.n_queries_ + 2


def test_an_explicit_text_door_tunes_through_score_text_and_matches_the_fit_in_process(live, digits, monkeypatch):
    url, ledger, _ = live
    Xtr, ytr, Xte, _ = digits
    key = _key(ledger, "text-door")

    def no_embedding_door(self, *args, **kwargs):
        raise AssertionError("the embedding door was used")

    monkeypatch.setattr(HTTPBackend, "logits", no_embedding_door)
    strings_sent = []
    text_scores = HTTPBackend.text_scores

    def counting_text_scores(self, images, prompts):
        strings_sent.append(sum(len(p) for p in prompts))
        return text_scores(self, images, prompts)

    monkeypatch.setattr(HTTPBackend, "text_scores", counting_text_scores)
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    params = dict(door="text", class_names=names, query_budget=30, popsize=4, prompt_tuning=True, random_state=0)
    backend = HTTPBackend(url, api_key=key)
    remote = CarrotClassifier(backend=backend, **params).fit(Xtr, ytr)
    local = CarrotClassifier(backend=embedded_backend(), **params).fit(Xtr, ytr)
    assert remote.door_ == "text" and remote.prompt_ == local.prompt_
    assert remote.n_queries_ == local.n_queries_
    # the client counts prompt sets; the server bills each string scored, and says so
    assert ledger.find_key("text-door").prompts_used == backend.n_billed_ == sum(strings_sent) > remote.n_queries_
    np.testing.assert_allclose(remote.predict_proba(Xte), local.predict_proba(Xte), rtol=1e-4, atol=1e-5)


def test_each_distinct_image_is_uploaded_once(live):
    url, ledger, app = live
    backend = HTTPBackend(url, api_key=_key(ledger, "uploads"))
    # large enough that a client asks which the server lacks before sending pixels
    images = [Image.fromarray(np.full((256, 256, 3), i, np.uint8)) for i in range(5)]
    uploads = app.state.server.metrics.requests.labels("/v1/images", "POST", "200")
    before = uploads._value.get()
    for _ in range(3):
        backend.logits(images + images[:2], ["a", "b"], np.zeros((2, 4, 64), np.float32))
    # a fresh client (new process, say) asks which are missing and uploads none
    HTTPBackend(url, api_key=backend.api_key).logits(images, ["a", "b"], np.zeros((1, 4, 64), np.float32))
    assert uploads._value.get() - before == 1


def test_the_key_is_read_from_the_environment_and_never_pickled(live, monkeypatch, digits):
    url, ledger, _ = live
    key = _key(ledger, "env-key")
    monkeypatch.setenv("SKCARROT_API_KEY", key)
    backend = HTTPBackend(url)
    assert backend.context_shape == (4, 64)
    explicit = HTTPBackend(url, api_key=key)
    assert key not in repr(explicit)
    assert pickle.loads(pickle.dumps(explicit)).api_key is None
    assert key.encode() not in pickle.dumps(explicit)
    assert pickle.loads(pickle.dumps(HTTPBackend(url, api_key=key, store_key=True))).api_key == key
    assert clone(explicit).get_params() == explicit.get_params()
    Xtr, ytr, _, _ = digits
    clf = CarrotClassifier(backend=explicit, **{**FAST, "query_budget": 30}).fit(Xtr, ytr)
    assert key.encode() not in pickle.dumps(clf)
    monkeypatch.delenv("SKCARROT_API_KEY")
    with pytest.raises(RemoteAuthenticationError, match="SKCARROT_API_KEY"):
        HTTPBackend(url).context_shape


def test_unknown_key_is_a_clear_authentication_error(live):
    url, _, _ = live
    with pytest.raises(RemoteAuthenticationError, match="refused the API key"):
        HTTPBackend(url, api_key="skc_nobody").context_shape


def test_server_budget_exhaustion_stops_the_fit_with_a_budget_error(live, digits):
    url, ledger, _ = live
    Xtr, ytr, _, _ = digits
    backend = HTTPBackend(url, api_key=_key(ledger, "poor", budget=50))
    with pytest.raises(QueryBudgetExceededError, match="budget") as info:
        CarrotClassifier(backend=backend, **FAST).fit(Xtr, ytr)
    assert isinstance(info.value, RemoteBudgetExceededError) and info.value.remaining < 9
    assert ledger.find_key("poor").prompts_used <= 50


def test_validation_errors_are_raised_at_once_never_retried(live):
    url, ledger, app = live
    backend = HTTPBackend(url, api_key=_key(ledger, "invalid"), max_retries=5, backoff=5.0)
    refused = app.state.server.metrics.requests.labels("/v1/score", "POST", "422")
    before = refused._value.get()
    with pytest.raises(RemoteValidationError, match="class_names"):
        backend.logits([Image.new("RGB", (8, 8))], ["x" * 500, "b"], np.zeros((1, 4, 64), np.float32))
    assert refused._value.get() - before == 1


def test_unreachable_server_fails_clearly_after_the_retries():
    from servekit import free_port

    backend = HTTPBackend(f"http://127.0.0.1:{free_port()}", api_key="skc_x", max_retries=2, backoff=0.01)
    with pytest.raises(RemoteUnavailableError, match="after 3 attempt"):
        backend.context_shape


def test_rate_limited_requests_wait_for_retry_after_and_succeed(tmp_path):
    app = create_app(Settings(db_url=f"sqlite:///{tmp_path / 'rated.db'}", rate_window_s=1.0))
    arrived, answered = [], []  # per /v1/score request: when it reached the server; when and how it was answered

    async def recording(scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/score":
            return await app(scope, receive, send)
        arrived.append(time.monotonic())

        async def record(message):
            if message["type"] == "http.response.start":
                answered.append((time.monotonic(), message["status"], dict(message["headers"]).get(b"retry-after")))
            await send(message)

        await app(scope, receive, record)

    recording.state = app.state
    ledger = app.state.server.ledger
    _, key = ledger.create_key("rated", budget=100, rate_limit=4)  # one request of 4 prompts a 1 s window
    with thread_server(recording) as url:
        backend = HTTPBackend(url, api_key=key, backoff=0.01)
        for _ in range(3):
            backend.logits([Image.new("RGB", (8, 8))], ["a", "b"], np.zeros((4, 4, 64), np.float32))
    statuses = [status for _, status, _ in answered]
    assert statuses.count(200) == 3 and statuses[-1] == 200
    assert statuses.count(429) >= 2  # the second and third requests came inside the first one's window
    assert backend.n_retries_ == statuses.count(429) and len(arrived) == len(answered)
    for (refused_at, status, retry_after), next_arrival in zip(answered, arrived[1:]):
        if status == 429:  # the server saw another attempt, sent no sooner than the Retry-After it was given
            assert retry_after is not None and next_arrival - refused_at >= float(retry_after)
    assert ledger.find_key("rated").prompts_used == 12  # the refused attempts were not charged


def test_lost_responses_are_retried_with_the_same_idempotency_key_and_charged_once(tmp_path):
    app = create_app(Settings(db_url=f"sqlite:///{tmp_path / 'l.db'}"))
    seen = []

    async def flaky(scope, receive, send):
        # The server charges and answers, but the first two answers are lost on the way.
        if scope["type"] != "http" or scope["path"] != "/v1/score" or len(seen) >= 2:
            return await app(scope, receive, send)
        seen.append(dict(scope["headers"]).get(b"idempotency-key"))

        async def swallow(message):
            if message["type"] == "http.response.body" and not message.get("more_body"):
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"retry-after", b"0"), (b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": b'{"detail": "lost"}'})

        await app(scope, receive, swallow)

    flaky.state = app.state
    _, key = app.state.server.ledger.create_key("flaky", budget=100)
    with thread_server(flaky) as url:
        out = HTTPBackend(url, api_key=key, backoff=0.01).logits(
            [Image.new("RGB", (8, 8))], ["a", "b"], np.zeros((3, 4, 64), np.float32)
        )
    assert out.shape == (3, 1, 2)
    assert len(seen) == 2 and seen[0] == seen[1] is not None
    assert app.state.server.ledger.find_key("flaky").prompts_used == 3


def test_eight_concurrent_tuners_keep_exact_per_key_totals(live, digits):
    url, ledger, _ = live
    Xtr, ytr, _, _ = digits
    small = {**FAST, "query_budget": 60}
    own = {f"own-{i}": _key(ledger, f"own-{i}") for i in range(5)}
    shared = _key(ledger, "shared", budget=130)  # three tuners want 180
    backends = [Counting(HTTPBackend(url, api_key=k)) for k in own.values()]
    backends += [Counting(HTTPBackend(url, api_key=shared)) for _ in range(3)]

    def tune(backend):
        try:
            return CarrotClassifier(backend=backend, **small).fit(Xtr, ytr).n_queries_
        except QueryBudgetExceededError:
            return None

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(tune, backends))
    for name, backend, n in zip(own, backends, results):
        assert n is not None and ledger.find_key(name).prompts_used == n == backend.answered
    shared_used = ledger.find_key("shared").prompts_used
    assert shared_used == sum(b.answered for b in backends[5:]) <= 130
    assert None in results[5:]  # someone sharing the key ran out, and was told


def test_huggingface_inference_client_speaks_to_the_zero_shot_endpoint(live, tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    # HF_HUB_OFFLINE=1 (set for the suite) blocks every request of the client, even to
    # 127.0.0.1; the model here is a local URL, so nothing reaches the Hub either way.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    url, ledger, _ = live
    key = _key(ledger, "hf-client")
    path = tmp_path / "digit.png"
    Image.fromarray(np.kron(np.eye(4, dtype=np.uint8) * 255, np.ones((4, 4), np.uint8))).save(path)
    client = huggingface_hub.InferenceClient(model=f"{url}/v1/zero-shot-image-classification", token=key)
    labels = ["zero", "one", "seven"]
    out = client.zero_shot_image_classification(path.read_bytes(), candidate_labels=labels,
                                                hypothesis_template="a photo of the number: {}.")
    assert sorted(o.label for o in out) == sorted(labels)
    assert abs(sum(o.score for o in out) - 1.0) < 1e-4
    assert [o.score for o in out] == sorted((o.score for o in out), reverse=True)
    assert ledger.find_key("hf-client").prompts_used == 1


def test_grid_search_and_pickled_models_work_over_http(live, monkeypatch, digits):
    from sklearn.model_selection import GridSearchCV

    url, ledger, _ = live
    monkeypatch.setenv("SKCARROT_API_KEY", _key(ledger, "grid"))
    Xtr, ytr, Xte, yte = digits
    search = GridSearchCV(
        CarrotClassifier(backend=HTTPBackend(url), **{**FAST, "query_budget": 20}),
        {"hidden_dim": [16, 32]},
        cv=2,
    ).fit(Xtr, ytr)
    fitted = pickle.loads(pickle.dumps(search.best_estimator_))  # the key stays in the environment
    assert fitted.score(Xte, yte) > 0.3
    assert ledger.find_key("grid").prompts_used > 0


def test_the_text_level_zero_shot_client_is_served_and_charged_per_call(live, monkeypatch):
    from skcarrot.backends import ZeroShotHTTPBackend

    url, ledger, _ = live
    monkeypatch.setenv("SKCARROT_API_KEY", _key(ledger, "zero-shot-door"))
    door = ZeroShotHTTPBackend(f"{url}/v1/zero-shot-image-classification", token_env="SKCARROT_API_KEY")
    images = [Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)) for i in range(3)]
    prompts = [["a photo of a one.", "a photo of a two."], ["a one.", "a two."]]
    probabilities = door.text_scores(images, prompts)
    assert probabilities.shape == (2, 3, 2)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-6)
    logits = HTTPBackend(url).text_scores(images, prompts)  # the same model, many images per request
    expected = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    # one per zero-shot call (an image and a prompt set), then one per string scored
    assert ledger.find_key("zero-shot-door").prompts_used == 2 * 3 + 2 * 2


def test_a_fit_resumed_from_its_checkpoint_is_charged_once_for_what_it_repeats(live, digits, tmp_path, monkeypatch):
    from skcarrot.exceptions import RemoteUnavailableError

    url, ledger, _ = live
    Xtr, ytr, _, _ = digits
    key = _key(ledger, "resumed-fit")
    params = {**FAST, "checkpoint": str(tmp_path / "fit.ckpt"), "checkpoint_every": 3}
    charged = HTTPBackend._charged
    sent = {"n": 0}

    def server_goes_away(self, path, payload, idempotency_key):
        sent["n"] += 1
        if sent["n"] == 11:  # a refiner request, after this generation's prompts were charged
            raise RemoteUnavailableError("the server went away")
        return charged(self, path, payload, idempotency_key)

    monkeypatch.setattr(HTTPBackend, "_charged", server_goes_away)
    with pytest.raises(RemoteUnavailableError):
        CarrotClassifier(backend=HTTPBackend(url, api_key=key), **params).fit(Xtr, ytr)
    monkeypatch.setattr(HTTPBackend, "_charged", charged)
    resumed = CarrotClassifier(backend=HTTPBackend(url, api_key=key), **params).fit(Xtr, ytr)
    local = CarrotClassifier(backend=embedded_backend(), **FAST).fit(Xtr, ytr)
    assert resumed.n_queries_ == local.n_queries_
    assert ledger.find_key("resumed-fit").prompts_used == resumed.n_queries_  # the repeated ones, once


def _uploads(app):
    return app.state.server.metrics.requests.labels("/v1/images", "POST", "200")._value.get()


def test_new_images_go_with_the_scoring_request_or_first_to_a_server_that_takes_none(tmp_path):
    app = create_app(Settings(db_url=f"sqlite:///{tmp_path / 'l.db'}"))
    refused = []

    async def older(scope, receive, send):
        # a server whose scoring requests take no images: FastAPI's 422 for a field it does not know
        if scope["type"] != "http" or scope["path"] != "/v1/score":
            return await app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if b'"images"' in body:
            refused.append(body)
            detail = [{"type": "extra_forbidden", "loc": ["body", "images"], "msg": "Extra inputs are not permitted"}]
            await send({"type": "http.response.start", "status": 422,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": json.dumps({"detail": detail}).encode()})
            return
        replayed = []

        async def replay():
            if not replayed:
                replayed.append(True)
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await app(scope, replay, send)

    older.state = app.state
    ledger = app.state.server.ledger
    images = [noise_image(seed) for seed in range(3)]
    offsets = np.random.RandomState(0).normal(scale=0.05, size=(2, 4, 64)).astype(np.float32)
    with thread_server(app) as url:
        backend = HTTPBackend(url, api_key=_key(ledger, "inline"))
        sent = backend.logits(images, ["a", "b"], offsets)
        assert backend.n_calls_ == 2 and _uploads(app) == 0  # /v1/info, then one request with the images
        backend.logits(images, ["a", "b"], offsets)
        assert backend.n_calls_ == 3 and _uploads(app) == 0
    with thread_server(older) as url:
        backend = HTTPBackend(url, api_key=_key(ledger, "older"))
        uploaded = backend.logits(images, ["a", "b"], offsets)
        backend.logits([noise_image(3)], ["a", "b"], offsets)
    assert len(refused) == 1 and _uploads(app) == 2  # refused once, then uploaded first, from then on
    np.testing.assert_array_equal(sent, uploaded)
    np.testing.assert_allclose(sent, embedded_backend().logits(images, ["a", "b"], offsets), atol=1e-5)
    assert ledger.find_key("inline").prompts_used == 4 and ledger.find_key("older").prompts_used == 4


def test_the_transport_replaces_a_kept_alive_connection_the_server_closed():
    from skcarrot.backends.remote._transport import Transport

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    connections = []

    def serve():
        # answers one request per connection, keeps it alive as far as the client knows, then closes it
        for _ in range(2):
            conn, _ = listener.accept()
            connections.append(conn)
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            answer = b'{"ok": 42}'
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                         % (len(answer), answer))
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = Transport(f"http://127.0.0.1:{port}/v1", timeout=10)
    assert client.request("GET", f"http://127.0.0.1:{port}/v1/info").json() == {"ok": 42}
    time.sleep(0.2)  # the server has closed the socket the client keeps
    again = client.request("GET", f"http://127.0.0.1:{port}/v1/info", headers={"Accept": "application/json"})
    assert again.status_code == 200 and again.json() == {"ok": 42}
    thread.join(5)
    assert len(connections) == 2
    client.close()
    listener.close()


def test_the_transport_keeps_one_connection_alive_across_requests():
    from skcarrot.backends.remote._transport import Transport

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted = []

    def serve():
        conn, _ = listener.accept()
        accepted.append(conn)
        for _ in range(3):
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = Transport(f"http://127.0.0.1:{port}", timeout=10)
    assert [client.request("GET", f"http://127.0.0.1:{port}/x").json() for _ in range(3)] == [{}, {}, {}]
    thread.join(5)
    assert len(accepted) == 1  # three requests, one connection
    client.close()
    listener.close()


def test_no_module_of_the_package_speaks_http_by_hand():
    """HTTP is urllib3's job (client) and uvicorn's (server): no module opens sockets or parses HTTP itself."""
    import ast
    import pathlib

    import skcarrot

    banned = {"socket", "http.client", "ssl", "select", "selectors", "asyncio.streams"}
    found = []
    for path in pathlib.Path(skcarrot.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            found += [f"{path.name}: {name}" for name in names if name in banned]
            if isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)):
                text = node.value if isinstance(node.value, str) else node.value.decode("latin-1")
                if "HTTP/1.1 " in text and "\r\n" in text:
                    found.append(f"{path.name}: a hand-built HTTP message")
    assert found == []
