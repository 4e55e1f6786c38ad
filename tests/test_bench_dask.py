"""``skcarrot bench`` on a Dask cluster of worker processes: the serial numbers, and resumable."""

import csv
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from helpers import make_split_dataset

from skcarrot.tools.bench import BenchError, read_cells, run_bench
from skcarrot.tools.cli import main

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.slow  # Dask clusters of worker processes

GRID = dict(datasets=["eurosat", "dtd"], shots=[1], seeds=[1, 2], methods=["zeroshot", "bbt", "carrot"], budget=82)
N_CELLS = 2 * 1 * 2 * 3


def _cli_args(root, out):
    return ["bench", "--root", str(root), "--datasets", *GRID["datasets"], "--shots", *map(str, GRID["shots"]),
            "--seeds", *map(str, GRID["seeds"]), "--methods", *GRID["methods"], "--budget", str(GRID["budget"]),
            "--out", str(out), "--quiet"]


def _numbers(cells):
    """Each cell's row without its timing."""
    return {key: {k: v for k, v in row.items() if k != "fit_seconds"} for key, row in cells.items()}


def _summary(out):
    with open(out / "summary.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "fit_seconds_mean"} for row in csv.DictReader(f)]


def _wait_for_cells(out, n, timeout=180, alive=lambda: True):
    deadline = time.monotonic() + timeout
    while len(list((out / "cells").glob("*.json"))) < n:
        assert alive(), "the run ended before the expected cells"
        assert time.monotonic() < deadline, f"fewer than {n} cells after {timeout} s"
        time.sleep(0.05)


def _stamps(out):
    return {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.RandomState(0)
    make_split_dataset(root, "eurosat", ["Annual Crop Land", "Forest", "Sea or Lake"], rng)
    make_split_dataset(root, "dtd", ["banded", "blotchy"], rng)
    return root


@pytest.fixture(scope="module")
def serial(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("serial")
    run_bench(root=str(tree), out=str(out), quiet=True, **GRID)
    return out


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as local:
        yield local


def test_cells_on_a_cluster_match_the_serial_run(tree, serial, cluster, tmp_path):
    out = tmp_path / "out"
    assert main(_cli_args(tree, out) + ["--scheduler", cluster.scheduler_address]) == 0
    cells = read_cells(out)
    assert len(cells) == len(list((out / "cells").glob("*.json"))) == N_CELLS
    assert _numbers(cells) == _numbers(read_cells(serial))
    assert _summary(out) == _summary(serial)
    assert len((out / "results.jsonl").read_text().splitlines()) == N_CELLS
    assert not list((out / "cells").glob(".*"))  # no temporary file left behind
    before = _stamps(out)
    assert main(_cli_args(tree, out) + ["--scheduler", cluster.scheduler_address]) == 0  # resumed: nothing to do
    assert _stamps(out) == before


def test_a_killed_worker_loses_at_most_its_cell_and_the_rerun_completes(tree, serial, cluster, tmp_path):
    out = tmp_path / "out"
    outcome = {}
    with distributed.Client(cluster) as client:
        pids = client.run(os.getpid)

        def first_run():
            try:
                run_bench(root=str(tree), out=str(out), quiet=True, client=client, **GRID)
            except BenchError as exc:  # the cell of the killed worker may be given up
                outcome["error"] = exc

        runner = threading.Thread(target=first_run)
        runner.start()
        _wait_for_cells(out, 2, alive=runner.is_alive)
        busy = [address for address, keys in client.processing().items() if keys]
        assert busy, "the grid ended before a worker could be killed"
        os.kill(pids[busy[0]], signal.SIGKILL)  # a worker with a cell in flight
        runner.join(timeout=240)
        assert not runner.is_alive()
        kept = _stamps(out)
        assert len(kept) >= 2
        run_bench(root=str(tree), out=str(out), quiet=True, client=client, **GRID)
    assert _numbers(read_cells(out)) == _numbers(read_cells(serial))
    assert {name: stamp for name, stamp in _stamps(out).items() if name in kept} == kept  # finished cells kept


def test_a_killed_local_cluster_run_resumes(tree, serial, cluster, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "skcarrot", *_cli_args(tree, out), "--workers", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_cells(out, 2, alive=lambda: proc.poll() is None)
        os.kill(proc.pid, signal.SIGKILL)  # the client and its local cluster, mid-grid
        proc.wait(timeout=30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # any worker process left of that run
        except ProcessLookupError:
            pass
    time.sleep(0.5)
    kept = _stamps(out)
    assert 2 <= len(kept) < N_CELLS
    assert main(_cli_args(tree, out) + ["--scheduler", cluster.scheduler_address]) == 0
    assert _numbers(read_cells(out)) == _numbers(read_cells(serial))
    assert {name: stamp for name, stamp in _stamps(out).items() if name in kept} == kept


def test_a_failing_cell_does_not_stop_the_others(tree, cluster, tmp_path):
    out = tmp_path / "out"
    args = ["bench", "--root", str(tree), "--datasets", "dtd", "oxford_pets", "--shots", "1", "--seeds", "1",
            "--methods", "zeroshot", "--out", str(out), "--quiet", "--scheduler", cluster.scheduler_address]
    assert main(args) == 1  # no oxford_pets folder in the tree
    assert set(read_cells(out)) == {("dtd", 1, 1, "zeroshot")}
    assert "| dtd | 1 | zeroshot |" in (out / "summary.md").read_text()
