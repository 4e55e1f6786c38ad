"""Each key's images are its own: in the cache, in the database, after a restart, in every refusal."""

import io

import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from servekit import auth, noise_image, score, sqlite_app, upload  # noqa: E402

from skcarrot.serve import Settings, create_app  # noqa: E402
from skcarrot.serve.db import Database  # noqa: E402
from skcarrot.serve.image_store import ImageStore  # noqa: E402
from skcarrot.serve.ledger import Ledger  # noqa: E402


@pytest.fixture
def served(tmp_path):
    with sqlite_app(tmp_path) as app_client_db:
        yield app_client_db


def _score(client, key, ids, p=2):
    return score(client, key, ids, p, class_names=("one", "two"))


def _used(client, key):
    return client.get("/v1/usage", headers=auth(key)).json()["prompts_used"]


def test_a_key_cannot_score_an_image_another_key_uploaded(served):
    app, client, db = served
    ledger = app.state.server.ledger
    alice, bob = ledger.create_key("alice", 100)[1], ledger.create_key("bob", 100)[1]
    ids = upload(client, alice, noise_image(1))
    assert _score(client, alice, ids).status_code == 200  # decoded and cached now
    r = _score(client, bob, ids)
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "value_error.unknown_image"
    assert _used(client, bob) == 0
    missing = client.post("/v1/images/missing", json={"ids": ids}, headers=auth(bob)).json()["missing"]
    assert missing == ids
    # nor after a restart, which starts from the database alone
    with TestClient(create_app(Settings(db_url=db))) as restarted:
        assert _score(restarted, bob, ids).status_code == 422
        assert _score(restarted, alice, ids).status_code == 200
    # bob's own upload of the same image is his, and counted as new for him
    r = client.post("/v1/images", json={"images": [_png(noise_image(1))]}, headers=auth(bob))
    assert r.json()["stored"] == 1 and _score(client, bob, ids).status_code == 200


def test_a_key_without_budget_learns_nothing_about_other_keys_images(served):
    app, client, _ = served
    ledger = app.state.server.ledger
    alice, broke = ledger.create_key("alice", 100)[1], ledger.create_key("broke", 0)[1]
    ids = upload(client, alice, noise_image(2))
    assert _score(client, alice, ids).status_code == 200
    theirs = _score(client, broke, ids)
    nobodys = _score(client, broke, ["e" * 64])
    # the same refusal whether anyone uploaded the image or not: no oracle
    assert theirs.status_code == nobodys.status_code == 422
    assert theirs.json()["detail"][0]["type"] == nobodys.json()["detail"][0]["type"] == "value_error.unknown_image"


def test_the_image_cache_is_keyed_by_key_and_content_id(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger = Ledger(db)
    alice, bob = ledger.create_key("alice", 1)[0], ledger.create_key("bob", 1)[0]
    store = ImageStore(db, decode=lambda raw: Image.open(io.BytesIO(raw)).convert("RGB"))
    image = noise_image(3)
    png = io.BytesIO()
    image.save(png, format="PNG")
    store.keep(alice, {"a" * 64: (png.getvalue(), image)})
    assert list(store.fetch(alice, ["a" * 64])) == ["a" * 64]
    assert store.fetch(bob, ["a" * 64]) == {}
    assert store.known(bob, ["a" * 64]) == []


def _png(image):
    from skcarrot.wire import png_base64

    return png_base64(image)
