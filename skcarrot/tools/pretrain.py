"""Pretraining recipe of the embedded micro CLIP (``skcarrot-micro-clip``).

A small open_clip model trained contrastively, from scratch, on real images with
templated captions: OpenCV's 5000 handwritten digits (4500 to train, the last
ten columns of the sheet held out) and Fashion-MNIST's 60000 training images.
Data (Debian/Ubuntu)::

    apt-get install opencv-doc dataset-fashion-mnist

Regenerate the shipped weights (about 15 minutes on 2 CPU cores)::

    python -m skcarrot.tools.pretrain --out skcarrot/weights/skcarrot-micro-clip.safetensors

The loss is CLIP's symmetric InfoNCE with every same-class pair counted as a
positive (captions are templated, so a batch holds many captions of one class).
Images are augmented with random crops, small rotations, contrast changes and,
half of the time, a round trip through a lower resolution (6 to 16 pixels), so
that the model also reads small images.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..backends.models import DEFAULT_TEMPLATE, EMBEDDED_MODEL
from ..datasets import (
    DIGIT_WORDS,
    FASHION_CLASSES,
    load_fashion_mnist,
    load_opencv_digits,
)

__all__ = ["MODEL_NAME", "DIGIT_TEMPLATES", "FASHION_TEMPLATES", "pretrain", "opencv_digits_split"]

#: The open_clip config the recipe trains: the embedded model, named once in backends.models.
MODEL_NAME = EMBEDDED_MODEL

DIGIT_TEMPLATES = (
    DEFAULT_TEMPLATE,  # the zero-shot prompt the model is trained to read
    "a photo of the number {}.",
    "a photo of the digit {}.",
    "the digit {}.",
    "the number {}",
    "handwritten {}",
    "a handwritten {}.",
    "a drawing of a {}.",
    "a blurry photo of a {}.",
    "a low resolution photo of a {}.",
    "a picture of the digit {}.",
    "{}",
)

FASHION_TEMPLATES = (
    DEFAULT_TEMPLATE,
    "a photo of the {}.",
    "a picture of a {}.",
    "a grayscale photo of a {}.",
    "a blurry photo of a {}.",
    "a low resolution photo of a {}.",
    "a product photo of a {}.",
    "a {}",
    "{}",
)

IMAGE_SIZE = 32
# open_clip's default preprocessing, which the backend applies at inference
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def opencv_digits_split(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """Train on the first 90 columns of OpenCV's digit sheet, hold out the last 10."""
    held = (np.arange(len(y)) % 100) >= 90
    return X[~held], y[~held], X[held], y[held]


def _resize_all(images: np.ndarray) -> torch.Tensor:
    """uint8 images -> float tensor (N, 1, 32, 32) in [0, 1], resized as the backend does (bicubic)."""
    out = np.stack(
        [np.asarray(Image.fromarray(im).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)) for im in images]
    )
    return torch.from_numpy(out).float().div_(255.0).unsqueeze(1)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    # random affine: scale 0.8-1.1, rotation +-12 degrees, shift +-10%
    scale = torch.empty(n).uniform_(0.8, 1.1, generator=gen)
    angle = torch.empty(n).uniform_(-0.21, 0.21, generator=gen)
    shift = torch.empty(n, 2).uniform_(-0.1, 0.1, generator=gen)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # half of the images: a round trip through a low resolution
    low = torch.rand(n, generator=gen) < 0.5
    if low.any():
        idx = low.nonzero().squeeze(1)
        sizes = torch.randint(6, 17, (len(idx),), generator=gen)
        for s in sizes.unique().tolist():
            sel = idx[sizes == s]
            small = F.adaptive_avg_pool2d(x[sel], s)
            x[sel] = F.interpolate(small, size=IMAGE_SIZE, mode="bicubic", align_corners=False)
    # contrast / brightness
    gain = torch.empty(n, 1, 1, 1).uniform_(0.7, 1.3, generator=gen)
    x = (x * gain).clamp_(0.0, 1.0)
    return x


def _caption_bank(tokenizer) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """All captions, their class (0-9 digits, 10-19 fashion) and the token ids."""
    texts, classes = [], []
    for d in range(10):
        for t in DIGIT_TEMPLATES:
            for name in (str(d), DIGIT_WORDS[d]):
                texts.append(t.format(name))
                classes.append(d)
    for c, name in enumerate(FASHION_CLASSES):
        for t in FASHION_TEMPLATES:
            texts.append(t.format(name))
            classes.append(10 + c)
    return tokenizer(texts), np.array(classes), texts


def _to_model_input(x: torch.Tensor) -> torch.Tensor:
    return (x.expand(-1, 3, -1, -1) - MEAN) / STD


def pretrain(
    out: str | Path,
    *,
    steps: int = 2400,
    batch_size: int = 256,
    lr: float = 2e-3,
    seed: int = 0,
    log_every: int = 100,
    data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> dict:
    """Train the micro CLIP and save fp16 safetensors weights to ``out``; returns a summary.

    Parameters
    ----------
    out : path-like
        Where the safetensors file goes (written atomically).
    steps, batch_size, lr, seed : int, int, float, int
        The recipe; the defaults made the shipped weights.
    log_every : int
        Print a progress line every so many steps (0: never).
    data : tuple of 4 arrays or None
        ``(digit_images, digit_labels, fashion_images, fashion_labels)`` (uint8 images, labels
        0-9). None loads the Debian data named in the module docstring, holding out the
        last ten columns of the OpenCV sheet.

    Returns
    -------
    summary : dict
        ``seconds``, ``parameters`` and ``bytes`` of the saved file.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from skcarrot.tools.pretrain import pretrain
    >>> rng = np.random.RandomState(0)
    >>> tiny = (rng.randint(0, 256, (8, 20, 20), dtype=np.uint8), np.arange(8) % 10,
    ...         rng.randint(0, 256, (8, 28, 28), dtype=np.uint8), np.arange(8) % 10)
    >>> out = os.path.join(tempfile.mkdtemp(), "micro.safetensors")
    >>> summary = pretrain(out, steps=1, batch_size=8, log_every=0, data=tiny)
    >>> summary["parameters"], os.path.getsize(out) == summary["bytes"]
    (3429953, True)
    """
    import open_clip
    from safetensors.torch import save_file

    from ..backends import register_model_configs

    register_model_configs()
    torch.manual_seed(seed)
    rng = np.random.RandomState(seed)
    gen = torch.Generator().manual_seed(seed)

    if data is None:
        Xd, yd = load_opencv_digits()
        Xd_tr, yd_tr, _, _ = opencv_digits_split(Xd, yd)
        Xf, yf = load_fashion_mnist("train")
    else:
        Xd_tr, yd_tr, Xf, yf = (np.asarray(a) for a in data)
    digits = _resize_all(Xd_tr)
    fashion = _resize_all(Xf)
    fashion_y = yf + 10

    model = open_clip.create_model(MODEL_NAME, pretrained=None)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    bank_tokens, bank_classes, _ = _caption_bank(tokenizer)
    by_class = [np.flatnonzero(bank_classes == c) for c in range(20)]
    n_params = sum(p.numel() for p in model.parameters())

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    model.train()
    start = time.perf_counter()
    half = batch_size // 2
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        di = rng.randint(0, len(digits), half)
        fi = rng.randint(0, len(fashion), batch_size - half)
        x = torch.cat([digits[di], fashion[fi]])
        cls = np.concatenate([yd_tr[di], fashion_y[fi]])
        x = _augment(x, gen)
        cap = np.array([by_class[c][rng.randint(len(by_class[c]))] for c in cls])
        uniq, inv = np.unique(cap, return_inverse=True)
        img_f = model.encode_image(_to_model_input(x), normalize=True)
        txt_f = model.encode_text(bank_tokens[uniq], normalize=True)
        scale = model.logit_scale.exp().clamp(max=100.0)
        logits = scale * img_f @ txt_f.T  # (B, U)
        same = torch.from_numpy(cls[:, None] == bank_classes[uniq][None, :]).float()
        loss_i = -(same / same.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
        # text -> image: each unique caption against the batch's images
        loss_t = -(same.T / same.T.sum(1, keepdim=True) * F.log_softmax(logits.T, 1)).sum(1).mean()
        loss = 0.5 * (loss_i + loss_t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}/{steps}  loss {loss.item():.4f}  scale {scale.item():.1f}  "
                  f"{time.perf_counter() - start:.0f}s", flush=True)
    seconds = time.perf_counter() - start
    model.eval()
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"model": MODEL_NAME, "steps": str(steps), "seed": str(seed)})
    tmp.chmod(0o644)
    tmp.replace(out)
    return {"seconds": seconds, "parameters": n_params, "bytes": out.stat().st_size}


def main(argv: list[str] | None = None) -> int:
    """``python -m skcarrot.tools.pretrain``: train and save the embedded model."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parent / "weights" / f"{MODEL_NAME}.safetensors"))
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = pretrain(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    print(f"saved {args.out}: {summary['parameters']:,} parameters, {summary['bytes'] / 1e6:.1f} MB, "
          f"{summary['seconds']:.0f} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
