"""Option-position bias at the chat door, and what batch calibration does about it.

    python benchmarks/chat_position_bias.py [--n 600] [--seed 0]

The embedded micro chat model, served by ``skcarrot serve``'s app on 127.0.0.1 and asked through
:class:`skcarrot.backends.ChatVLMBackend` (the ``openai`` client), scores held-out sklearn digits
zero-shot under the default instruction, twice: options in class order (A = 0, ..., J = 9) and
rotated by five (A = 5, ..., J = 4), so a letter's pull and a class's are told apart. It prints,
per option letter, the mean probability the model gives it and how often it wins, against how
often it is right; the accuracy of each order; and the accuracy after batch calibration (the
mean log-probability of each option over the batch subtracted, Zhou et al., ICLR 2024): it costs
no call, only a batch of images scored together.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from servekit import thread_server

    from skcarrot.backends import ChatVLMBackend
    from skcarrot.backends.remote.chat import DEFAULT_INSTRUCTION, batch_calibrate
    from skcarrot.datasets import load_digit_images
    from skcarrot.images import to_pil_images
    from skcarrot.serve import Settings, create_app

    X, y = load_digit_images()
    keep = np.random.RandomState(args.seed).choice(len(y), args.n, replace=False)
    images, y = to_pil_images(X[keep]), y[keep]
    app = create_app(Settings(db_url=f"sqlite:///{tempfile.mkdtemp()}/ledger.db"))
    _, key = app.state.server.ledger.create_key("bias", budget=10**6)
    os.environ["SKCARROT_BIAS_KEY"] = key
    rows = {}
    with thread_server(app) as base:
        backend = ChatVLMBackend(base_url=f"{base}/v1", api_key_env="SKCARROT_BIAS_KEY", cache=None)
        for shift in (0, 5):
            order = [(c + shift) % 10 for c in range(10)]  # option k describes class order[k]
            by_option = backend.option_log_probs(images, DEFAULT_INSTRUCTION, [str(c) for c in order])
            rows[shift] = (order, by_option)
    print(f"{args.n} held-out sklearn digits, zero-shot, {backend.n_calls_} calls\n")
    print("| options | letter | mean probability | wins | right answer |")
    print("|---|---|---|---|---|")
    for shift, (order, lp) in rows.items():
        gold = np.array([order.index(c) for c in y])
        wins = np.bincount(lp.argmax(1), minlength=10) / len(y)
        right = np.bincount(gold, minlength=10) / len(y)
        for k, letter in enumerate("ABCDEFGHIJ"):
            print(f"| A = {order[0]} | {letter} ({order[k]}) | {np.exp(lp[:, k]).mean():.3f} | {wins[k]:.3f} | "
                  f"{right[k]:.3f} |")
    print("\n| options | accuracy | after batch calibration | largest share of wins (letter) |")
    print("|---|---|---|---|")
    for shift, (order, lp) in rows.items():
        gold = np.array([order.index(c) for c in y])
        calibrated = batch_calibrate(lp)
        wins = np.bincount(lp.argmax(1), minlength=10) / len(y)
        print(f"| A = {order[0]} | {100 * (lp.argmax(1) == gold).mean():.1f}% | "
              f"{100 * (calibrated.argmax(1) == gold).mean():.1f}% | {wins.max():.3f} ({'ABCDEFGHIJ'[wins.argmax()]}) |")


if __name__ == "__main__":
    main()
