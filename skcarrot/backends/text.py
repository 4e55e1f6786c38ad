"""The text-level door: prompt strings in, probabilities (or logits) out.

Hosted CLIP endpoints do not accept prompt embeddings. They take an image and
candidate labels and return one probability per label. :class:`TextBlackBox` is
that door, batched: ``text_scores(images, prompts)`` scores every image against
every prompt string of each of ``P`` *prompt sets* (one string per class) and
returns an array ``(P, n_images, n_strings)``. Each prompt set scored is one
*query*; :class:`TextQueryCounter` counts them (and the images scored), and
refuses, before the model is reached, any call that would overspend.

Backends:

- :class:`OpenCLIPTextBackend`: in process, over any :class:`OpenCLIPBackend`
  (the embedded default model when none is given); returns logits.
- :class:`ZeroShotHTTPBackend`: any HTTP endpoint that speaks the
  zero-shot-image-classification contract (one image per call); returns
  probabilities.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from sklearn.base import BaseEstimator

from .._threads import threads_for, torch_threads
from ..exceptions import QueryBudgetExceededError

__all__ = [
    "RETURNS",
    "TextBlackBox",
    "TextQueryCounter",
    "OpenCLIPTextBackend",
    "ZeroShotHTTPBackend",
    "TOKEN_ENV",
    "check_prompt_sets",
    "log_probabilities",
    "returns_of",
    "score_prompt_sets",
]

#: What a text-level black box may return.
RETURNS = ("probabilities", "logits")

_MAX_CACHED_TEXTS = 200_000
_TEXTS_PER_CHUNK = 1024


@runtime_checkable
class TextBlackBox(Protocol):
    """What a text-level black box must offer: two members.

    Attributes
    ----------
    returns : {"probabilities", "logits"}
        What :meth:`text_scores` returns. Probabilities are read as a softmax
        over the strings of one prompt set (what CLIP endpoints return), so
        their logarithms are logits up to a constant per image and prompt set.

    Methods
    -------
    text_scores(images, prompts)
        Score every image against every string of each prompt set. ``images`` is
        a sequence of RGB :class:`PIL.Image.Image`; ``prompts`` a sequence of
        ``P`` prompt sets, each a sequence of full prompt strings (usually one
        per class, e.g. ``"a photo of a cat."``), all of the same length ``L``.
        Returns an array ``(P, n_images, L)``. Each prompt set is one query.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot.backends import TextBlackBox
    >>> class Uniform:
    ...     returns = "probabilities"
    ...     def text_scores(self, images, prompts):
    ...         n_strings = len(prompts[0])
    ...         return np.full((len(prompts), len(images), n_strings), 1.0 / n_strings)
    >>> isinstance(Uniform(), TextBlackBox)
    True
    """

    returns: str

    def text_scores(self, images: Sequence[Any], prompts: Sequence[Sequence[str]]) -> np.ndarray:
        ...  # pragma: no cover


def returns_of(backend: Any) -> str:
    """Read and validate ``backend.returns`` of a text-level black box.

    Examples
    --------
    >>> from skcarrot.backends.text import OpenCLIPTextBackend, returns_of
    >>> returns_of(OpenCLIPTextBackend())
    'logits'
    """
    try:
        returns = backend.returns
    except AttributeError as exc:
        raise TypeError(
            f"backend {type(backend).__name__} has no 'returns'; a text-level black box needs "
            "'returns' ('probabilities' or 'logits') and 'text_scores(images, prompts)'"
        ) from exc
    if returns not in RETURNS:
        raise ValueError(f"backend.returns must be one of {RETURNS}, got {returns!r}")
    return returns


def check_prompt_sets(prompts: Any) -> list[tuple[str, ...]]:
    """Validate ``P`` prompt sets of the same length; return them as tuples of str.

    Parameters
    ----------
    prompts : sequence of sequence of str
        ``P >= 1`` prompt sets, each of ``L >= 1`` non-empty strings.

    Returns
    -------
    prompts : list of tuple of str

    Raises
    ------
    ValueError
        If there is no prompt set, one is empty or of another length than the
        first, or a string is empty; the message gives the index.
    TypeError
        If a prompt set is a bare string or holds something that is not a str.

    Examples
    --------
    >>> from skcarrot.backends.text import check_prompt_sets
    >>> check_prompt_sets([["a cat.", "a dog."]])
    [('a cat.', 'a dog.')]
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of prompt sets (sequences of str), got a single str")
    sets = list(prompts)
    if not sets:
        raise ValueError("expected at least one prompt set, got none")
    out = []
    for i, prompt_set in enumerate(sets):
        if isinstance(prompt_set, str):
            raise TypeError(
                f"prompt set {i} is a str ({prompt_set!r}); each prompt set is a sequence of "
                "strings, one per class: wrap it, e.g. [[...]]"
            )
        strings = tuple(prompt_set)
        if not strings:
            raise ValueError(f"prompt set {i} is empty; give one prompt string per class")
        for j, s in enumerate(strings):
            if not isinstance(s, str):
                raise TypeError(f"prompt set {i}, string {j} is a {type(s).__name__}, expected str")
            if not s.strip():
                raise ValueError(f"prompt set {i}, string {j} is empty")
        if strings and out and len(strings) != len(out[0]):
            raise ValueError(
                f"prompt set {i} has {len(strings)} strings but prompt set 0 has {len(out[0])}; "
                "every prompt set of one call must have the same length"
            )
        out.append(strings)
    return out


def check_text_scores(scores: Any, expected: tuple[int, int, int], returns: str) -> np.ndarray:
    """Check what a text-level black box returned: shape, finiteness, range of probabilities.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot.backends.text import check_text_scores
    >>> check_text_scores(np.full((1, 2, 2), 0.5), (1, 2, 2), "probabilities").dtype
    dtype('float64')
    """
    out = np.asarray(scores, dtype=np.float64)
    if out.shape != expected:
        raise ValueError(
            f"backend.text_scores returned shape {out.shape}, expected {expected} "
            "(prompt sets, images, strings per set)"
        )
    if not np.all(np.isfinite(out)):
        bad = np.argwhere(~np.isfinite(out))[0]
        raise ValueError(
            f"backend.text_scores returned non-finite values (first at prompt set {bad[0]}, image {bad[1]})"
        )
    if returns == "probabilities" and (out.min() < 0.0 or out.max() > 1.0 + 1e-6):
        raise ValueError(
            f"backend.text_scores returned probabilities outside [0, 1] (min {out.min():.3g}, "
            f"max {out.max():.3g}); a backend that returns logits must say returns='logits'"
        )
    return out


def log_probabilities(scores: np.ndarray, returns: str, floor: float = 1e-12) -> np.ndarray:
    """Log-probabilities over the last axis from what a text-level door returned.

    Logits go through a log-softmax. Probabilities are floored at ``floor``
    (endpoints may round tiny ones to 0) and renormalised, so rows sum to one
    even over a subset of the strings scored.

    Parameters
    ----------
    scores : ndarray of shape (..., n_strings)
    returns : {"probabilities", "logits"}
    floor : float, default=1e-12

    Returns
    -------
    log_probs : ndarray of the same shape

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot.backends.text import log_probabilities
    >>> np.exp(log_probabilities(np.array([[0.0, 0.0]]), "logits")).round(2)
    array([[0.5, 0.5]])
    >>> np.exp(log_probabilities(np.array([[0.2, 0.2]]), "probabilities")).round(2)
    array([[0.5, 0.5]])
    """
    scores = np.asarray(scores, dtype=np.float64)
    if returns == "logits":
        z = scores
    elif returns == "probabilities":
        z = np.log(np.maximum(scores, floor))
    else:
        raise ValueError(f"returns must be one of {RETURNS}, got {returns!r}")
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


class TextQueryCounter:
    """Wrap a text-level black box, count every prompt set and image it scores, enforce a budget.

    Parameters
    ----------
    backend : TextBlackBox
        The model behind the door.
    budget : int or None, default=None
        Most queries (prompt sets scored) allowed in total; ``None`` means unlimited.

    Attributes
    ----------
    returns : {"probabilities", "logits"}
        The backend's.
    n_queries : int
        Queries spent so far: prompt sets scored. A prompt set with more strings
        than classes (as in screening candidate names) is still one query.
    n_images_scored : int
        Images sent so far, summed over calls (as :class:`skcarrot.backends.QueryCounter`
        counts them): a model that encodes each image once per call does that many
        image forward passes.
    n_pairs_scored : int
        Image x prompt set pairs scored so far: the number of calls a
        one-image-per-call HTTP endpoint receives.
    by_purpose, images_by_purpose : dict of str to int
        Queries and images scored, split by the ``purpose`` given to each call.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot.backends import TextQueryCounter
    >>> class Uniform:
    ...     returns = "probabilities"
    ...     def text_scores(self, images, prompts):
    ...         return np.full((len(prompts), len(images), len(prompts[0])), 0.5)
    >>> counter = TextQueryCounter(Uniform(), budget=3)
    >>> counter.text_scores(["img"] * 4, [["a cat.", "a dog."]] * 2, purpose="prompt").shape
    (2, 4, 2)
    >>> counter.n_queries, counter.n_images_scored, counter.n_pairs_scored, counter.remaining
    (2, 4, 8, 1)
    """

    def __init__(self, backend: Any, budget: int | None = None) -> None:
        self.backend = backend
        self.budget = budget
        self.returns = returns_of(backend)
        self.n_queries = 0
        self.n_images_scored = 0
        self.n_pairs_scored = 0
        self.by_purpose: dict[str, int] = {}
        self.images_by_purpose: dict[str, int] = {}

    @property
    def remaining(self) -> int | None:
        """Queries left, or ``None`` when unlimited."""
        return None if self.budget is None else self.budget - self.n_queries

    def text_scores(
        self, images: Sequence[Any], prompts: Sequence[Sequence[str]], purpose: str = "other"
    ) -> np.ndarray:
        """Score ``images`` against every string of each prompt set.

        Parameters
        ----------
        images : sequence of PIL.Image.Image
            Images, scored under every prompt set.
        prompts : sequence of sequence of str
            ``P`` prompt sets of ``L`` strings each (one query each).
        purpose : str, default="other"
            Label for the accounting in :attr:`by_purpose`.

        Returns
        -------
        scores : ndarray of shape (P, n_images, L)
            Float64 probabilities or logits, as :attr:`returns` says.

        Raises
        ------
        QueryBudgetExceededError
            If the call would spend more than the remaining budget; the model is
            not called.
        """
        sets = check_prompt_sets(prompts)
        images = list(images)
        if not images:
            raise ValueError("expected at least one image to score, got none")
        n_sets = len(sets)
        remaining = self.remaining
        if remaining is not None and n_sets > remaining:
            raise QueryBudgetExceededError(
                f"scoring {n_sets} prompt set(s) would exceed the query budget of "
                f"{self.budget} ({self.n_queries} spent, {remaining} left); the call was not sent"
            )
        try:
            out = self.backend.text_scores(images, sets)
        finally:
            # Count what was sent, whatever came back: the model did (some of) the work.
            self.n_queries += n_sets
            self.n_images_scored += len(images)
            self.n_pairs_scored += n_sets * len(images)
            self.by_purpose[purpose] = self.by_purpose.get(purpose, 0) + n_sets
            self.images_by_purpose[purpose] = self.images_by_purpose.get(purpose, 0) + len(images)
        return check_text_scores(out, (n_sets, len(images), len(sets[0])), self.returns)

    def log_probabilities(
        self, images: Sequence[Any], prompts: Sequence[Sequence[str]], purpose: str = "other"
    ) -> np.ndarray:
        """As :meth:`text_scores`, turned into log-probabilities over each prompt set's strings.

        Examples
        --------
        >>> import numpy as np
        >>> from skcarrot.backends import OpenCLIPTextBackend, TextQueryCounter
        >>> counter = TextQueryCounter(OpenCLIPTextBackend())
        >>> from PIL import Image
        >>> logp = counter.log_probabilities([Image.new("RGB", (8, 8))], [["a one.", "a two."]])
        >>> logp.shape, bool(np.allclose(np.exp(logp).sum(-1), 1.0))
        ((1, 1, 2), True)
        """
        return log_probabilities(self.text_scores(images, prompts, purpose=purpose), self.returns)


# Text features of strings already encoded, per loaded model (a _LoadedBox of openclip.py).
_TEXT_FEATURES: "weakref.WeakKeyDictionary[Any, OrderedDict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()
_TEXT_LOCK = threading.Lock()


def _text_features(box: Any, strings: Sequence[str]) -> torch.Tensor:
    """Normalised text features ``(S, E)`` of full prompt strings, cached per string.

    Called with ``box.lock`` held and in inference mode.
    """
    with _TEXT_LOCK:
        cache = _TEXT_FEATURES.setdefault(box, OrderedDict())
    missing = [s for s in dict.fromkeys(strings) if s not in cache]
    for start in range(0, len(missing), _TEXTS_PER_CHUNK):
        chunk = missing[start : start + _TEXTS_PER_CHUNK]
        tokens = box.tokenizer(chunk)
        too_long = [s for s, row in zip(chunk, tokens) if int(row[-1]) != 0]
        if too_long:
            raise ValueError(
                f"{len(too_long)} prompt string(s) are longer than the model's context length "
                f"({tokens.shape[1]} tokens), e.g. {too_long[0]!r}; shorten them"
            )
        feats = box.model.encode_text(tokens.to(box.device), normalize=True).float()
        for s, f in zip(chunk, feats):
            cache[s] = f
    for s in strings:
        cache.move_to_end(s)
    while len(cache) > _MAX_CACHED_TEXTS:
        cache.popitem(last=False)
    return torch.stack([cache[s] for s in strings])


def score_prompt_sets(backend: Any, images: Sequence[Any], prompts: Sequence[Sequence[str]]) -> np.ndarray:
    """Logits of every image against every string of each prompt set, on an open_clip model.

    Every distinct string is encoded once (and cached across calls, as are the
    image features), so ``P`` prompt sets that share most strings cost little
    more than one.

    Parameters
    ----------
    backend : OpenCLIPBackend
        The model; its ``template`` plays no part (the strings are full prompts).
    images : sequence of PIL.Image.Image
    prompts : sequence of sequence of str
        ``P`` prompt sets of ``L`` strings each.

    Returns
    -------
    logits : ndarray of shape (P, n_images, L)
        ``logit_scale * cos(image, text)`` (plus the model's ``logit_bias``), float64.

    Examples
    --------
    >>> from PIL import Image
    >>> from skcarrot.backends import embedded_backend
    >>> from skcarrot.backends.text import score_prompt_sets
    >>> sets = [["a photo of a one.", "a photo of a two."], ["a one.", "a two."]]
    >>> score_prompt_sets(embedded_backend(), [Image.new("RGB", (8, 8))] * 3, sets).shape
    (2, 3, 2)
    """
    sets = check_prompt_sets(prompts)
    box = backend._box()
    strings = list(dict.fromkeys(s for prompt_set in sets for s in prompt_set))
    column = {s: i for i, s in enumerate(strings)}
    width = int(box.dim)
    layers = len(getattr(box.tower.transformer, "resblocks", [None]))
    flops = 24.0 * len(strings) * 16 * width * width * layers
    threads = threads_for(flops) if box.device.type == "cpu" else None
    with box.lock, torch.inference_mode(), torch_threads(threads), box._autocast():
        image_features = box.encode_images(images)  # (N, E)
        text_features = _text_features(box, strings)  # (S, E)
        with torch.autocast(device_type=box.device.type, enabled=False):  # the product in fp32
            scale = box.model.logit_scale.exp().float()
            logits = scale * image_features.float() @ text_features.float().T  # (N, S)
            bias = getattr(box.model, "logit_bias", None)
            if bias is not None:
                logits = logits + bias.float()
        logits = logits.cpu().numpy().astype(np.float64)
    columns = np.array([[column[s] for s in prompt_set] for prompt_set in sets])  # (P, L)
    return logits[:, columns].transpose(1, 0, 2)


class OpenCLIPTextBackend(BaseEstimator):
    """A text-level black box over an open_clip model, in process; returns logits.

    Parameters
    ----------
    backend : OpenCLIPBackend or None, default=None
        The model; None for the embedded default
        (:func:`skcarrot.backends.embedded_backend`). Its weights and image
        features live in the process-level cache of :class:`OpenCLIPBackend`;
        text features are cached there too, per distinct string.

    Attributes
    ----------
    returns : str
        ``"logits"``.

    Examples
    --------
    >>> import numpy as np
    >>> from skcarrot.backends import OpenCLIPTextBackend
    >>> from skcarrot.images import to_pil_images
    >>> door = OpenCLIPTextBackend()
    >>> images = to_pil_images(np.zeros((4, 8, 8), dtype=np.uint8))
    >>> door.text_scores(images, [["a photo of a one.", "a photo of a two."]]).shape
    (1, 4, 2)
    """

    returns = "logits"

    def __init__(self, backend: Any = None) -> None:
        self.backend = backend

    def _open_clip(self) -> Any:
        from .embedded import resolve_backend
        from .openclip import OpenCLIPBackend

        backend = resolve_backend(self.backend)
        if not isinstance(backend, OpenCLIPBackend):
            raise TypeError(
                f"OpenCLIPTextBackend needs an OpenCLIPBackend (or None for the embedded model), "
                f"got {type(backend).__name__}"
            )
        return backend

    def text_scores(self, images: Sequence[Any], prompts: Sequence[Sequence[str]]) -> np.ndarray:
        """Logits ``(P, n_images, L)``; see :class:`TextBlackBox` and :func:`score_prompt_sets`."""
        return score_prompt_sets(self._open_clip(), images, prompts)


#: Environment variable read for the bearer token when ``token`` is None (hosted endpoints' usual one).
TOKEN_ENV = "HF_TOKEN"

# Statuses worth retrying: the endpoint was busy, loading, restarting or rate limiting.
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


def _png_base64(image: Any) -> str:
    import base64
    import io

    rgb = image if image.mode == "RGB" else image.convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    import email.utils
    import time

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class ZeroShotHTTPBackend(BaseEstimator):
    """A text-level black box behind any zero-shot-image-classification HTTP endpoint.

    Speaks the public contract of hosted CLIP endpoints (Hugging Face Inference
    Endpoints, ``skcarrot serve``'s ``/v1/zero-shot-image-classification``):
    ``POST {"inputs": <base64 PNG>, "parameters": {"candidate_labels": [...],
    "hypothesis_template": "{}"}}`` returns ``[{"label": ..., "score": ...}]``,
    softmax probabilities over the labels. One image per call: scoring ``P``
    prompt sets on ``N`` images makes ``P * N`` calls, run concurrently. The
    full prompt strings are sent as the labels, with the template ``"{}"``.

    Parameters
    ----------
    url : str
        The endpoint's full URL.
    token : str or None, default=None
        Bearer token. None reads the environment variable ``token_env`` at every
        call, so the token never sits in parameters, reprs or pickles: the
        recommended way. An explicit token is dropped when pickled unless
        ``store_token=True``, and masked in the repr.
    token_env : str, default="HF_TOKEN"
        Environment variable of the token (for ``skcarrot serve``:
        ``"SKCARROT_API_KEY"``). Unset: requests go without authorization.
    max_concurrency : int, default=8
        Most requests in flight at once (and pooled connections).
    timeout : float, default=60.0
        Seconds to wait for one response.
    max_retries : int, default=6
        Retries of a request after a connection error, a timeout, a 429 or a
        5xx, with exponential backoff and full jitter, never shorter than the
        server's ``Retry-After``. Other 4xx are never retried.
    backoff : float, default=0.5
        First backoff ceiling in seconds; doubles per retry.
    max_backoff : float, default=30.0
        Largest backoff ceiling in seconds.
    store_token : bool, default=False
        Keep an explicit ``token`` in pickles.
    max_labels : int or None, default=256
        Most candidate labels the endpoint accepts in one call (hosted endpoints
        cap them); :class:`~skcarrot.CarrotClassifier` screens candidate words
        in chunks of this size. None: no cap.

    Attributes
    ----------
    returns : str
        ``"probabilities"``.
    n_calls_ : int
        HTTP requests sent by this object, retries included.
    n_retries_ : int
        Of which retries.

    Notes
    -----
    Needs ``httpx`` (``pip install httpx``). Probabilities over a prompt set's
    strings are a softmax, so their log-ratios are logit differences: the text
    prompt search relies on that to screen many candidate strings in one call.

    Examples
    --------
    >>> from skcarrot.backends.text import ZeroShotHTTPBackend
    >>> door = ZeroShotHTTPBackend("https://example.org/models/clip", token="hf_secret")
    >>> door.returns, "hf_secret" in repr(door)
    ('probabilities', False)
    """

    returns = "probabilities"

    def __init__(
        self,
        url: str,
        token: str | None = None,
        token_env: str = TOKEN_ENV,
        max_concurrency: int = 8,
        timeout: float = 60.0,
        max_retries: int = 6,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        store_token: bool = False,
        max_labels: int | None = 256,
    ) -> None:
        self.url = url
        self.token = token
        self.token_env = token_env
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.store_token = store_token
        self.max_labels = max_labels

    # -- what never travels: the token (unless asked), the connection pool, the lock ------------
    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_runtime_state", None)
        if not self.store_token:
            state["token"] = None
        return state

    def __repr__(self, N_CHAR_MAX: int = 700) -> str:
        if self.token is None:
            return super().__repr__(N_CHAR_MAX)
        token, self.token = self.token, "***"
        try:
            return super().__repr__(N_CHAR_MAX)
        finally:
            self.token = token

    def _runtime(self) -> dict:
        state = self.__dict__.get("_runtime_state")
        if state is None:
            state = self.__dict__.setdefault(
                "_runtime_state",
                {"lock": threading.Lock(), "client": None, "calls": 0, "retries": 0, "random": None},
            )
        return state

    @property
    def n_calls_(self) -> int:
        return self._runtime()["calls"]

    @property
    def n_retries_(self) -> int:
        return self._runtime()["retries"]

    def _client(self) -> Any:
        state = self._runtime()
        with state["lock"]:
            if state["client"] is None:
                try:
                    import httpx
                except ImportError as exc:  # pragma: no cover - depends on the install
                    raise ImportError("ZeroShotHTTPBackend needs httpx: pip install httpx") from exc
                import random

                limits = httpx.Limits(
                    max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency
                )
                state["client"] = httpx.Client(timeout=self.timeout, limits=limits)
                # Jitter only spreads retries in time; it never touches results or numpy's state.
                state["random"] = random.Random()
            return state["client"]

    def _headers(self) -> dict[str, str]:
        import os

        token = self.token if self.token is not None else os.environ.get(self.token_env)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        ceiling = min(float(self.max_backoff), float(self.backoff) * 2.0**attempt)
        delay = self._runtime()["random"].uniform(0.0, ceiling)
        return max(delay, retry_after or 0.0)

    def _post(self, payload: dict) -> Any:
        import time

        import httpx

        client = self._client()
        state = self._runtime()
        headers = self._headers()
        for attempt in range(int(self.max_retries) + 1):
            last = attempt == int(self.max_retries)
            with state["lock"]:
                state["calls"] += 1
                state["retries"] += attempt > 0
            try:
                response = client.post(self.url, json=payload, headers=headers)
            except httpx.TransportError as exc:
                if last:
                    raise ConnectionError(
                        f"{self.url} could not be reached after {attempt + 1} attempt(s): {exc!r}"
                    ) from exc
                time.sleep(self._delay(attempt, None))
                continue
            if response.status_code < 400:
                try:
                    return response.json()
                except ValueError as exc:
                    raise ValueError(f"{self.url} answered with invalid JSON: {response.text[:200]!r}") from exc
            if response.status_code in _RETRY_STATUSES and not last:
                time.sleep(self._delay(attempt, _retry_after(response.headers.get("Retry-After"))))
                continue
            self._raise(response, attempt + 1)
        raise AssertionError("unreachable")  # pragma: no cover

    def _raise(self, response: Any, attempts: int) -> None:
        status = response.status_code
        text = response.text[:300]
        if status in (401, 403):
            raise PermissionError(
                f"{self.url} refused the request ({status}): {text!r}; set the token in the environment "
                f"variable {self.token_env} (or pass token=...)"
            )
        if status in _RETRY_STATUSES:
            raise ConnectionError(f"{self.url} answered {status} after {attempts} attempt(s): {text!r}")
        raise ValueError(f"{self.url} rejected the request ({status}): {text!r}")

    def _score_one(self, image_b64: str, labels: list[str]) -> dict[str, float]:
        payload = {"inputs": image_b64, "parameters": {"candidate_labels": labels, "hypothesis_template": "{}"}}
        body = self._post(payload)
        if isinstance(body, list) and len(body) == 1 and isinstance(body[0], list):
            body = body[0]  # some servers wrap one input's answer in a batch
        try:
            scores = {str(item["label"]): float(item["score"]) for item in body}
        except (TypeError, KeyError, ValueError) as exc:
            raise ValueError(
                f"{self.url} answered {str(body)[:200]!r}; expected a list of {{'label', 'score'}}"
            ) from exc
        missing = [label for label in labels if label not in scores]
        if missing:
            raise ValueError(f"{self.url} answered without a score for {len(missing)} label(s), e.g. {missing[0]!r}")
        return scores

    def text_scores(self, images: Sequence[Any], prompts: Sequence[Sequence[str]]) -> np.ndarray:
        """Probabilities ``(P, n_images, L)``: one HTTP call per image and prompt set.

        A string repeated within a prompt set is sent once and gets its score in
        every column it fills.
        """
        from concurrent.futures import ThreadPoolExecutor

        sets = check_prompt_sets(prompts)
        images = list(images)
        encoded = [_png_base64(img) for img in images]
        labels = [list(dict.fromkeys(prompt_set)) for prompt_set in sets]
        jobs = [(p, n) for p in range(len(sets)) for n in range(len(images))]
        self._client()
        with ThreadPoolExecutor(max_workers=max(1, int(self.max_concurrency))) as pool:
            answers = list(pool.map(lambda job: self._score_one(encoded[job[1]], labels[job[0]]), jobs))
        out = np.empty((len(sets), len(images), len(sets[0])))
        for (p, n), scores in zip(jobs, answers):
            out[p, n] = [scores[s] for s in sets[p]]
        return out
