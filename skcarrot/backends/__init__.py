"""The door between the estimator and a vision-language model.

:class:`BlackBoxVLM` is the whole protocol: ``context_shape`` and
``logits(images, class_names, offsets)``. :class:`QueryCounter` counts every
prompt scored and enforces the query budget. :class:`OpenCLIPBackend` serves
any open_clip model through the protocol; :class:`ToyBackend` is a tiny
deterministic stand-in for tests and examples. :class:`HTTPBackend` reaches a
model served by ``skcarrot serve`` over HTTP.

The text-level door, :class:`TextBlackBox` (``returns`` and
``text_scores(images, prompts)``), takes prompt strings instead of offsets, as
hosted endpoints do; :class:`TextQueryCounter` counts it the same way.
"""

from ._base import BlackBoxVLM, QueryCounter
from .embedded import embedded_backend
from .http import HTTPBackend
from .openclip import OpenCLIPBackend, register_model_configs
from .text import OpenCLIPTextBackend, TextBlackBox, TextQueryCounter, ZeroShotHTTPBackend
from .toy import ToyBackend

__all__ = ["BlackBoxVLM", "QueryCounter", "OpenCLIPBackend", "ToyBackend", "register_model_configs", "embedded_backend"]
__all__ += ["TextBlackBox", "TextQueryCounter", "OpenCLIPTextBackend", "ZeroShotHTTPBackend"]
__all__ += ["HTTPBackend"]
