"""Backends on the far side of a network, on one retrying HTTP client.

- :class:`HTTPBackend`: a model served by ``skcarrot serve`` (both doors).
- :class:`ZeroShotHTTPBackend`: any zero-shot-image-classification endpoint (the text door).
- :class:`ChatVLMBackend`: any OpenAI-compatible chat API that returns log-probabilities
  (the chat door), on the official ``openai`` client.
"""

from .chat import ChatVLMBackend
from .serve_api import API_KEY_ENV, HTTPBackend
from .zero_shot import TOKEN_ENV, ZeroShotHTTPBackend

__all__ = ["API_KEY_ENV", "ChatVLMBackend", "HTTPBackend", "TOKEN_ENV", "ZeroShotHTTPBackend"]
