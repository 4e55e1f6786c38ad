"""Same bits: predict_proba and query counts of 35 fits, this tree against a git revision.

    python benchmarks/same_bits.py [--base f8e53a8^]

A refactor of the fit must not change what a fit does. The package at ``--base`` is
unpacked into a temporary folder (``git archive``), and each version, in a subprocess that
imports its own copy of ``skcarrot``, fits the same configurations: the toy backend and the
embedded micro CLIP on the embedding door, the embedded model on the text door (words kept
and none kept), each at ``prompt_tuning`` True, False and "auto", with and without the
refiner, early stopping, fresh views, warm starts (changing the budget, the refiner, the
mode) and checkpoints resumed after an interrupted fit. Every fit records a digest of its
``predict_proba`` bits on held-out digits, its queries (in all and by purpose), images and
pairs scored, generations, history digest, selection and prompts. Prints the configurations
that differ and ``N/N identical``; exits 1 when any differs.
"""

import argparse
import hashlib
import os
import pickle
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _digest(array) -> str:
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def _describe(clf, X_test) -> dict:
    """What must not change: the bits of ``predict_proba``, every count, the history and the prompt."""
    import numpy as np

    history = np.array([[np.nan if v is None else float(v) for v in row.values()] for row in clf.history_])
    # fields of the selection a version leaves unset are left out, so one added later still compares
    selection = None if clf.selection_ is None else {k: v for k, v in clf.selection_.items() if v is not None}
    return dict(
        proba=_digest(clf.predict_proba(X_test)), queries=clf.n_queries_, by_purpose=clf.n_queries_by_purpose_,
        images=clf.n_images_scored_, pairs=clf.n_pairs_scored_, n_iter=clf.n_iter_, best=clf.best_generation_,
        history=_digest(history) if len(history) else None, selection=selection,
        validation_loss=clf.validation_loss_, prompt=clf.prompt_,
        offset=None if clf.prompt_offset_ is None else _digest(clf.prompt_offset_),
    )


def record(out_path) -> None:
    """Run every configuration with the ``skcarrot`` on ``sys.path`` and pickle what each fit did."""
    from helpers import digits_split

    from skcarrot import CarrotClassifier
    from skcarrot.backends import OpenCLIPTextBackend, ToyBackend, embedded_backend

    class Interrupted(ToyBackend):
        """The toy model, whose network goes away at the 30th call."""

        calls = 0

        def logits(self, images, class_names, offsets):
            type(self).calls += 1
            if type(self).calls % 30 == 0:
                raise ConnectionError("the network went away")
            return super().logits(images, class_names, offsets)

    warnings.simplefilter("ignore")
    Xtr, ytr, Xte, _ = digits_split(8, seed=0, n_test=100)
    fast = dict(query_budget=200, popsize=8, intrinsic_dim=16, hidden_dim=32, n_views=2, random_state=0)
    out = {}

    def fit(name, backend, params, again=None):
        clf = CarrotClassifier(backend=backend, **params).fit(Xtr, ytr)
        out[name] = _describe(clf, Xte)
        if again is not None:  # a warm start: the second fit continues the first
            out[name] = (out[name], _describe(clf.set_params(**again).fit(Xtr, ytr), Xte))

    toy = ToyBackend()
    for name, params in [
        ("carrot", dict(prompt_tuning=True)), ("carrot-512", dict(prompt_tuning=True, intrinsic_dim=512)),
        ("refine", dict(prompt_tuning=False)), ("auto", dict(prompt_tuning="auto", query_budget=400)),
        ("auto-no-refiner", dict(prompt_tuning="auto", refinement=False, query_budget=400)),
        ("zero-shot", dict(prompt_tuning=False, refinement=False)),
        ("early-stopping", dict(prompt_tuning=True, early_stopping=True, n_iter_no_change=3)),
        ("early-stopping-fresh", dict(prompt_tuning=True, early_stopping=True, fresh_views=True, n_iter_no_change=50)),
        ("refine-fresh", dict(prompt_tuning=False, fresh_views=True)),
        ("refine-early-stopping", dict(prompt_tuning=False, early_stopping=True)),
        ("prompt-only", dict(prompt_tuning=True, refinement=False)),
        ("kl-throughout", dict(prompt_tuning=True, consistency_fraction=1.0, max_iter=5)),
    ]:
        fit(f"toy-{name}", toy, dict(fast, **params))
    for name, params, again in [
        ("carrot", dict(prompt_tuning=True), dict(query_budget=100)),
        ("auto", dict(prompt_tuning="auto", query_budget=400), dict(query_budget=100)),
        ("refine-then-carrot", dict(prompt_tuning=False), dict(prompt_tuning=True)),
        ("carrot-then-no-refiner", dict(prompt_tuning=True), dict(refinement=False)),
        ("early-stopping", dict(prompt_tuning=True, early_stopping=True), dict(query_budget=120)),
    ]:
        fit(f"toy-warm-{name}", toy, dict(fast, warm_start=True, **params), again)
    with tempfile.TemporaryDirectory() as tmp:
        for name, params in [
            ("carrot", dict(prompt_tuning=True)),
            ("early-stopping-fresh", dict(prompt_tuning=True, early_stopping=True, fresh_views=True,
                                          n_iter_no_change=50)),
            ("refine-fresh", dict(prompt_tuning=False, fresh_views=True)),
            ("auto", dict(prompt_tuning="auto", query_budget=400)),
        ]:
            params = dict(fast, checkpoint=os.path.join(tmp, f"{name}.ckpt"), checkpoint_every=2, **params)
            clf = CarrotClassifier(backend=Interrupted(), **params)
            try:
                clf.fit(Xtr, ytr)
            except ConnectionError:
                pass
            out[f"resumed-{name}"] = _describe(clf.set_params(backend=toy).fit(Xtr, ytr), Xte)
    embedded = dict(query_budget=300, popsize=10, intrinsic_dim=32, random_state=1)
    for name, params in [("carrot", dict(prompt_tuning=True)), ("auto", dict(prompt_tuning="auto", query_budget=800)),
                         ("refine", dict(prompt_tuning=False)), ("early-stopping", dict(prompt_tuning=True,
                                                                                       early_stopping=True))]:
        fit(f"embedded-{name}", embedded_backend(), dict(embedded, **params))
    text = dict(query_budget=60, popsize=4, random_state=2, vocabulary=30, hidden_dim=32)
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "digit", "number",
             "shoe", "bag"]
    for name, params in [
        ("carrot", dict(prompt_tuning=True)), ("auto", dict(prompt_tuning="auto", query_budget=120)),
        ("refine", dict(prompt_tuning=False)), ("early-stopping", dict(prompt_tuning=True, early_stopping=True)),
        ("prompt-only", dict(prompt_tuning=True, refinement=False)),
        ("words", dict(prompt_tuning=True, refinement=False, vocabulary=words)),
        ("words-refine", dict(prompt_tuning=True, vocabulary=words)),
        ("words-early-stopping", dict(prompt_tuning=True, refinement=False, vocabulary=words, early_stopping=True)),
    ]:
        fit(f"text-{name}", OpenCLIPTextBackend(), dict(text, **params))
    fit("text-warm-words", OpenCLIPTextBackend(),
        dict(text, prompt_tuning=True, refinement=False, vocabulary=words, warm_start=True),
        dict(query_budget=30, refinement=True))
    fit("text-warm", OpenCLIPTextBackend(), dict(text, prompt_tuning=True, warm_start=True), dict(query_budget=30))
    with open(out_path, "wb") as f:
        pickle.dump(out, f)

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD", help="git revision to compare with (default HEAD)")
    args = parser.parse_args(argv)
    records = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.base], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
        for name, tree in (("base", base), ("new", ROOT)):
            out = Path(tmp) / f"{name}.pkl"
            env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{tree / 'tests'}", HF_HUB_OFFLINE="1")
            code = f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import same_bits; same_bits.record({str(out)!r})"
            subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp)
            with open(out, "rb") as f:
                records[name] = pickle.load(f)
    before, after = records["base"], records["new"]
    differ = [k for k in before if before[k] != after.get(k)]
    for k in differ:
        print(f"DIFFERS {k}\n  {args.base}: {before[k]}\n  this tree: {after.get(k)}")
    print(f"{len(before) - len(differ)}/{len(before)} identical ({args.base} against this tree)")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
