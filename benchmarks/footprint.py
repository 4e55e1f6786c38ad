"""Deployment footprint: what a user keeps (the fitted estimator) against the white-box model.

    python benchmarks/footprint.py [--models skcarrot-micro-clip RN50]

For each model: bytes of the saved CARROT estimator (joblib) against the bytes of the
model's weights (fp32), and the peak memory of ``predict_proba`` on 500 digits on the
client side (the estimator turning returned logits into probabilities) against the
white-box alternative (loading the model and computing the same predictions), each in a
fresh process, measured as peak resident memory above the same process right after its
imports (Linux: the peak mark is reset through /proc/self/clear_refs). RN50 is a random initialisation: sizes do not depend on the weights.
"""

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, numpy as np, joblib, torch
from skcarrot.datasets import load_digit_images
from skcarrot.images import to_pil_images
mode, model, pretrained, est_path, logits_path = sys.argv[1:6]
X, _ = load_digit_images()
X = X[:500]
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
# The peak-memory mark survives fork and exec: reset it (Linux) and measure from here.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS:")
if mode == "client":
    clf = joblib.load(est_path)
    logits = np.load(logits_path)
    class Remote:  # the service answers with logits; nothing of the model is here
        context_shape = tuple(clf.prompt_offset_.shape)
        def logits(self, images, class_names, offsets):
            return logits[None]
    clf.backend = Remote()
    proba = clf.predict_proba(X)
else:
    from skcarrot.backends import OpenCLIPBackend
    box = OpenCLIPBackend(model_name=model, pretrained=None if pretrained == "none" else pretrained, device="cpu")
    out = box.logits(to_pil_images(X), [str(i) for i in range(10)], np.zeros((1,) + box.context_shape))
print(json.dumps({"peak_above_imports": status("VmHWM:") - base}))
"""


def run_child(*args):
    out = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_above_imports"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["skcarrot-micro-clip", "RN50"])
    parser.add_argument("--budget", type=int, default=410, help="query budget of the fit (RN50 on CPU is slow)")
    args = parser.parse_args()

    import joblib
    import numpy as np

    from skcarrot import CarrotClassifier
    from skcarrot.backends import OpenCLIPBackend
    from skcarrot.backends.embedded import EMBEDDED_MODEL, EMBEDDED_WEIGHTS
    from skcarrot.datasets import few_shot_split, load_digit_images
    from skcarrot.images import to_pil_images

    X, y = load_digit_images()
    Xtr, ytr, _, _ = few_shot_split(X, y, 16, seed=0)
    print("| model | saved estimator | model weights (fp32) | bytes ratio | client predict peak | "
          "white-box predict peak | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            pretrained = EMBEDDED_WEIGHTS if name == EMBEDDED_MODEL else None
            backend = OpenCLIPBackend(model_name=name, pretrained=pretrained, device="cpu")
            clf = CarrotClassifier(backend=backend, query_budget=args.budget, random_state=0).fit(Xtr, ytr)
            buf = io.BytesIO()
            joblib.dump(clf, buf)
            saved = buf.tell()
            est_path = Path(tmp) / f"{name}.joblib"
            est_path.write_bytes(buf.getvalue())
            logits_path = Path(tmp) / f"{name}.npy"
            np.save(logits_path, backend.logits(to_pil_images(X[:500]), clf.class_names_, clf.prompt_offset_[None])[0])
            weights = sum(p.numel() * 4 for p in backend._box().model.parameters())
            client = run_child("client", name, str(pretrained or "none"), str(est_path), str(logits_path))
            white = run_child("white", name, str(pretrained or "none"), str(est_path), str(logits_path))
            print(f"| {name} | {saved / 1024:.1f} KiB | {weights / 2**20:.1f} MiB | 1/{weights / saved:,.0f} | "
                  f"{client / 2**20:.1f} MiB | {white / 2**20:.1f} MiB | 1/{white / max(client, 1):,.0f} |", flush=True)


if __name__ == "__main__":
    main()
