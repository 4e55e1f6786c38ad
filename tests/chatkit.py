"""A scripted OpenAI-compatible chat server for what the micro chat model can not show.

Its answers are a fixed function of the image: the image's mean brightness picks the right
option (classes in order of brightness), its letter gets most of the mass and the others a
deterministic share. A script switches on a provider's quirks: fewer alternatives than asked,
the -9999 sentinel, 429 storms with Retry-After, 5xx, a model without log-probabilities,
refused keys, unknown models. Every request is recorded.
"""

from __future__ import annotations

import base64
import io
import math
import re
import threading

import numpy as np
from PIL import Image

from helpers import JSONHandler, LoopbackServer
from skcarrot.datasets import DIGIT_WORDS

MODEL = "fake-vlm"
KEY = "sk-test-key"


class Script:
    """What the fake server does; tests change the fields."""

    def __init__(self):
        self.alternatives = None  # None: as many as asked
        self.sentinel = False  # options past the second get -9999 instead of being left out
        self.storm = 0  # answer this many requests with 429 before the first success
        self.retry_after = "0"
        self.errors_5xx = 0
        self.no_logprobs = False  # 400, as reasoning models answer
        self.no_option = False  # the top alternatives hold no option letter
        # True: the model reads options that end in a number word ("three", "the number three") right, and
        # those that end in a digit ("3", "the digit 3") only on half the images (the others get the next
        # class): a wording a search can find
        self.prefers_words = False
        self.lock = threading.Lock()
        self.requests = []
        self.answered = 0

    def take(self, name):
        with self.lock:
            left = getattr(self, name)
            if left > 0:
                setattr(self, name, left - 1)
                return True
            return False


def brightness(url):
    raw = base64.b64decode(url.split(",", 1)[1])
    return float(np.asarray(Image.open(io.BytesIO(raw)).convert("L"), dtype=float).mean())


def number(option):
    """The class an option names: its last word, a digit or a number word ("3", "three", "the digit 3")."""
    word = option.strip().split()[-1]
    return int(word) if word.isdigit() else (DIGIT_WORDS.index(word) if word in DIGIT_WORDS else 99)


def answer(body, script):
    """The fake model's top alternatives for one chat request."""
    parts = body["messages"][-1]["content"]
    text = next(p["text"] for p in parts if p["type"] == "text")
    url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
    letters = re.findall(r"(?:^|\s)([A-Z])\. ", text)
    options = re.findall(r"(?:^|\s)[A-Z]\. (.+?)(?= [A-Z]\. |$)", text)
    classes = [number(o) for o in options]
    level = brightness(url)
    # class k is the image of brightness 20 * k; the nearest class among the options wins
    right = int(np.argmin([abs(level - 20 * c) for c in classes])) if classes else 0
    if script.prefers_words and options and options[right].strip()[-1].isdigit() and int(level) % 2:
        right = (right + 1) % len(options)
    k = body.get("top_logprobs") or 0
    if script.alternatives is not None:
        k = min(k, script.alternatives)
    weights = np.array([8.0 if i == right else 1.0 / (1 + i) for i in range(len(letters))])
    probs = 0.9 * weights / weights.sum()
    pairs = [(" " + letter if i % 2 else letter, math.log(p)) for i, (letter, p) in enumerate(zip(letters, probs))]
    pairs.sort(key=lambda t: -t[1])
    if script.no_option:
        pairs = [("Sure", math.log(0.6)), ("I", math.log(0.3))]
    if script.sentinel:
        pairs = pairs[:2] + [(t, -9999.0) for t, _ in pairs[2:]]
    pairs = pairs[:k] if k else pairs[:1]
    return pairs


class ChatHandler(JSONHandler):
    script: Script

    def do_GET(self):
        if self.path.rstrip("/") == "/v1/models":
            self.reply(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0,
                                                           "owned_by": "test"}]})
        else:
            self.reply(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

    def do_POST(self):
        script = self.script
        body = self.read_body()
        with script.lock:
            script.requests.append(body)
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            return self.reply(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                              "param": None, "code": "invalid_api_key"}})
        if body.get("model") != MODEL:
            return self.reply(404, {"error": {"message": f"The model '{body.get('model')}' does not exist",
                                              "type": "invalid_request_error", "param": None,
                                              "code": "model_not_found"}})
        if script.take("storm"):
            return self.reply(429, {"error": {"message": "Rate limit reached", "type": "requests",
                                              "param": None, "code": "rate_limit_exceeded"}},
                              headers=[("Retry-After", script.retry_after)])
        if script.take("errors_5xx"):
            return self.reply(503, {"error": {"message": "overloaded", "type": "server_error"}})
        if script.no_logprobs and body.get("logprobs"):
            return self.reply(400, {"error": {"message": "logprobs are not supported with reasoning models.",
                                              "type": "invalid_request_error", "param": "logprobs",
                                              "code": "unsupported_parameter"}})
        pairs = answer(body, script)
        top = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in pairs]
        with script.lock:
            script.answered += 1
        self.reply(200, {
            "id": "chatcmpl-test", "object": "chat.completion", "created": 1700000000, "model": MODEL,
            "choices": [{"index": 0, "finish_reason": "length",
                         "message": {"role": "assistant", "content": pairs[0][0], "refusal": None},
                         "logprobs": {"content": [{"token": pairs[0][0], "logprob": pairs[0][1],
                                                   "bytes": list(pairs[0][0].encode()), "top_logprobs": top}],
                                      "refusal": None}}],
            "usage": {"prompt_tokens": 120, "completion_tokens": 1, "total_tokens": 121,
                      "prompt_tokens_details": {"cached_tokens": 0, "image_tokens": 85}},
        })


def fake_chat_server(script=None):
    """``(LoopbackServer, script)``: use the server in a ``with`` block; its ``url`` ends in ``/v1``."""
    script = script or Script()
    handler = type("Handler", (ChatHandler,), {"script": script})
    return LoopbackServer(handler, path="/v1"), script


def brightness_images(classes, seed=0, size=12):
    """Images whose brightness tells their class (class k near 20 * k), with a little noise."""
    rng = np.random.RandomState(seed)
    return [Image.fromarray(np.clip(20 * c + rng.normal(0, 6, (size, size)), 0, 255).astype(np.uint8))
            for c in classes]
