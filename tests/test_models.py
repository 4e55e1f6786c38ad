"""One resolver turns a model name into a model: the estimator, the benchmark and the server agree."""

import importlib
import pkgutil
import warnings

import pytest
from helpers import MICRO

import skcarrot
from skcarrot.backends.models import (
    EMBEDDED_MODEL,
    EMBEDDED_WEIGHTS,
    RandomWeightsWarning,
    open_model,
    resolve_weights,
)
from skcarrot.exceptions import WeightsUnavailableError


def _public_modules():
    for info in pkgutil.walk_packages(skcarrot.__path__, "skcarrot."):
        if not any(part.startswith("_") for part in info.name.split(".")[1:]):
            yield info.name


@pytest.mark.parametrize("name", sorted(_public_modules()))
def test_every_public_module_star_imports(name):
    module = importlib.import_module(name)
    namespace = {}
    exec(f"from {name} import *", namespace)  # noqa: S102 - the very thing under test
    for exported in getattr(module, "__all__", []):
        assert exported in namespace, f"{name}.__all__ lists {exported!r}, which it does not define"


def test_a_name_means_the_same_weights_to_the_estimator_the_bench_and_the_server():
    from skcarrot.backends.embedded import resolve_backend
    from skcarrot.tools.bench import open_model as bench_model
    from skcarrot.serve.scorer import Scorer

    assert bench_model is open_model
    embedded = resolve_backend(None)
    assert (embedded.model_name, embedded.pretrained) == (EMBEDDED_MODEL, EMBEDDED_WEIGHTS)
    served = Scorer().backend
    assert (served.model_name, served.pretrained) == (EMBEDDED_MODEL, EMBEDDED_WEIGHTS)
    assert resolve_weights("RN50") == ("RN50", "openai")
    assert resolve_weights("RN50", "/ckpt/rn50.pt") == ("RN50", "/ckpt/rn50.pt")


def test_a_served_name_whose_weights_can_not_be_downloaded_fails_at_once(monkeypatch):
    from skcarrot.serve.scorer import Scorer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="'openai' of 'RN50'.*pretrained='/path/to/checkpoint'"):
        Scorer(model_name="RN50")


def test_random_weights_are_served_only_when_asked_for_and_with_a_warning():
    from skcarrot.serve.scorer import Scorer

    # the micro test config has no pretrained tag: a name alone can not mean random weights
    with pytest.raises(ValueError, match="has no pretrained tag.*pretrained='random'"):
        Scorer(model_name=MICRO)
    with pytest.warns(RandomWeightsWarning, match="random weights"):
        scorer = Scorer(model_name=MICRO, pretrained="random")
    assert scorer.backend.pretrained is None and scorer.model_id == f"{MICRO}:random-init"


def test_an_unknown_model_and_a_missing_checkpoint_fail_with_what_to_do():
    with pytest.raises(ValueError, match="unknown open_clip model 'RN5O'.*list_models"):
        resolve_weights("RN5O")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_model("RN50", "/no/such/dir/rn50.pt", check=True)


def test_the_embedded_model_resolves_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_model().pretrained == EMBEDDED_WEIGHTS
