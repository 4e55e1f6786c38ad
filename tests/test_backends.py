import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import MICRO, StrictBackend, scored
from sklearn.base import clone

from skcarrot.backends import OpenCLIPBackend, QueryCounter, ToyBackend
from skcarrot.backends.openclip import _MODELS
from skcarrot.exceptions import QueryBudgetExceededError, WeightsUnavailableError
from skcarrot.images import to_pil_images

NAMES = ["zero", "one", "a big red bird"]


@pytest.fixture(scope="module")
def images():
    rng = np.random.RandomState(0)
    return to_pil_images(rng.randint(0, 256, size=(5, 12, 12, 3)).astype(np.uint8))


# ------------------------------------------------------------------ accounting
def test_counter_counts_each_prompt_and_purpose(images):
    inner = StrictBackend()
    box = QueryCounter(inner, budget=10)
    box.logits(images, NAMES, np.zeros((3, 2, 8)), purpose="prompt")
    box.logits(images, NAMES, np.zeros((1, 2, 8)), purpose="refiner")
    assert box.n_queries == 4 == scored(inner)
    assert box.by_purpose == {"prompt": 3, "refiner": 1}
    assert box.remaining == 6


def test_counter_refuses_before_the_call(images):
    inner = StrictBackend()
    box = QueryCounter(inner, budget=5)
    box.logits(images, NAMES, np.zeros((4, 2, 8)))
    with pytest.raises(QueryBudgetExceededError, match="exceed the query budget of 5"):
        box.logits(images, NAMES, np.zeros((2, 2, 8)))
    assert scored(inner) == 4 and box.n_queries == 4
    box.logits(images, NAMES, np.zeros((1, 2, 8)))
    assert box.n_queries == 5


class Failing:
    """A backend with both doors whose every call reaches it and raises, as a dropped connection does."""

    context_shape = (2, 8)
    returns = "logits"

    def __init__(self):
        self.calls = 0

    def logits(self, images, class_names, offsets):
        self.calls += 1
        raise ConnectionError("the answer was lost")

    def text_scores(self, images, prompts):
        self.calls += 1
        raise ConnectionError("the answer was lost")


@pytest.mark.parametrize("door", ["embedding", "text"])
def test_a_call_that_raises_is_counted_on_either_door(images, door):
    inner = Failing()
    box = QueryCounter(inner, budget=10)
    with pytest.raises(ConnectionError, match="lost"):
        if door == "embedding":
            box.logits(images, NAMES, np.zeros((3, 2, 8)), purpose="prompt")
        else:
            box.text_scores(images, [["a cat.", "a dog."]] * 3, purpose="prompt")
    assert inner.calls == 1  # handed to the backend: counted in full, though it raised
    assert (box.n_queries, box.n_images_scored, box.n_pairs_scored) == (3, 5, 15)
    assert box.by_purpose == {"prompt": 3} and box.images_by_purpose == {"prompt": 5}
    assert box.remaining == 7


def test_call_refused_by_the_budget_is_not_sent_nor_counted(images):
    inner = Failing()
    box = QueryCounter(inner, budget=2)
    with pytest.raises(QueryBudgetExceededError, match="3 prompt\\(s\\).*2 left.*not sent"):
        box.logits(images, NAMES, np.zeros((3, 2, 8)))
    with pytest.raises(QueryBudgetExceededError, match="3 prompt set\\(s\\).*2 left.*not sent"):
        box.text_scores(images, [["a cat.", "a dog."]] * 3)
    assert inner.calls == 0
    assert (box.n_queries, box.n_images_scored, box.n_pairs_scored) == (0, 0, 0)
    assert box.by_purpose == {} and box.images_by_purpose == {} and box.remaining == 2


def test_one_counter_and_one_budget_for_both_doors(images):
    box = QueryCounter(ToyBackend(), budget=4)
    box.logits(images, NAMES, np.zeros((3, 2, 8)), purpose="prompt")
    with pytest.raises(TypeError, match="has no 'returns'"):  # ToyBackend has no text door
        box.text_scores(images, [["a cat.", "a dog."]])
    assert box.n_queries == 3 and box.n_pairs_scored == 15


def test_counter_reads_each_door_lazily():
    class TextOnly:
        returns = "probabilities"

        def text_scores(self, images, prompts):
            return np.full((len(prompts), len(images), len(prompts[0])), 0.5)

    box = QueryCounter(TextOnly())  # no context_shape needed for the text door
    assert box.text_scores(["img"], [["a", "b"]]).shape == (1, 1, 2)
    with pytest.raises(TypeError, match="has no 'logits'"):
        box.logits(["img"], ["a", "b"], np.zeros((1, 2, 8)))


def test_counter_checks_shapes(images):
    box = QueryCounter(ToyBackend(), budget=None)
    with pytest.raises(ValueError, match=r"offsets must have shape \(P, 2, 8\)"):
        box.logits(images, NAMES, np.zeros((1, 3, 8)))

    class Wrong:
        context_shape = (2, 8)

        def logits(self, images, class_names, offsets):
            return np.zeros((1, 1))

    with pytest.raises(ValueError, match="returned shape"):
        QueryCounter(Wrong()).logits(images, NAMES, np.zeros((1, 2, 8)))
    with pytest.raises(TypeError, match="context_shape"):
        QueryCounter(object())


# -------------------------------------------------------------------- open_clip
def test_context_shape_and_logit_shape(micro, images):
    assert micro.context_shape == (4, 32)
    out = micro.logits(images, NAMES, np.zeros((3, 4, 32)))
    assert out.shape == (3, 5, 3) and out.dtype == np.float64


def test_zero_offset_is_the_hand_written_prompt(micro, images):
    """Truncated, batched encoding equals open_clip's own full-length encode_text."""
    box = micro._box()
    model = box.model
    texts = [micro.template.format(n) for n in NAMES]
    with torch.no_grad():
        img = model.encode_image(torch.stack([box.preprocess(im) for im in images]), normalize=True)
        txt = model.encode_text(box.tokenizer(texts), normalize=True)
        ref = (model.logit_scale.exp() * img @ txt.T).numpy()
    got = micro.logits(images, NAMES, np.zeros((2, 4, 32)))
    np.testing.assert_allclose(got[0], ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[1], ref, rtol=1e-4, atol=1e-5)


def test_offsets_go_to_the_context_tokens(micro, images):
    """A non-zero offset equals adding it by hand to the embeddings of 'a photo of a'."""
    box = micro._box()
    model = box.model
    offset = np.random.RandomState(3).normal(0, 0.5, size=(4, 32)).astype(np.float32)
    tokens = box.tokenizer([micro.template.format(n) for n in NAMES])
    with torch.no_grad():
        x = model.token_embedding(tokens)
        x[:, 1:5] += torch.from_numpy(offset)
        x = model.transformer(x + model.positional_embedding, attn_mask=model.attn_mask)
        x = model.ln_final(x)[torch.arange(len(NAMES)), tokens.argmax(-1)] @ model.text_projection
        txt = torch.nn.functional.normalize(x, dim=-1)
        img = model.encode_image(torch.stack([box.preprocess(im) for im in images]), normalize=True)
        ref = (model.logit_scale.exp() * img @ txt.T).numpy()
    got = micro.logits(images, NAMES, np.stack([np.zeros_like(offset), offset]))
    np.testing.assert_allclose(got[1], ref, rtol=1e-4, atol=1e-5)
    assert not np.allclose(got[0], got[1])


def test_image_features_are_cached_per_distinct_image(micro, images):
    box = micro._box()
    micro.logits(images, NAMES, np.zeros((1, 4, 32)))
    n = len(box.image_features)
    micro.logits(images + images[:2], NAMES, np.zeros((1, 4, 32)))
    assert len(box.image_features) == n


def test_copies_share_weights_and_carry_none(micro, images):
    micro.context_shape  # loaded
    n_models = len(_MODELS)
    copies = [clone(micro), pickle.loads(pickle.dumps(micro))]
    assert len(pickle.dumps(micro)) < 2000
    for c in copies:
        assert c._box() is micro._box()
    assert len(_MODELS) == n_models


@pytest.mark.slow
def test_random_init_is_the_same_in_every_process(micro, images):
    code = (
        "import numpy as np; from skcarrot.backends import OpenCLIPBackend;"
        "from skcarrot.images import to_pil_images;"
        f"b = OpenCLIPBackend(model_name={MICRO!r}, pretrained=None);"
        "imgs = to_pil_images(np.random.RandomState(0).randint(0, 256, size=(5, 12, 12, 3)).astype(np.uint8));"
        f"print(repr(b.logits(imgs, {NAMES!r}, np.zeros((1, 4, 32)))[0].tolist()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    other = np.array(eval(out.strip().splitlines()[-1]))
    np.testing.assert_array_equal(other, micro.logits(images, NAMES, np.zeros((1, 4, 32)))[0])


def test_local_checkpoint_path(micro, images, tmp_path):
    path = tmp_path / "micro.pt"
    state = {k: v * 1.5 if k == "logit_scale" else v for k, v in micro._box().model.state_dict().items()}
    torch.save(state, path)
    local = OpenCLIPBackend(model_name=MICRO, pretrained=str(path))
    np.testing.assert_allclose(
        local.logits(images, NAMES, np.zeros((1, 4, 32))),
        micro.logits(images, NAMES, np.zeros((1, 4, 32))) * np.exp(0.5 * float(micro._box().model.logit_scale)),
        rtol=1e-5,
    )


def test_unknown_model_name_says_how_to_list():
    with pytest.raises(ValueError, match=r"unknown open_clip model 'not-a-model'.*open_clip.list_models\(\)"):
        OpenCLIPBackend(model_name="not-a-model", pretrained=None).context_shape


def test_unknown_tag_or_missing_file():
    with pytest.raises(ValueError, match=r"neither a known tag of 'RN50' \(known: .*openai"):
        OpenCLIPBackend(model_name="RN50", pretrained="no-such-tag").context_shape


def test_offline_download_failure_tells_to_pass_a_local_file():
    with pytest.raises(WeightsUnavailableError, match="pass a local checkpoint|Pass a local checkpoint"):
        OpenCLIPBackend(model_name="RN50", pretrained="openai", device="cpu").context_shape


def test_bad_templates():
    with pytest.raises(ValueError, match="exactly once"):
        OpenCLIPBackend(model_name=MICRO, pretrained=None, template="a photo").context_shape
    with pytest.raises(ValueError, match="no context words"):
        OpenCLIPBackend(model_name=MICRO, pretrained=None, template="{}.").context_shape


def test_other_template_changes_context_shape():
    b = OpenCLIPBackend(model_name=MICRO, pretrained=None, template="a blurry photo of the number {}")  # 6 words
    assert b.context_shape == (6, 32)


def test_shared_prefix_equals_the_plain_pass(micro):
    box = micro._box()
    assert box.share_prefix
    tokens = box.tokens_for(["cat", "a much longer class name", "x", "dog"])
    offsets = torch.from_numpy(np.random.RandomState(1).normal(0, 0.5, size=(7, 4, 32)).astype(np.float32))
    with torch.no_grad():
        shared = box.text_features(tokens, offsets, share_prefix=True)
        plain = box.text_features(tokens, offsets, share_prefix=False)
    np.testing.assert_allclose(shared.numpy(), plain.numpy(), rtol=1e-4, atol=1e-6)


def test_shared_prefix_is_differentiable(micro):
    wb = micro.white_box()
    offsets = torch.zeros(1, 4, 32, requires_grad=True)
    wb.text_features(["cat", "dog"], offsets).sum().backward()
    assert offsets.grad is not None and torch.isfinite(offsets.grad).all() and offsets.grad.abs().sum() > 0


def test_half_precision_stays_close(images):
    fp32 = OpenCLIPBackend(model_name=MICRO, pretrained=None, precision="fp32")
    bf16 = OpenCLIPBackend(model_name=MICRO, pretrained=None, precision="bf16")
    offsets = np.random.RandomState(2).normal(0, 0.1, size=(3, 4, 32))
    a, b = fp32.logits(images, NAMES, offsets), bf16.logits(images, NAMES, offsets)
    assert b.dtype == np.float64
    np.testing.assert_allclose(b, a, atol=0.05 * np.abs(a).max())
    with pytest.raises(ValueError, match="precision must be"):
        OpenCLIPBackend(model_name=MICRO, pretrained=None, precision="int4").context_shape


def test_non_finite_offsets_are_refused_with_their_count_and_the_first_index():
    from skcarrot._util.validation import check_offsets

    offsets = np.zeros((3, 4, 32))
    offsets[1, 2, 5], offsets[2, 0, 0] = np.nan, np.inf
    expected = r"2 NaN or infinite values of 384, the first at index \(1, 2, 5\) \(prompt 1\)"
    with pytest.raises(ValueError, match=expected):
        check_offsets(offsets, (4, 32))


def test_a_class_name_too_long_for_the_context_is_named_with_the_context_length(micro, images):
    long_name = "very " * 100 + "long"
    expected = r"1 prompt\(s\) are longer than the model's context length of \d+ tokens"
    with pytest.raises(ValueError, match=expected) as info:
        micro.logits(images, ["cat", long_name], np.zeros((1, 4, 32)))
    assert long_name in str(info.value) and "'a photo of a cat.'" not in str(info.value)
