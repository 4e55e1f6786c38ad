"""Throughput of the black box: skcarrot's OpenCLIPBackend against a reference-style loop.

    python benchmarks/query_throughput.py [--model RN50] [--classes 10 100] [--prompts 40] [--device cpu]

The reference scores one prompt at a time at the full 77-token context, as the official
CARROT code does; the backend scores all prompts in batches, cuts sequences to their real
length and encodes the shared start/context tokens once per prompt. Same model (random
initialisation: cost does not depend on the weights), same images, image features cached
in both. Prints queries per second, the ratio, the largest logit difference, and the share
of this machine's measured float32 matmul peak that the backend reaches.
"""

import argparse
import time

import numpy as np
import torch

from skcarrot.backends import OpenCLIPBackend
from skcarrot.images import to_pil_images

CIFAR100 = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
    "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
    "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger "
    "tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()


def matmul_peak(device, seconds=2.0, n=2048):
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def reference_logits(box, images_feats, names, offset):
    """One prompt, full context: the reference loop body."""
    model = box.tower
    tokens = box.tokenizer([box.template.format(n) for n in names]).to(box.device)
    with torch.inference_mode():
        x = model.token_embedding(tokens)
        x[:, 1 : 1 + box.n_ctx] += torch.as_tensor(offset, device=box.device)
        x = x + model.positional_embedding
        x = model.transformer(x, attn_mask=model.attn_mask)
        x = model.ln_final(x)
        x = x[torch.arange(len(names)), tokens.argmax(-1)] @ model.text_projection
        t = torch.nn.functional.normalize(x, dim=-1)
        return (box.model.logit_scale.exp() * images_feats @ t.T).cpu().numpy()


def backend_flops(box, names, n_prompts):
    tokens = box.tokens_for(names)
    length = int(tokens.argmax(-1).max()) + 1
    lp = 1 + box.n_ctx
    d = box.dim
    layers = len(box.tower.transformer.resblocks)
    per_token = layers * (24 * d * d)
    return per_token * (n_prompts * lp + n_prompts * len(names) * (length - lp))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="RN50")
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--reference-prompts", type=int, default=3, help="prompts timed in the reference loop")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    backend = OpenCLIPBackend(model_name=args.model, pretrained=None, device=args.device)
    box = backend._box()
    device = box.device
    rng = np.random.RandomState(0)
    images = to_pil_images(rng.randint(0, 256, size=(32, 64, 64, 3)).astype(np.uint8))
    feats = box.encode_images(images)
    peak = matmul_peak(device)
    print(f"model {args.model} ({box.dim}-wide text tower, {len(box.tower.transformer.resblocks)} layers) on "
          f"{device}, {torch.get_num_threads()} threads; measured matmul peak {peak / 1e9:.0f} GFLOP/s")
    print("| classes | reference queries/s | backend queries/s | ratio | max rel. diff | backend share of peak |")
    print("|---|---|---|---|---|---|")
    for n_classes in args.classes:
        names = [n.replace("_", " ") for n in (CIFAR100 * 10)[:n_classes]]
        offsets = rng.normal(0, 0.02, size=(args.prompts,) + backend.context_shape).astype(np.float32)
        backend.logits(images, names, offsets[:2])  # warm up
        reference_logits(box, feats, names, offsets[0])
        start = time.perf_counter()
        ref = [reference_logits(box, feats, names, o) for o in offsets[: args.reference_prompts]]
        ref_rate = args.reference_prompts / (time.perf_counter() - start)
        start = time.perf_counter()
        got = backend.logits(images, names, offsets)
        seconds = time.perf_counter() - start
        rate = args.prompts / seconds
        diff = max(np.abs(got[i] - r).max() / np.abs(r).max() for i, r in enumerate(ref))
        share = backend_flops(box, names, args.prompts) / seconds / peak
        print(f"| {n_classes} | {ref_rate:.2f} | {rate:.2f} | {rate / ref_rate:.1f}x | {diff:.1e} | {100 * share:.0f}% |",
              flush=True)


if __name__ == "__main__":
    main()
