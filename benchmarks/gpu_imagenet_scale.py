"""GPU check at ImageNet scale (C = 1000): query throughput on RN50 and ViT-B-16, and the time
of an 8000-query ImageNet CARROT fit it implies.

    python benchmarks/gpu_imagenet_scale.py [--device cuda] [--prompts 40]

Random initialisation (cost does not depend on the weights). For each model and precision,
times the backend scoring ``--prompts`` prompts x 1000 class names (ImageNet-length names),
reports queries per second and estimates the fit: 8000 queries of text encoding plus the
refiner's share (one query per generation, already inside the 8000). Runs on CPU too, slowly.
"""

import argparse
import time

import numpy as np
import torch

from skcarrot.backends import OpenCLIPBackend
from skcarrot.images import to_pil_images

WORDS = ("tench goldfish great white shark tiger shark hammerhead electric ray stingray cock hen ostrich "
         "brambling goldfinch house finch junco indigo bunting robin bulbul jay magpie chickadee").split()


def names(n):
    rng = np.random.RandomState(0)
    return [" ".join(rng.choice(WORDS, size=rng.randint(1, 4))) + f" {i}" for i in range(n)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["RN50", "ViT-B-16"])
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--classes", type=int, default=1000)
    args = parser.parse_args()
    classes = names(args.classes)
    images = to_pil_images(np.random.RandomState(0).randint(0, 256, size=(64, 224, 224, 3)).astype(np.uint8))
    print(f"device {args.device}; {args.prompts} prompts x {args.classes} classes per call")
    print("| model | precision | queries/s | s per generation (40+1) | 8000-query fit (est.) | max rel. diff vs fp32 |")
    print("|---|---|---|---|---|---|")
    for model in args.models:
        ref = None
        for precision in ("fp32", "bf16", "fp16"):
            if precision != "fp32" and args.device == "cpu":
                continue
            box = OpenCLIPBackend(model_name=model, pretrained=None, device=args.device, precision=precision)
            offsets = np.random.RandomState(1).normal(0, 0.02, size=(args.prompts,) + box.context_shape)
            box.logits(images, classes, offsets[:2])  # warm up, image features cached
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = box.logits(images, classes, offsets)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            sec = time.perf_counter() - start
            rate = args.prompts / sec
            diff = 0.0 if ref is None else float(np.abs(out - ref).max() / np.abs(ref).max())
            ref = out if ref is None else ref
            per_gen = 41 / rate
            print(f"| {model} | {precision} | {rate:.1f} | {per_gen:.2f} | {8000 / rate / 60:.1f} min | {diff:.1e} |",
                  flush=True)


if __name__ == "__main__":
    main()
