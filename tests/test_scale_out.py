"""GridSearchCV on a Dask LocalCluster (worker processes) matches the default joblib backend."""

import numpy as np
import pytest
from helpers import FAST, digits_split
from sklearn.model_selection import GridSearchCV

from skcarrot import CarrotClassifier
from skcarrot.backends import embedded_backend

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.slow  # a Dask cluster of worker processes


def _search():
    return GridSearchCV(
        CarrotClassifier(backend=embedded_backend(), **dict(FAST, query_budget=90)),
        {"consistency_weight": [0.0, 0.1], "query_budget": [45, 90]},
        cv=2,
    )


def test_grid_search_on_a_dask_cluster_matches_joblib():
    import joblib

    Xtr, ytr, _, _ = digits_split(n_shots=4, seed=3)
    local = _search().fit(Xtr, ytr)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with distributed.Client(cluster):
            with joblib.parallel_backend("dask"):
                remote = _search().fit(Xtr, ytr)
    assert remote.best_params_ == local.best_params_
    np.testing.assert_array_equal(remote.cv_results_["mean_test_score"], local.cv_results_["mean_test_score"])
    np.testing.assert_array_equal(remote.cv_results_["split0_test_score"], local.cv_results_["split0_test_score"])
