"""
Grid search over the consistency weight and the query budget
============================================================

``consistency_weight`` and ``query_budget`` are ordinary estimator parameters, so
:class:`~sklearn.model_selection.GridSearchCV` tunes them like any other.
"""

from sklearn.model_selection import GridSearchCV

from skcarrot import CarrotClassifier
from skcarrot.datasets import few_shot_split, load_digit_images

X, y = load_digit_images()
X_train, y_train, X_test, y_test = few_shot_split(X, y, n_shots=8, seed=0)

search = GridSearchCV(
    CarrotClassifier(popsize=20, random_state=0),
    {"consistency_weight": [0.0, 0.1], "query_budget": [420, 840]},
    cv=2,
)
search.fit(X_train, y_train)
print("best parameters:", search.best_params_)
print(f"held-out accuracy of the refitted best model: {search.score(X_test, y_test):.3f}")
