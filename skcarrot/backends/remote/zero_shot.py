"""A text-level black box behind any zero-shot-image-classification HTTP endpoint.

Hosted CLIP endpoints do not accept prompt embeddings: they take an image and
candidate labels and return one probability per label.
:class:`ZeroShotHTTPBackend` speaks that contract, one image per call, through
the retrying client of :class:`~skcarrot.backends.remote._client.RemoteClient`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from ...exceptions import RemoteProtocolError
from ...wire import png_base64
from .._base import check_prompt_sets
from ._client import RemoteClient

__all__ = ["TOKEN_ENV", "ZeroShotHTTPBackend"]

#: Environment variable read for the bearer token when ``token`` is None (hosted endpoints' usual one).
TOKEN_ENV = "HF_TOKEN"


class ZeroShotHTTPBackend(RemoteClient):
    """A text-level black box behind any zero-shot-image-classification HTTP endpoint.

    Speaks the public contract of hosted CLIP endpoints (Hugging Face Inference
    Endpoints, ``skcarrot serve``'s ``/v1/zero-shot-image-classification``):
    ``POST {"inputs": <base64 PNG>, "parameters": {"candidate_labels": [...],
    "hypothesis_template": "{}"}}`` returns ``[{"label": ..., "score": ...}]``,
    softmax probabilities over the labels. One image per call: scoring ``P``
    prompt sets on ``N`` images makes ``P * N`` calls, run concurrently. The
    full prompt strings are sent as the labels, with the template ``"{}"``.
    Each call carries an ``Idempotency-Key``, the same on its retries, so a
    metered server charges a call whose answer was lost once.

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
        server's ``Retry-After`` (in seconds or as an HTTP date). Other 4xx are
        never retried.
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
        HTTP requests sent by this object in this process, retries included.
    n_retries_ : int
        Of which retries.

    Raises
    ------
    skcarrot.exceptions.RemoteUnavailableError
        No answer after every retry (a :class:`ConnectionError`).
    skcarrot.exceptions.RemoteAuthenticationError
        The endpoint refused the token, 401 or 403 (a :class:`PermissionError`).
    skcarrot.exceptions.RemoteValidationError
        The endpoint refused the request, another 4xx (a :class:`ValueError`).
    skcarrot.exceptions.RemoteProtocolError
        An answer that is not a score per label (a :class:`ValueError`).

    Notes
    -----
    Needs the ``serve`` extra (urllib3). Probabilities over a prompt set's
    strings are a softmax, so their log-ratios are logit differences: the text
    prompt search relies on that to screen many candidate strings in one call.

    Examples
    --------
    >>> from skcarrot.backends import ZeroShotHTTPBackend
    >>> door = ZeroShotHTTPBackend("https://example.org/models/clip", token="hf_secret")
    >>> door.returns, "hf_secret" in repr(door)
    ('probabilities', False)
    """

    returns = "probabilities"
    _secret = "token"
    _store_secret = "store_token"
    _credential = "token"

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
        super().__init__(url, timeout=timeout, max_retries=max_retries, backoff=backoff, max_backoff=max_backoff)
        self.token = token
        self.token_env = token_env
        self.max_concurrency = max_concurrency
        self.store_token = store_token
        self.max_labels = max_labels

    # -- what the client needs (see RemoteClient) ------------------------------------------

    def _connection_limits(self) -> tuple[int, int]:
        return self.max_concurrency, self.max_concurrency

    def _auth_headers(self) -> dict[str, str]:
        token = self.token if self.token is not None else os.environ.get(self.token_env)
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _auth_hint(self) -> str:
        if self.token is not None:
            return (
                "the token passed as token=... was refused: pass one the endpoint accepts, or token=None "
                f"to read it from the environment variable named by token_env (now {self.token_env!r})"
            )
        where = f"the environment variable {self.token_env} (token_env={self.token_env!r})"
        if not os.environ.get(self.token_env):
            return (
                f"no token was sent: {where} is unset; set it, pass token_env='<VARIABLE>' to read "
                "another variable (for 'skcarrot serve' keys, e.g. 'SKCARROT_API_KEY'), or pass token=..."
            )
        return (
            f"the token came from {where}: set it to a token the endpoint accepts, pass "
            "token_env='<VARIABLE>' to read another variable, or pass token=..."
        )

    def _not_found_hint(self) -> str:
        parts = urlsplit(self.url)
        hint = (
            "url must be the endpoint's full URL, the one each image is POSTed to (for 'skcarrot serve': "
            f"'<server>/v1/zero-shot-image-classification'), got url={self.url!r}"
        )
        if parts.path.strip("/") == "":
            hint += f"; try url={self.url.rstrip('/') + '/v1/zero-shot-image-classification'!r}"
        return hint

    # -- the door ---------------------------------------------------------------------------

    def _score_one(self, image_b64: str, labels: list[str], key: str) -> dict[str, float]:
        payload = {"inputs": image_b64, "parameters": {"candidate_labels": labels, "hypothesis_template": "{}"}}
        # An Idempotency-Key, the same on every retry: a server that meters calls (skcarrot serve)
        # charges a retried call once; others ignore the header.
        body = self._call("POST", self.url, payload, charged=True, key=key)
        if isinstance(body, list) and len(body) == 1 and isinstance(body[0], list):
            body = body[0]  # some servers wrap one input's answer in a batch
        try:
            scores = {str(item["label"]): float(item["score"]) for item in body}
        except (TypeError, KeyError, ValueError) as exc:
            raise RemoteProtocolError(
                f"{self.url} answered {str(body)[:200]!r}; expected a list of {{'label', 'score'}}"
            ) from exc
        missing = [label for label in labels if label not in scores]
        if missing:
            raise RemoteProtocolError(
                f"{self.url} answered without a score for {len(missing)} label(s), e.g. {missing[0]!r}"
            )
        return scores

    def text_scores(self, images: Sequence[Any], prompts: Sequence[Sequence[str]]) -> np.ndarray:
        """Probabilities ``(P, n_images, L)``: one HTTP call per image and prompt set.

        A string repeated within a prompt set is sent once and gets its score in
        every column it fills.
        """
        sets = check_prompt_sets(prompts)
        images = list(images)
        encoded = [png_base64(img) for img in images]
        labels = [list(dict.fromkeys(prompt_set)) for prompt_set in sets]
        jobs = [(p, n) for p in range(len(sets)) for n in range(len(images))]
        # one key per call, made here (not in the pool's threads) so that it is the same in a
        # run repeated inside an idempotency scope
        base = self._next_key()
        self._http()
        with ThreadPoolExecutor(max_workers=max(1, int(self.max_concurrency))) as pool:
            answers = list(pool.map(
                lambda job: self._score_one(encoded[job[1]], labels[job[0]], f"{base}.{job[0]}.{job[1]}"), jobs
            ))
        out = np.empty((len(sets), len(images), len(sets[0])))
        for (p, n), scores in zip(jobs, answers):
            out[p, n] = [scores[s] for s in sets[p]]
        return out
