"""Accuracy impact of half precision inside the box (autocast), on the embedded model.

    python benchmarks/precision_impact.py [--device cpu] [--budget 8000]

Fits CARROT once in fp32, then scores the held-out digits with the same fitted prompt and
refiner through boxes running fp32, bf16 and fp16: zero-shot and CARROT accuracy, and the
largest logit difference. On CPU, fp16 autocast may be unsupported or slow; it is skipped
there. The GPU numbers come from the same script with ``--device cuda``.
"""

import argparse

import numpy as np

from skcarrot import CarrotClassifier
from skcarrot.backends import OpenCLIPBackend
from skcarrot.backends.embedded import EMBEDDED_MODEL, EMBEDDED_WEIGHTS
from skcarrot.datasets import few_shot_split, load_digit_images
from skcarrot.images import to_pil_images


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budget", type=int, default=8000)
    args = parser.parse_args()
    X, y = load_digit_images()
    Xtr, ytr, Xte, yte = few_shot_split(X, y, 16, seed=0)
    box = {p: OpenCLIPBackend(model_name=EMBEDDED_MODEL, pretrained=EMBEDDED_WEIGHTS, device=args.device, precision=p)
           for p in ("fp32", "bf16", "fp16")}
    clf = CarrotClassifier(backend=box["fp32"], query_budget=args.budget, random_state=0).fit(Xtr, ytr)
    images = to_pil_images(Xte)
    zero = np.zeros((1,) + clf.prompt_offset_.shape)
    ref = box["fp32"].logits(images, clf.class_names_, clf.prompt_offset_[None])[0]
    print(f"device {args.device}; held-out sklearn digits ({len(yte)} images), CARROT fitted in fp32")
    print("| precision | zero-shot accuracy | CARROT accuracy | max logit diff vs fp32 (relative) |")
    print("|---|---|---|---|")
    for p, b in box.items():
        if p == "fp16" and args.device == "cpu":
            continue
        zs = b.logits(images, clf.class_names_, zero)[0]
        clf.set_params(backend=b)
        acc = clf.score(Xte, yte)
        lg = b.logits(images, clf.class_names_, clf.prompt_offset_[None])[0]
        print(f"| {p} | {np.mean(zs.argmax(1) == yte):.4f} | {acc:.4f} | {np.abs(lg - ref).max() / np.abs(ref).max():.1e} |")


if __name__ == "__main__":
    main()
