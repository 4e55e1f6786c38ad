"""
Grid search on a Dask cluster
=============================

joblib's Dask backend sends the fits of a :class:`~sklearn.model_selection.GridSearchCV`
to the workers of a cluster; each worker loads the model once. A
:class:`~dask.distributed.LocalCluster` stands in for a real one here.
"""

import joblib
from dask.distributed import Client, LocalCluster
from sklearn.model_selection import GridSearchCV

from skcarrot import CarrotClassifier
from skcarrot.datasets import few_shot_split, load_digit_images

X, y = load_digit_images()
X_train, y_train, X_test, y_test = few_shot_split(X, y, n_shots=8, seed=0)

if __name__ == "__main__":
    search = GridSearchCV(
        CarrotClassifier(popsize=20, random_state=0),
        {"consistency_weight": [0.0, 0.1], "query_budget": [210, 420]},
        cv=2,
    )
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster), joblib.parallel_backend("dask"):
            search.fit(X_train, y_train)
    print("best parameters:", search.best_params_)
    print(f"held-out accuracy: {search.score(X_test, y_test):.3f}")
