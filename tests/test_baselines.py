"""White-box baselines on the embedded model: shapes, both class counts, learning."""

import numpy as np
import pytest

from skcarrot import ToyBackend
from skcarrot.baselines import CoOpClassifier, LinearProbeClassifier, TipAdapterClassifier
from skcarrot.datasets import few_shot_split, load_digit_images

ESTIMATORS = [
    lambda: CoOpClassifier(max_epochs=3, random_state=0),
    lambda: LinearProbeClassifier(),
    lambda: TipAdapterClassifier(),
]


@pytest.mark.parametrize("make", ESTIMATORS)
@pytest.mark.parametrize("n_classes", [2, 10])
def test_probabilities_have_one_column_per_class(make, n_classes):
    X, y = load_digit_images()
    keep = y < n_classes
    Xtr, ytr, Xte, yte = few_shot_split(X[keep], y[keep], 8, seed=0)
    clf = make().fit(Xtr, ytr)
    proba = clf.predict_proba(Xte)
    assert proba.shape == (len(Xte), n_classes)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(clf.predict(Xte), clf.classes_[proba.argmax(axis=1)])
    assert clf.score(Xte, yte) > 1.0 / n_classes + 0.2  # well above chance on held-out digits


def test_white_box_methods_refuse_a_black_box():
    X, y = load_digit_images()
    with pytest.raises(TypeError, match="white-box method"):
        LinearProbeClassifier(backend=ToyBackend()).fit(X[:20], y[:20])
