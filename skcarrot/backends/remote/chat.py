"""A chat vision-language model behind any OpenAI-compatible ``/v1/chat/completions`` that returns log-probabilities.

Chat models take no prompt embedding and return no per-class score: they answer
text. Asked for *one* output token with ``logprobs=True``, they return the
log-probabilities of their ``top_logprobs`` most likely first tokens, and a
multiple-choice question whose options are letters turns those into a score per
class. :class:`ChatVLMBackend` asks that question, one chat call per image (and
per group of options when there are more classes than one call can show):

- the text first (the instruction, then ``A. <description>``, ``B. ...``, then the
  answer format), the image last as a PNG data URL, so a server's prompt cache
  can reuse the shared prefix;
- ``max_completion_tokens=1``, ``logprobs=True``, ``top_logprobs=k``, ``temperature=0``;
- the first token's alternatives are mapped to options by normalised text
  (:func:`option_letter`: ``"B"``, ``" B"``, ``"b"``, ``"B."``, ``"b</w>"`` are all
  option B; their probabilities are summed), an option missing from them gets the
  floor of :func:`option_scores`, and a log-softmax over the options gives the
  log-probabilities the door hands on.

Every try of a call, retries included, passes through a *meter* (the chat door's
query counter), which refuses the try that would overspend the budget; answers
are cached on disk (SQLite) by what was asked, so asking again costs no call.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import random
import sqlite3
import string
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import numpy as np

from ..._math import log_softmax, logsumexp
from ...exceptions import (
    QueryBudgetExceededError,
    RemoteAuthenticationError,
    RemoteProtocolError,
    RemoteUnavailableError,
    RemoteValidationError,
)
from ...wire import hash_pixels

__all__ = [
    "API_KEY_ENV",
    "ChatAnswer",
    "ChatVLMBackend",
    "DEFAULT_INSTRUCTION",
    "IMAGE_TOKENS",
    "LETTERS",
    "batch_calibrate",
    "combine_rounds",
    "default_cache_path",
    "option_groups",
    "option_letter",
    "option_scores",
]

logger = logging.getLogger("skcarrot")

#: Environment variable the key is read from at every call (never stored).
API_KEY_ENV = "OPENAI_API_KEY"
#: The option labels, in order: one call shows at most this many options.
LETTERS = tuple(string.ascii_uppercase)
#: The hand-written instruction (the chat door's zero-shot prompt).
DEFAULT_INSTRUCTION = "What is shown in this image? Choose one option."
#: What follows the options: the answer must be one token, the option's letter.
ANSWER_FORMAT = "Answer with the letter of one option only."
#: The value OpenAI gives a token outside the top 20.
SENTINEL = -9999.0
#: Image tokens billed per image by model family at ``detail="low"`` (OpenAI's tables: tile models bill a
#: flat 85; gpt-4o-mini bills 2,833). Models not listed: 85 (what OpenAI-like servers, ``skcarrot serve``
#: included, bill). The longest matching prefix wins.
IMAGE_TOKENS = {"gpt-4o": 85, "gpt-4.1": 85, "gpt-4o-mini": 2833, "o1": 85, "o3": 85}
_PUNCTUATION = string.punctuation + string.whitespace
# Sub-word markers of common tokenizers: CLIP's BPE ("b</w>"), GPT-2's byte-level space ("Ġb"), SentencePiece ("▁b").
_MARKERS = ("</w>", "\u0120", "\u2581")


def option_letter(token: str, letters: Sequence[str] = LETTERS) -> int | None:
    """The option a returned token names, by normalised text, or None.

    Normalising strips sub-word markers (``"</w>"``, ``"Ġ"``, ``"▁"``), spaces and
    punctuation, and folds case, so ``"B"``, ``" B"``, ``"b"``, ``"B."``, ``"(b)"``
    and ``"b</w>"`` all name option B.

    Examples
    --------
    >>> from skcarrot.backends.remote.chat import option_letter
    >>> [option_letter(t) for t in ["B", " B", "b", "B.", "b</w>", "(c)", "Bee", ""]]
    [1, 1, 1, 1, 1, 2, None, None]
    """
    text = str(token)
    for marker in _MARKERS:
        text = text.replace(marker, "")
    text = text.strip(_PUNCTUATION).casefold()
    if len(text) != 1:
        return None
    for i, letter in enumerate(letters):
        if letter.casefold() == text:
            return i
    return None


def option_scores(alternatives: Sequence[tuple[str, float]], n_options: int,
                  letters: Sequence[str] = LETTERS) -> tuple[np.ndarray, int]:
    """Log-probabilities over ``n_options`` options from a first token's alternatives, and how many were floored.

    Tokens naming the same option (by :func:`option_letter`) have their probabilities
    summed. An option absent from the alternatives, or given the ``-9999`` sentinel,
    gets the *floor*: the lowest log-probability returned, less ``log 2``. Every
    absent token is less likely than the least likely one returned (that is what
    top-k means), so the floor is an upper bound halved: it keeps an absent option
    below every option seen, without the arbitrary depth of a constant. Then a
    log-softmax over the options.

    Raises
    ------
    RemoteProtocolError
        No alternative names any option.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot.backends.remote.chat import option_scores
    >>> logp, floored = option_scores([("B", np.log(0.6)), (" b", np.log(0.2)), ("A", np.log(0.1))], 3)
    >>> np.exp(logp).round(3).tolist(), floored
    ([0.105, 0.842, 0.053], 1)
    """
    finite = [float(lp) for _, lp in alternatives if lp is not None and float(lp) > SENTINEL / 2]
    if not finite:
        raise RemoteProtocolError("the answer's alternatives hold no log-probability (all missing or -9999)")
    floor = min(finite) - math.log(2.0)
    found: list[list[float]] = [[] for _ in range(n_options)]
    for token, lp in alternatives:
        i = option_letter(token, letters)
        if i is not None and i < n_options and lp is not None and float(lp) > SENTINEL / 2:
            found[i].append(float(lp))
    if not any(found):
        tokens = [t for t, _ in alternatives][:8]
        raise RemoteProtocolError(
            f"none of the {len(alternatives)} alternatives the model returned names an option "
            f"{letters[0]}..{letters[n_options - 1]} (it returned {tokens!r}); make the instruction ask for "
            "the option's letter only, or use a model that follows multiple-choice instructions"
        )
    raw = np.array([float(logsumexp(np.array(v))) if v else floor for v in found])
    return log_softmax(raw), sum(1 for v in found if not v)


def option_groups(n_options: int, group_size: int) -> list[list[int]]:
    """Options split into as few groups of at most ``group_size`` as possible, of near-equal sizes, in order.

    Examples
    --------
    >>> from skcarrot.backends.remote.chat import option_groups
    >>> option_groups(5, 20), option_groups(7, 3)
    ([[0, 1, 2, 3, 4]], [[0, 1, 2], [3, 4], [5, 6]])
    """
    if group_size < 2:
        raise ValueError(f"a group needs at least two options, got group_size={group_size}")
    n_groups = math.ceil(n_options / group_size)
    sizes = [n_options // n_groups + (1 if g < n_options % n_groups else 0) for g in range(n_groups)]
    out, start = [], 0
    for size in sizes:
        out.append(list(range(start, start + size)))
        start += size
    return out


def combine_rounds(group_log_probs: Sequence[np.ndarray], groups: Sequence[Sequence[int]],
                   final_log_probs: np.ndarray, n_options: int) -> np.ndarray:
    """Log-probabilities over all options from a tournament: each group's, then a final among their winners.

    Separate calls are separate questions, so their log-probabilities are on no common
    scale; the final call puts the groups' winners side by side and sets the scale.
    An option ``c`` of group ``g`` (winner ``w``) scores
    ``log p_g(c) - log p_g(w) + log p_final(w)``, then a log-softmax over all
    options. When every call answers the softmax of one set of scores restricted to
    the options it shows (a model whose preferences do not depend on the company),
    this is exactly that softmax over all options.

    Parameters
    ----------
    group_log_probs : sequence of ndarray of shape (len(groups[g]),)
    groups : sequence of sequence of int
    final_log_probs : ndarray of shape (n_groups,)
        The final call's log-probabilities over the groups' winners, in group order.
    n_options : int

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot._math import log_softmax
    >>> from skcarrot.backends.remote.chat import combine_rounds
    >>> s = np.array([1.0, 3.0, 0.0, 2.0, -1.0])
    >>> groups = [[0, 1, 2], [3, 4]]
    >>> rounds = [log_softmax(s[g]) for g in groups]
    >>> final = log_softmax(np.array([s[1], s[3]]))
    >>> bool(np.allclose(combine_rounds(rounds, groups, final, 5), log_softmax(s)))
    True
    """
    out = np.empty(n_options)
    for g, (members, logp) in enumerate(zip(groups, group_log_probs)):
        logp = np.asarray(logp, dtype=float)
        w = int(np.argmax(logp))
        out[list(members)] = logp - logp[w] + float(final_log_probs[g])
    return log_softmax(out)


def batch_calibrate(log_probs: np.ndarray) -> np.ndarray:
    """Batch calibration (Zhou et al., ICLR 2024): remove the mean log-probability of each option position over a batch.

    A chat model favours some option letters whatever the image (option-position
    bias); over a batch of images of mixed classes, the mean log-probability of each
    position estimates that bias. Subtracting it and renormalising costs no call. It
    needs a batch that holds every class: a single image would be flattened to uniform.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot.backends.remote.chat import batch_calibrate
    >>> logp = np.log(np.array([[0.9, 0.1], [0.6, 0.4]]))
    >>> batch_calibrate(logp).argmax(-1).tolist()
    [0, 1]
    """
    log_probs = np.asarray(log_probs, dtype=float)
    return log_softmax(log_probs - log_probs.mean(axis=-2, keepdims=True))


def default_cache_path() -> Path:
    """Where ``cache=True`` keeps answers: ``$SKCARROT_CACHE_DIR`` or the user cache dir, then ``chat-answers.sqlite``.

    The user's cache directory (``$XDG_CACHE_HOME/skcarrot``, ``~/.cache/skcarrot`` by
    default) outlives a process and a checkout, as paid answers should, and is
    what cleaners know to empty; it never sits in a project's tree, where it could be
    committed.
    """
    root = os.environ.get("SKCARROT_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "skcarrot")
    return Path(root) / "chat-answers.sqlite"


class ChatAnswer(dict):
    """One call's answer: ``alternatives`` (token, log-probability) and ``usage`` (token counts)."""


class _AnswerCache:
    """Answers by key on SQLite (WAL), at most ``size`` entries, the least recently used evicted first."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = Path(path)
        self.size = int(size)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30.0)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value TEXT NOT NULL, "
                             "used INTEGER NOT NULL)")
            self._db.execute("CREATE INDEX IF NOT EXISTS answers_used ON answers (used)")
            self._db.commit()

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM answers WHERE key = ?", (key,)).fetchone()
            if row is None:
                return None
            self._db.execute("UPDATE answers SET used = ? WHERE key = ?", (time.time_ns(), key))
            self._db.commit()
        return json.loads(row[0])

    def put(self, key: str, value: dict) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO answers (key, value, used) VALUES (?, ?, ?)",
                             (key, json.dumps(value), time.time_ns()))
            (n,) = self._db.execute("SELECT COUNT(*) FROM answers").fetchone()
            if n > self.size:
                self._db.execute("DELETE FROM answers WHERE key IN (SELECT key FROM answers ORDER BY used LIMIT ?)",
                                 (n - self.size,))
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _Unmetered:
    """The meter of calls made outside a fit: counts, refuses nothing."""

    def reserve(self, n_calls: int) -> None:
        pass

    def charge(self) -> None:
        pass

    def record(self, usage: Mapping[str, int]) -> None:
        pass


def _retry_after(exc: Any) -> float | None:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class ChatVLMBackend:
    """A chat vision-language model behind an OpenAI-compatible chat endpoint that returns log-probabilities.

    Offers the chat door (:class:`skcarrot.doors.ChatDoor`): :meth:`option_log_probs`
    asks, for each image, one multiple-choice question whose options are the classes'
    descriptions, and reads the first answer token's log-probabilities.

    Parameters
    ----------
    model : str
        The model's name on the server (``"gpt-4o"``, ``"gpt-4.1-mini"``, a vLLM model...).
    base_url : str or None, default=None
        The API's root, e.g. ``"http://127.0.0.1:8000/v1"``; None: OpenAI's (or ``$OPENAI_BASE_URL``).
    api_key_env : str, default="OPENAI_API_KEY"
        Environment variable of the key, read at every call: the key never sits in
        parameters, reprs or pickles. Unset with a ``base_url``: a placeholder key is
        sent (self-hosted servers usually take any).
    top_logprobs : int, default=20
        Alternatives asked for (OpenAI's cap is 20, some models 5). One call shows at
        most this many options (and at most 26, one per letter).
    detail : {"low", "high", "auto"}, default="low"
        The image's detail: ``"low"`` bills a flat 85 tokens on OpenAI's tile models.
    max_concurrency : int, default=4
        Most calls in flight at once.
    timeout : float, default=60.0
        Seconds to wait for one answer.
    max_retries : int, default=4
        Retries of a call after a 429, a 5xx, a timeout or a lost connection, with
        exponential backoff and full jitter, never shorter than the server's
        ``Retry-After``. Every try is a call of the budget. Other errors are never retried.
    backoff, max_backoff : float, default=0.5, 20.0
        First backoff ceiling, doubling per retry, and the largest, in seconds.
    cache : bool, str, path or None, default=True
        Where answers are kept: True for :func:`default_cache_path`, a path for that
        file, None or False for no cache. A cached answer costs no call and no budget.
    cache_size : int, default=200000
        Most answers kept; the least recently used go first.
    option_token_ids : mapping or callable or None, default=None
        On servers that take vLLM's ``logprob_token_ids``: the token id of each option
        letter in the server's tokenizer (a mapping ``{"A": 32, ...}`` or a callable
        ``letter -> id``). The answer then holds every option's exact log-probability
        (no floor), and a call shows up to 26 options whatever ``top_logprobs``.
    instruction_format : str, default="{instruction}\\n\\n{options}\\n\\n{answer}"
        How the text of a call is laid out.
    max_image_bytes : int, default=20000000
        Largest PNG sent (OpenAI takes 20 MB); a larger image is refused before any call.
    max_image_pixels : int or None, default=None
        Largest ``width * height`` sent; None: no bound.
    image_tokens : int or None, default=None
        Image tokens one image bills, for :meth:`estimate_tokens`; None: :data:`IMAGE_TOKENS` by model.
    count_tokens : callable or None, default=None
        ``text -> int``, the server's count of a text's tokens, for :meth:`estimate_tokens`;
        None: open_clip's BPE (what ``skcarrot serve`` bills), or 4 characters a token
        when open_clip is missing.

    Attributes
    ----------
    n_calls_ : int
        Chat calls sent by this object in this process, retries included.
    n_cache_hits_ : int
        Answers read from the cache instead.
    usage_ : dict of str to int
        ``prompt_tokens``, ``completion_tokens`` and ``image_tokens`` summed over the answers received.

    Raises
    ------
    skcarrot.exceptions.RemoteValidationError
        The model returns no log-probabilities (400/403), the model is unknown (404), the image is too large.
    skcarrot.exceptions.RemoteAuthenticationError
        The key was refused (401).
    skcarrot.exceptions.RemoteUnavailableError
        No answer after every retry.
    skcarrot.exceptions.RemoteProtocolError
        An answer without log-probabilities, or none of whose alternatives names an option.

    Examples
    --------
    >>> from skcarrot.backends import ChatVLMBackend
    >>> backend = ChatVLMBackend("gpt-4o", cache=None)
    >>> backend.calls_per_image(10), backend.calls_per_image(30)
    (1, 3)
    >>> print(backend.message_text("Which digit is it?", ["zero", "one"]))
    Which digit is it?
    <BLANKLINE>
    A. zero
    B. one
    <BLANKLINE>
    Answer with the letter of one option only.
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key_env: str = API_KEY_ENV,
        top_logprobs: int = 20,
        detail: str = "low",
        max_concurrency: int = 4,
        timeout: float = 60.0,
        max_retries: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 20.0,
        cache: Any = True,
        cache_size: int = 200_000,
        option_token_ids: Mapping[str, int] | Callable[[str], int] | None = None,
        instruction_format: str = "{instruction}\n\n{options}\n\n{answer}",
        max_image_bytes: int = 20_000_000,
        max_image_pixels: int | None = None,
        image_tokens: int | None = None,
        count_tokens: Callable[[str], int] | None = None,
    ) -> None:
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be the model's name on the server, got {model!r}")
        if not 2 <= int(top_logprobs) <= 20:
            raise ValueError(f"top_logprobs must be in 2..20 (the API's range, and two options a call at least), "
                             f"got {top_logprobs}")
        if detail not in ("low", "high", "auto"):
            raise ValueError(f"detail must be 'low', 'high' or 'auto', got {detail!r}")
        self.model = model
        self.base_url = base_url
        self.api_key_env = api_key_env
        self.top_logprobs = int(top_logprobs)
        self.detail = detail
        self.max_concurrency = int(max_concurrency)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.cache = cache
        self.cache_size = int(cache_size)
        self.option_token_ids = option_token_ids
        self.instruction_format = instruction_format
        self.max_image_bytes = int(max_image_bytes)
        self.max_image_pixels = max_image_pixels
        self.image_tokens = image_tokens
        self.count_tokens = count_tokens
        self._reset()

    _PARAMS = ("model", "base_url", "api_key_env", "top_logprobs", "detail", "max_concurrency", "timeout",
               "max_retries", "backoff", "max_backoff", "cache", "cache_size", "option_token_ids",
               "instruction_format", "max_image_bytes", "max_image_pixels", "image_tokens", "count_tokens")

    def _reset(self) -> None:
        """What a process builds for itself: the client, the cache connection, locks, counts."""
        self._client = None
        self._client_key: tuple | None = None
        self._cache_db: _AnswerCache | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._probed = False
        self.n_calls_ = 0
        self.n_cache_hits_ = 0
        self.usage_ = {"prompt_tokens": 0, "completion_tokens": 0, "image_tokens": 0}

    def get_params(self, deep: bool = False) -> dict:
        """The constructor's arguments (the key is none of them)."""
        return {name: getattr(self, name) for name in self._PARAMS}

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items() if k in ("model", "base_url"))
        return f"{type(self).__name__}({shown})"

    def __getstate__(self) -> dict:
        # Nothing of a process crosses a pickle: no client (it holds the key and sockets), no connection.
        return {name: getattr(self, name) for name in self._PARAMS}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    # -- the client, the cache ----------------------------------------------------------------
    def _fresh_process(self) -> None:
        if self._pid != os.getpid():  # a forked child: its parent's sockets and connection are not its own
            self._reset()

    def _api_key(self) -> str:
        key = os.environ.get(self.api_key_env)
        if key:
            return key
        if self.base_url is None:
            raise RemoteAuthenticationError(
                f"no API key: the environment variable {self.api_key_env} is unset; set it to your key, "
                f"or pass api_key_env='<VARIABLE>' to read another, or base_url=... for a self-hosted server",
                status_code=None,
            )
        return "unused"  # self-hosted servers usually take any key, and the client insists on one

    def _openai(self):
        self._fresh_process()
        try:
            import openai
        except ImportError as exc:  # pragma: no cover - the extra is installed in the test environment
            raise ImportError(
                "ChatVLMBackend needs the openai client: pip install skcarrot[chat]"
            ) from exc
        key = self._api_key()
        identity = (hashlib.sha256(key.encode()).hexdigest(), self.base_url, self.timeout)
        with self._lock:
            if self._client is None or self._client_key != identity:
                # The client's own retries are off: every try must pass the meter, so this class retries.
                self._client = openai.OpenAI(api_key=key, base_url=self.base_url, max_retries=0,
                                             timeout=self.timeout)
                self._client_key = identity
            return self._client

    def cache_path(self) -> Path | None:
        """The answer cache's file, or None when off."""
        if self.cache is None or self.cache is False:
            return None
        return default_cache_path() if self.cache is True else Path(self.cache)

    def _cache(self) -> _AnswerCache | None:
        self._fresh_process()
        path = self.cache_path()
        if path is None:
            return None
        with self._lock:
            if self._cache_db is None:
                self._cache_db = _AnswerCache(path, self.cache_size)
            return self._cache_db

    # -- one call -------------------------------------------------------------------------
    def group_size(self) -> int:
        """Most options one call shows: ``top_logprobs`` (26 with ``option_token_ids``), at most one per letter."""
        if self.option_token_ids is not None:
            return len(LETTERS)
        return min(self.top_logprobs, len(LETTERS))

    def calls_per_image(self, n_options: int) -> int:
        """Calls one image costs with ``n_options`` options: the groups, then (if more than one) a final among winners.

        Examples
        --------
        >>> from skcarrot.backends import ChatVLMBackend
        >>> backend = ChatVLMBackend("m", top_logprobs=5, cache=None)
        >>> [backend.calls_per_image(c) for c in (2, 5, 6, 25, 26)]
        [1, 1, 3, 6, 9]
        """
        size = self.group_size()
        if n_options <= size:
            return 1
        n_groups = math.ceil(n_options / size)
        return n_groups + self.calls_per_image(n_groups)

    def message_text(self, instruction: str, options: Sequence[str]) -> str:
        """The text part of a call: the instruction, the lettered options, the answer format."""
        if len(options) > len(LETTERS):
            raise ValueError(f"one call shows at most {len(LETTERS)} options, got {len(options)}")
        lines = "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(options))
        return self.instruction_format.format(instruction=instruction, options=lines, answer=ANSWER_FORMAT)

    def _png(self, image: Any) -> bytes:
        if self.max_image_pixels is not None and image.width * image.height > self.max_image_pixels:
            raise RemoteValidationError(
                f"an image of {image.width}x{image.height} = {image.width * image.height} pixels is over "
                f"max_image_pixels={self.max_image_pixels}; resize the images or raise max_image_pixels"
            )
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
        data = buffer.getvalue()
        if len(data) > self.max_image_bytes:
            raise RemoteValidationError(
                f"an image of {image.width}x{image.height} is {len(data)} bytes as PNG, over "
                f"max_image_bytes={self.max_image_bytes} (the API's limit); resize the images before fitting, "
                "or raise max_image_bytes if the server takes larger ones"
            )
        return data

    def _key(self, text: str, image_digest: str) -> str:
        ids = None
        if self.option_token_ids is not None:
            ids = self._token_ids(len(LETTERS))
        what = [self.base_url or "https://api.openai.com/v1", self.model, self.detail, self.top_logprobs, ids,
                text, image_digest]
        return hashlib.sha256(json.dumps(what).encode()).hexdigest()

    def _token_ids(self, n: int) -> list[int]:
        ids = self.option_token_ids
        return [int(ids[LETTERS[i]] if isinstance(ids, Mapping) else ids(LETTERS[i])) for i in range(n)]

    def _request(self, text: str, png: bytes, n_options: int) -> dict:
        import base64

        url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        body = dict(
            model=self.model,
            messages=[{"role": "user", "content": [
                {"type": "text", "text": text},  # text first: the prefix a prompt cache can reuse
                {"type": "image_url", "image_url": {"url": url, "detail": self.detail}},
            ]}],
            max_completion_tokens=1, logprobs=True, top_logprobs=min(self.top_logprobs, 20), temperature=0,
        )
        if self.option_token_ids is not None:
            body["extra_body"] = {"logprob_token_ids": self._token_ids(n_options)}
        return body

    def _send(self, body: dict, meter: Any) -> Any:
        """One call with this class's retries; every try passes ``meter.charge()`` first."""
        import openai

        client = self._openai()
        for attempt in range(self.max_retries + 1):
            meter.charge()
            with self._lock:
                self.n_calls_ += 1
            try:
                return client.chat.completions.create(**body)
            except openai.AuthenticationError as exc:
                raise RemoteAuthenticationError(
                    f"{self._where()} refused the key (401): set the environment variable {self.api_key_env} "
                    f"to a key it accepts, or pass api_key_env='<VARIABLE>' to read another "
                    f"({self.api_key_env} is {'set' if os.environ.get(self.api_key_env) else 'unset'})",
                    status_code=401,
                ) from exc
            except openai.NotFoundError as exc:
                raise RemoteValidationError(self._not_found(exc), status_code=404) from exc
            except (openai.BadRequestError, openai.PermissionDeniedError) as exc:
                message = str(getattr(exc, "message", exc))
                if "logprob" in message.lower():
                    raise RemoteValidationError(
                        f"model {self.model!r} returns no log-probabilities ({exc.status_code}: {message}); use "
                        "a model that does (gpt-4o, gpt-4.1, gpt-4.1-mini...) or a self-hosted server "
                        "(vLLM, SGLang, skcarrot serve)", status_code=exc.status_code,
                    ) from exc
                if "top_logprobs" in message:
                    raise RemoteValidationError(
                        f"{self._where()} refused top_logprobs={self.top_logprobs} ({message}); pass the "
                        "largest value it takes as ChatVLMBackend(top_logprobs=...)", status_code=exc.status_code,
                    ) from exc
                raise RemoteValidationError(
                    f"{self._where()} refused the call ({exc.status_code}: {message})", status_code=exc.status_code,
                ) from exc
            except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError,
                    openai.APIStatusError) as exc:
                status = getattr(exc, "status_code", None)
                if isinstance(exc, openai.APIStatusError) and status is not None and status < 500 \
                        and status not in (408, 409, 429):
                    raise RemoteValidationError(
                        f"{self._where()} refused the call ({status}: {getattr(exc, 'message', exc)})",
                        status_code=status,
                    ) from exc
                if attempt == self.max_retries:
                    raise RemoteUnavailableError(
                        f"{self._where()} gave no answer after {attempt + 1} tries (last: {exc}); retry later, "
                        "raise max_retries or timeout, or lower max_concurrency", status_code=status,
                    ) from exc
                ceiling = min(self.max_backoff, self.backoff * 2**attempt)
                wait = max(random.uniform(0.0, ceiling), _retry_after(exc) or 0.0)
                logger.info("chat call failed (%s); retry %d of %d in %.2f s", exc, attempt + 1,
                            self.max_retries, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    def _where(self) -> str:
        return f"the chat server at {self.base_url or 'api.openai.com'} (model {self.model!r})"

    def _not_found(self, exc: Any) -> str:
        message = f"{self._where()} answered 404 ({getattr(exc, 'message', exc)})"
        try:
            names = sorted(m.id for m in self._openai().models.list())
        except Exception:  # noqa: BLE001 - the list is a hint; the 404 is the error
            names = None
        if names:
            return f"{message}: unknown model {self.model!r}; the server offers {names[:20]}: pass one as model=..."
        return (f"{message}: check model={self.model!r} and base_url={self.base_url!r} (the API's root, "
                "usually ending in /v1)")

    def _parse(self, response: Any, n_options: int) -> ChatAnswer:
        data = response.to_dict() if hasattr(response, "to_dict") else dict(response)
        try:
            first = data["choices"][0]["logprobs"]["content"][0]
            alternatives = [(str(t["token"]), float(t["logprob"])) for t in first.get("top_logprobs") or []]
            if not alternatives:
                alternatives = [(str(first["token"]), float(first["logprob"]))]
        except (KeyError, IndexError, TypeError) as exc:
            raise RemoteProtocolError(
                f"{self._where()} answered without log-probabilities ({str(data)[:200]}); use a model and "
                "server that return logprobs for chat completions"
            ) from exc
        usage = data.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        return ChatAnswer(alternatives=alternatives, usage={
            "prompt_tokens": int(usage.get("prompt_tokens") or 0),
            "completion_tokens": int(usage.get("completion_tokens") or 0),
            "image_tokens": int(details.get("image_tokens") or 0),
        })

    def _probe(self, answer: ChatAnswer, n_options: int) -> None:
        """The first answer's capabilities: as many alternatives as one call's options need."""
        if self._probed:
            return
        self._probed = True
        got = len(answer["alternatives"])
        if self.option_token_ids is None and got < min(self.top_logprobs, n_options):
            raise RemoteValidationError(
                f"{self._where()} returned {got} alternatives of the top_logprobs={self.top_logprobs} asked, "
                f"too few for calls of {n_options} options; pass ChatVLMBackend(top_logprobs={max(got, 2)}) "
                "to ask for what it returns (more classes are then shown in groups)"
            )

    def ask(self, image: Any, instruction: str, options: Sequence[str], meter: Any = None,
            png: bytes | None = None, digest: str | None = None) -> tuple[ChatAnswer, bool]:
        """One multiple-choice question about ``image``: ``(answer, from_cache)``."""
        meter = _Unmetered() if meter is None else meter
        text = self.message_text(instruction, options)
        if digest is None:
            digest = hash_pixels(hashlib.sha256(), image, "chat-image").hexdigest()
        key = self._key(text, digest)
        cache = self._cache()
        if cache is not None:
            hit = cache.get(key)
            if hit is not None:
                with self._lock:
                    self.n_cache_hits_ += 1
                return ChatAnswer(alternatives=[tuple(a) for a in hit["alternatives"]], usage=hit["usage"]), True
        png = self._png(image) if png is None else png
        answer = self._parse(self._send(self._request(text, png, len(options)), meter), len(options))
        self._probe(answer, len(options))
        with self._lock:
            for name, value in answer["usage"].items():
                self.usage_[name] += value
        meter.record(answer["usage"])
        if cache is not None:
            cache.put(key, {"alternatives": answer["alternatives"], "usage": answer["usage"]})
        return answer, False

    def is_cached(self, image_digest: str, instruction: str, options: Sequence[str]) -> bool:
        """Whether the answer to this question is in the cache (no call)."""
        cache = self._cache()
        if cache is None:
            return False
        return cache.get(self._key(self.message_text(instruction, options), image_digest)) is not None

    # -- the door ---------------------------------------------------------------------------
    def option_log_probs(self, images: Sequence[Any], instruction: str, options: Sequence[str],
                         meter: Any = None) -> np.ndarray:
        """Log-probabilities ``(n_images, n_options)`` of each image over the options: one call per image and group.

        Options beyond :meth:`group_size` are shown in groups (:func:`option_groups`) and
        combined by a final call among the groups' winners (:func:`combine_rounds`).

        Parameters
        ----------
        images : sequence of PIL.Image.Image
        instruction : str
        options : sequence of str
            One description per class, in column order.
        meter : object or None, default=None
            ``reserve(n)`` before a round's uncached calls, ``charge()`` before each try,
            ``record(usage)`` after each answer (the chat door's counter); None counts nothing.
        """
        meter = _Unmetered() if meter is None else meter
        images = list(images)
        options = [str(o) for o in options]
        if len(options) < 2:
            raise ValueError(f"need at least two options, got {options}")
        digests = [hash_pixels(hashlib.sha256(), img, "chat-image").hexdigest() for img in images]
        pngs: dict[int, bytes] = {}

        def png(n: int) -> bytes:
            if n not in pngs:
                pngs[n] = self._png(images[n])
            return pngs[n]

        def round_of(questions: list[tuple[int, list[int]]]) -> list[np.ndarray]:
            """Ask every ``(image, option indices)`` question: log-probabilities over the indices shown."""
            uncached = [q for q in questions if len(q[1]) > 1
                        and not self.is_cached(digests[q[0]], instruction, [options[i] for i in q[1]])]
            meter.reserve(len(uncached))

            def one(q):
                n, shown = q
                if len(shown) == 1:  # a group of one option has nothing to ask
                    return np.zeros(1)
                answer, _ = self.ask(images[n], instruction, [options[i] for i in shown], meter,
                                     png=None if self.is_cached(digests[n], instruction, [options[i] for i in shown])
                                     else png(n), digest=digests[n])
                return option_scores(answer["alternatives"], len(shown))[0]

            if not self._probed and questions:  # the first answer probes the server alone
                first = [one(questions[0])]
                questions = questions[1:]
            else:
                first = []
            with ThreadPoolExecutor(max_workers=max(1, self.max_concurrency)) as pool:
                return first + list(pool.map(one, questions))

        return self._tournament(list(range(len(options))), len(images), round_of)

    def _tournament(self, members: list[int], n_images: int, round_of) -> np.ndarray:
        """Scores ``(n_images, len(members))`` over ``members``: one round, or groups then a final among winners."""
        size = self.group_size()
        if len(members) <= size:
            return np.stack(round_of([(n, members) for n in range(n_images)]))
        groups = [[members[i] for i in g] for g in option_groups(len(members), size)]
        answers = round_of([(n, g) for n in range(n_images) for g in groups])
        per_image = [answers[n * len(groups):(n + 1) * len(groups)] for n in range(n_images)]
        winners = [[g[int(np.argmax(lp))] for g, lp in zip(groups, rounds)] for rounds in per_image]
        # The final is itself a tournament when the winners are more than one call shows; each image has its own.
        out = np.empty((n_images, len(members)))
        position = {m: j for j, m in enumerate(members)}
        finals = self._final_round(winners, round_of)
        for n in range(n_images):
            local = [[position[m] for m in g] for g in groups]
            out[n] = combine_rounds(per_image[n], local, finals[n], len(members))
        return out

    def _final_round(self, winners: list[list[int]], round_of) -> list[np.ndarray]:
        size = self.group_size()
        if len(winners[0]) <= size:
            return round_of([(n, w) for n, w in enumerate(winners)])
        # More winners than one call shows: each image's winners go through their own tournament.
        return [self._tournament(w, 1, lambda qs, n=n: round_of([(n, q[1]) for q in qs]))[0]
                for n, w in enumerate(winners)]

    # -- what a fit will cost ------------------------------------------------------------------
    def estimate_tokens(self, instruction: str, options: Sequence[str]) -> tuple[int, int]:
        """``(input_tokens, output_tokens)`` of one image's calls with these options, counted without a call."""
        count = self.count_tokens or _default_counter()
        image = self.image_tokens
        if image is None:
            matches = [k for k in IMAGE_TOKENS if self.model.startswith(k)]
            image = IMAGE_TOKENS[max(matches, key=len)] if matches else 85
        size = self.group_size()
        options = list(options)
        if len(options) <= size:
            return count(self.message_text(instruction, options)) + image, 1
        groups = option_groups(len(options), size)
        text = sum(count(self.message_text(instruction, [options[i] for i in g])) for g in groups)
        # the final shows one winner per group: the groups' first options stand in for the winners unknown yet
        final_in, final_out = self.estimate_tokens(instruction, [options[g[0]] for g in groups])
        return text + image * len(groups) + final_in, len(groups) + final_out


def _default_counter() -> Callable[[str], int]:
    try:
        from open_clip.tokenizer import SimpleTokenizer
    except ImportError:  # pragma: no cover
        return lambda text: max(1, math.ceil(len(text) / 4))
    tokenizer = _tokenizer_cache.get("clip")
    if tokenizer is None:
        tokenizer = _tokenizer_cache["clip"] = SimpleTokenizer()
    return lambda text: len(tokenizer.encode(text))


_tokenizer_cache: dict[str, Any] = {}
