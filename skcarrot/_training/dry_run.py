"""A stand-in for a backend that answers every call with equal scores and counts what it would cost."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..exceptions import QueryBudgetExceededError

__all__ = ["DryRunBackend", "dry_run_backend"]


class DryRunBackend:
    """Answers like ``backend`` would be asked, without asking it: equal scores, calls and tokens counted.

    It offers the members ``backend`` offers (the chat door's ``option_log_probs``, the text
    door's ``text_scores``, the embedding door's ``logits``), so the fit picks the same door and
    plans the same run. Tokens are counted where ``backend`` can estimate them
    (``estimate_tokens``).
    """

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.n_calls_ = 0
        self.n_cached_ = 0  # a dry run reads no cache: every question is a call
        self.n_input_tokens_ = 0
        self.n_output_tokens_ = 0
        for name in ("returns", "context_shape", "template", "max_labels", "instruction"):
            if hasattr(backend, name):
                setattr(self, name, getattr(backend, name))

    def get_params(self, deep: bool = True) -> dict:
        return {"backend": self.backend}

    def calls_per_image(self, n_classes: int) -> int:
        return self.backend.calls_per_image(n_classes)

    def _option_log_probs(self, images, instruction, descriptions, max_calls=None) -> np.ndarray:
        backend = self.backend
        groups = backend.groups(len(descriptions))
        calls = len(images) * backend.calls_per_image(len(descriptions))
        if len(groups) > 1:  # the final round among the groups' winners: as many options as groups
            groups = groups + [(0, len(groups))]
        if max_calls is not None and calls > max_calls:
            raise QueryBudgetExceededError(f"scoring needs {calls} chat calls and the budget has {max_calls} left")
        estimate = getattr(backend, "estimate_tokens", None)
        if estimate is not None:
            per_size: dict = {}
            for image in images:
                size = tuple(image.size)
                if size not in per_size:
                    per_size[size] = [estimate(instruction, descriptions[a:b], size) for a, b in groups]
                for n_in, n_out in per_size[size]:
                    self.n_input_tokens_ += n_in
                    self.n_output_tokens_ += n_out
        self.n_calls_ += calls
        return np.full((len(images), len(descriptions)), -np.log(len(descriptions)))

    def _text_scores(self, images, prompts) -> np.ndarray:
        self.n_calls_ += len(images) * len(prompts)
        value = 1.0 / len(prompts[0]) if getattr(self, "returns", "logits") == "probabilities" else 0.0
        return np.full((len(prompts), len(images), len(prompts[0])), value)

    def _logits(self, images, class_names, offsets) -> np.ndarray:
        self.n_calls_ += len(offsets)
        return np.zeros((len(offsets), len(images), len(class_names)))


_MEMBERS = ("option_log_probs", "text_scores", "logits")


def dry_run_backend(backend: Any) -> DryRunBackend:
    """A :class:`DryRunBackend` for ``backend``, with exactly the scoring members ``backend`` has."""
    offered = {name: getattr(DryRunBackend, f"_{name}") for name in _MEMBERS if getattr(backend, name, None) is not None}
    kind = type(f"DryRun{type(backend).__name__}", (DryRunBackend,), offered)
    return kind(backend)
