"""SIGKILL the server in the middle of a fit: the fit finishes or fails clearly, nothing is charged twice."""

import threading
import time

import numpy as np
import pytest
from helpers import FAST

pytest.importorskip("fastapi")
from servekit import ServerProcess, ThreadServer  # noqa: E402

from skcarrot import CarrotClassifier, HTTPBackend  # noqa: E402
from skcarrot.backends import embedded_backend  # noqa: E402
from skcarrot.exceptions import RemoteUnavailableError  # noqa: E402
from skcarrot.serve import Settings, create_app  # noqa: E402
from skcarrot.serve.ledger import Ledger  # noqa: E402


def _wait_for_spending(ledger, name, at_least, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ledger.find_key(name).prompts_used >= at_least:
            return
        time.sleep(0.02)
    raise TimeoutError(f"key {name!r} never spent {at_least} queries")


@pytest.mark.slow
def test_fit_survives_a_server_killed_and_restarted_on_the_same_ledger(tmp_path, digits):
    Xtr, ytr, Xte, _ = digits
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = Ledger(db)
    _, key = ledger.create_key("tuner", budget=FAST["query_budget"])
    server = ServerProcess(db)
    with server:
        server.start()
        # about a minute of retries: a restarted server process imports torch again, slowly on a busy machine
        backend = HTTPBackend(server.url, api_key=key, max_retries=60, backoff=0.1, max_backoff=2.0)
        clf = CarrotClassifier(backend=backend, **FAST)
        outcome = {}
        fit = threading.Thread(target=lambda: outcome.setdefault("clf", clf.fit(Xtr, ytr)), daemon=True)
        fit.start()
        _wait_for_spending(ledger, "tuner", 40)
        server.kill()  # SIGKILL: no shutdown, requests in flight are lost
        killed_at = ledger.find_key("tuner").prompts_used
        server.start()  # same port, same ledger file
        fit.join(timeout=180)
        assert not fit.is_alive(), "the fit did not finish after the restart"
    assert "clf" in outcome
    assert killed_at < clf.n_queries_
    record = ledger.find_key("tuner")
    # the ledger equals the client's count: no retry was charged twice, the budget held
    assert record.prompts_used == clf.n_queries_ <= FAST["query_budget"]
    # and the kill left no trace on the trajectory
    local = CarrotClassifier(backend=embedded_backend(), **FAST).fit(Xtr, ytr)
    np.testing.assert_allclose(clf.prompt_offset_, local.prompt_offset_, rtol=1e-5, atol=1e-6)
    ledger.dispose()


def test_fit_fails_clearly_when_the_server_stays_down(tmp_path, digits):
    Xtr, ytr, _, _ = digits
    app = create_app(Settings(db_url=f"sqlite:///{tmp_path / 'ledger.db'}"))
    ledger = app.state.server.ledger
    _, key = ledger.create_key("tuner", budget=10_000)
    counted = []
    live = ThreadServer(app).start()
    try:
        backend = HTTPBackend(live.url, api_key=key, max_retries=3, backoff=0.05)

        class Spy:
            context_shape = property(lambda self: backend.context_shape)

            def logits(self, images, class_names, offsets):
                out = backend.logits(images, class_names, offsets)
                counted.append(len(offsets))
                if sum(counted) >= 40:
                    live.stop()  # for good
                return out

        with pytest.raises(RemoteUnavailableError, match="failed after 4 attempt"):
            CarrotClassifier(backend=Spy(), **FAST).fit(Xtr, ytr)
    finally:
        live.stop()
    assert ledger.find_key("tuner").prompts_used == sum(counted)
