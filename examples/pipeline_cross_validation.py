"""
Pipeline and cross-validation
=============================

Flat rows of 64 pixels (``load_digits().data``) become 8x8 images in a
:class:`~sklearn.pipeline.Pipeline`, and the whole pipeline is cross-validated.
"""

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from skcarrot import CarrotClassifier


def to_images(rows):
    """0-16 pixel rows -> (N, 8, 8) uint8 images."""
    return np.rint(np.asarray(rows) * (255 / 16)).astype(np.uint8).reshape(-1, 8, 8)


digits = load_digits()
rng = np.random.RandomState(0)
subset = rng.choice(len(digits.target), 200, replace=False)
pipe = make_pipeline(FunctionTransformer(to_images), CarrotClassifier(query_budget=410, random_state=0))
scores = cross_val_score(pipe, digits.data[subset], digits.target[subset], cv=3)
print("accuracy per fold:", np.round(scores, 3), "mean:", round(scores.mean(), 3))
