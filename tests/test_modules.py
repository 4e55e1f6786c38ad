"""The paper's two modules as objects, the starting point of a fit, and the run plan in a door's units."""

import ast
import inspect

import numpy as np
import pytest
from helpers import FAST

from skcarrot import CarrotClassifier
from skcarrot._training import NullPrompt, NullRefiner, StartingPoint, build_run, run_generations
from skcarrot._training import loop as loop_module
from skcarrot._training import state as state_module
from skcarrot._training.state import FitSettings
from skcarrot.backends import QueryCounter, ToyBackend
from skcarrot.doors import EmbeddingDoor
from skcarrot.images import to_pil_images


def _settings(**changes):
    params = dict(CarrotClassifier(**dict(FAST, **changes)).get_params(deep=False))
    return FitSettings.resolve(params, EmbeddingDoor)


def test_a_fresh_start_and_a_switched_off_module_are_objects_not_branches(digits):
    Xtr, ytr, _, _ = digits
    door = EmbeddingDoor(ToyBackend(), [str(c) for c in range(10)], budget=50)
    loop, run = build_run(door, _settings(prompt_tuning=False, refinement=False), to_pil_images(Xtr),
                          np.asarray(ytr), 0)
    assert isinstance(loop.prompt, NullPrompt) and isinstance(loop.refiner, NullRefiner)
    assert run.n_generations == 0 and not run.warm and loop.generation == 0
    run_generations(loop, run)
    assert door.counter.n_queries == 0
    fresh = StartingPoint()
    assert fresh.prompt_for(door).shape == door.context_shape and fresh.warm_from is None


def test_build_run_and_the_loop_never_ask_whether_a_previous_fit_exists():
    for function in (state_module.build_run, loop_module.CollaborativeLoop):
        names = {node.id for node in ast.walk(ast.parse(inspect.getsource(function))) if isinstance(node, ast.Name)}
        assert not names & {"previous", "warm"}, function


def test_the_query_counter_saves_and_restores_its_counts():
    images = to_pil_images(np.zeros((3, 8, 8), dtype=np.uint8))
    counter = QueryCounter(ToyBackend(), budget=10)
    counter.logits(images, ["a", "b"], np.zeros((2, 2, 8)), purpose="prompt")
    saved = counter.state()
    counter.logits(images, ["a", "b"], np.zeros((1, 2, 8)), purpose="refiner")
    counter.restore(saved)
    assert (counter.n_queries, counter.n_images_scored, counter.by_purpose) == (2, 3, {"prompt": 2})
    saved["by_purpose"]["prompt"] = 99  # the saved state is a copy: changing it changes nothing
    assert counter.by_purpose == {"prompt": 2}


def test_the_embedding_door_reads_the_seeds_and_never_rewrites_them(digits):
    Xtr, ytr, _, _ = digits
    clf = CarrotClassifier(backend=ToyBackend(), warm_start=True, **FAST).fit(Xtr, ytr)
    door = EmbeddingDoor(ToyBackend(), clf.class_names_)
    start = StartingPoint.continuing(clf._prompt_state, clf.refiner_weights_, clf.n_iter_, clf._kl_until,
                                     clf.history_)
    seeds = {"projection": 1, "cma": 2, "torch": 3, "loop": 4}
    search = door.build_search(_settings(), seeds, start)
    assert seeds == {"projection": 1, "cma": 2, "torch": 3, "loop": 4}
    assert search.projection_seed == clf._prompt_state["projection_seed"] != 1  # the same A: z keeps its meaning


def test_a_warm_start_on_another_context_shape_says_both_shapes(digits):
    Xtr, ytr, _, _ = digits
    clf = CarrotClassifier(backend=ToyBackend(), warm_start=True, **FAST).fit(Xtr, ytr)
    clf.set_params(backend=ToyBackend(n_ctx=3))
    with pytest.raises(ValueError, match=r"offset is \(2, 8\), the backend takes \(3, 8\)"):
        clf.fit(Xtr, ytr)
