"""Wrap your own black-box API: any object with ``context_shape`` and ``logits`` will do.

Here the "API" is the embedded model behind a function, standing in for an HTTP client: the
estimator only ever sends images, class names and prompt offsets, and reads back logits.
"""

import numpy as np

from skcarrot import CarrotClassifier
from skcarrot.backends import embedded_backend
from skcarrot.datasets import few_shot_split, load_digit_images

_remote = embedded_backend()  # pretend this lives on someone else's server


class MyAPI:
    """Two members, nothing else: that is the whole protocol."""

    context_shape = _remote.context_shape  # (n_ctx, dim) the service accepts

    def logits(self, images, class_names, offsets):
        # e.g. POST {"images": [...png...], "classes": class_names, "offsets": offsets.tolist()}
        return np.asarray(_remote.logits(images, class_names, offsets))


X, y = load_digit_images()
X_train, y_train, X_test, y_test = few_shot_split(X, y, n_shots=16, seed=0)
clf = CarrotClassifier(backend=MyAPI(), query_budget=2000, random_state=0).fit(X_train, y_train)
print(f"held-out accuracy {clf.score(X_test, y_test):.3f} after {clf.n_queries_} queries")
