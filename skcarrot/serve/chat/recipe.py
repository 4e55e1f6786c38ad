"""How the micro chat model's shipped weights were trained.

    python -m skcarrot.serve.chat.recipe [--steps 3000] [--seed 0] [--out PATH]

Images: OpenCV's handwritten digits (the first 90 of the sheet's 100 columns) and
Fashion-MNIST's training split, augmented as the micro CLIP's recipe does. Text:
instruction-style multiple-choice chats. Each sample shows one image, an instruction drawn
from :data:`INSTRUCTIONS`, and 2 to 20 options (the right class among distractors, in a
random order, each a letter and a description of a class); the answer is the right
option's letter, or for a fifth of the samples, under a "name it" instruction, the class
description itself (several tokens: ``ankle boot``). The loss is the cross-entropy of the
answer's tokens only. The image tower is the embedded micro CLIP's, frozen; the decoder's
token embeddings start from the CLIP text tower's.

Held out: scikit-learn's digits, another source; :func:`evaluate` scores the zero-shot
multiple-choice accuracy the model card reports.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...datasets import DIGIT_WORDS, FASHION_CLASSES, load_digit_images, load_fashion_mnist, load_opencv_digits
from .model import CHAT_MODEL, _visual, build, chat_text

__all__ = ["INSTRUCTIONS", "DEFAULT_INSTRUCTION", "train", "evaluate", "options_text", "letters"]

#: Instructions the model was trained with (the first is the chat door's default).
INSTRUCTIONS = (
    "which option describes the image? answer with the letter.",
    "what is shown in the picture? reply with one letter.",
    "choose the label of this image.",
    "look at the image and pick the right option.",
    "classify the image. answer with a letter.",
    "which of these is it?",
    "select the category of the object in the photo.",
    "what does this image show? give the letter of the answer.",
)
DEFAULT_INSTRUCTION = INSTRUCTIONS[0]
NAME_INSTRUCTIONS = ("what is in the image? answer with its name.", "name the object in the picture.")


def letters(n: int) -> list[str]:
    """The first ``n`` option letters, ``A``, ``B``, ..."""
    return [chr(ord("A") + i) for i in range(n)]


def options_text(descriptions) -> str:
    """``"A. three B. seven ..."``: the options as the user message lists them."""
    return " ".join(f"{letter}. {d}" for letter, d in zip(letters(len(descriptions)), descriptions))


def _descriptions(rng: np.random.RandomState, c: int) -> str:
    if c < 10:
        return [str(c), DIGIT_WORDS[c], f"the digit {c}", f"the number {DIGIT_WORDS[c]}"][rng.randint(4)]
    name = FASHION_CLASSES[c - 10]
    return [name, name, f"a {name}"][rng.randint(3)]


def _sample(rng, n_classes_pool, tokenizer):
    """One chat: (class, user text, answer token ids)."""
    domain = rng.rand()
    if domain < 0.45:
        pool = np.arange(10)
    elif domain < 0.8:
        pool = np.arange(10, 20)
    else:
        pool = np.arange(20)
    c = int(rng.choice(pool))
    k = int(rng.randint(2, len(pool) + 1))
    others = rng.choice([p for p in pool if p != c], k - 1, replace=False)
    classes = list(others) + [c]
    rng.shuffle(classes)
    descriptions = [_descriptions(rng, int(x)) for x in classes]
    right = classes.index(c)
    if rng.rand() < 0.2:
        instruction = NAME_INSTRUCTIONS[rng.randint(len(NAME_INSTRUCTIONS))]
        answer = descriptions[right]
    else:
        instruction = INSTRUCTIONS[rng.randint(len(INSTRUCTIONS))]
        answer = letters(k)[right]
    text = chat_text([("user", f"{instruction} {options_text(descriptions)}")])
    return c, tokenizer.encode(text), tokenizer.encode(answer)


def _pixels(images: np.ndarray) -> torch.Tensor:
    from ...tools.pretrain import _resize_all

    return _resize_all(images)


def train(out: str | Path, *, steps: int = 3000, batch_size: int = 64, seed: int = 0, lr: float = 2e-3,
          verbose: bool = True) -> dict:
    """Train and write the weights (fp16 safetensors) to ``out``; returns what was measured."""
    from safetensors.torch import save_file

    from ...tools.pretrain import _augment, _to_model_input, opencv_digits_split

    torch.manual_seed(seed)
    rng = np.random.RandomState(seed)
    gen = torch.Generator().manual_seed(seed)
    Xd, yd = load_opencv_digits()
    Xd, yd, _, _ = opencv_digits_split(Xd, yd)
    Xf, yf = load_fashion_mnist("train")
    keep = rng.choice(len(yf), 20000, replace=False)
    images = {0: _pixels(Xd), 1: _pixels(Xf[keep])}
    labels = {0: yd, 1: yf[keep] + 10}
    by_class = {c: (0, np.flatnonzero(yd == c)) if c < 10 else (1, np.flatnonzero(labels[1] == c))
                for c in range(20)}
    model = build()
    tokenizer = _visual()[1]
    for p in model.visual.parameters():
        p.requires_grad_(False)
    model.visual.eval()
    params = [p for n, p in model.named_parameters() if not n.startswith("visual.")]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warm = max(steps // 20, 1)

    def lr_at(step):
        return lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(step / steps, 1.0)))

    start, log = time.time(), []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        chats = [_sample(rng, 20, tokenizer) for _ in range(batch_size)]
        pix = []
        for c, _, _ in chats:
            source, idx = by_class[c]
            pix.append(images[source][idx[rng.randint(len(idx))]])
        x = _to_model_input(_augment(torch.stack(pix), gen))
        seqs = [t + a for _, t, a in chats]
        width = max(len(s) for s in seqs)
        tokens = torch.zeros(batch_size, width, dtype=torch.long)
        for i, s in enumerate(seqs):
            tokens[i, : len(s)] = torch.tensor(s)
        lengths = torch.tensor([len(s) for s in seqs])
        with torch.no_grad():
            features = model.visual(x)
        prefix = model.prefix(F.normalize(features.float(), dim=-1) * math.sqrt(features.shape[-1]))
        prefix = prefix.view(batch_size, model.n_prefix, model.width)
        hidden = model.hidden(prefix, tokens, lengths)
        rows, cols, targets = [], [], []
        for i, (_, t, a) in enumerate(chats):
            for j, token in enumerate(a):
                rows.append(i)
                cols.append(model.n_prefix + len(t) + j - 1)
                targets.append(token)
        logits = model.logits_at(hidden[torch.tensor(rows), torch.tensor(cols)])
        loss = F.cross_entropy(logits, torch.tensor(targets))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if verbose and (step % 100 == 0 or step == steps - 1):
            print(f"step {step:5d} loss {loss.item():.3f} ({time.time() - start:.0f}s)", flush=True)
        log.append(float(loss.item()))
    model.eval()
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    out = Path(out)
    tmp = out.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"model": CHAT_MODEL, "steps": str(steps), "seed": str(seed)})
    tmp.replace(out)
    return {"final_loss": float(np.mean(log[-50:])), "seconds": time.time() - start}


def evaluate(weights: str | None = None, instructions=(DEFAULT_INSTRUCTION,), n: int = 500, seed: int = 0) -> dict:
    """Zero-shot multiple-choice accuracy on held-out sklearn digits (10 options, class order), per instruction."""
    from .engine import ChatEngine

    engine = ChatEngine.load(weights)
    X, y = load_digit_images()
    keep = np.random.RandomState(seed).choice(len(y), n, replace=False)
    from ...images import to_pil_images

    images = to_pil_images(X[keep])
    descriptions = [str(d) for d in range(10)]
    answers = [letter.lower() for letter in letters(10)]
    ids = [engine.tokenizer.encode(a)[0] for a in answers]
    out = {}
    for instruction in instructions:
        text = f"{instruction} {options_text(descriptions)}"
        scores = engine.next_token_log_probs([[("user", [text, img])] for img in images])[:, ids]
        out[instruction] = float((scores.argmax(1) == y[keep]).mean())
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "weights" / f"{CHAT_MODEL}.safetensors"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    print(train(args.out, steps=args.steps, seed=args.seed))
    print(evaluate(args.out, instructions=INSTRUCTIONS[:4] + ("tell me about it.",)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
