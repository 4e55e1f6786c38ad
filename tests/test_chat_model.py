"""The micro chat model: its shipped weights, its recipe, its billing rule."""

import numpy as np
import pytest

from skcarrot.backends.models import RandomWeightsWarning
from skcarrot.serve.chat import recipe
from skcarrot.serve.chat.engine import CHAT_WEIGHTS, ChatEngine
from skcarrot.wire import image_tokens


def test_the_shipped_weights_answer_held_out_digits_as_the_model_card_says():
    # model card: 68.2% on 500 held-out sklearn digits, 10 options; 200 of them here
    accuracy = recipe.evaluate(CHAT_WEIGHTS, n=200, seed=1)[recipe.DEFAULT_INSTRUCTION]
    assert 0.55 <= accuracy <= 0.8  # well above chance (0.1), far from perfect: room to tune


def test_an_unseen_instruction_answers_worse():
    scores = recipe.evaluate(CHAT_WEIGHTS, instructions=(recipe.DEFAULT_INSTRUCTION, "tell me about it."), n=200)
    assert scores["tell me about it."] < scores[recipe.DEFAULT_INSTRUCTION] - 0.1


def test_the_recipe_trains_weights_the_engine_loads(tmp_path):
    out = tmp_path / "chat.safetensors"
    info = recipe.train(out, steps=3, batch_size=8, verbose=False)
    assert out.is_file() and np.isfinite(info["final_loss"])
    engine = ChatEngine.load(str(out))
    lp = engine.next_token_log_probs([[("user", ["which digit? A. 1 B. 2"])]])
    assert lp.shape == (1, 49408) and np.isclose(np.exp(lp).sum(), 1.0, atol=1e-3)


def test_random_weights_only_when_asked_and_with_a_warning():
    with pytest.warns(RandomWeightsWarning):
        ChatEngine.load("random")
    with pytest.raises(FileNotFoundError, match="recipe"):
        ChatEngine.load("/nonexistent/chat.safetensors")


@pytest.mark.parametrize("size, detail, tokens", [
    ((28, 28), "low", 85), ((4000, 4000), "low", 85), ((512, 512), "high", 255), ((1024, 1024), "high", 765),
    ((2048, 4096), "high", 1105), ((600, 600), "auto", 765), ((300, 200), "auto", 85),
])
def test_images_are_billed_like_openai_tile_models(size, detail, tokens):
    assert image_tokens(*size, detail) == tokens
