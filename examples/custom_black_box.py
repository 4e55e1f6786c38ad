"""
Wrap your own black-box API
===========================

Any object with ``context_shape`` and ``logits(images, class_names, offsets)`` is a backend.
Here the "API" forwards to the embedded model, standing in for an HTTP client: the estimator
only ever sends images, class names and prompt offsets, and reads back logits.
"""

import numpy as np

from skcarrot import CarrotClassifier
from skcarrot.backends import embedded_backend
from skcarrot.datasets import few_shot_split, load_digit_images

_service = embedded_backend()  # pretend this runs on someone else's server


class MyAPI:
    """Two members, nothing else: that is the whole protocol."""

    context_shape = _service.context_shape  # (n_ctx, dim) the service accepts

    def __init__(self):
        self.calls = 0

    def logits(self, images, class_names, offsets):
        # e.g. POST {"images": [png, ...], "classes": class_names, "offsets": offsets.tolist()}
        self.calls += 1
        return np.asarray(_service.logits(images, class_names, offsets))


api = MyAPI()
X, y = load_digit_images()
X_train, y_train, X_test, y_test = few_shot_split(X, y, n_shots=16, seed=0)
clf = CarrotClassifier(backend=api, query_budget=2000, random_state=0).fit(X_train, y_train)
print(f"held-out accuracy {clf.score(X_test, y_test):.3f}")
print(f"{clf.n_queries_} queries in {api.calls - 1} calls during fit (the last call was the score)")
