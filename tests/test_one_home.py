"""Facts kept in one place: the stratified splits, the pixel digest, the default template, the predict mixin.

Each test pins the shared home against the code it replaced (copied here as it was), so moving a
definition can not change a split or a digest: the same seeds give the same indices, and a served
content id stays what it was.
"""

import hashlib

import numpy as np
import pytest
from PIL import Image

from skcarrot import wire
from skcarrot._util import split as _split
from skcarrot._training import early_stopping, selection
from skcarrot.datasets import few_shot_split, load_digit_images
from skcarrot.datasets.benchmark import _per_class

SEEDS = range(12)


def _labels(seed):
    """Unbalanced labels in shuffled order: classes of 1 to 9 samples."""
    rng = np.random.RandomState(1000 + seed)
    return rng.permutation(np.repeat(np.arange(5), [1, 2, 5, 8, 9]))


# -- the splits as they were written before they had one home ---------------------------------------------


def _old_few_shot_split(X, y, n_shots, seed=0):
    X, y = np.asarray(X), np.asarray(y)
    rng = np.random.RandomState(seed)
    train = np.concatenate([rng.choice(np.flatnonzero(y == c), n_shots, replace=False) for c in np.unique(y)])
    test = np.setdiff1d(np.arange(len(y)), train)
    return X[train], y[train], X[test], y[test]


def _old_per_class(labels, k, rng, exclude=None):
    chosen = []
    for c in np.unique(labels):
        pool = [i for i in np.flatnonzero(labels == c) if not exclude or i not in exclude]
        if not pool:
            continue
        chosen.extend(rng.choice(pool, min(k, len(pool)), replace=False).tolist())
    return np.asarray(sorted(chosen), dtype=np.int64)


@pytest.mark.parametrize("n_shots", [1, 4, 16])
def test_few_shot_split_draws_the_same_shots_as_before(n_shots):
    X, y = load_digit_images()
    for seed in SEEDS:
        new, old = few_shot_split(X, y, n_shots, seed=seed), _old_few_shot_split(X, y, n_shots, seed=seed)
        for a, b in zip(new, old):
            np.testing.assert_array_equal(a, b)
    first, other = few_shot_split(X, y, n_shots, seed=0)[0], few_shot_split(X, y, n_shots, seed=1)[0]
    assert not np.array_equal(first, other)  # the seed decides the draw


def test_few_shot_split_asking_for_more_shots_than_a_class_has_names_the_class_and_its_count():
    y = np.repeat([0, 1], [5, 3])
    with pytest.raises(ValueError, match=r"class 1 has 3 samples to draw from, fewer than the 4 asked for"):
        few_shot_split(np.arange(8), y, 4)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_the_benchmark_draw_is_the_same_as_before_with_and_without_exclusions(k):
    for seed in SEEDS:
        y = _labels(seed)
        exclude = set(np.random.RandomState(seed).choice(len(y), 6, replace=False).tolist())
        for excluded in (None, exclude):
            new = _per_class(y, k, np.random.RandomState(seed), exclude=excluded)
            old = _old_per_class(y, k, np.random.RandomState(seed), exclude=excluded)
            np.testing.assert_array_equal(new, old)
            assert new.dtype == old.dtype
            if excluded:
                assert not set(new.tolist()) & excluded


def _holdout_as_it_was(y, fraction, rng):
    """The early-stopping holdout as it was written before it moved to _split: the indices it must keep."""
    validation = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        n_val = min(max(1, int(round(fraction * len(members)))), len(members) - 1)
        if n_val > 0:
            validation.extend(rng.choice(members, n_val, replace=False))
    validation = np.sort(np.asarray(validation, dtype=int))
    return np.setdiff1d(np.arange(len(y)), validation), validation


def _folds_as_they_were(y, k, rng):
    """The selection's folds as they were written before they moved to _split."""
    folds = np.empty(len(y), dtype=int)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        folds[rng.permutation(members)] = np.arange(len(members)) % k
    return folds


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_the_holdout_of_early_stopping_and_the_baselines_is_the_one_it_was(fraction):
    assert early_stopping.stratified_holdout is _split.stratified_holdout
    for seed in SEEDS:
        y = _labels(seed)
        train, held = _split.stratified_holdout(y, fraction, np.random.RandomState(seed))
        old_train, old_held = _holdout_as_it_was(y, fraction, np.random.RandomState(seed))
        np.testing.assert_array_equal(train, old_train)
        np.testing.assert_array_equal(held, old_held)
        assert sorted(np.concatenate([train, held]).tolist()) == list(range(len(y)))
        assert 0 not in y[held]  # the class of one image keeps it for training


@pytest.mark.parametrize("k", [2, 3, 5])
def test_the_folds_of_the_selection_are_the_ones_they_were(k):
    assert selection.stratified_folds is _split.stratified_folds
    for seed in SEEDS:
        y = _labels(seed)
        folds = _split.stratified_folds(y, k, np.random.RandomState(seed))
        np.testing.assert_array_equal(folds, _folds_as_they_were(y, k, np.random.RandomState(seed)))
        for c in np.unique(y):  # each class dealt round-robin: fold sizes differ by at most one
            sizes = np.bincount(folds[y == c], minlength=k)
            assert sizes.max() - sizes.min() <= 1


# -- the pixel digest -------------------------------------------------------------------------------------


def _old_content_id(image, band_bytes):
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    width, height = rgb.size
    digest = hashlib.sha256(f"skcarrot-rgb {width}x{height}\n".encode())
    rows = max(1, band_bytes // (3 * max(1, width)))
    if rows >= height:
        digest.update(rgb.tobytes())
    else:
        for top in range(0, height, rows):
            digest.update(rgb.crop((0, top, width, min(height, top + rows))).tobytes())
    return digest.hexdigest()


def _old_image_key(img):
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{img.mode}{img.size}".encode())
    h.update(img.tobytes())
    return h.digest()


def _old_fingerprint_part(images):
    digest = hashlib.sha256()
    for img in images:
        digest.update(repr((img.mode, img.size)).encode())
        digest.update(img.tobytes())
    return digest.hexdigest()


def _images():
    rng = np.random.RandomState(0)
    rgb = Image.fromarray(rng.randint(0, 256, size=(37, 23, 3)).astype(np.uint8))
    return [
        rgb,
        rgb.convert("L"),
        rgb.convert("RGBA"),
        rgb.convert("1"),
        rgb.convert("P"),
        Image.fromarray(rng.randint(0, 2**16, size=(9, 13)).astype(np.uint16)),  # I;16
        Image.fromarray(rng.rand(5, 7).astype(np.float32)),  # F
        Image.new("RGB", (1, 1)),
    ]


@pytest.mark.parametrize("band_bytes", [1 << 22, 64, 1])  # one piece, and bands of rows
def test_every_pixel_digest_keeps_its_value(monkeypatch, band_bytes):
    from skcarrot.backends.openclip import _image_key

    monkeypatch.setattr(wire, "_HASH_BAND_BYTES", band_bytes)
    images = _images()
    ids = []
    for img in images:
        ids.append(wire.image_content_id(img))
        assert ids[-1] == _old_content_id(img, band_bytes), img.mode  # a served content id stays stable
        assert _image_key(img) == _old_image_key(img), img.mode
    shared = hashlib.sha256()
    for img in images:
        wire.hash_pixels(shared, img, repr((img.mode, img.size)))
    assert shared.hexdigest() == _old_fingerprint_part(images)
    # the fit fingerprint hashes its images through it: a checkpoint written before still names its fit
    from skcarrot._training.checkpoint import fingerprint

    old = hashlib.sha256()
    for img in images:
        old.update(repr((img.mode, img.size)).encode())
        old.update(img.tobytes())
    old.update(np.zeros(2, dtype=int).tobytes())
    old.update(repr([]).encode())
    assert fingerprint(images, np.zeros(2, dtype=int), {}) == old.hexdigest()
    assert ids[0] == ids[2] != ids[1]  # the RGB content, whatever the mode it came in


def test_the_client_and_the_server_name_an_image_alike():
    from skcarrot.backends.remote import serve_api

    pytest.importorskip("fastapi")
    from skcarrot.serve import validation

    assert serve_api.image_content_id is validation.image_content_id is wire.image_content_id


# -- the default template and the predict mixin -----------------------------------------------------------


def test_every_default_template_is_the_one_constant():
    import argparse
    import inspect

    from skcarrot.backends import OpenCLIPBackend, embedded_backend
    from skcarrot.backends.models import DEFAULT_TEMPLATE, open_model
    from skcarrot.tools.cli import _add_serve_commands
    from skcarrot.tools.pretrain import DIGIT_TEMPLATES, FASHION_TEMPLATES

    defaults = [inspect.signature(f).parameters["template"].default
                for f in (OpenCLIPBackend, embedded_backend, open_model)]
    parser = argparse.ArgumentParser()
    _add_serve_commands(parser.add_subparsers(dest="command"))
    serve = parser.parse_args(["serve"])
    from skcarrot.doors.text import _TEMPLATE
    from skcarrot.search import TextPromptSearch
    from skcarrot.serve.config import Settings

    defaults += [inspect.signature(TextPromptSearch).parameters["templates"].default[0], _TEMPLATE,
                 Settings(db_url="sqlite://").template]
    assert defaults + [serve.template, DIGIT_TEMPLATES[0], FASHION_TEMPLATES[0]] == [DEFAULT_TEMPLATE] * 9
    assert DEFAULT_TEMPLATE.count("{}") == 1


def test_the_predict_mixin_has_one_home():
    from skcarrot import CarrotClassifier
    from skcarrot._util import predict as _predict
    from skcarrot._util import validation as _validation
    from skcarrot.tools.baselines import LinearProbeClassifier

    assert not hasattr(_validation, "ImageClassifierMixin")
    assert issubclass(CarrotClassifier, _predict.ImageClassifierMixin)
    assert issubclass(LinearProbeClassifier, _predict.ImageClassifierMixin)
