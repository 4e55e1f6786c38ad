"""A chat vision-language model behind an OpenAI-compatible ``/v1/chat/completions`` API.

The chat models people pay for (GPT-4o and 4.1-class models, and Qwen-VL, InternVL or LLaVA
behind vLLM, SGLang, llama.cpp or Ollama) take an image and an instruction in a chat message
and can return the top log-probabilities of each answer token. :class:`ChatVLMBackend` asks
such a model a multiple-choice question per image, with the classes as lettered options, and
reads each class's score from its letter's log-probability: one call per image (and per group
of options, when there are more classes than the API returns alternatives).

Reading the answer (the rules the tests pin):

- **Tokens are options by their normalised text**: stripped of spaces and punctuation and
  case-folded, so ``"B"``, ``" B"``, ``"b"`` and ``"B."`` are all option B; their probabilities add up.
- **The floor**: an option missing from the returned alternatives (or given OpenAI's ``-9999``
  sentinel) gets the probability mass the alternatives leave, split evenly among the missing
  options, and never more than the least likely alternative returned.
- **Groups**: with more classes than ``max_options`` (at most ``top_logprobs``), the classes
  are sent in consecutive groups of at most ``max_options``, each lettered from A, one call a
  group; then a final call asks among the groups' winners. A class scores its group winner's
  log-probability in the final call plus its own log-probability within its group less the
  winner's, normalised over all classes (a log-softmax). Within a group the model compares
  classes directly; across groups, only through their winners. A call per image more than the
  groups: ``G + 1`` calls for ``G`` groups (at most ``max_options`` groups).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import sqlite3
import string
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..._util.math import logsumexp
from ...exceptions import (
    QueryBudgetExceededError,
    RemoteAuthenticationError,
    RemoteBackendError,
    RemoteBudgetExceededError,
    RemoteProtocolError,
    RemoteUnavailableError,
    RemoteValidationError,
)
from ...wire import image_content_id, image_tokens, png_base64
from ._client import retry_after_seconds

__all__ = ["ChatVLMBackend", "AnswerCache", "DEFAULT_INSTRUCTION", "batch_calibrate", "normalise_token",
           "option_log_probs", "combine_groups", "LogprobsUnavailableError", "default_cache_path"]

logger = logging.getLogger("skcarrot")

#: The instruction a chat prompt starts from (the zero-shot prompt's).
DEFAULT_INSTRUCTION = "Which option describes the image? Answer with the letter."
#: OpenAI's "very unlikely" log-probability, for tokens outside the top 20.
SENTINEL = -9999.0
_LETTERS = string.ascii_uppercase
_PUNCTUATION = str.maketrans("", "", string.punctuation + "\u00a0")
# Word-boundary marks of raw tokenizer pieces: CLIP's BPE, GPT-2's byte-level BPE, SentencePiece.
_SUBWORD_MARKERS = ("</w>", "\u0120", "\u2581")
# the most seconds one Retry-After is honoured for; a server asking for longer is not waited on
_MAX_RETRY_AFTER_S = 120.0


class LogprobsUnavailableError(RemoteValidationError):
    """The model answers, but returns no log-probabilities (reasoning models, some hosted models)."""


def normalise_token(token: str) -> str:
    """A token's text as an option label: no sub-word markers, spaces or punctuation, case-folded.

    Servers that return raw tokenizer pieces mark word boundaries: CLIP's BPE ends a word with
    ``</w>``, GPT-2's byte-level BPE starts one with ``Ġ``, SentencePiece with ``▁``. Those are
    dropped first (``"b</w>"`` would otherwise lose its brackets to the punctuation and read ``"bw"``).

    Examples
    --------
    >>> from skcarrot.backends.remote.chat import normalise_token
    >>> [normalise_token(t) for t in ["B", " B", "b ", "B.", "(b)", "b</w>", "\u0120B", "\u2581b"]]
    ['b', 'b', 'b', 'b', 'b', 'b', 'b', 'b']
    """
    for marker in _SUBWORD_MARKERS:
        token = token.replace(marker, "")
    return token.translate(_PUNCTUATION).strip().casefold()


def batch_calibrate(log_probs: np.ndarray) -> np.ndarray:
    """Batch calibration (Zhou et al., ICLR 2024): less each option position's mean log-probability over a batch.

    A chat model prefers some option letters whatever the image (option-position bias). Over a
    batch of images of mixed classes, the mean log-probability of each position estimates that
    preference; subtracting it and renormalising removes it without a call. It needs a batch
    that holds every class (one image alone would come out uniform), so ``predict`` does not
    apply it: the refiner learns the same per-position offset from the shots.

    Parameters
    ----------
    log_probs : ndarray of shape (..., n_images, n_options)

    Returns
    -------
    log_probs : ndarray of the same shape, normalised over the options

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot.backends.remote.chat import batch_calibrate
    >>> biased = np.log(np.array([[0.9, 0.1], [0.6, 0.4]]))  # option A favoured on both images
    >>> batch_calibrate(biased).argmax(-1).tolist()
    [0, 1]
    """
    centred = np.asarray(log_probs, dtype=np.float64)
    centred = centred - centred.mean(axis=-2, keepdims=True)
    return centred - logsumexp(centred, axis=-1)[..., None]


def option_log_probs(alternatives: Sequence[tuple[str, float]], labels: Sequence[str]) -> tuple[np.ndarray, bool]:
    """Log-probabilities over ``labels`` read from one answer position's ``alternatives``.

    Parameters
    ----------
    alternatives : sequence of (token, logprob)
        The returned top alternatives (and the chosen token).
    labels : sequence of str
        The options' labels (``"A"``, ``"B"``, ...).

    Returns
    -------
    log_probs : ndarray of shape (len(labels),)
        Normalised over the options (see the module's rules: summed variants, the floor).
    answered : bool
        Whether any option was among the alternatives (else the scores are uniform).

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot.backends.remote.chat import option_log_probs
    >>> lp, ok = option_log_probs([("B", np.log(0.6)), (" B", np.log(0.2)), ("A", np.log(0.1))], ["A", "B", "C"])
    >>> np.round(np.exp(lp), 3).tolist(), ok
    ([0.1, 0.8, 0.1], True)
    """
    index = {normalise_token(label): i for i, label in enumerate(labels)}
    found = np.zeros(len(labels))
    seen, total, lowest = set(), 0.0, None
    for token, logprob in alternatives:
        if logprob is None or logprob <= SENTINEL or not math.isfinite(logprob):
            continue
        key = (token, round(float(logprob), 6))
        if key in seen:  # the chosen token is also among the alternatives
            continue
        seen.add(key)
        p = math.exp(min(float(logprob), 0.0))
        total += p
        lowest = p if lowest is None else min(lowest, p)
        i = index.get(normalise_token(token))
        if i is not None:
            found[i] += p
    answered = bool(found.any())
    if not answered:
        return np.full(len(labels), -math.log(len(labels))), False
    missing = found == 0
    if missing.any():
        left = max(1.0 - total, 0.0) / missing.sum()
        floor = min(left, lowest) if left > 0 else lowest / 2
        found[missing] = max(floor, 1e-12)
    logp = np.log(found)
    return logp - logsumexp(logp), True


def combine_groups(within: Sequence[np.ndarray], final: np.ndarray) -> np.ndarray:
    """All classes' log-probabilities from their groups' answers and the final round's.

    ``within[g]``: log-probabilities over group ``g``'s classes; ``final[g]``: the final round's
    log-probability of group ``g``'s winner. A class scores ``final[g] + within[g] - max(within[g])``,
    normalised over all classes.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot.backends.remote.chat import combine_groups
    >>> within = [np.log([0.8, 0.2]), np.log([0.5, 0.5])]
    >>> np.round(np.exp(combine_groups(within, np.log([0.9, 0.1]))), 3).tolist()
    [0.679, 0.17, 0.075, 0.075]
    """
    scores = np.concatenate([f + np.asarray(w, dtype=np.float64) - np.max(w) for w, f in zip(within, final)])
    return scores - logsumexp(scores)


def default_cache_path() -> str:
    """Where answers are kept by default: ``$SKCARROT_CACHE_DIR`` or ``$XDG_CACHE_HOME/skcarrot`` (``~/.cache``)."""
    root = os.environ.get("SKCARROT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "skcarrot")
    return os.path.join(root, "chat-answers.sqlite")


class AnswerCache:
    """Answers already paid for, on SQLite: (model, instruction, options, image) -> the alternatives.

    At most ``max_entries`` answers are kept; the least recently used go first. Safe across
    threads and processes (WAL, one short transaction a write).

    Examples
    --------
    >>> from skcarrot.backends.remote.chat import AnswerCache
    >>> cache = AnswerCache(":memory:", max_entries=2)
    >>> cache.put("k1", [["A", -0.1]]); cache.put("k2", [["B", -0.2]]); cache.put("k3", [["C", -0.3]])
    >>> cache.get("k1") is None, cache.get("k3"), len(cache)
    (True, [['C', -0.3]], 2)
    """

    def __init__(self, path: str, max_entries: int = 200_000) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.path, self.max_entries = str(path), int(max_entries)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        with self._lock, self._db:
            if self.path != ":memory:":
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value TEXT NOT NULL, "
                             "used REAL NOT NULL)")
            self._db.execute("CREATE INDEX IF NOT EXISTS answers_used ON answers (used)")
        self._tick = time.time()

    def _now(self) -> float:
        # strictly increasing within the process, so eviction order is exact even within a clock tick
        self._tick = max(time.time(), self._tick + 1e-6)
        return self._tick

    def get(self, key: str) -> Any:
        import json

        with self._lock:
            row = self._db.execute("SELECT value FROM answers WHERE key = ?", (key,)).fetchone()
            if row is None:
                return None
            with self._db:
                self._db.execute("UPDATE answers SET used = ? WHERE key = ?", (self._now(), key))
        return json.loads(row[0])

    def put(self, key: str, value: Any) -> None:
        import json

        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO answers (key, value, used) VALUES (?, ?, ?)",
                             (key, json.dumps(value), self._now()))
            extra = self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0] - self.max_entries
            if extra > 0:
                self._db.execute("DELETE FROM answers WHERE key IN (SELECT key FROM answers ORDER BY used LIMIT ?)",
                                 (extra,))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def clear(self) -> None:
        with self._lock, self._db:
            self._db.execute("DELETE FROM answers")

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _data_url(image: Any) -> str:
    return "data:image/png;base64," + png_base64(image)


def _retry_after(exc: Any) -> float | None:
    """The wait an answer asks for: OpenAI's ``retry-after-ms``, else ``Retry-After`` (seconds or an HTTP date)."""
    headers = getattr(getattr(exc, "response", None), "headers", None) or {}
    try:
        if "retry-after-ms" in headers:
            return float(headers["retry-after-ms"]) / 1000.0
    except (TypeError, ValueError):
        pass
    return retry_after_seconds(headers.get("retry-after"))


class ChatVLMBackend:
    """A chat VLM behind an OpenAI-compatible API, as a black box for the chat door.

    One query of the chat door is one instruction scored on the images of one fit step: a
    chat call per image (and option group) carrying the instruction, the lettered options and
    the image, answered with ``max_completion_tokens=1``, ``logprobs=True`` and
    ``top_logprobs``. The class scores are read from the letters' log-probabilities (see
    the module's rules). Calls already answered are read from a local answer cache and cost
    nothing.

    Parameters
    ----------
    model : str, default="skcarrot-micro-chat"
        The model's id at the API (``"gpt-4o"``, a vLLM model name...).
    base_url : str or None, default=None
        The API's base URL (``http://host:8000/v1``); None reads ``OPENAI_BASE_URL``, else OpenAI's.
    api_key_env : str, default="OPENAI_API_KEY"
        Environment variable read for the key at every call: the key never sits in
        parameters, reprs or pickles.
    top_logprobs : int, default=20
        Alternatives asked for at the answer position (OpenAI allows 0-20; some models fewer).
    max_options : int or None, default=None
        Most options in one call (None: ``top_logprobs``, at most 26 letters); more classes go in groups.
    detail : {"low", "high", "auto"}, default="low"
        The images' ``detail`` (what they are billed: 85 tokens at low detail on OpenAI's tile models).
    max_concurrency : int, default=4
        Most calls in flight at once.
    timeout : float, default=60.0
        Seconds to wait for one answer.
    max_retries : int, default=4
        Retries of a call after a 429 (not an exhausted quota), a 5xx, a timeout or a lost
        connection, waiting ``Retry-After`` (at most 120 s) or an exponential backoff. Every
        try is a call and counts against the fit's budget.
    cache : bool, str or None, default=True
        The answer cache: True for :func:`default_cache_path`, a file path, or None/False for none.
    cache_size : int, default=200000
        Most answers kept in the cache (least recently used go first).
    option_token_ids : dict of str to int or None, default=None
        The token id of each option letter at a server that takes vLLM's
        ``logprob_token_ids`` (exact log-probabilities of the letters, whatever their rank);
        None reads the top alternatives.
    max_image_bytes : int, default=20 MiB
        Largest PNG sent; a larger image is refused before any call (downscale it).
    max_image_pixels : int or None, default=None
        Most pixels (width x height) of an image sent; a larger one is refused before any call
        (servers downscale large images anyway, and bill by size at high detail). None: no bound.
    count_tokens : callable or None, default=None
        ``count_tokens(text) -> int`` for :meth:`estimate_tokens`; None counts with open_clip's
        BPE tokenizer (exact for ``skcarrot serve``'s model, an estimate elsewhere).

    Attributes
    ----------
    n_calls_ : int
        Calls sent so far (tries, retries included); cached answers are not calls.
    n_input_tokens_, n_output_tokens_ : int
        Tokens billed so far, from each answer's ``usage``.
    n_cached_ : int
        Answers read from the cache.

    Examples
    --------
    >>> from skcarrot.backends import ChatVLMBackend
    >>> backend = ChatVLMBackend(model="gpt-4o", base_url="https://api.openai.com/v1", cache=None)
    >>> backend.groups(45), backend.option_labels(3)
    ([(0, 20), (20, 40), (40, 45)], ['A', 'B', 'C'])
    """

    #: What :meth:`text_scores`-like members return here: log-probabilities over the options.
    returns = "log_probabilities"

    def __init__(
        self,
        model: str = "skcarrot-micro-chat",
        *,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        top_logprobs: int = 20,
        max_options: int | None = None,
        detail: str = "low",
        max_concurrency: int = 4,
        timeout: float = 60.0,
        max_retries: int = 4,
        cache: bool | str | None = True,
        cache_size: int = 200_000,
        option_token_ids: dict | None = None,
        max_image_bytes: int = 20 * 1024 * 1024,
        max_image_pixels: int | None = None,
        count_tokens: Any = None,
    ) -> None:
        self.model = model
        self.base_url = base_url
        self.api_key_env = api_key_env
        self.top_logprobs = top_logprobs
        self.max_options = max_options
        self.detail = detail
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.cache = cache
        self.cache_size = cache_size
        self.option_token_ids = option_token_ids
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self.count_tokens = count_tokens
        self._check()
        self._reset()

    _PARAMS = ("model", "base_url", "api_key_env", "top_logprobs", "max_options", "detail", "max_concurrency",
               "timeout", "max_retries", "cache", "cache_size", "option_token_ids", "max_image_bytes", "max_image_pixels",
               "count_tokens")

    def _check(self) -> None:
        if not isinstance(self.top_logprobs, int) or not 1 <= self.top_logprobs <= 20:
            raise ValueError(f"top_logprobs must be an int in [1, 20] (OpenAI's range), got {self.top_logprobs!r}")
        if self.detail not in ("low", "high", "auto"):
            raise ValueError(f"detail must be 'low', 'high' or 'auto', got {self.detail!r}")
        if self.max_options is not None and not 2 <= self.max_options <= len(_LETTERS):
            raise ValueError(f"max_options must be in [2, {len(_LETTERS)}] or None, got {self.max_options!r}")
        if not isinstance(self.max_concurrency, int) or self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be an int >= 1, got {self.max_concurrency!r}")
        if self.max_image_pixels is not None and (not isinstance(self.max_image_pixels, int)
                                                  or self.max_image_pixels < 1):
            raise ValueError(f"max_image_pixels must be an int >= 1 or None, got {self.max_image_pixels!r}")
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {self.max_retries!r}")

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._client = None
        self._cache = None
        self._pid = os.getpid()
        self._tokenizer = None
        self.n_calls_ = 0
        self.n_input_tokens_ = 0
        self.n_output_tokens_ = 0
        self.n_cached_ = 0

    # -- sklearn-style parameters, pickles without a client, a key or a cache handle -----------
    def get_params(self, deep: bool = True) -> dict:
        return {name: getattr(self, name) for name in self._PARAMS}

    def set_params(self, **params) -> "ChatVLMBackend":
        for name, value in params.items():
            if name not in self._PARAMS:
                raise ValueError(f"invalid parameter {name!r} for ChatVLMBackend; valid: {list(self._PARAMS)}")
            setattr(self, name, value)
        self._check()
        self._reset()
        return self

    def __getstate__(self) -> dict:
        return {name: getattr(self, name) for name in self._PARAMS}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def __repr__(self) -> str:
        return f"ChatVLMBackend(model={self.model!r}, base_url={self.base_url!r})"

    # -- options -------------------------------------------------------------------------------
    @property
    def options_per_call(self) -> int:
        """Most options one call carries: ``max_options``, else ``top_logprobs`` (and at most 26 letters)."""
        return min(self.max_options or self.top_logprobs, len(_LETTERS))

    def option_labels(self, n: int) -> list[str]:
        """The letters of ``n`` options."""
        return list(_LETTERS[:n])

    def groups(self, n_classes: int) -> list[tuple[int, int]]:
        """``[(start, stop)]`` of the consecutive option groups of ``n_classes`` classes."""
        size = self.options_per_call
        if n_classes <= size:
            return [(0, n_classes)]
        n_groups = math.ceil(n_classes / size)
        return [(g * size, min((g + 1) * size, n_classes)) for g in range(n_groups)]

    def calls_per_image(self, n_classes: int) -> int:
        """Calls one image costs under one instruction: its option groups, and a final round when they are several."""
        n_groups = len(self.groups(n_classes))
        return n_groups + (n_groups > 1)

    def user_text(self, instruction: str, descriptions: Sequence[str]) -> str:
        """The text of a call: the instruction, then the lettered options (the image follows)."""
        labels = self.option_labels(len(descriptions))
        return f"{instruction} " + " ".join(f"{label}. {d}" for label, d in zip(labels, descriptions))

    # -- the API -------------------------------------------------------------------------------
    def _key(self) -> str:
        key = os.environ.get(self.api_key_env)
        if not key:
            raise RemoteAuthenticationError(
                f"no API key: set the environment variable {self.api_key_env} (ChatVLMBackend reads the key "
                "there at every call, so it never sits in the estimator or its pickles)")
        return key

    def _own_process(self) -> None:
        """After a fork, the parent's client (its sockets) and cache connection are not this process's: rebuild them.

        The counts go on: a fork is the same backend, in another process.
        """
        if self._pid != os.getpid():
            self._lock = threading.Lock()
            self._client = self._cache = None
            self._pid = os.getpid()

    def _openai(self):
        self._own_process()
        with self._lock:
            if self._client is None:
                try:
                    import openai
                except ImportError:
                    raise ImportError("ChatVLMBackend needs the openai client: pip install 'skcarrot[chat]'") from None
                # retries are ours (every try is counted); the key is set per call
                self._client = openai.OpenAI(base_url=self.base_url, api_key="unset", max_retries=0,
                                             timeout=self.timeout)
            return self._client

    def _answer_cache(self) -> AnswerCache | None:
        if self.cache in (None, False):
            return None
        self._own_process()
        with self._lock:
            if self._cache is None:
                path = default_cache_path() if self.cache is True else os.fspath(self.cache)
                self._cache = AnswerCache(path, self.cache_size)
            return self._cache

    def _cache_key(self, text: str, digest: str) -> str:
        parts = [str(self.base_url), self.model, self.detail, str(self.top_logprobs),
                 repr(sorted(self.option_token_ids.items())) if self.option_token_ids else "", text, digest]
        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()

    def _request(self, text: str, url: str, labels: Sequence[str]) -> dict:
        body = dict(
            model=self.model,
            messages=[{"role": "user", "content": [
                {"type": "text", "text": text},
                {"type": "image_url", "image_url": {"url": url, "detail": self.detail}}]}],
            max_completion_tokens=1, logprobs=True, top_logprobs=self.top_logprobs, temperature=0,
        )
        if self.option_token_ids:
            body["extra_body"] = {"logprob_token_ids": [int(self.option_token_ids[label]) for label in labels]}
        return body

    def _call(self, body: dict, allowance: "_Allowance") -> tuple[list, int, int]:
        """One answer: ``(alternatives, input_tokens, output_tokens)``, retrying as allowed."""
        import openai

        client = self._openai()
        for attempt in range(self.max_retries + 1):
            allowance.take()
            with self._lock:
                self.n_calls_ += 1
            try:
                response = client.with_options(api_key=self._key()).chat.completions.create(**body)
            except openai.RateLimitError as exc:
                code = (getattr(exc, "code", None) or "") + str(getattr(exc, "body", "") or "")
                if "insufficient_quota" in code:
                    raise RemoteBudgetExceededError(
                        f"{self.model} at {self.base_url}: the key's quota is exhausted ({exc}); add budget or "
                        "credit to the key") from None
                self._wait(attempt, exc)
                continue
            except (openai.InternalServerError, openai.APIConnectionError) as exc:
                self._wait(attempt, exc)
                continue
            except openai.AuthenticationError as exc:
                raise RemoteAuthenticationError(
                    f"{self.base_url or 'the API'} refused the key in ${self.api_key_env} (401: {exc.message}); "
                    f"set {self.api_key_env} to a valid key") from None
            except openai.PermissionDeniedError as exc:
                if "logprob" in str(exc.message).lower():
                    raise self._no_logprobs(exc.message) from None
                raise RemoteAuthenticationError(
                    f"{self.base_url or 'the API'} denied the key in ${self.api_key_env} access to {self.model} "
                    f"(403: {exc.message})") from None
            except openai.NotFoundError as exc:
                raise RemoteValidationError(self._unknown_model(exc.message)) from None
            except openai.BadRequestError as exc:
                message = str(exc.message)
                if "logprob" in message.lower():
                    raise self._no_logprobs(message) from None
                raise RemoteValidationError(f"{self.model} refused the call (400: {message})") from None
            except openai.APIStatusError as exc:
                if exc.status_code == 413:
                    raise RemoteValidationError(
                        f"{self.model} refused an image as too large (413: {exc.message}); downscale the images "
                        "or lower max_image_bytes") from None
                raise RemoteValidationError(f"{self.model} refused the call ({exc.status_code}: {exc.message})") from None
            return self._read(response)
        raise RemoteUnavailableError(
            f"{self.model} at {self.base_url} kept failing after {self.max_retries + 1} tries (429/5xx/timeouts); "
            "retry later or raise max_retries")

    def _wait(self, attempt: int, exc: Any) -> None:
        if attempt >= self.max_retries:
            return
        delay = _retry_after(exc)
        if delay is None:
            delay = min(0.5 * 2 ** attempt, 30.0) * (0.5 + random.random() / 2)
        if delay > _MAX_RETRY_AFTER_S:
            raise RemoteUnavailableError(
                f"{self.model} asked to wait {delay:.0f} s before retrying (more than {_MAX_RETRY_AFTER_S:.0f} s); "
                "retry the fit later (answers received so far are cached)")
        logger.info("chat API %s: %s; retrying in %.1f s", self.model, type(exc).__name__, delay)
        time.sleep(delay)

    def _no_logprobs(self, message: str) -> LogprobsUnavailableError:
        return LogprobsUnavailableError(
            f"{self.model} returns no log-probabilities ({message}); the chat door reads the class scores from "
            "them: use a model that returns them (gpt-4o, gpt-4.1 and their minis on OpenAI; any model behind "
            "vLLM, SGLang, llama.cpp or Ollama >= 0.12.11), not a reasoning model")

    def _unknown_model(self, message: str) -> str:
        known = ""
        try:
            known = ", ".join(sorted(m.id for m in self._openai().with_options(api_key=self._key()).models.list()))
        except Exception:  # noqa: BLE001 - the list is a courtesy; the error below stands without it
            pass
        return (f"model {self.model!r} is unknown at {self.base_url or 'the API'} (404: {message})"
                + (f"; it serves: {known}" if known else "; check the model id"))

    def _read(self, response: Any) -> tuple[list, int, int]:
        choice = response.choices[0] if response.choices else None
        content = getattr(getattr(choice, "logprobs", None), "content", None)
        if not content:
            raise self._no_logprobs("the answer has no logprobs.content")
        first = content[0]
        alternatives = [[t.token, t.logprob] for t in (first.top_logprobs or [])]
        alternatives.append([first.token, first.logprob])
        usage = getattr(response, "usage", None)
        n_in = int(getattr(usage, "prompt_tokens", 0) or 0)
        n_out = int(getattr(usage, "completion_tokens", 0) or 0)
        with self._lock:
            self.n_input_tokens_ += n_in
            self.n_output_tokens_ += n_out
        return alternatives, n_in, n_out

    # -- scoring -------------------------------------------------------------------------------
    def option_log_probs(self, images: Sequence[Any], instruction: str, descriptions: Sequence[str],
                         max_calls: int | None = None) -> np.ndarray:
        """Log-probabilities ``(N, C)`` of each image over the classes described by ``descriptions``.

        Parameters
        ----------
        images : sequence of PIL.Image.Image
        instruction : str
            The question before the options.
        descriptions : sequence of str
            One description per class (its option's text), in column order.
        max_calls : int or None, default=None
            Most queries this may count: calls (tries, retries included) and answers read
            from the cache alike, so calls never pass it. A scoring that needs more is
            refused before any call (:class:`~skcarrot.exceptions.QueryBudgetExceededError`),
            and retries that would pass it stop it (answers so far are cached).

        Raises
        ------
        QueryBudgetExceededError
            The calls needed, or the retries, would pass ``max_calls``.
        LogprobsUnavailableError, RemoteAuthenticationError, RemoteValidationError, RemoteUnavailableError
            The model returns no log-probabilities, the key is refused, the model is
            unknown or an image too large, or the server kept failing.
        RemoteProtocolError
            No image's answer held any option letter (the model does not answer the question).
        """
        images = list(images)
        descriptions = [str(d) for d in descriptions]
        if len(descriptions) < 2:
            raise ValueError(f"need at least two classes' descriptions, got {descriptions}")
        groups = self.groups(len(descriptions))
        if len(groups) > self.options_per_call:
            raise ValueError(f"{len(descriptions)} classes need {len(groups)} option groups, more than the "
                             f"{self.options_per_call} options a call carries for their final round; raise "
                             "top_logprobs (or max_options), or classify fewer classes")
        allowance = _Allowance(max_calls)
        urls: dict = {}
        digests = [image_content_id(img) for img in images]
        # round 1: every image against every group (one call each)
        questions = [(i, list(range(a, b))) for i in range(len(images)) for a, b in groups]
        first = self._ask_all(images, digests, urls, instruction, descriptions, questions, allowance,
                              extra=len(images) if len(groups) > 1 else 0)
        out = np.empty((len(images), len(descriptions)))
        if len(groups) == 1:
            for i in range(len(images)):
                out[i] = first[i]
            return out
        # round 2: each image against its groups' winners; a class scores its winner's final
        # log-probability plus its own log-probability within its group relative to the winner's
        winners = [[a + int(np.argmax(first[i * len(groups) + g])) for g, (a, _) in enumerate(groups)]
                   for i in range(len(images))]
        final = self._ask_all(images, digests, urls, instruction, descriptions,
                              [(i, winners[i]) for i in range(len(images))], allowance)
        for i in range(len(images)):
            out[i] = combine_groups(first[i * len(groups): (i + 1) * len(groups)], final[i])
        return out

    def _ask_all(self, images, digests, urls, instruction, descriptions, questions, allowance, extra=0):
        """Each question ``(image index, class indices)`` answered: log-probabilities over its classes, in order.

        Cached answers cost nothing; the calls needed (plus ``extra`` to come) are checked against
        ``allowance`` before any is sent.
        """
        cache = self._answer_cache()
        texts = [self.user_text(instruction, [descriptions[c] for c in classes]) for _, classes in questions]
        answers, tasks = {}, []
        for q, (i, _) in enumerate(questions):
            key = self._cache_key(texts[q], digests[i])
            found = cache.get(key) if cache is not None else None
            if found is not None:
                answers[q] = found
                with self._lock:
                    self.n_cached_ += 1
            else:
                tasks.append((q, key))
        # an answer read from the cache counts as asked: a refit then plans and chooses as the fit that
        # paid for it did, and calls nothing
        allowance.check(len(questions) + extra)
        allowance.spend(len(questions) - len(tasks))
        for q, _ in tasks:
            i = questions[q][0]
            if i not in urls:
                width, height = images[i].size
                if self.max_image_pixels is not None and width * height > self.max_image_pixels:
                    raise ValueError(f"image {i} is {width}x{height} = {width * height} pixels, more than "
                                     f"max_image_pixels={self.max_image_pixels}; downscale it or raise "
                                     "max_image_pixels")
                url = _data_url(images[i])
                size = len(url) * 3 // 4
                if size > self.max_image_bytes:
                    raise ValueError(f"image {i} is {size} bytes as PNG, more than max_image_bytes="
                                     f"{self.max_image_bytes}; downscale it or raise max_image_bytes")
                urls[i] = url

        def run(task):
            q, key = task
            labels = self.option_labels(len(questions[q][1]))
            alternatives, _, _ = self._call(self._request(texts[q], urls[questions[q][0]], labels), allowance)
            if cache is not None:
                cache.put(key, alternatives)
            return q, alternatives

        if tasks:
            with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(tasks))) as pool:
                for q, alternatives in pool.map(run, tasks):
                    answers[q] = alternatives
        out, unanswered = [], 0
        labels = [self.option_labels(len(classes)) for _, classes in questions]
        for q in range(len(questions)):
            lp, ok = option_log_probs([(t, v) for t, v in answers[q]], labels[q])
            unanswered += not ok
            out.append(lp)
        self._check_answers(answers, labels, unanswered, len(questions))
        return out

    def _check_answers(self, answers: dict, labels: list, unanswered: int, total: int) -> None:
        if total and unanswered == total:
            raise RemoteProtocolError(
                f"{self.model} answered none of {total} calls with an option letter (its top alternatives hold "
                "no A, B, ...); the instruction must ask for the letter of an option")
        if unanswered:
            logger.info("chat API %s: %d of %d answers held no option letter (scored uniform)",
                        self.model, unanswered, total)
        asked = self.top_logprobs
        if not self.option_token_ids:
            for q, alternatives in answers.items():
                returned = len(alternatives) - 1  # the chosen token is appended
                if returned < asked and returned < len(labels[q]):
                    raise RemoteProtocolError(
                        f"{self.model} returned {returned} alternatives where top_logprobs={asked} were asked, fewer "
                        f"than the {len(labels[q])} options of a call: options beyond them would all get the floor. "
                        f"Set ChatVLMBackend(top_logprobs={max(returned, 1)}) (or max_options={max(returned, 2)}): "
                        "classes are then sent in groups that fit")

    # -- costs ---------------------------------------------------------------------------------
    def estimate_tokens(self, instruction: str, descriptions: Sequence[str], image_size=(28, 28)) -> tuple[int, int]:
        """``(input, output)`` tokens one call is expected to bill (image at ``detail``, text counted)."""
        count = self.count_tokens or self._bpe_count
        text = self.user_text(instruction, descriptions)
        # the chat format's own tokens around the message ("user :" and "assistant :", as skcarrot serve renders it)
        return count(text) + 4 + image_tokens(image_size[0], image_size[1], self.detail), 1

    def _bpe_count(self, text: str) -> int:
        if self._tokenizer is None:
            import open_clip

            self._tokenizer = open_clip.get_tokenizer("ViT-B-32")
        return len(self._tokenizer.encode(text))


class _Allowance:
    """The queries one scoring may still count (None: no cap): calls, taken one try at a time across
    threads, and answers read from the cache."""

    def __init__(self, max_calls: int | None) -> None:
        self.left = max_calls
        self._lock = threading.Lock()

    def check(self, n: int) -> None:
        if self.left is not None and n > self.left:
            raise QueryBudgetExceededError(
                f"scoring needs {n} chat queries (calls or cached answers) and the budget has {self.left} left; "
                "no call was sent")

    def spend(self, n: int) -> None:
        """Count ``n`` questions answered without a call (from the cache), already checked."""
        with self._lock:
            if self.left is not None:
                self.left -= n

    def take(self) -> None:
        with self._lock:
            if self.left is not None:
                if self.left <= 0:
                    raise QueryBudgetExceededError(
                        "retries used up the query budget mid-scoring; answers received so far are cached, "
                        "so a fit with more budget resumes without paying for them again")
                self.left -= 1
