"""The text-level door on sklearn digits: zero-shot against the text prompt search, three seeds, 16 shots.

    python benchmarks/text_level_digits.py [--seeds 0 1 2] [--steps 20] [--popsize 10]

Every method scores full prompt strings through the text-level door of the embedded
model, in process. ``logits``: the door returns logits and screening scores every
tokenizer word in one query. ``probabilities``: the same model behind a door that
returns softmax probabilities, as a hosted endpoint does, with at most 256 strings
per call and a random subset of words screened; one image per call, so its HTTP
calls are its images scored. Held-out: every digit outside the 16-shot split.
"""

import argparse
import time

import numpy as np

from skcarrot.backends import OpenCLIPTextBackend, TextQueryCounter
from skcarrot.backends.text import log_probabilities
from skcarrot.datasets import DIGIT_WORDS, few_shot_split, load_digit_images
from skcarrot.images import to_pil_images
from skcarrot.text_prompt import TextPromptSearch, run_text_prompt_search


class SoftmaxDoor:
    """The in-process door, returning probabilities like a hosted zero-shot endpoint."""

    returns = "probabilities"

    def __init__(self):
        self.inner = OpenCLIPTextBackend()

    def text_scores(self, images, prompts):
        return np.exp(log_probabilities(self.inner.text_scores(images, prompts), "logits"))


def held_out_accuracy(prompts, images, y):
    logits = OpenCLIPTextBackend().text_scores(images, [prompts])[0]
    return float((logits.argmax(1) == y).mean())


SETTINGS = {
    "text prompt search (logits)": dict(door=OpenCLIPTextBackend, n_words=None, strings_per_query=None),
    "text prompt search (probabilities, 256/call, 4000 words)": dict(
        door=SoftmaxDoor, n_words=4000, strings_per_query=256
    ),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--popsize", type=int, default=10)
    parser.add_argument("--candidates", type=int, default=8)
    args = parser.parse_args()
    X, y = load_digit_images()
    names = list(DIGIT_WORDS)
    rows = []
    for seed in args.seeds:
        Xtr, ytr, Xte, yte = few_shot_split(X, y, 16, seed=seed)
        train, test = to_pil_images(Xtr), to_pil_images(Xte)
        zero_shot = TextPromptSearch(names).class_prompts()
        rows.append((seed, "zero-shot", held_out_accuracy(zero_shot, test, yte), 0, 0, 0.0, zero_shot))
        print(f"seed {seed} {'zero-shot':<58} {rows[-1][2]:.3f}", flush=True)
        for name, setting in SETTINGS.items():
            start = time.perf_counter()
            counter = TextQueryCounter(setting["door"]())
            search = TextPromptSearch(
                names,
                n_words=setting["n_words"],
                strings_per_query=setting["strings_per_query"],
                n_candidates=args.candidates,
                popsize=args.popsize,
                random_state=np.random.RandomState(seed),
            )
            run_text_prompt_search(counter, train, ytr, search, n_steps=args.steps)
            learned = search.current()
            acc = held_out_accuracy(learned, test, yte)
            rows.append((seed, name, acc, counter.n_queries, counter.n_pairs_scored,
                         time.perf_counter() - start, learned))
            print(f"seed {seed} {name:<58} {acc:.3f} {counter.n_queries:5d} queries "
                  f"{counter.n_pairs_scored:6d} images scored {rows[-1][5]:.1f}s", flush=True)
            print(f"    {learned}", flush=True)
    print(f"\n| method | door | held-out accuracy (mean over {len(args.seeds)} seeds) | per seed | queries "
          "| images scored (= HTTP calls at one image per call) |")
    print("|---|---|---|---|---|---|")
    for name in ["zero-shot", *SETTINGS]:
        mine = [r for r in rows if r[1] == name]
        accs = [r[2] for r in mine]
        print(f"| {name} | text | {100 * np.mean(accs):.1f} | {', '.join(f'{100 * a:.1f}' for a in accs)} "
              f"| {int(np.mean([r[3] for r in mine]))} | {int(np.mean([r[4] for r in mine]))} |")


if __name__ == "__main__":
    main()
