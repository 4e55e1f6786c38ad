"""Inputs that must give a clear error or a correct reading, never a silent wrong answer."""

import numpy as np
import pytest
from helpers import FAST

from skcarrot import CarrotClassifier, ToyBackend


class ScaledBackend(ToyBackend):
    """A ToyBackend whose logits are multiplied by ``factor`` (NaN/inf/huge on demand)."""

    def __init__(self, factor=1.0, n_ctx=2, dim=8, scale=10.0, seed=0):
        super().__init__(n_ctx=n_ctx, dim=dim, scale=scale, seed=seed)
        self.factor = factor

    def logits(self, images, class_names, offsets):
        return super().logits(images, class_names, offsets) * self.factor


class MutatingBackend(ToyBackend):
    """Writes into the offsets it is given."""

    def logits(self, images, class_names, offsets):
        out = super().logits(images, class_names, offsets)
        offsets += 1.0
        return out


def test_non_finite_logits_at_predict_time_raise_naming_the_backend(digits):
    Xtr, ytr, Xte, _ = digits
    clf = CarrotClassifier(backend=ScaledBackend(), **FAST).fit(Xtr, ytr)
    for bad in (np.nan, np.inf):
        clf.set_params(backend=ScaledBackend(factor=bad))
        for method in (clf.predict, clf.predict_proba, clf.decision_function):
            with pytest.raises(ValueError, match="backend ScaledBackend returned non-finite logits"):
                method(Xte)


def test_logits_beyond_float32_during_fit_raise_naming_the_backend(digits):
    Xtr, ytr, _, _ = digits
    with pytest.raises(ValueError, match="backend ScaledBackend returned logits beyond float32's range"):
        CarrotClassifier(backend=ScaledBackend(factor=1e38), **FAST).fit(Xtr, ytr)


def test_a_backend_that_writes_into_the_offsets_can_not_change_the_prompt(digits):
    Xtr, ytr, Xte, _ = digits
    clean = CarrotClassifier(backend=ToyBackend(), **FAST).fit(Xtr, ytr)
    mutated = CarrotClassifier(backend=MutatingBackend(), **FAST).fit(Xtr, ytr)
    np.testing.assert_array_equal(mutated.prompt_offset_, clean.prompt_offset_)
    offset = mutated.prompt_offset_.copy()
    mutated.predict(Xte)
    np.testing.assert_array_equal(mutated.prompt_offset_, offset)


def test_a_backend_whose_logits_is_not_callable_is_refused_up_front(digits):
    Xtr, ytr, _, _ = digits

    class NotCallable:
        context_shape = (2, 8)
        logits = np.zeros(3)

    with pytest.raises(TypeError, match="backend NotCallable: 'logits' must be a method"):
        CarrotClassifier(backend=NotCallable(), **FAST).fit(Xtr, ytr)


def test_duplicate_class_names_are_refused(digits):
    Xtr, ytr, _, _ = digits
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "Eight"]
    with pytest.raises(ValueError, match=r"same name to different classes: 'eight' for labels \[8, 9\]"):
        CarrotClassifier(backend=ToyBackend(), class_names=names, **FAST).fit(Xtr, ytr)


def test_a_dataframe_of_pixels_gets_the_feature_count_check(digits):
    pd = pytest.importorskip("pandas")
    Xtr, ytr, Xte, _ = digits
    clf = CarrotClassifier(backend=ToyBackend(), **FAST).fit(pd.DataFrame(Xtr.reshape(len(Xtr), -1)), ytr)
    assert clf.n_features_in_ == 64
    with pytest.raises(ValueError, match="X has 63 features, but CarrotClassifier is expecting 64"):
        clf.predict(pd.DataFrame(Xte.reshape(len(Xte), -1)[:, :63]))


def test_an_array_of_paths_is_accepted(digits, tmp_path):
    from PIL import Image

    Xtr, ytr, Xte, _ = digits
    paths = []
    for i, img in enumerate(Xtr):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(img).save(paths[-1])
    from_arrays = CarrotClassifier(backend=ToyBackend(), **FAST).fit(Xtr, ytr)
    from_paths = CarrotClassifier(backend=ToyBackend(), **FAST).fit(np.array(paths), ytr)
    np.testing.assert_allclose(from_paths.predict_proba(Xte), from_arrays.predict_proba(Xte))


def test_an_augmentation_returning_an_array_is_named(digits):
    Xtr, ytr, _, _ = digits

    def to_array(img, rng):
        return np.asarray(img)

    with pytest.raises(TypeError, match="augmentation to_array returned ndarray for image 0"):
        CarrotClassifier(backend=ToyBackend(), augmentation=to_array, **FAST).fit(Xtr, ytr)


def test_float_0_255_images_learn_like_uint8(digits):
    Xtr, ytr, Xte, yte = digits
    as_uint8 = CarrotClassifier(backend=ToyBackend(), **FAST).fit(Xtr, ytr)
    as_float = CarrotClassifier(backend=ToyBackend(), **FAST).fit(Xtr.astype(np.float64), ytr)
    np.testing.assert_allclose(as_float.predict_proba(Xte.astype(np.float64)), as_uint8.predict_proba(Xte))
    with pytest.raises(ValueError, match="neither intensities in"):
        as_uint8.predict(Xte.astype(np.float64) / 16)  # 0-16 data: ambiguous, and said so
    clf = CarrotClassifier(backend=ToyBackend(), image_range=(0, 255 / 16), **FAST).fit(Xtr / 16.0, ytr)
    np.testing.assert_allclose(clf.predict_proba(Xte / 16.0), as_uint8.predict_proba(Xte), atol=1e-6)
