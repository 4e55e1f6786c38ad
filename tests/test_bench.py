"""Benchmark loaders and the ``skcarrot bench`` command on generated miniature dataset trees."""

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import make_split_dataset, save_noise_image

from skcarrot.tools.bench import make_estimator, paper_numbers, read_cells, run_bench
from skcarrot.tools.cli import main
from skcarrot.datasets import load_benchmark, sample_few_shot
from skcarrot.datasets.benchmark import SPLIT_DATASETS

RNG = np.random.RandomState(0)


def _img(path, value):
    save_noise_image(path, value, RNG)


def make_imagenet(root, wnids=("n01", "n02", "n03"), per_class=3):
    base = root / "imagenet"
    (base).mkdir(parents=True)
    (base / "classnames.txt").write_text("\n".join(f"{w} class {w}" for w in wnids))
    for part in ("train", "val"):
        for j, w in enumerate(wnids):
            for i in range(per_class):
                _img(base / "images" / part / w / f"{i}.JPEG", 50 + 70 * j)
    a = root / "imagenet-adversarial"
    (a / "classnames.txt").parent.mkdir(parents=True)
    (a / "classnames.txt").write_text((base / "classnames.txt").read_text())
    for j, w in enumerate(wnids[1:]):  # a 2-class subset, as -A has 200 of 1000
        for i in range(2):
            _img(a / "imagenet-a" / w / f"{i}.jpg", 50 + 70 * (j + 1))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_split_dataset(root, "eurosat", ["Annual Crop Land", "Forest", "Sea or Lake"], RNG)
    make_split_dataset(root, "dtd", ["banded", "blotchy"], RNG)
    for name in ("caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "sun397", "ucf101"):
        make_split_dataset(root, name, ["a_b", "c"], RNG, per_split=(2, 1, 1))
    air = root / "fgvc_aircraft"
    (air / "variants.txt").parent.mkdir(parents=True)
    (air / "variants.txt").write_text("707-320\nA300B4\n")
    for part in ("train", "val", "test"):
        lines = []
        for j, v in enumerate(["707-320", "A300B4"]):
            for i in range(2):
                name = f"{part}{j}{i}"
                _img(air / "images" / f"{name}.jpg", 60 + 80 * j)
                lines.append(f"{name} {v}")
        (air / f"images_variant_{part}.txt").write_text("\n".join(lines))
    make_imagenet(root)
    return root


def test_every_layout_loads(tree):
    for name in list(SPLIT_DATASETS) + ["fgvc_aircraft", "imagenet", "imagenet_a"]:
        ds = load_benchmark(name, tree)
        assert ds.classnames and len(ds.test[1]) > 0, name
    assert load_benchmark("caltech101", tree).classnames == ["a b", "c"]  # underscores cleaned
    a = load_benchmark("imagenet_a", tree)
    assert list(a.label_subset) == [1, 2] and len(a.classnames) == 2


def test_sampler_is_seeded_and_never_uses_test_images(tree):
    ds = load_benchmark("eurosat", tree)
    t1, t2, t3 = (sample_few_shot(ds, 2, s) for s in (1, 1, 2))
    assert t1.X_train == t2.X_train and t1.X_train != t3.X_train
    assert len(t1.X_train) == 2 * 3 and len(t1.X_val) == 2 * 3
    test = set(ds.test[0])
    for t in (t1, t3):
        assert not test & set(t.X_train) and not test & set(t.X_val)
    im = load_benchmark("imagenet", tree)
    t = sample_few_shot(im, 2, 0)
    assert not set(t.X_train) & set(t.X_val) and not set(t.X_train) & set(im.test[0])


def test_missing_split_file_names_file_and_folder(tree, tmp_path):
    (tmp_path / "dtd").mkdir()
    with pytest.raises(FileNotFoundError, match=r"split file 'split_zhou_DescribableTextures.json' not found in .*dtd"):
        load_benchmark("dtd", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"folder 'eurosat' not found in"):
        load_benchmark("eurosat", tmp_path)
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text('{"train": [[1, 2]], "val": [], "test": []}')
    with pytest.raises(ValueError, match=r"train\[0\] should be \[relative_path, label, classname\]"):
        load_benchmark("dtd", tmp_path)
    code = main(["bench", "--root", str(tmp_path), "--datasets", "eurosat", "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 2


@pytest.mark.slow
def test_bench_end_to_end_and_resume(tree, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["bench", "--root", str(tree), "--datasets", "eurosat", "dtd", "--shots", "1", "2", "--seeds", "1", "2",
            "--methods", "zeroshot", "bbt", "carrot", "--budget", "82", "--out", str(out), "--quiet"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 2 * 3
    cells = sorted((out / "cells").glob("*.json"))  # one result file per cell
    assert len(cells) == len(rows) and "eurosat-1shot-seed1-zeroshot.json" in {p.name for p in cells}
    assert {r["method"] for r in rows} == {"zeroshot", "bbt", "carrot"}
    assert all(0 <= r["accuracy"] <= 100 and r["queries"] <= 82 for r in rows)
    assert all(r["queries"] == 0 for r in rows if r["method"] == "zeroshot")
    md = (out / "summary.md").read_text()
    accs = np.array([r["accuracy"] for r in rows if (r["dataset"], r["shots"], r["method"]) == ("eurosat", 1, "zeroshot")])
    paper_zero_shot = paper_numbers()["zeroshot"]["eurosat"]
    row = (f"| eurosat | 1 | zeroshot | black-box | {accs.mean():.2f} ± {accs.std():.2f} | 2 | 0 | ")
    assert len(accs) == 2 and row in md  # the mean and std over the two seeds
    assert f"| {paper_zero_shot:.2f} | {paper_zero_shot:.2f} | — | — |" in md  # the paper's zero-shot, not its 16 shots
    assert len((out / "summary.csv").read_text().splitlines()) == 1 + 2 * 2 * 3
    before = (out / "results.jsonl").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in cells}
    assert main(args) == 0  # resumed: nothing to do
    assert (out / "results.jsonl").read_text() == before
    assert {p: p.stat().st_mtime_ns for p in cells} == stamps


def test_an_output_folder_of_results_jsonl_only_is_resumed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    old = {"dataset": "digits", "shots": 1, "seed": 1, "method": "zeroshot", "kind": "black-box", "accuracy": 12.5,
           "queries": 0, "fit_seconds": 0.1, "model": "m", "pretrained": "w", "fitted_on": "digits"}
    (out / "results.jsonl").write_text(json.dumps(old) + "\n" + '{"dataset": "dig')  # the last line cut short
    rows = run_bench(root=None, datasets=["digits"], shots=[1], seeds=[1], methods=["zeroshot"], out=str(out),
                     quiet=True)
    assert rows == [old]  # not run again
    assert read_cells(out) == {("digits", 1, 1, "zeroshot"): old}
    assert (out / "results.jsonl").read_text() == json.dumps(old) + "\n"


def test_the_methods_fix_prompt_tuning_as_in_the_paper():
    expected = {"zeroshot": (False, False), "bbt": (True, False), "refine": (False, True), "carrot": (True, True)}
    for method, (prompt, refine) in expected.items():
        est = make_estimator(method, "eurosat", 1, seed=1, backend=None, classnames=["a", "b"])
        assert (est.prompt_tuning, est.refinement) == (prompt, refine), method  # never the "auto" default


def test_bench_cluster_options_are_checked(tmp_path, capsys):
    base = ["bench", "--datasets", "digits", "--out", str(tmp_path), "--quiet"]
    with pytest.raises(SystemExit):
        main(base + ["--scheduler", "tcp://127.0.0.1:1", "--workers", "2"])
    assert "not allowed with argument" in capsys.readouterr().err
    assert main(base + ["--workers", "0"]) == 2
    assert main(base + ["--workers", "1", "--resources", "=1"]) == 2
    assert "NAME=AMOUNT" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at most one of"):
        run_bench(root=None, datasets=["digits"], shots=[1], seeds=[1], methods=["zeroshot"], out=str(tmp_path),
                  scheduler="tcp://127.0.0.1:1", workers=1)


def test_white_box_baselines_and_shift_sets_share_the_table(tree, tmp_path):
    out = tmp_path / "out"
    args = ["bench", "--root", str(tree), "--datasets", "imagenet", "imagenet_a", "--shots", "1", "--seeds", "1",
            "--methods", "zeroshot", "coop", "linear_probe", "tip_adapter", "--out", str(out), "--quiet"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {(r["dataset"], r["method"]) for r in rows} == {
        (d, m) for d in ("imagenet", "imagenet_a") for m in ("zeroshot", "coop", "linear_probe", "tip_adapter")
    }
    assert {r["kind"] for r in rows if r["method"] != "zeroshot"} == {"white-box"}
    assert all(r["fitted_on"] == "imagenet" for r in rows)
    md = (out / "summary.md").read_text()
    for m in ("coop", "linear_probe", "tip_adapter"):
        assert f"| {m} | white-box |" in md


@pytest.mark.slow
def test_bench_list_and_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "skcarrot", "bench", "--list"], capture_output=True, text=True, check=True)
    for word in ("eurosat", "imagenet_r", "carrot", "tip_adapter", "white-box", "sigma=0.02"):
        assert word in out.stdout
    version = subprocess.run([sys.executable, "-m", "skcarrot", "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("skcarrot ")
