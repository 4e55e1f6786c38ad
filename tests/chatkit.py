"""A scripted OpenAI-compatible chat server for the chat door's tests, on 127.0.0.1, and images it can tell apart.

``FakeChat`` answers ``POST /v1/chat/completions`` and ``GET /v1/models`` as OpenAI does
(the real ``openai`` client talks to it), with a deterministic scorer: an image's mean
brightness decides its class (class ``c`` of ``C`` sits at brightness ``(c + 0.5) / C``),
an option's description names its class, the word "Classify" in the instruction sharpens
the answer, and option A gets a fixed bonus (option-position bias). Faults are scripted
on the object: fewer alternatives, the -9999 sentinel, 429 storms with Retry-After, 500s,
a model refusing log-probabilities, a wrong key, an unknown model, slow answers.
"""

from __future__ import annotations

import base64
import io
import re
import threading
import time

import numpy as np
from PIL import Image

from helpers import JSONHandler, LoopbackServer

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DISTRACTORS = ("The", "I", "This", "It", "An", "Sure")


def _clip_count(text):
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = _TOKENIZER.get("t")
    if tokenizer is None:
        tokenizer = _TOKENIZER["t"] = SimpleTokenizer()
    return len(tokenizer.encode(text))


_TOKENIZER = {}


def images_for(y, n_classes, seed=0, size=8):
    """Grey images whose brightness tells class ``y`` (with noise)."""
    rng = np.random.RandomState(seed)
    out = []
    for c in y:
        level = (c + 0.5) / n_classes + rng.normal(0, 0.18 / n_classes)
        pixels = np.clip(level * 255 + rng.normal(0, 10, (size, size)), 0, 255).astype(np.uint8)
        out.append(np.stack([pixels] * 3, axis=-1))
    return np.stack(out)


class FakeChat:
    """The server's script and record; ``url`` (the API root, ``.../v1``) inside a ``with`` block."""

    def __init__(self, class_names, *, model="fake-vlm", key=None, position_bias=1.0, sharpness=8.0, distractor_gap=3.0):
        self.class_names = [str(c) for c in class_names]
        self.model = model
        self.key = key
        self.position_bias = position_bias
        self.sharpness = sharpness
        self.distractor_gap = distractor_gap  # how far below the best option the distractor words come
        self.max_alternatives = 20
        self.sentinel = False  # options outside the returned ones come back as -9999 entries
        self.storm = 0  # this many next calls answer 429
        self.retry_after = "0"
        self.errors_500 = 0
        self.no_logprobs = set()  # models that refuse logprobs with 400
        self.forbidden = set()  # models that refuse with 403
        self.delay = 0.0
        self.chatty = False  # the distractor words crowd every option out of the alternatives
        self.letter_style = "plain"  # "plain", "clip" ("b</w>"), "split" (mass over "B" and " b")
        self.requests = 0  # every POST, faults included
        self.answered = 0
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "image_tokens": 0}
        self.bodies = []
        self._lock = threading.Lock()

    # -- scoring ------------------------------------------------------------------------------
    def class_of(self, description):
        text = description.lower()
        for c, name in enumerate(self.class_names):
            if re.search(rf"\b{re.escape(name.lower())}\b", text):
                return c
            if name.isdigit() and len(name) == 1 and WORDS[int(name)] in text:
                return c
        return None

    def option_scores(self, text, brightness):
        options = re.findall(r"^([A-Z])\. (.*)$", text, flags=re.M)
        sharp = self.sharpness * (3.0 if "classify" in text.lower() else 1.0)
        n = len(self.class_names)
        scores = []
        for pos, (letter, description) in enumerate(options):
            c = self.class_of(description)
            centre = (c + 0.5) / n if c is not None else 2.0
            s = -sharp * n * abs(brightness - centre) + (self.position_bias if pos == 0 else 0.0)
            scores.append((letter, s))
        return scores

    def completion(self, body):
        content = body["messages"][-1]["content"]
        text = "".join(p.get("text", "") for p in content if p["type"] == "text")
        url = next(p["image_url"]["url"] for p in content if p["type"] == "image_url")
        image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("L")
        brightness = float(np.asarray(image, dtype=float).mean() / 255.0)
        scored = self.option_scores(text, brightness)
        # The distractors trail the best option (a model that follows the instruction), unless it chats.
        top_option = max(s for _, s in scored)
        level = top_option + 5.0 if self.chatty else top_option - self.distractor_gap
        tokens = [(letter, s) for letter, s in scored] + [(d, level - i) for i, d in enumerate(DISTRACTORS)]
        logits = np.array([s for _, s in tokens])
        logp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
        entries = []
        for (token, _), lp in zip(tokens, logp):
            if token in DISTRACTORS:
                entries.append((token, float(lp)))
            elif self.letter_style == "clip":
                entries.append((token.lower() + "</w>", float(lp)))
            elif self.letter_style == "split":
                entries += [(token, float(lp + np.log(0.7))), (" " + token.lower(), float(lp + np.log(0.3)))]
            else:
                entries.append((token, float(lp)))
        entries.sort(key=lambda e: -e[1])
        ids = (body.get("logprob_token_ids") or [])
        k = int(body.get("top_logprobs") or 0)
        if ids:  # vLLM: the requested token ids (here: 1000 + letter index) are all returned
            wanted = {chr(ord("A") + i - 1000) for i in ids}
            top = [e for e in entries if e[0].strip().upper().replace("</W>", "") in wanted]
            top += [e for e in entries[:1] if e not in top]  # the sampled token comes along
        else:
            top = entries[: min(k, self.max_alternatives)]
            if self.sentinel:
                shown = {e[0] for e in top}
                top += [(letter, -9999.0) for letter, _ in scored if letter not in shown]
        prompt_tokens = _clip_count(text) + 85
        with self._lock:
            self.answered += 1
            self.usage["prompt_tokens"] += prompt_tokens
            self.usage["completion_tokens"] += 1
            self.usage["image_tokens"] += 85
        first = top[0]
        return {
            "id": f"chatcmpl-{self.answered}", "object": "chat.completion", "created": 1700000000,
            "model": body["model"], "system_fingerprint": "fp_test",
            "choices": [{"index": 0, "finish_reason": "length",
                         "message": {"role": "assistant", "content": first[0], "refusal": None},
                         "logprobs": {"content": [{"token": first[0], "logprob": first[1], "bytes": None,
                                                   "top_logprobs": [{"token": t, "logprob": lp, "bytes": None}
                                                                    for t, lp in top]}],
                                      "refusal": None}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1, "total_tokens": prompt_tokens + 1,
                      "prompt_tokens_details": {"cached_tokens": 0, "image_tokens": 85}},
        }

    # -- serving ------------------------------------------------------------------------------
    def handler(self):
        fake = self

        class Handler(JSONHandler):
            def _authorised(self):
                if fake.key is None:
                    return True
                if self.headers.get("Authorization") == f"Bearer {fake.key}":
                    return True
                self.reply(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                           "code": "invalid_api_key"}})
                return False

            def do_GET(self):
                if not self._authorised():
                    return
                if self.path.rstrip("/") == "/v1/models":
                    self.reply(200, {"object": "list", "data": [{"id": fake.model, "object": "model",
                                                                 "created": 0, "owned_by": "test"}]})
                else:
                    self.reply(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

            def do_POST(self):
                body = self.read_body()
                with fake._lock:
                    fake.requests += 1
                    fake.bodies.append(body)
                    storm = fake.storm > 0
                    if storm:
                        fake.storm -= 1
                    error500 = not storm and fake.errors_500 > 0
                    if error500:
                        fake.errors_500 -= 1
                if not self._authorised():
                    return
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self.reply(404, {"error": {"message": "no such route", "type": "invalid_request_error"}})
                if fake.delay:
                    time.sleep(fake.delay)
                if storm:
                    return self.reply(429, {"error": {"message": "Rate limit reached", "type": "requests",
                                                      "code": "rate_limit_exceeded"}},
                                      headers=[("Retry-After", fake.retry_after)])
                if error500:
                    return self.reply(500, {"error": {"message": "internal error", "type": "server_error"}})
                model = body.get("model")
                if model in fake.no_logprobs:
                    return self.reply(400, {"error": {"message": "logprobs are not supported with reasoning "
                                                                 "models.", "type": "invalid_request_error",
                                                      "param": "logprobs", "code": "unsupported_parameter"}})
                if model in fake.forbidden:
                    return self.reply(403, {"error": {"message": "You are not allowed to request logprobs from "
                                                                 "this model", "type": "invalid_request_error"}})
                if model != fake.model:
                    return self.reply(404, {"error": {"message": f"The model `{model}` does not exist",
                                                      "type": "invalid_request_error", "code": "model_not_found"}})
                self.reply(200, fake.completion(body))

        return Handler

    def __enter__(self):
        self._server = LoopbackServer(self.handler(), path="/v1")
        self._server.__enter__()
        self.url = self._server.url
        return self

    def __exit__(self, *exc):
        self._server.__exit__(*exc)
