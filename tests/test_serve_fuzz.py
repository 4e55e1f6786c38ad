"""Fuzzing every endpoint from the OpenAPI schema (schemathesis), with every check: no 5xx, no schema violation.

Every built-in check runs on every response: no server error, documented status codes,
content types and headers, responses that match their schema, invalid requests refused,
required headers and authentication enforced, and valid requests accepted. A request the
schema calls valid may still be refused only for what no schema can state (an image id
this key never uploaded, bytes that are no image, ...: ``SEMANTIC_REFUSALS``), and an
invalid request may be refused by its size (413, 431) rather than by its content; to reach
the model, valid requests name images the key did upload. Bounded here (a fixed number of
valid and invalid cases per operation, derandomised); ``benchmarks/serve_fuzz.py`` runs the
same against a live server with more cases.
"""

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from servekit import auth, fuzz_every_operation, noise_image  # noqa: E402

from skcarrot.serve import Settings, create_app  # noqa: E402
from skcarrot.wire import png_base64  # noqa: E402

CASES_PER_OPERATION_AND_MODE = 20

pytestmark = pytest.mark.slow  # schemathesis, every operation, valid and invalid cases


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    db = tmp_path_factory.mktemp("fuzz") / "ledger.db"
    app = create_app(Settings(db_url=f"sqlite:///{db}", max_body_bytes=1_000_000))
    _, key = app.state.server.ledger.create_key("fuzzer", budget=10**9)
    files = [png_base64(noise_image(seed, 12)) for seed in range(3)]
    with TestClient(app) as client:
        ids = client.post("/v1/images", json={"images": files}, headers=auth(key)).json()["ids"]
    return app, key, ids, files


def test_every_check_passes_on_every_operation(served):
    app, key, ids, files = served
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    report = fuzz_every_operation(schema, auth(key), ids, files, CASES_PER_OPERATION_AND_MODE)
    statuses = report["statuses"]
    assert report["operations"] == 11
    assert not report["failures"], "\n".join(report["failures"][:20])
    assert len(statuses) >= 11 * CASES_PER_OPERATION_AND_MODE
    assert all(code < 500 for code in statuses)
    assert statuses.count(200) >= 3 * CASES_PER_OPERATION_AND_MODE  # valid requests reach the model
