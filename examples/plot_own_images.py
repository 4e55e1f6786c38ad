"""
Your own images: a folder of files named by class
=================================================

The usual way to bring your own data: one folder per class, holding image files. Here the
folder is written from scikit-learn's handwritten digits (the embedded default model knows
digits and clothing only); with a real model (``backend=OpenCLIPBackend(...)``, or a hosted
one, see :class:`skcarrot.ZeroShotHTTPBackend`) the same code tunes any classes, e.g.
``photos/cat/*.jpg`` and ``photos/dog/*.jpg``.

``fit`` takes file paths and string labels as they are. The class names in the prompts are
the labels unless ``class_names`` says otherwise; a folder name cannot always be the words
you want the model to read (``ankle_boot`` for "ankle boot"), so the mapping is shown.

Every fit spends *queries*, counted and capped by ``query_budget``: one query is one prompt
scored on a batch of images. ``n_images_scored_`` counts the images sent in all, the cost in
image forward passes.
"""

import tempfile
from pathlib import Path

from PIL import Image
from sklearn.model_selection import train_test_split

from skcarrot import CarrotClassifier
from skcarrot.datasets import DIGIT_WORDS, load_digit_images

# %%
# A folder of images, one subfolder per class
# -------------------------------------------
# ``photos/seven/0012.png`` and so on: 30 images of each digit.
X, y = load_digit_images()
root = Path(tempfile.mkdtemp()) / "photos"
for digit in range(10):
    folder = root / DIGIT_WORDS[digit]
    folder.mkdir(parents=True)
    for i, image in enumerate(X[y == digit][:30]):
        Image.fromarray(image).resize((32, 32), Image.BICUBIC).save(folder / f"{i:04d}.png")

# %%
# Paths and labels, from the folder names
# ---------------------------------------
paths = sorted(str(p) for p in root.glob("*/*.png"))
labels = [Path(p).parent.name for p in paths]
paths_train, paths_test, labels_train, labels_test = train_test_split(
    paths, labels, train_size=0.5, stratify=labels, random_state=0
)
classes = sorted(set(labels))
print(f"{len(paths)} images of {len(classes)} classes: {classes}")

# %%
# Tune and score
# --------------
# The prompt of each class carries its name: underscores become spaces.
class_names = {label: label.replace("_", " ") for label in classes}
clf = CarrotClassifier(class_names=class_names, query_budget=600, random_state=0)
clf.fit(paths_train, labels_train)

print(f"held-out accuracy: {clf.score(paths_test, labels_test):.3f}")
print(f"predicted: {[str(p) for p in clf.predict(paths_test[:5])]}, true: {labels_test[:5]}")

# %%
# What the fit cost
# -----------------
# On a paid endpoint this is what is billed: queries (prompts scored) and the images each
# query sent.
print(f"queries spent: {clf.n_queries_} of {clf.query_budget}, by purpose {clf.n_queries_by_purpose_}")
print(f"images scored: {clf.n_images_scored_}")

# %%
# What ``prompt_tuning="auto"`` chose, and why
# --------------------------------------------
print(f"choice: {clf.selection_['choice']}")
print(f"reason: {clf.selection_['reason']}")
