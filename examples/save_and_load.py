"""
Save, load and predict in a fresh process
=========================================

A fitted estimator holds the prompt offset and the refiner, not the model: a few tens of kB.
Loaded in another process it gives the same probabilities, as long as the same black box is
reachable there.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import joblib
import numpy as np

from skcarrot import CarrotClassifier
from skcarrot.datasets import few_shot_split, load_digit_images

X, y = load_digit_images()
X_train, y_train, X_test, y_test = few_shot_split(X, y, n_shots=16, seed=0)
clf = CarrotClassifier(query_budget=820, random_state=0).fit(X_train, y_train)

with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "carrot.joblib"
    joblib.dump(clf, path)
    print(f"saved estimator: {path.stat().st_size / 1024:.1f} KiB")
    np.save(Path(tmp) / "X.npy", X_test[:100])
    code = (
        "import joblib, numpy as np;"
        f"clf = joblib.load({str(path)!r});"
        f"np.save({str(Path(tmp) / 'p.npy')!r}, clf.predict_proba(np.load({str(Path(tmp) / 'X.npy')!r})))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    fresh = np.load(Path(tmp) / "p.npy")
print("same probabilities in a fresh process:", np.array_equal(fresh, clf.predict_proba(X_test[:100])))
