"""The ledger on a real PostgreSQL, started by this module: races, replays, two server processes."""

import concurrent.futures
import threading

import pytest
from helpers import FAST

pytest.importorskip("fastapi")
pytest.importorskip("psycopg")
from servekit import ServerProcess, auth, noise_image, offsets_array, postgres_cluster, postgres_server  # noqa: E402

from skcarrot import CarrotClassifier, HTTPBackend, QueryBudgetExceededError  # noqa: E402
from skcarrot.serve.ledger import BudgetExceeded, Ledger  # noqa: E402

pytestmark = pytest.mark.slow  # a PostgreSQL cluster started by the module, and server processes


@pytest.fixture(scope="module")
def pg_url():
    with postgres_cluster() as url:
        yield url


@pytest.fixture
def ledger(pg_url):
    ledger = Ledger(pg_url)
    yield ledger
    ledger.dispose()


def test_concurrent_charges_on_one_key_never_overspend(ledger):
    key_id, _ = ledger.create_key("pg-race", budget=250)
    granted = []
    lock = threading.Lock()

    def spend(worker):
        for i in range(12):
            try:
                ledger.begin_charge(key_id, 3, 2, idempotency_key=f"{worker}-{i}", fingerprint="x")
            except BudgetExceeded:
                continue
            with lock:
                granted.append(3)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(spend, range(8)))
    record = ledger.usage(key_id)
    assert sum(granted) == record.prompts_used == 249 and record.images_used == 2 * len(granted)


def test_replays_are_charged_once_across_ledger_instances(pg_url, ledger):
    key_id, _ = ledger.create_key("pg-replay", budget=100)
    assert ledger.begin_charge(key_id, 10, 1, "r1", "f").kind == "new"
    ledger.answers.store(key_id, "r1", b'{"ok": true}')
    other = Ledger(pg_url)  # another server process, say
    again = other.begin_charge(key_id, 10, 1, "r1", "f")
    other.dispose()
    assert (again.kind, again.response) == ("replay", b'{"ok": true}')
    assert ledger.usage(key_id).prompts_used == 10


def test_eight_tuners_on_two_server_processes_share_one_ledger_exactly(pg_url, ledger, digits):
    Xtr, ytr, _, _ = digits
    small = {**FAST, "query_budget": 60}
    own = {f"pg-own-{i}": ledger.create_key(f"pg-own-{i}", budget=1000)[1] for i in range(5)}
    shared = ledger.create_key("pg-shared", budget=130)[1]  # three tuners, on both servers, want 180
    servers = [ServerProcess(pg_url).launch(), ServerProcess(pg_url).launch()]
    try:
        for server in servers:
            server.wait()
        keys = list(own.values()) + [shared] * 3
        backends = [HTTPBackend(servers[i % 2].url, api_key=k) for i, k in enumerate(keys)]
        answered = [0] * len(backends)

        class Counting:
            def __init__(self, i):
                self.i = i

            @property
            def context_shape(self):
                return backends[self.i].context_shape

            def logits(self, images, class_names, offsets):
                out = backends[self.i].logits(images, class_names, offsets)
                answered[self.i] += len(offsets)
                return out

        def tune(i):
            try:
                return CarrotClassifier(backend=Counting(i), **small).fit(Xtr, ytr).n_queries_
            except QueryBudgetExceededError:
                return None

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(tune, range(8)))
    finally:
        for server in servers:
            server.stop()
    for i, name in enumerate(own):
        assert results[i] is not None and ledger.find_key(name).prompts_used == results[i] == answered[i]
    assert ledger.find_key("pg-shared").prompts_used == sum(answered[5:]) <= 130
    assert None in results[5:]


def test_a_database_that_goes_away_is_503_nothing_charged_and_the_client_waits_for_it(digits):
    import threading

    import httpx
    import numpy as np
    from servekit import thread_server

    from skcarrot.serve import Settings, create_app

    with postgres_server() as pg:
        app = create_app(Settings(db_url=pg.url))
        ledger = app.state.server.ledger
        _, key = ledger.create_key("outage", budget=100)
        images = [noise_image(1)]
        with thread_server(app) as url:
            backend = HTTPBackend(url, api_key=key, max_retries=8, backoff=0.2)
            backend.logits(images, ["a", "b"], np.zeros((2, 4, 64), np.float32))
            pg.stop()
            body = {"image_ids": backend._content_ids(images), "class_names": ["a", "b"], "offsets": offsets_array(1)}
            r = httpx.post(f"{url}/v1/score", headers=auth(key), json=body, timeout=60)
            assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1, r.text
            restart = threading.Timer(1.0, pg.start)
            restart.start()
            out = backend.logits(images, ["a", "b"], np.zeros((3, 4, 64), np.float32))  # waits through it
            restart.join()
        assert out.shape == (3, 1, 2)
        assert ledger.find_key("outage").prompts_used == 5
        ledger.dispose()
