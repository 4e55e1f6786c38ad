"""The chat endpoint: the real openai client against skcarrot serve's /v1/chat/completions on loopback."""

import base64
import io

import numpy as np
import openai
import pytest
from PIL import Image

from servekit import thread_server
from skcarrot.serve import Settings, create_app
from skcarrot.serve.chat.model import CHAT_MODEL, chat_text

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

INSTRUCTION = "which option describes the image? answer with the letter."


def data_url(array):
    png = io.BytesIO()
    image = array if isinstance(array, Image.Image) else Image.fromarray(np.asarray(array, dtype=np.uint8))
    image.save(png, format="PNG")
    return "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()


def digit_url(d=3):
    from skcarrot.datasets import load_digit_images
    from skcarrot.images import to_pil_images

    X, y = load_digit_images()
    return data_url(to_pil_images(X[np.flatnonzero(y == d)[:1]])[0])


def user(text, url, detail="low"):
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url, "detail": detail}}]}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``(app, base_url, key)``: one server with the shipped chat model, a key of 200 queries."""
    app = create_app(Settings(db_url=f"sqlite:///{tmp_path_factory.mktemp('chat')}/ledger.db"))
    key_id, key = app.state.server.ledger.create_key("chat-test", budget=200)
    with thread_server(app) as base:
        yield app, base, key, key_id


def client(base, key):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)


def ask(c, text=INSTRUCTION + " A. 3 B. 7 C. 1", url=None, **kw):
    params = dict(model=CHAT_MODEL, messages=user(text, url or digit_url()), max_completion_tokens=1,
                  logprobs=True, top_logprobs=5)
    params.update(kw)
    return c.chat.completions.create(**params)


def test_models_lists_the_chat_model(served):
    _, base, key, _ = served
    assert [m.id for m in client(base, key).models.list()] == [CHAT_MODEL]


def test_logprobs_and_usage_come_back_in_openai_shape(served):
    app, base, key, _ = served
    r = ask(client(base, key), top_logprobs=7)
    first = r.choices[0].logprobs.content[0]
    assert len(first.top_logprobs) == 7
    lps = [t.logprob for t in first.top_logprobs]
    assert lps == sorted(lps, reverse=True) and all(lp <= 0 for lp in lps)
    assert first.token == first.top_logprobs[0].token and bytes(first.bytes).decode() == first.token
    engine = app.state.chat_engine
    text_tokens = engine.count(chat_text([("user", INSTRUCTION + " A. 3 B. 7 C. 1")]))
    assert r.usage.prompt_tokens_details.image_tokens == 85
    assert r.usage.prompt_tokens == text_tokens + 85
    assert r.usage.completion_tokens == 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_high_detail_bills_tiles(served):
    _, base, key, _ = served
    r = ask(client(base, key), url=data_url(np.zeros((600, 600))), max_completion_tokens=1)
    low = r.usage.prompt_tokens_details.image_tokens
    big = ask(client(base, key), url=data_url(np.zeros((600, 600))), max_completion_tokens=1,
              messages=user(INSTRUCTION + " A. 3 B. 7 C. 1", data_url(np.zeros((600, 600))), "high"))
    assert (low, big.usage.prompt_tokens_details.image_tokens) == (85, 85 + 170 * 4)


def test_each_image_is_billed_by_its_own_detail_and_answered_as_if_sent_small(served):
    _, base, key, _ = served
    big = data_url(np.kron(np.eye(2) * 255, np.ones((300, 300))))  # 600 x 600
    parts = [{"type": "text", "text": INSTRUCTION + " A. 3 B. 7"},
             {"type": "image_url", "image_url": {"url": big, "detail": "low"}},
             {"type": "image_url", "image_url": {"url": big, "detail": "high"}}]
    r = client(base, key).chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": parts}],
                                                  max_completion_tokens=1, logprobs=True, top_logprobs=3)
    assert r.usage.prompt_tokens_details.image_tokens == 85 + 765
    from skcarrot.serve.chat.engine import ChatEngine

    small = ChatEngine.reduce(Image.open(io.BytesIO(base64.b64decode(big.split(",", 1)[1]))))
    parts[1]["image_url"]["url"] = parts[2]["image_url"]["url"] = data_url(small)
    same = client(base, key).chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": parts}],
                                                     max_completion_tokens=1, logprobs=True, top_logprobs=3)
    first = r.choices[0].logprobs.content[0].top_logprobs
    assert [(t.token, t.logprob) for t in first] == [
        (t.token, t.logprob) for t in same.choices[0].logprobs.content[0].top_logprobs]


def test_option_letters_are_tokens_and_the_answer_follows_the_image(served):
    _, base, key, _ = served
    c = client(base, key)
    answers = {}
    for d in (0, 1, 7):
        top = ask(c, INSTRUCTION + " A. 0 B. 1 C. 7", url=digit_url(d)).choices[0].logprobs.content[0].top_logprobs
        answers[d] = top[0].token.strip()
    assert set(answers.values()) <= {"a", "b", "c"}
    assert len(set(answers.values())) >= 2  # different digits, different letters


def test_the_instruction_wording_changes_the_distribution(served):
    _, base, key, _ = served
    c = client(base, key)
    one = ask(c, INSTRUCTION + " A. 3 B. 7 C. 1").choices[0].logprobs.content[0].top_logprobs
    other = ask(c, "tell me about it. A. 3 B. 7 C. 1").choices[0].logprobs.content[0].top_logprobs
    assert [(t.token, round(t.logprob, 3)) for t in one] != [(t.token, round(t.logprob, 3)) for t in other]


def test_a_label_of_several_tokens_is_answered_token_by_token(served):
    app, base, key, _ = served
    assert app.state.chat_engine.count("ankle boot") == 2 and app.state.chat_engine.count("b") == 1
    from skcarrot.datasets import load_fashion_mnist

    X, y = load_fashion_mnist("test")
    r = ask(client(base, key), "what is in the image? answer with its name. A. ankle boot B. t-shirt/top",
            url=data_url(X[np.flatnonzero(y == 9)[0]]), max_completion_tokens=4, top_logprobs=2)
    tokens = r.choices[0].logprobs.content
    assert 1 <= len(tokens) <= 4 and r.usage.completion_tokens == len(tokens)
    assert r.choices[0].message.content == "".join(t.token for t in tokens).strip()


def test_logprob_token_ids_return_exactly_those_tokens(served):
    app, base, key, _ = served
    ids = [app.state.chat_engine.tokenizer.encode(letter)[0] for letter in "abc"]
    r = ask(client(base, key), extra_body={"logprob_token_ids": ids})
    top = r.choices[0].logprobs.content[0].top_logprobs
    assert [t.token.strip() for t in top] == ["a", "b", "c"]


def test_the_ledger_charges_one_query_per_call(served):
    app, base, key, key_id = served
    before = app.state.server.ledger.usage(key_id).prompts_used
    c = client(base, key)
    for _ in range(3):
        ask(c)
    assert app.state.server.ledger.usage(key_id).prompts_used - before == 3


@pytest.mark.parametrize("change, status, code", [
    (dict(model="gpt-4o"), 404, "model_not_found"),
    (dict(top_logprobs=21), 400, "integer_above_max_value"),
    (dict(max_completion_tokens=500), 400, "integer_above_max_value"),
    (dict(n=2), 400, "integer_above_max_value"),
    (dict(messages=user("x", "https://example.org/cat.png")), 400, "invalid_image_url"),
    (dict(messages=user("x", "data:image/png;base64,not-base64!")), 400, "invalid_image_url"),
    (dict(messages=user("x", "data:image/png;base64," + base64.b64encode(b"not an image").decode())), 400,
     "invalid_image"),
    (dict(messages=[{"role": "user", "content": "x" * 5000}]), 400, "string_above_max_length"),
    (dict(messages=[{"role": "user", "content": [{"type": "text", "text": "x"}] * 40}]), 400,
     "array_above_max_length"),
    (dict(messages=user("x" * 3000, digit_url())), 400, "context_length_exceeded"),
    (dict(messages=[{"role": "user", "content": "x " * 1500}] * 3), 400, "context_length_exceeded"),
    (dict(messages=[]), 400, None),
])
def test_bad_requests_get_openai_errors_and_cost_nothing(served, change, status, code):
    app, base, key, key_id = served
    before = app.state.server.ledger.usage(key_id).prompts_used
    with pytest.raises(openai.APIStatusError) as info:
        ask(client(base, key), **change)
    error = info.value.body
    assert info.value.status_code == status
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    assert app.state.server.ledger.usage(key_id).prompts_used == before


def test_a_plain_string_message_is_answered(served):
    _, base, key, _ = served
    r = client(base, key).chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "system", "content": "you classify images."},
                                    {"role": "user", "content": INSTRUCTION + " A. 3 B. 7"}], max_tokens=1)
    assert r.usage.prompt_tokens_details.image_tokens == 0 and r.choices[0].logprobs is None


def test_too_many_images_are_refused(served):
    _, base, key, _ = served
    url = digit_url()
    parts = [{"type": "text", "text": "x"}] + [{"type": "image_url", "image_url": {"url": url}}] * 5
    with pytest.raises(openai.BadRequestError, match="images"):
        client(base, key).chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": parts}])


def test_a_wrong_key_is_a_401_in_openai_shape(served):
    _, base, _, _ = served
    with pytest.raises(openai.AuthenticationError) as info:
        ask(client(base, "skc_wrong"))
    assert info.value.body["code"] == "invalid_api_key"


def test_an_exhausted_budget_is_a_429_no_client_retries(tmp_path):
    app = create_app(Settings(db_url=f"sqlite:///{tmp_path}/ledger.db"))
    _, key = app.state.server.ledger.create_key("tiny", budget=1)
    with thread_server(app) as base:
        c = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=2)
        ask(c)
        with pytest.raises(openai.RateLimitError) as info:
            ask(c)
    assert info.value.body["code"] == "insufficient_quota"
    assert info.value.response.headers["x-should-retry"] == "false"


def test_an_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path):
    app = create_app(Settings(db_url=f"sqlite:///{tmp_path}/ledger.db", max_image_pixels=100))
    _, key = app.state.server.ledger.create_key("k", budget=10)
    with thread_server(app) as base, pytest.raises(openai.BadRequestError, match="pixels"):
        ask(client(base, key), url=data_url(np.zeros((20, 20))))


def test_a_server_without_the_chat_model_says_so(tmp_path):
    app = create_app(Settings(db_url=f"sqlite:///{tmp_path}/ledger.db", chat_weights="off"))
    _, key = app.state.server.ledger.create_key("k", budget=10)
    with thread_server(app) as base, pytest.raises(openai.NotFoundError, match="no chat model"):
        ask(client(base, key))
