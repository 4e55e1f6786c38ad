"""The black boxes: the interfaces a vision-language model offers, and the models behind them.

:class:`BlackBoxVLM` is the embedding interface: ``context_shape`` and
``logits(images, class_names, offsets)``. :class:`TextBlackBox` is the
text interface: ``returns`` and ``text_scores(images, prompts)``, prompt
strings instead of offsets, as hosted endpoints take. :class:`QueryCounter`
counts every query scored through either interface and enforces the query budget.
(The estimator reaches them through a *door*, :mod:`skcarrot.doors`.)

:class:`OpenCLIPBackend` serves any open_clip model through both interfaces
(:class:`OpenCLIPTextBackend` is its text interface alone); :class:`ToyBackend` is a
tiny deterministic stand-in for tests and examples. :class:`HTTPBackend`
reaches a model served by ``skcarrot serve`` over HTTP (both interfaces);
:class:`ZeroShotHTTPBackend` any zero-shot-image-classification endpoint (the
text interface); :class:`ChatVLMBackend` any OpenAI-compatible chat API that returns
log-probabilities (the chat door). :func:`~skcarrot.backends.models.open_model` turns a model name into a model.
"""

from ._base import BlackBoxVLM, QueryCounter, TextBlackBox
from .embedded import OpenCLIPTextBackend, embedded_backend
from .models import open_model
from .openclip import OpenCLIPBackend, register_model_configs
from .remote import ChatVLMBackend, HTTPBackend, ZeroShotHTTPBackend
from .toy import ToyBackend

__all__ = [
    "BlackBoxVLM",
    "TextBlackBox",
    "QueryCounter",
    "OpenCLIPBackend",
    "OpenCLIPTextBackend",
    "ToyBackend",
    "HTTPBackend",
    "ZeroShotHTTPBackend",
    "ChatVLMBackend",
    "embedded_backend",
    "open_model",
    "register_model_configs",
]
