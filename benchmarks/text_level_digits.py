"""Text-level vs embedding-level tuning on digits with the embedded model, 16 shots, three seeds.

    python benchmarks/text_level_digits.py [--seeds 0 1 2] [--plot docs/_static/text_level.png]

The text door is the embedded model behind the public zero-shot-image-classification
contract, in process: probabilities over the candidate labels, at most 256 labels a call,
one image and one prompt set per HTTP call (``calls`` below counts what such an endpoint
would receive). The embedding door is the paper's: prompt offsets in, logits out.
Held-out: every digit outside the 16-shot split.
"""

import argparse
import time

import numpy as np

from skcarrot import CarrotClassifier
from skcarrot.backends import OpenCLIPTextBackend
from skcarrot.backends._base import log_probabilities
from skcarrot.datasets import few_shot_split, load_digit_images


class HostedLikeDoor(OpenCLIPTextBackend):
    """The embedded model as hosted endpoints serve it: probabilities, a cap on labels per call."""

    returns = "probabilities"

    def __init__(self, backend=None, max_labels=256):
        super().__init__(backend=backend)
        self.max_labels = max_labels
        self.calls = 0

    def text_scores(self, images, prompts):
        self.calls += len(images) * len(prompts)  # one image and one prompt set per HTTP call
        return np.exp(log_probabilities(super().text_scores(images, prompts), "logits"))


ROWS = {
    "zero-shot": ("text", dict(prompt_tuning=False, refinement=False)),
    "text prompt search only": ("text", dict(prompt_tuning=True, refinement=False)),
    "refine-only on probabilities": ("text", dict(prompt_tuning=False)),
    "CARROT": ("text", dict(prompt_tuning=True)),
    "default (`prompt_tuning=\"auto\"`)": ("text", dict()),
    "CARROT (embedding door)": ("embedding", dict(prompt_tuning=True)),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--plot", default=None, help="write a bar chart of the table here (PNG)")
    args = parser.parse_args()
    X, y = load_digit_images()
    results = {name: [] for name in ROWS}
    for seed in args.seeds:
        Xtr, ytr, Xte, yte = few_shot_split(X, y, 16, seed=seed)
        for name, (door, params) in ROWS.items():
            backend = HostedLikeDoor() if door == "text" else None
            start = time.perf_counter()
            clf = CarrotClassifier(backend=backend, random_state=seed, **params).fit(Xtr, ytr)
            seconds = time.perf_counter() - start
            calls = backend.calls if backend is not None else None
            acc = 100 * clf.score(Xte, yte)
            results[name].append((acc, clf.n_queries_, clf.n_images_scored_, calls, seconds))
            print(f"seed {seed} {name:<30} {acc:.2f}  {clf.n_queries_:5d} queries {clf.n_images_scored_:7d} images "
                  f"{calls if calls is not None else '-':>7} calls {seconds:.1f}s", flush=True)
            if name == "CARROT" and seed == args.seeds[0]:
                print("  learned prompts:", clf.prompt_, flush=True)
    print(f"\n| method | door | held-out accuracy (mean ± std, {len(args.seeds)} seeds) | queries | images scored "
          "| HTTP calls at one image per call |")
    print("|---|---|---|---|---|---|")
    for name, (door, _) in ROWS.items():
        r = np.array([row[:3] for row in results[name]], dtype=float)
        calls = [row[3] for row in results[name]]
        calls = "—" if calls[0] is None else f"{np.mean(calls):,.0f}"
        print(f"| {name} | {door} | {r[:, 0].mean():.1f} ± {r[:, 0].std():.1f} | {r[:, 1].mean():.0f} | "
              f"{r[:, 2].mean():,.0f} | {calls} |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(ROWS)
        means = [np.mean([row[0] for row in results[n]]) for n in names]
        stds = [np.std([row[0] for row in results[n]]) for n in names]
        fig, ax = plt.subplots(figsize=(8, 3.4))
        ax.barh(names[::-1], means[::-1], xerr=stds[::-1], color=["#4c72b0"] + ["#dd8452"] * (len(names) - 1))
        ax.set_xlim(60, 95)
        ax.set_xlabel("held-out accuracy (%), sklearn digits, 16 shots, mean ± std")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"chart written to {args.plot}")


if __name__ == "__main__":
    main()
