"""The doors between the estimator and a vision-language model.

:class:`BlackBoxVLM` is the embedding-level door: ``context_shape`` and
``logits(images, class_names, offsets)``. :class:`TextBlackBox` is the
text-level door: ``returns`` and ``text_scores(images, prompts)``, prompt
strings instead of offsets, as hosted endpoints take. :class:`QueryCounter`
counts every query scored through either door and enforces the query budget.

:class:`OpenCLIPBackend` serves any open_clip model through both doors
(:class:`OpenCLIPTextBackend` is its text door alone); :class:`ToyBackend` is a
tiny deterministic stand-in for tests and examples. :class:`HTTPBackend`
reaches a model served by ``skcarrot serve`` over HTTP (both doors);
:class:`ZeroShotHTTPBackend` any zero-shot-image-classification endpoint (the
text door).
"""

from ._base import BlackBoxVLM, QueryCounter, TextBlackBox
from .embedded import OpenCLIPTextBackend, embedded_backend
from .openclip import OpenCLIPBackend, register_model_configs
from .remote import HTTPBackend, ZeroShotHTTPBackend
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
    "embedded_backend",
    "register_model_configs",
]
