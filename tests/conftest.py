"""Shared fixtures: offline, small, seeded."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
from helpers import MICRO, digits16_split, digits_split


@pytest.fixture(scope="session")
def digits():
    """8 shots per class of sklearn digits and 200 held-out images, as uint8 8x8 arrays."""
    return digits_split()


@pytest.fixture(scope="session")
def digits16():
    """16 shots per class of sklearn digits, every other image held out."""
    return digits16_split()


@pytest.fixture(scope="session")
def digit_images():
    """The first 60 sklearn digits as PIL images, and their labels."""
    from skcarrot.datasets import load_digit_images
    from skcarrot.images import to_pil_images

    X, y = load_digit_images()
    return to_pil_images(X[:60]), y[:60]


@pytest.fixture(scope="session")
def micro():
    """The micro open_clip test model, random weights: a real model, no download."""
    from skcarrot.backends import OpenCLIPBackend

    return OpenCLIPBackend(model_name=MICRO, pretrained=None)
