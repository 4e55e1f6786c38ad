"""
Quickstart
==========

Adapt the embedded black-box model to 16 handwritten digits per class and compare with
zero-shot prediction on the held-out digits.
"""

from skcarrot import CarrotClassifier
from skcarrot.datasets import few_shot_split, load_digit_images

X, y = load_digit_images()  # (1797, 8, 8) uint8 images
X_train, y_train, X_test, y_test = few_shot_split(X, y, n_shots=16, seed=0)

zero_shot = CarrotClassifier(prompt_tuning=False, refinement=False).fit(X_train, y_train)
carrot = CarrotClassifier(query_budget=4000, random_state=0).fit(X_train, y_train)

print(f"zero-shot held-out accuracy: {zero_shot.score(X_test, y_test):.3f}")
print(f"CARROT    held-out accuracy: {carrot.score(X_test, y_test):.3f}")
print(f"queries spent: {carrot.n_queries_} {carrot.n_queries_by_purpose_}")
