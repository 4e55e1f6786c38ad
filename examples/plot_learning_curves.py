"""
Learning curves from ``history_``
=================================

Every generation of a fit is recorded in ``history_``: the queries spent so far, the best and
mean fitness of the candidate prompts, the refiner's loss and the training accuracy. The fit
below follows the paper's protocol (``prompt_tuning=True``: every generation of the budget).
"""

import matplotlib.pyplot as plt

from skcarrot import CarrotClassifier
from skcarrot.datasets import few_shot_split, load_digit_images

X, y = load_digit_images()
X_train, y_train, X_test, y_test = few_shot_split(X, y, n_shots=16, seed=0)
clf = CarrotClassifier(query_budget=4000, prompt_tuning=True, random_state=0).fit(X_train, y_train)

queries = [h["queries"] for h in clf.history_]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
ax1.plot(queries, [h["train_accuracy"] for h in clf.history_])
ax1.set(xlabel="queries", ylabel="training accuracy", title="accuracy against queries")
ax2.plot(queries, [h["best_fitness"] for h in clf.history_], label="best")
ax2.plot(queries, [h["mean_fitness"] for h in clf.history_], label="mean")
ax2.set(xlabel="queries", ylabel="fitness (lower is better)", title="prompt fitness")
ax2.legend()
fig.tight_layout()
print(f"held-out accuracy {clf.score(X_test, y_test):.3f} after {clf.n_queries_} queries")
