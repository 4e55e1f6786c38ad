"""Key lifecycle as an operator expects it, keys never written down, and only documented refusals."""

import base64
import logging

import numpy as np
import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402
from servekit import auth, noise_image, offsets_array, score, sqlite_app, thread_server, upload  # noqa: E402

from skcarrot.tools.cli import main  # noqa: E402
from skcarrot.serve import Settings, create_app  # noqa: E402


@pytest.fixture
def served(tmp_path):
    with sqlite_app(tmp_path) as app_client_db:
        yield app_client_db


def _cli(capsys, *args):
    status = main(["keys", *args])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_revoke_takes_effect_for_the_very_next_charged_request(served, capsys):
    app, client, db = served
    status, out, _ = _cli(capsys, "create", "--name", "mallory", "--budget", "100", "--db", db)
    key = out.strip()
    assert status == 0 and key.startswith("skc_")
    ids = upload(client, key, noise_image(1))
    assert score(client, key, ids).status_code == 200  # the key is now in the server's cache
    assert _cli(capsys, "revoke", "mallory", "--db", db)[0] == 0
    r = score(client, key, ids)
    assert r.status_code == 401
    assert client.post("/v1/images", headers=auth(key), json={"images": []}).status_code in (401, 422)
    status, listing, _ = _cli(capsys, "list", "--db", db)
    assert status == 0 and "mallory\trevoked" in listing and "used=1" in listing and key not in listing


def test_a_revoked_key_is_refused_at_once_by_every_endpoint(served, capsys):
    app, client, db = served
    _, key = app.state.server.ledger.create_key("trudy", budget=10)
    ids = upload(client, key, noise_image(5))
    from skcarrot.wire import png_base64

    requests = {
        "score": lambda: score(client, key, ids),
        "info": lambda: client.get("/v1/info", headers=auth(key)),
        "usage": lambda: client.get("/v1/usage", headers=auth(key)),
        "upload": lambda: client.post("/v1/images", headers=auth(key), json={"images": [png_base64(noise_image(6))]}),
        "missing": lambda: client.post("/v1/images/missing", headers=auth(key), json={"ids": ids}),
        "models": lambda: client.get("/v1/models", headers=auth(key)),
    }
    assert {name: send().status_code for name, send in requests.items()} == {name: 200 for name in requests}
    assert _cli(capsys, "revoke", "trudy", "--db", db)[0] == 0
    # every key record is still in the server's cache: each endpoint refuses anyway, at once
    assert {name: send().status_code for name, send in requests.items()} == {name: 401 for name in requests}


def test_rotate_keeps_the_account_and_stops_the_old_secret_at_once(served, capsys):
    app, client, db = served
    _, old = app.state.server.ledger.create_key("carol", budget=10)
    ids = upload(client, old, noise_image(2))
    assert score(client, old, ids, p=3).status_code == 200
    status, out, err = _cli(capsys, "rotate", "carol", "--db", db)
    new = out.strip()
    assert status == 0 and new.startswith("skc_") and new != old and new not in err
    assert score(client, old, ids).status_code == 401  # although the old secret is still cached
    r = score(client, new, ids, p=2)  # same account: the images and the spending carry over
    assert r.status_code == 200 and r.json()["remaining"] == 5


def test_set_budget_and_top_up_change_what_is_left(served, capsys):
    app, client, db = served
    _, key = app.state.server.ledger.create_key("dave", budget=5)
    ids = upload(client, key, noise_image(3))
    assert score(client, key, ids, p=5).status_code == 200
    assert score(client, key, ids).status_code == 402
    assert _cli(capsys, "top-up", "dave", "3", "--db", db)[0] == 0
    assert score(client, key, ids, p=3).status_code == 200
    assert _cli(capsys, "set-budget", "dave", "20", "--db", db)[0] == 0
    r = score(client, key, ids, p=2)
    assert r.status_code == 200 and r.json()["remaining"] == 10
    assert _cli(capsys, "set-budget", "nobody", "20", "--db", db)[0] == 2
    assert _cli(capsys, "top-up", "dave", "0", "--db", db)[0] == 2


def test_keys_sent_in_a_query_string_are_never_logged(tmp_path):
    app = create_app(Settings(db_url=f"sqlite:///{tmp_path / 'ledger.db'}"))
    _, key = app.state.server.ledger.create_key("careless", budget=1)
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(self.format(record))

    handler = Keep()
    with thread_server(app, log_level="info") as url:
        access = logging.getLogger("uvicorn.access")
        access.addHandler(handler)
        try:
            httpx.get(f"{url}/v1/info?api_key={key}")
            httpx.get(f"{url}/v1/usage?token={key}&x=1", headers=auth(key))
        finally:
            access.removeHandler(handler)
    assert len(lines) == 2 and all("/v1/" in line for line in lines)
    assert not any(key in line for line in lines)


def test_info_shows_no_file_path_and_refusals_show_no_object_reprs(served):
    app, client, _ = served
    _, key = app.state.server.ledger.create_key("curious", budget=1)
    info = client.get("/v1/info", headers=auth(key)).json()
    shown = str(info["model"])
    assert "/" not in shown and ".safetensors" not in shown and info["model"]["pretrained"] == "embedded"
    r = client.post("/v1/images", headers=auth(key), json={"images": [base64.b64encode(b"not an image").decode()]})
    assert r.status_code == 422 and "0x" not in r.text and "BytesIO" not in r.text


def test_a_body_that_is_not_utf8_is_a_documented_422(served):
    app, client, _ = served
    _, key = app.state.server.ledger.create_key("bytes", budget=1)
    for path in ("/v1/score", "/v1/images/missing", "/v1/images"):
        r = client.post(path, content=b'{"ids": ["\xff\xfe"]}',
                        headers=auth(key, **{"Content-Type": "application/json"}))
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body"], r.text
        assert "422" in client.get("/openapi.json").json()["paths"][path]["post"]["responses"]


def test_the_schema_states_what_validation_accepts(served):
    from skcarrot.serve.openapi import SEMANTIC_REFUSALS

    app, client, _ = served
    _, key = app.state.server.ledger.create_key("strings", budget=10)
    ids = upload(client, key, noise_image(4))
    schema = client.get("/openapi.json").json()
    names = schema["components"]["schemas"]["ScoreRequest"]["properties"]["class_names"]
    assert names["items"]["minLength"] == 1 and names["items"]["maxLength"] == 200 and names["maxItems"] == 1000
    # what the schema allows is accepted, what it does not is refused, the boundary on both sides
    assert _score_names(client, key, ids, [" ", "b"]).status_code == 200
    at_most = _score_names(client, key, ids, ["x" * 200, "b"])  # within the schema: refused only by the model's
    assert at_most.status_code == 422 and at_most.json()["detail"][0]["type"] in SEMANTIC_REFUSALS  # context
    for names in (["", "b"], ["x" * 201, "b"]):
        refused = _score_names(client, key, ids, names)
        assert refused.status_code == 422 and refused.json()["detail"][0]["type"] not in SEMANTIC_REFUSALS
    prompts = schema["components"]["schemas"]["ScoreTextRequest"]["properties"]["prompts"]
    assert prompts["items"]["minItems"] == 1 and prompts["items"]["items"]["minLength"] == 1
    r = client.post("/v1/score-text", headers=auth(key), json={"image_ids": ids, "prompts": [[""]]})
    assert r.status_code == 422


def _score_names(client, key, ids, names):
    return client.post("/v1/score", headers=auth(key),
                       json={"image_ids": ids, "class_names": names, "offsets": offsets_array(1)})


def test_revoked_keys_are_refused_by_the_ledger_itself(tmp_path):
    from skcarrot.serve.ledger import KeyRevoked, Ledger, hash_key

    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    key_id, key = ledger.create_key("eve", budget=10)
    assert ledger.begin_charge(key_id, 1, 1, key_hash=hash_key(key)).kind == "new"
    new = ledger.rotate_key("eve")
    with pytest.raises(KeyRevoked):
        ledger.begin_charge(key_id, 1, 1, key_hash=hash_key(key))
    assert ledger.begin_charge(key_id, 1, 1, key_hash=hash_key(new)).kind == "new"
    ledger.revoke_key("eve")
    with pytest.raises(KeyRevoked):
        ledger.begin_charge(key_id, 1, 1, key_hash=hash_key(new))
    assert ledger.usage(key_id).prompts_used == 2 and np.isfinite(ledger.usage(key_id).remaining)
