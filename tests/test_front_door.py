"""What a newcomer meets first: class names the default model never learned, and errors that say what to do."""

import logging
import warnings

import numpy as np
import pytest

from skcarrot import (
    CarrotClassifier,
    HTTPBackend,
    OpenCLIPBackend,
    ToyBackend,
    UnknownClassNamesWarning,
    WeightsUnavailableError,
    ZeroShotHTTPBackend,
)
from skcarrot._training import plan_generations
from skcarrot.search._vocabulary import unknown_class_names, warn_if_unknown_to
from skcarrot.backends import OpenCLIPTextBackend, embedded_backend
from skcarrot.backends import _weights
from skcarrot.datasets import DIGIT_WORDS, FASHION_CLASSES
from skcarrot.exceptions import RemoteAuthenticationError, RemoteValidationError

from helpers import JSONHandler, LoopbackServer

# -- class names the embedded model never learned ------------------------------------------------


def _caught(backend, names):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_unknown_to(backend, names)
    return [w for w in caught if issubclass(w.category, UnknownClassNamesWarning)]


def test_cat_and_dog_on_the_embedded_model_warn_with_what_to_pass_instead():
    (warning,) = _caught(embedded_backend(), ["cat", "dog"])
    message = str(warning.message)
    assert "'cat', 'dog'" in message
    assert "OpenCLIPBackend(model_name='ViT-B-32', pretrained='openai')" in message
    assert "pretrained='/path/to/checkpoint'" in message
    assert "HTTPBackend" in message and "ZeroShotHTTPBackend" in message
    assert issubclass(UnknownClassNamesWarning, UserWarning)


@pytest.mark.parametrize("names", [
    [str(d) for d in range(10)],
    list(DIGIT_WORDS),
    list(FASHION_CLASSES),
    ["T-shirt/top", "Trousers", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
    ["the digit 7", "handwritten seven", "number 3", "digit 4", "ankle_boot"],
])
def test_digits_and_clothing_names_are_silent(names):
    assert _caught(embedded_backend(), names) == []


def test_only_the_unknown_names_are_named_and_a_plural_gets_its_learned_word():
    assert unknown_class_names(["7", "cat", "sneaker", "12"]) == ["cat", "12"]
    (warning,) = _caught(embedded_backend(), ["sneakers", "bag"])
    assert "'sneakers'" in str(warning.message) and "'sneaker' for 'sneakers'" in str(warning.message)


def test_the_text_view_of_the_embedded_model_warns_too():
    assert len(_caught(OpenCLIPTextBackend(), ["cat", "dog"])) == 1


@pytest.mark.parametrize("backend", [
    ToyBackend(),
    OpenCLIPBackend(model_name="skcarrot-micro-test", pretrained=None),
    ZeroShotHTTPBackend("http://127.0.0.1:9/never-called"),
    HTTPBackend("http://127.0.0.1:9", api_key="never-used"),
])
def test_other_backends_are_silent(backend):
    assert _caught(backend, ["cat", "dog"]) == []


def test_fit_on_cat_and_dog_warns_at_the_callers_line():
    rng = np.random.RandomState(0)
    X = rng.randint(0, 256, (6, 8, 8)).astype(np.uint8)
    y = np.array(["cat", "dog"] * 3)
    with pytest.warns(UnknownClassNamesWarning, match="'cat', 'dog'") as record:
        CarrotClassifier(prompt_tuning=False, refinement=False).fit(X, y)
    assert [w.filename for w in record if w.category is UnknownClassNamesWarning] == [__file__]


def test_fit_on_digits_does_not_warn(digits):
    X_train, y_train, _, _ = digits
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownClassNamesWarning)
        CarrotClassifier(prompt_tuning=False, refinement=False).fit(X_train, y_train)


# -- a budget smaller than one generation says what to change ---------------------------------------


def test_too_small_a_budget_names_the_least_budget_and_what_lowers_it():
    with pytest.raises(ValueError, match="query_budget=10 is smaller than one generation .* = 43 queries") as info:
        plan_generations(10, prompt_tuning=True, refinement=True, popsize=40, fresh_views=False,
                         validation=True, max_iter=None)
    message = str(info.value)
    assert "raise query_budget to at least 43" in message
    assert "lower popsize to at most 7" in message
    assert "early_stopping=False" in message and "prompt_tuning=False (the refiner alone needs 3)" in message


def test_the_estimator_says_how_far_popsize_must_come_down():
    X = np.zeros((4, 8, 8), dtype=np.uint8)
    clf = CarrotClassifier(backend=ToyBackend(), query_budget=10, popsize=40, prompt_tuning=True)
    with pytest.raises(ValueError, match="at least 41, lower popsize to at most 9, or set prompt_tuning=False"):
        clf.fit(X, [0, 1, 0, 1])


# -- servers that refuse: the URL and the token ---------------------------------------------------


class _Server(LoopbackServer):
    """A server on 127.0.0.1 that answers like FastAPI: ``POST /v1/zero-shot-image-classification`` needs a token."""

    def __init__(self, token="right"):
        class Handler(JSONHandler):
            def _answer(self):
                self.read_body()
                if self.path != "/v1/zero-shot-image-classification":
                    return self.reply(404, {"detail": "Not Found"})
                if self.headers.get("Authorization") != f"Bearer {token}":
                    return self.reply(401, {"detail": "invalid API key"})
                return self.reply(200, [{"label": "a", "score": 1.0}])

            do_GET = do_POST = do_HEAD = _answer

        super().__init__(Handler)


def _image():
    from PIL import Image

    return Image.new("RGB", (8, 8))


def test_zero_shot_on_the_servers_base_url_says_the_url_is_the_endpoints_full_url():
    with _Server() as server:
        backend = ZeroShotHTTPBackend(server.url, token="right", max_retries=0)
        with pytest.raises(RemoteValidationError, match=r"\(404\)") as info:
            backend.text_scores([_image()], [["a", "b"]])
    message = str(info.value)
    assert "url must be the endpoint's full URL" in message
    assert "/v1/zero-shot-image-classification" in message
    assert f"try url='{server.url}/v1/zero-shot-image-classification'" in message


def test_zero_shot_refused_for_want_of_a_token_names_token_env_and_token(monkeypatch):
    monkeypatch.delenv("MY_ENDPOINT_TOKEN", raising=False)
    with _Server() as server:
        url = server.url + "/v1/zero-shot-image-classification"
        backend = ZeroShotHTTPBackend(url, token_env="MY_ENDPOINT_TOKEN", max_retries=0)
        with pytest.raises(RemoteAuthenticationError, match=r"\(401\)") as unset:
            backend.text_scores([_image()], [["a", "b"]])
        monkeypatch.setenv("MY_ENDPOINT_TOKEN", "wrong")
        with pytest.raises(RemoteAuthenticationError) as wrong:
            backend.text_scores([_image()], [["a", "b"]])
        monkeypatch.setenv("MY_ENDPOINT_TOKEN", "right")
        assert backend.text_scores([_image()], [["a"]]).shape == (1, 1, 1)
    assert "MY_ENDPOINT_TOKEN (token_env='MY_ENDPOINT_TOKEN') is unset" in str(unset.value)
    assert "token=..." in str(unset.value)
    assert "came from the environment variable MY_ENDPOINT_TOKEN (token_env='MY_ENDPOINT_TOKEN')" in str(wrong.value)
    assert "token=..." in str(wrong.value)


def test_http_backend_on_an_endpoints_url_says_url_is_the_servers_base_url():
    with _Server() as server:
        backend = HTTPBackend(server.url + "/v1/zero-shot-image-classification", api_key="right", max_retries=0)
        with pytest.raises(RemoteValidationError, match=r"\(404\)") as info:
            backend.context_shape
    message = str(info.value)
    assert "url must be the server's base URL" in message
    assert f"try url='{server.url}'" in message


# -- pretrained weights out of reach: fail at once, with the fix -----------------------------------


def test_offline_pretrained_tag_fails_at_once_naming_a_local_checkpoint(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    backend = OpenCLIPBackend(model_name="RN50", pretrained="openai", cache_dir=str(tmp_path))
    with caplog.at_level(logging.DEBUG), pytest.raises(WeightsUnavailableError) as info:
        backend.context_shape
    message = str(info.value)
    assert "HF_HUB_OFFLINE is set" in message
    assert "OpenCLIPBackend(model_name='RN50', pretrained='/path/to/checkpoint')" in message
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or "etr" in r.getMessage()]


def test_an_unreachable_download_server_fails_at_once(monkeypatch, tmp_path, caplog):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with _Server() as server:
        closed = server.url
    monkeypatch.setattr(_weights, "_hub_endpoint", lambda: closed)
    with caplog.at_level(logging.DEBUG), pytest.raises(WeightsUnavailableError, match="is unreachable") as info:
        _weights.check_weights_obtainable("RN50", "openai", str(tmp_path))
    assert "pretrained='/path/to/checkpoint'" in str(info.value)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_reachable_download_server_or_cached_weights_go_on_to_open_clip(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with _Server() as server:
        monkeypatch.setattr(_weights, "_hub_endpoint", lambda: server.url)
        assert _weights.check_weights_obtainable("RN50", "openai", str(tmp_path)) is None
    # cached weights load offline as they always did
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = tmp_path / "models--timm--resnet50_clip.openai" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"")
    (tmp_path / "models--timm--resnet50_clip.openai" / "refs").mkdir()
    (tmp_path / "models--timm--resnet50_clip.openai" / "refs" / "main").write_text("0123abcd")
    assert _weights.check_weights_obtainable("RN50", "openai", str(tmp_path)) is None
