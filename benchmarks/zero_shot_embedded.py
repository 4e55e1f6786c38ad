"""Zero-shot accuracy of the embedded micro CLIP: the numbers of its model card.

    python benchmarks/zero_shot_embedded.py [--weights PATH]

Needs Debian's opencv-doc and dataset-fashion-mnist for the first two rows;
sklearn digits ships with scikit-learn.
"""

import argparse
import time

import numpy as np

from skcarrot.backends import OpenCLIPBackend
from skcarrot.backends.embedded import EMBEDDED_MODEL, EMBEDDED_WEIGHTS
from skcarrot.datasets import (
    FASHION_CLASSES,
    load_digit_images,
    load_fashion_mnist,
    load_opencv_digits,
)
from skcarrot.images import to_pil_images
from skcarrot.tools.pretrain import opencv_digits_split


def zero_shot(backend, X, y, names, batch=2000):
    correct = 0
    for start in range(0, len(X), batch):
        imgs = to_pil_images(X[start : start + batch])
        logits = backend.logits(imgs, names, np.zeros((1,) + backend.context_shape))[0]
        correct += int((logits.argmax(1) == y[start : start + batch]).sum())
    return correct / len(X)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", default=EMBEDDED_WEIGHTS)
    args = parser.parse_args()
    box = OpenCLIPBackend(model_name=EMBEDDED_MODEL, pretrained=args.weights)
    digits = [str(d) for d in range(10)]
    rows = []
    Xd, yd = load_opencv_digits()
    _, _, Xh, yh = opencv_digits_split(Xd, yd)
    rows.append(("OpenCV digits, held-out 500", zero_shot(box, Xh, yh, digits)))
    Xf, yf = load_fashion_mnist("test")
    rows.append(("Fashion-MNIST test 10000", zero_shot(box, Xf, yf, list(FASHION_CLASSES))))
    Xs, ys = load_digit_images()
    rows.append(("sklearn digits 1797 (8x8)", zero_shot(box, Xs, ys, digits)))
    print(f"zero-shot, template {box.template!r}, weights {args.weights}")
    print("| data | zero-shot accuracy |\n|---|---|")
    for name, acc in rows:
        print(f"| {name} | {100 * acc:.1f}% |")


if __name__ == "__main__":
    t = time.time()
    main()
    print(f"({time.time() - t:.0f} s)")
