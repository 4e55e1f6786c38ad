"""Datasets: image sets that load offline, and the few-shot benchmark's loaders.

- :mod:`skcarrot.datasets.offline`: :func:`load_digit_images` (scikit-learn's 8x8 digits),
  :func:`load_opencv_digits`, :func:`load_fashion_mnist` and :func:`few_shot_split`.
- :mod:`skcarrot.datasets.benchmark`: the CoOp-layout datasets of the paper's benchmark.
"""

from .benchmark import DATASETS, FewShotTask, ImageSet, clean_classname, load_benchmark, sample_few_shot
from .offline import (
    DIGIT_WORDS,
    FASHION_CLASSES,
    few_shot_split,
    load_digit_images,
    load_fashion_mnist,
    load_opencv_digits,
)

__all__ = [
    "DIGIT_WORDS",
    "FASHION_CLASSES",
    "load_digit_images",
    "load_opencv_digits",
    "load_fashion_mnist",
    "few_shot_split",
    "DATASETS",
    "FewShotTask",
    "ImageSet",
    "clean_classname",
    "load_benchmark",
    "sample_few_shot",
]
