"""Shared fixtures: offline, small, seeded."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
from helpers import digits_split


@pytest.fixture(scope="session")
def digits():
    return digits_split()
