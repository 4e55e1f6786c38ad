"""
Quickstart
==========

Adapt the embedded black-box model to 16 handwritten digits per class and compare with
zero-shot prediction on the held-out digits. The default spends queries only where held-out
shots say they help, and ``selection_`` says what it chose.
"""

from skcarrot import CarrotClassifier
from skcarrot.datasets import few_shot_split, load_digit_images

X, y = load_digit_images()  # (1797, 8, 8) uint8 images
X_train, y_train, X_test, y_test = few_shot_split(X, y, n_shots=16, seed=0)

zero_shot = CarrotClassifier(prompt_tuning=False, refinement=False).fit(X_train, y_train)
adapted = CarrotClassifier(query_budget=4000, random_state=0).fit(X_train, y_train)

print(f"zero-shot held-out accuracy: {zero_shot.score(X_test, y_test):.3f}")
print(f"adapted   held-out accuracy: {adapted.score(X_test, y_test):.3f} ({adapted.selection_['choice']})")
print(f"queries spent: {adapted.n_queries_} {adapted.n_queries_by_purpose_}")
