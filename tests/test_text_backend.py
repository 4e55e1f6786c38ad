"""The text-level door: protocol, counting, and the in-process open_clip backend."""

import pickle

import numpy as np
import pytest
from sklearn.base import clone

from skcarrot.backends import (
    BlackBoxVLM,
    OpenCLIPBackend,
    OpenCLIPTextBackend,
    QueryCounter,
    TextBlackBox,
    embedded_backend,
)
from skcarrot.backends._base import check_prompt_sets, log_probabilities
from skcarrot.datasets import DIGIT_WORDS
from skcarrot.exceptions import QueryBudgetExceededError
from skcarrot.images import to_pil_images

from helpers import MICRO


class StrictTextBackend:
    """A text-level black box with exactly two members; it records every call it receives."""

    def __init__(self, returns="probabilities", scores=None):
        self.returns = returns
        self.calls = []
        self._scores = scores

    def text_scores(self, images, prompts):
        self.calls.append((len(images), [tuple(p) for p in prompts]))
        if self._scores is not None:
            return self._scores
        n_strings = len(prompts[0])
        return np.full((len(prompts), len(images), n_strings), 1.0 / n_strings)


def test_door_is_a_two_member_protocol():
    assert isinstance(StrictTextBackend(), TextBlackBox)
    assert isinstance(OpenCLIPTextBackend(), TextBlackBox)
    assert not isinstance(OpenCLIPTextBackend(), BlackBoxVLM)  # a view of the text door alone
    assert isinstance(embedded_backend(), TextBlackBox) and isinstance(embedded_backend(), BlackBoxVLM)


def test_counter_refuses_before_the_call():
    backend = StrictTextBackend()
    counter = QueryCounter(backend, budget=3)
    counter.text_scores(["img"] * 5, [["a", "b"]] * 2)
    with pytest.raises(QueryBudgetExceededError, match="2 prompt set.*1 left.*not sent"):
        counter.text_scores(["img"] * 5, [["a", "b"]] * 2)
    assert len(backend.calls) == 1
    assert counter.n_queries == 2
    counter.text_scores(["img"] * 5, [["a", "b"]])  # the last query still fits
    assert counter.remaining == 0 and len(backend.calls) == 2


def test_counter_counts_prompt_sets_and_images_by_purpose():
    counter = QueryCounter(StrictTextBackend())
    counter.text_scores(["img"] * 7, [["a", "b"]] * 3, purpose="prompt")
    counter.text_scores(["img"] * 4, [["a", "b", "c", "d", "e"]], purpose="screen")
    assert counter.n_queries == 4
    assert counter.n_images_scored == 7 + 4
    assert counter.n_pairs_scored == 3 * 7 + 4
    assert counter.by_purpose == {"prompt": 3, "screen": 1}
    assert counter.images_by_purpose == {"prompt": 7, "screen": 4}


def test_counter_counts_a_call_that_came_back_malformed():
    counter = QueryCounter(StrictTextBackend(scores=np.zeros((1, 2, 3))))
    with pytest.raises(ValueError, match=r"shape \(1, 2, 3\), expected \(2, 2, 2\)"):
        counter.text_scores(["img"] * 2, [["a", "b"]] * 2)
    assert counter.n_queries == 2


@pytest.mark.parametrize(
    "returns, scores, message",
    [
        ("logits", np.array([[[0.0, np.nan]]]), "non-finite values.*prompt set 0, image 0"),
        ("probabilities", np.array([[[0.5, 1.5]]]), "outside \\[0, 1\\].*returns='logits'"),
        ("probabilities", np.array([[[-0.1, 0.5]]]), "outside \\[0, 1\\]"),
    ],
)
def test_counter_rejects_bad_scores(returns, scores, message):
    counter = QueryCounter(StrictTextBackend(returns=returns, scores=scores))
    with pytest.raises(ValueError, match=message):
        counter.text_scores(["img"], [["a", "b"]])


def test_counter_needs_a_backend_that_says_what_it_returns():
    class NoReturns:
        def text_scores(self, images, prompts):  # pragma: no cover
            return None

    backend = StrictTextBackend(returns="scores")
    with pytest.raises(TypeError, match="has no 'returns'"):
        QueryCounter(NoReturns()).text_scores(["img"], [["a", "b"]])
    with pytest.raises(ValueError, match="must be one of"):
        QueryCounter(backend).text_scores(["img"], [["a", "b"]])
    assert backend.calls == []


@pytest.mark.parametrize(
    "prompts, error, message",
    [
        ("a cat.", TypeError, "single str"),
        (["a cat.", "a dog."], TypeError, "prompt set 0 is a str"),
        ([], ValueError, "at least one prompt set"),
        ([["a", "b"], ["a"]], ValueError, "prompt set 1 has 1 strings but prompt set 0 has 2"),
        ([["a", ""]], ValueError, "prompt set 0, string 1 is empty"),
        ([["a", 3]], TypeError, "string 1 is a int"),
    ],
)
def test_prompt_sets_are_validated_before_sending(prompts, error, message):
    backend = StrictTextBackend()
    with pytest.raises(error, match=message):
        QueryCounter(backend).text_scores(["img"], prompts)
    assert backend.calls == []
    assert check_prompt_sets([("x", "y")]) == [("x", "y")]


def test_log_probabilities_of_probabilities_are_renormalised_and_floored():
    probs = np.array([[0.6, 0.2, 0.0]])
    logp = log_probabilities(probs, "probabilities")
    assert np.allclose(np.exp(logp).sum(-1), 1.0)
    assert np.isfinite(logp).all()
    assert logp[0, 0] - logp[0, 1] == pytest.approx(np.log(3.0))
    # Logits and the softmax probabilities they give are the same log-probabilities.
    logits = np.array([[2.0, -1.0, 0.5]])
    soft = np.exp(logits) / np.exp(logits).sum()
    assert np.allclose(log_probabilities(logits, "logits"), log_probabilities(soft, "probabilities"))


def test_text_door_matches_embedding_door_at_zero_offset(digit_images):
    images, y = digit_images[0][:40], digit_images[1][:40]
    backend = embedded_backend()
    names = list(DIGIT_WORDS)
    embedding_logits = backend.logits(images, names, np.zeros((1,) + backend.context_shape))[0]
    text_logits = OpenCLIPTextBackend(backend).text_scores(images, [[f"a photo of a {w}." for w in names]])[0]
    np.testing.assert_allclose(text_logits, embedding_logits, atol=1e-4)
    assert (text_logits.argmax(1) == y).mean() > 0.4  # the embedded model reads digits zero-shot


def test_prompt_sets_share_encoded_strings(digit_images):
    images, _ = digit_images
    backend = OpenCLIPBackend(model_name=MICRO, pretrained=None, device="cpu")
    sets = [["a one.", "a two.", "a three."], ["a three.", "a one.", "a seven."]]
    logits = backend.text_scores(images[:5], sets)
    assert logits.shape == (2, 5, 3)
    # The same string scores the same wherever it sits.
    np.testing.assert_allclose(logits[0, :, 0], logits[1, :, 1])
    np.testing.assert_allclose(logits[0, :, 2], logits[1, :, 0])
    cache = backend._box().string_features
    assert {"a one.", "a two.", "a three.", "a seven."} <= set(cache)
    before = cache["a one."]
    backend.text_scores(images[:5], [["a one.", "a nine."]])
    assert cache["a one."] is before  # encoded once, then read from the cache


def test_too_long_prompt_is_refused_with_the_string():
    backend = OpenCLIPBackend(model_name=MICRO, pretrained=None, device="cpu")
    long_prompt = "a photo of " + "a very " * 40 + "cat."
    with pytest.raises(ValueError, match="longer than the model's context length"):
        backend.text_scores(to_pil_images(np.zeros((1, 8, 8), np.uint8)), [["a dog.", long_prompt]])


def test_text_backend_pickles_and_clones_without_weights():
    door = OpenCLIPTextBackend(OpenCLIPBackend(model_name=MICRO, pretrained=None, device="cpu"))
    door.text_scores(to_pil_images(np.zeros((1, 8, 8), np.uint8)), [["a cat.", "a dog."]])
    assert len(pickle.dumps(door)) < 2_000
    assert clone(door).get_params()["backend"].model_name == MICRO
    assert OpenCLIPTextBackend().returns == "logits"


def test_text_backend_refuses_a_backend_that_is_not_open_clip():
    from skcarrot.backends import ToyBackend

    with pytest.raises(TypeError, match="needs an OpenCLIPBackend"):
        OpenCLIPTextBackend(ToyBackend()).text_scores(["img"], [["a", "b"]])
