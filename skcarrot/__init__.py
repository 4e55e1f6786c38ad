"""skcarrot: few-shot fine-tuning of black-box vision-language models (CARROT) for scikit-learn.

The estimator :class:`CarrotClassifier` talks to a model only through the
black-box door in :mod:`skcarrot.backends`: prompt offsets in, logits out, every
query counted.
"""

from .search._vocabulary import UnknownClassNamesWarning
from .backends import BlackBoxVLM, ChatVLMBackend, HTTPBackend, OpenCLIPBackend, QueryCounter, ToyBackend, ZeroShotHTTPBackend
from .classifier import CarrotClassifier
from .exceptions import QueryBudgetExceededError, WeightsUnavailableError

__version__ = "0.1.0"

__all__ = [
    "CarrotClassifier",
    "BlackBoxVLM",
    "OpenCLIPBackend",
    "HTTPBackend",
    "ChatVLMBackend",
    "ZeroShotHTTPBackend",
    "QueryCounter",
    "ToyBackend",
    "QueryBudgetExceededError",
    "WeightsUnavailableError",
    "UnknownClassNamesWarning",
    "__version__",
]
