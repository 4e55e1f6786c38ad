"""Answering chats with the micro chat model: greedy tokens, their log-probabilities, billed tokens."""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ...wire import image_tokens
from .model import CHAT_MODEL, chat_text

__all__ = ["ChatEngine", "Completion", "TokenLogprob", "CHAT_WEIGHTS", "CHAT_OFF", "LazyChatEngine", "image_tokens"]

#: Path of the shipped fp16 weights.
CHAT_WEIGHTS = str(Path(__file__).resolve().parents[2] / "weights" / f"{CHAT_MODEL}.safetensors")

#: The ``chat_weights`` setting of a server without a chat endpoint.
CHAT_OFF = "off"

@dataclass
class TokenLogprob:
    """One generated token: its text, log-probability, UTF-8 bytes and the top alternatives."""

    token: str
    logprob: float
    bytes: list[int]
    top: list[tuple[str, float, list[int]]] = field(default_factory=list)


@dataclass
class Completion:
    """What one chat produced, and what it is billed."""

    text: str
    tokens: list[TokenLogprob]
    prompt_tokens: int
    image_tokens: int
    completion_tokens: int
    finish_reason: str


class ChatEngine:
    """The micro chat model, loaded once, answering parsed chats (thread-safe, greedy).

    A chat is a list of ``(role, parts)``, each part a string or a PIL image; the images go in
    front of the text as visual prefix tokens, in order.

    Examples
    --------
    >>> import numpy as np
    >>> from PIL import Image
    >>> from skcarrot.serve.chat.engine import ChatEngine
    >>> engine = ChatEngine.load()
    >>> image = Image.fromarray(np.zeros((28, 28), dtype=np.uint8))
    >>> out = engine.complete([[("user", ["which option describes the image? A. 0 B. 1", image])]],
    ...                       max_tokens=1, top_logprobs=3)[0]
    >>> out.completion_tokens, out.image_tokens, len(out.tokens[0].top)
    (1, 85, 3)
    """

    model_id = CHAT_MODEL
    max_images = 4

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.context = model.context
        self._lock = threading.Lock()
        self._text = {}

    @classmethod
    def load(cls, weights: str | None = None) -> "ChatEngine":
        """The engine with the shipped weights (None), a safetensors file, or ``"random"`` (with a warning)."""
        from ...backends.models import RandomWeightsWarning
        from .model import _visual, build

        if weights == "random":
            warnings.warn("the chat model has random weights: its answers mean nothing about images",
                          RandomWeightsWarning, stacklevel=2)
            model = build()
        else:
            path = weights or CHAT_WEIGHTS
            if not Path(path).is_file():
                raise FileNotFoundError(f"chat model weights not found at {path}; pass a safetensors file the "
                                        "recipe wrote (python -m skcarrot.serve.chat.recipe) or 'random'")
            model = build(str(path))
        return cls(model, _visual()[1])

    # -- text ----------------------------------------------------------------------------------
    def token_text(self, token_id: int) -> str:
        """A token's text as the API returns it (``"b"`` for ``b</w>``: a word's end is a space after it)."""
        text = self._text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([int(token_id)])
            self._text[token_id] = text
        return text

    def count(self, text: str) -> int:
        """Tokens of ``text``."""
        return len(self.tokenizer.encode(text))

    def _encode(self, chat) -> tuple[list, list[int]]:
        images, messages = [], []
        for role, parts in chat:
            texts = []
            for part in parts:
                if isinstance(part, str):
                    texts.append(part)
                else:
                    images.append(part)
            messages.append((role, " ".join(texts)))
        return images, self.tokenizer.encode(chat_text(messages))

    def positions(self, chat) -> int:
        """Positions a chat takes in the decoder's context (its images' prefixes and its text)."""
        images, tokens = self._encode(chat)
        return len(images) * self.model.n_prefix + len(tokens)

    @staticmethod
    def reduce(image: Any) -> Any:
        """The image as the model reads it: grayscale, 32x32 (bicubic); a server keeps only this."""
        gray = image.convert("L")
        return gray if gray.size == (32, 32) else gray.resize((32, 32), 3)

    def _pixels(self, images) -> torch.Tensor:
        from ...tools.pretrain import _resize_all, _to_model_input

        return _to_model_input(_resize_all(np.stack([np.asarray(self.reduce(img)) for img in images])))

    # -- the forward pass ------------------------------------------------------------------------
    @torch.no_grad()
    def _next_log_probs(self, prefixes: list[torch.Tensor], token_lists: list[list[int]]) -> torch.Tensor:
        # one row at a time: chats differ in images and length, and a row costs about a millisecond
        hidden_rows = []
        for p, t in zip(prefixes, token_lists):
            h = self.model.hidden(p[None], torch.tensor([t], dtype=torch.long))
            hidden_rows.append(h[0, -1])
        logits = self.model.logits_at(torch.stack(hidden_rows))
        return torch.log_softmax(logits.float(), dim=-1)

    def next_token_log_probs(self, chats: Sequence) -> np.ndarray:
        """``(B, vocab)`` log-probabilities of each chat's first answer token."""
        with self._lock:
            prefixes, tokens = self._prepare(chats)
            return self._next_log_probs(prefixes, tokens).numpy()

    def _prepare(self, chats):
        prefixes, tokens = [], []
        for chat in chats:
            images, ids = self._encode(chat)
            if len(images) > self.max_images:
                raise ValueError(f"{len(images)} images in one chat; the model reads at most {self.max_images}")
            if images:
                p = self.model.image_prefix(self._pixels(images)).reshape(-1, self.model.width)
            else:
                p = torch.zeros(0, self.model.width)
            if p.shape[0] + len(ids) + 1 > self.context:
                raise ValueError(f"the chat takes {p.shape[0] + len(ids)} positions; the model's context is "
                                 f"{self.context} (shorten the text)")
            prefixes.append(p)
            tokens.append(ids)
        return prefixes, tokens

    def complete(self, chats: Sequence, *, max_tokens: int = 1, top_logprobs: int = 0,
                 logprob_token_ids: Sequence[int] | None = None,
                 billed_images: Sequence[int] | None = None) -> list[Completion]:
        """Greedy answers of ``chats``, up to ``max_tokens`` tokens each (ending early at the end-of-text token).

        ``top_logprobs`` alternatives are returned at each position; with ``logprob_token_ids``
        those tokens' log-probabilities are returned instead (vLLM's extension).
        ``billed_images`` gives each chat's image tokens (a server bills the images as sent,
        by their size and detail, before it reduces them); by default each image is billed at
        low detail by its size here.
        """
        end = self.tokenizer.encoder.get("<end_of_text>")
        end_text = self.token_text(end)
        out = []
        with self._lock:
            prefixes, token_lists = self._prepare(chats)
            for i, (p, ids) in enumerate(zip(prefixes, token_lists)):
                generated, records = [], []
                finish = "length"
                with torch.no_grad():
                    for _ in range(max_tokens):
                        if p.shape[0] + len(ids) + len(generated) >= self.context:
                            break
                        lp = self._next_log_probs([p], [ids + generated])[0]
                        best = int(lp.argmax())
                        if logprob_token_ids:
                            alternatives = [int(t) for t in logprob_token_ids]
                        else:
                            alternatives = torch.topk(lp, top_logprobs).indices.tolist() if top_logprobs else []
                        top = [(self.token_text(t), float(lp[t]), list(self.token_text(t).encode())) for t in alternatives]
                        text = self.token_text(best)
                        records.append(TokenLogprob(text, float(lp[best]), list(text.encode()), top))
                        if best == end:
                            finish = "stop"
                            break
                        generated.append(best)
                if billed_images is None:
                    images = [part for _, parts in chats[i] for part in parts if not isinstance(part, str)]
                    billed = sum(image_tokens(img.size[0], img.size[1], "low") for img in images)
                else:
                    billed = int(billed_images[i])
                text = "".join(r.token for r in records if r.token != end_text)
                out.append(Completion(text=text.strip(), tokens=records, prompt_tokens=len(ids) + billed,
                                      image_tokens=billed, completion_tokens=len(records), finish_reason=finish))
        return out


class LazyChatEngine:
    """A :class:`ChatEngine` loaded at first use (or by :meth:`load`, before a server listens), once.

    Attribute access goes to the engine: ``lazy.complete(...)`` loads it if need be.
    """

    def __init__(self, weights: str | None = None) -> None:
        self.weights = weights
        self._engine: ChatEngine | None = None
        self._lock = threading.Lock()

    def load(self) -> ChatEngine:
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    self._engine = ChatEngine.load(self.weights)
        return self._engine

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.load(), name)
