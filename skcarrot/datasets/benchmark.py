"""Few-shot benchmark datasets in the layout of CoOp and the official CARROT code.

Each dataset lives in its own folder under a root (``$DATA``):

=================  =======================  ==========================================
name               folder                   what must be there
=================  =======================  ==========================================
caltech101         caltech-101/             101_ObjectCategories/, split_zhou_Caltech101.json
oxford_pets        oxford_pets/             images/, split_zhou_OxfordPets.json
stanford_cars      stanford_cars/           split_zhou_StanfordCars.json (+ the images it names)
oxford_flowers     oxford_flowers/          jpg/, split_zhou_OxfordFlowers.json
food101            food-101/                images/, split_zhou_Food101.json
sun397             sun397/                  SUN397/, split_zhou_SUN397.json
dtd                dtd/                     images/, split_zhou_DescribableTextures.json
eurosat            eurosat/                 2750/, split_zhou_EuroSAT.json
ucf101             ucf101/                  UCF-101-midframes/, split_zhou_UCF101.json
fgvc_aircraft      fgvc_aircraft/           images/, variants.txt, images_variant_{train,val,test}.txt
imagenet           imagenet/                images/{train,val}/<wnid>/, classnames.txt
imagenet_v2        imagenetv2/              imagenetv2-matched-frequency-format-val/<0..999>/, classnames.txt
imagenet_sketch    imagenet-sketch/         images/<wnid>/, classnames.txt
imagenet_a         imagenet-adversarial/    imagenet-a/<wnid>/ (200 classes), classnames.txt
imagenet_r         imagenet-rendition/      imagenet-r/<wnid>/ (200 classes), classnames.txt
=================  =======================  ==========================================

A ``split_zhou_*.json`` file holds ``{"train": [[relative_path, label, classname], ...],
"val": [...], "test": [...]}``. The ImageNet variants are test-only: a model fitted on
ImageNet is scored on them (-A and -R on their 200-class subsets).

Two offline sets need no root: ``digits`` (scikit-learn's 8x8 digits) and ``fashion_mnist``
(Debian's ``dataset-fashion-mnist``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._util.split import draw_per_class

__all__ = [
    "DATASETS",
    "IMAGENET_VARIANTS",
    "ImageSet",
    "FewShotTask",
    "load_benchmark",
    "sample_few_shot",
    "clean_classname",
]

#: Split-file datasets: name -> (folder, image folder, split file).
SPLIT_DATASETS = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": ("food-101", "images", "split_zhou_Food101.json"),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json"),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
}

#: Test-only ImageNet variants: name -> (folder, image folder, label folders named by index?).
IMAGENET_VARIANTS = {
    "imagenet_v2": ("imagenetv2", "imagenetv2-matched-frequency-format-val", True),
    "imagenet_sketch": ("imagenet-sketch", "images", False),
    "imagenet_a": ("imagenet-adversarial", "imagenet-a", False),
    "imagenet_r": ("imagenet-rendition", "imagenet-r", False),
}

#: Every dataset name ``load_benchmark`` knows.
DATASETS = (
    tuple(SPLIT_DATASETS) + ("fgvc_aircraft", "imagenet") + tuple(IMAGENET_VARIANTS) + ("digits", "fashion_mnist")
)

_IMAGE_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def clean_classname(name: str) -> str:
    """Class name as it goes into a prompt: underscores become spaces, as CoOp does.

    Examples
    --------
    >>> from skcarrot.datasets import clean_classname
    >>> clean_classname("Apply_Eye_Makeup")
    'Apply Eye Makeup'
    """
    return " ".join(name.replace("_", " ").split())


@dataclass
class ImageSet:
    """A dataset: class names and (image, label) lists for train, val and test.

    ``images`` entries are file paths, except for the offline sets whose images are arrays.
    A test-only set has empty ``train`` and ``val``; ``label_subset`` then gives, for a set
    scored by an ImageNet model, the ImageNet label of each of its classes.
    """

    name: str
    classnames: list[str]
    train: tuple[Any, np.ndarray]
    val: tuple[Any, np.ndarray]
    test: tuple[Any, np.ndarray]
    label_subset: np.ndarray | None = None
    root: str = ""


@dataclass
class FewShotTask:
    """A seeded few-shot draw: what :class:`skcarrot.CarrotClassifier` needs."""

    name: str
    n_shots: int
    seed: int
    classnames: list[str]
    X_train: Any
    y_train: np.ndarray
    X_val: Any
    y_val: np.ndarray
    X_test: Any
    y_test: np.ndarray


def _require(path: Path, what: str, folder: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} {path.name!r} not found in {folder} (looked for {path})")
    return path


def _dataset_folder(root: Path, folder: str, name: str) -> Path:
    path = root / folder
    if not path.is_dir():
        raise FileNotFoundError(
            f"dataset {name!r}: folder {folder!r} not found in {root} (looked for {path}); "
            "see the layout in skcarrot.datasets.benchmark"
        )
    return path


def _read_split(name: str, root: Path) -> ImageSet:
    folder, image_dir, split_file = SPLIT_DATASETS[name]
    base = _dataset_folder(root, folder, name)
    split_path = _require(base / split_file, "split file", base)
    try:
        split = json.loads(split_path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"split file {split_path} is not valid JSON: {exc}") from exc
    prefix = base / image_dir if image_dir else base
    names: dict[int, str] = {}
    parts = []
    for part in ("train", "val", "test"):
        rows = split.get(part)
        if not isinstance(rows, list):
            raise ValueError(f"split file {split_path} has no list {part!r}")
        paths, labels = [], []
        for i, row in enumerate(rows):
            if not (isinstance(row, (list, tuple)) and len(row) == 3):
                raise ValueError(
                    f"split file {split_path}: {part}[{i}] should be [relative_path, label, classname], got {row!r}"
                )
            rel, label, cname = row
            paths.append(str(prefix / rel))
            labels.append(int(label))
            names.setdefault(int(label), clean_classname(str(cname)))
        parts.append((paths, np.asarray(labels, dtype=np.int64)))
    n = max(names) + 1
    missing = sorted(set(range(n)) - set(names))
    if missing:
        raise ValueError(f"split file {split_path}: no class name for labels {missing[:5]}")
    return ImageSet(name, [names[i] for i in range(n)], *parts, root=str(base))


def _read_aircraft(root: Path) -> ImageSet:
    base = _dataset_folder(root, "fgvc_aircraft", "fgvc_aircraft")
    variants = _require(base / "variants.txt", "class list", base).read_text().splitlines()
    classnames = [v.strip() for v in variants if v.strip()]
    index = {c: i for i, c in enumerate(classnames)}
    parts = []
    for part in ("train", "val", "test"):
        f = _require(base / f"images_variant_{part}.txt", "split file", base)
        paths, labels = [], []
        for line in f.read_text().splitlines():
            if not line.strip():
                continue
            image, _, cname = line.strip().partition(" ")
            if cname not in index:
                raise ValueError(f"{f}: unknown variant {cname!r} (not in variants.txt)")
            paths.append(str(base / "images" / f"{image}.jpg"))
            labels.append(index[cname])
        parts.append((paths, np.asarray(labels, dtype=np.int64)))
    return ImageSet("fgvc_aircraft", classnames, *parts, root=str(base))


def _read_classnames(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            wnid, _, cname = line.strip().partition(" ")
            out[wnid] = cname.strip()
    return out


def _list_images(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in _IMAGE_EXT and not p.name.startswith("."))


def _read_imagenet(root: Path) -> ImageSet:
    base = _dataset_folder(root, "imagenet", "imagenet")
    classnames = _read_classnames(_require(base / "classnames.txt", "class-name list", base))
    wnids = list(classnames)
    parts = []
    for part in ("train", "val"):
        split_dir = _require(base / "images" / part, "image folder", base / "images")
        paths, labels = [], []
        for label, wnid in enumerate(wnids):
            d = split_dir / wnid
            if d.is_dir():
                imgs = _list_images(d)
                paths += imgs
                labels += [label] * len(imgs)
        parts.append((paths, np.asarray(labels, dtype=np.int64)))
    train, test = parts
    empty = ([], np.zeros(0, dtype=np.int64))
    names = [clean_classname(classnames[w]) for w in wnids]
    return ImageSet("imagenet", names, train, empty, test, root=str(base))


def _read_variant(name: str, root: Path) -> ImageSet:
    folder, image_dir, by_index = IMAGENET_VARIANTS[name]
    base = _dataset_folder(root, folder, name)
    classnames = _read_classnames(_require(base / "classnames.txt", "class-name list", base))
    wnids = list(classnames)
    images = _require(base / image_dir, "image folder", base)
    present = sorted(p.name for p in images.iterdir() if p.is_dir() and not p.name.startswith("."))
    if by_index:
        labels_of = {d: int(d) for d in present if d.isdigit()}
    else:
        unknown = [d for d in present if d not in classnames]
        if unknown:
            raise ValueError(f"{images}: class folders {unknown[:3]} are not in {base / 'classnames.txt'}")
        labels_of = {d: wnids.index(d) for d in present}
    subset = np.array(sorted(set(labels_of.values())), dtype=np.int64)
    local = {lab: i for i, lab in enumerate(subset)}
    paths, labels = [], []
    for d, lab in labels_of.items():
        imgs = _list_images(images / d)
        paths += imgs
        labels += [local[lab]] * len(imgs)
    names = [clean_classname(classnames[wnids[i]]) for i in subset]
    empty = ([], np.zeros(0, dtype=np.int64))
    return ImageSet(name, names, empty, empty, (paths, np.asarray(labels, dtype=np.int64)), subset, str(base))


def _offline(name: str) -> ImageSet:
    from .offline import FASHION_CLASSES, load_digit_images, load_fashion_mnist

    empty = (np.zeros((0, 8, 8), np.uint8), np.zeros(0, dtype=np.int64))
    if name == "digits":
        X, y = load_digit_images()
        # The sklearn digits have no official split: a fixed seeded half for train/val.
        order = np.random.RandomState(0).permutation(len(y))
        half = order[: len(y) // 2]
        rest = order[len(y) // 2 :]
        return ImageSet(name, [str(d) for d in range(10)], (X[half], y[half]), empty, (X[rest], y[rest]))
    Xtr, ytr = load_fashion_mnist("train")
    Xte, yte = load_fashion_mnist("test")
    return ImageSet(name, list(FASHION_CLASSES), (Xtr, ytr), empty, (Xte, yte))


def load_benchmark(name: str, root: str | os.PathLike | None = None) -> ImageSet:
    """Load one benchmark dataset.

    Parameters
    ----------
    name : str
        One of :data:`DATASETS`.
    root : path-like or None
        The folder holding the dataset folders; not needed for ``digits`` and ``fashion_mnist``.

    Returns
    -------
    dataset : ImageSet

    Raises
    ------
    FileNotFoundError
        If a folder or file is missing: the message names it and where it was looked for.
    ValueError
        For an unknown name or a malformed file.

    Examples
    --------
    >>> from skcarrot.datasets import load_benchmark
    >>> ds = load_benchmark("digits")
    >>> ds.classnames[:3], len(ds.test[1])
    (['0', '1', '2'], 899)
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if name in ("digits", "fashion_mnist"):
        return _offline(name)
    if root is None:
        raise ValueError(f"dataset {name!r} needs root=<folder holding the dataset folders>")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist")
    if name in SPLIT_DATASETS:
        return _read_split(name, root)
    if name == "fgvc_aircraft":
        return _read_aircraft(root)
    if name == "imagenet":
        return _read_imagenet(root)
    return _read_variant(name, root)


def _take(X: Any, idx: np.ndarray) -> Any:
    if isinstance(X, np.ndarray):
        return X[idx]
    return [X[i] for i in idx]


def _per_class(labels: np.ndarray, k: int, rng: np.random.RandomState, exclude: set | None = None) -> np.ndarray:
    """Up to ``k`` indices of each class, sorted."""
    return np.sort(draw_per_class(labels, k, rng, exclude=exclude, strict=False))


def sample_few_shot(dataset: ImageSet, n_shots: int, seed: int) -> FewShotTask:
    """Seeded few-shot draw: ``n_shots`` per class from train, ``min(n_shots, 4)`` per class for val.

    The test set is the dataset's test split, untouched; train and val are drawn from
    the train and val splits (or, where there is no val split, from the train images not
    drawn for train), so no test image is ever in train or val. The same seed gives the
    same draw.

    Examples
    --------
    >>> from skcarrot.datasets import load_benchmark, sample_few_shot
    >>> task = sample_few_shot(load_benchmark("digits"), 2, seed=1)
    >>> len(task.y_train), len(task.y_val)
    (20, 20)
    """
    if n_shots < 1:
        raise ValueError(f"n_shots must be >= 1, got {n_shots}")
    Xtr, ytr = dataset.train
    if len(ytr) == 0:
        raise ValueError(f"{dataset.name} is a test-only set: fit on imagenet and score on it")
    rng = np.random.RandomState(seed)
    train_idx = _per_class(ytr, n_shots, rng)
    Xva, yva = dataset.val
    if len(yva):
        val_idx = _per_class(yva, min(n_shots, 4), rng)
        X_val, y_val = _take(Xva, val_idx), yva[val_idx]
    else:
        val_idx = _per_class(ytr, min(n_shots, 4), rng, exclude=set(train_idx.tolist()))
        X_val, y_val = _take(Xtr, val_idx), ytr[val_idx]
    Xte, yte = dataset.test
    return FewShotTask(
        dataset.name, n_shots, seed, list(dataset.classnames),
        _take(Xtr, train_idx), ytr[train_idx], X_val, y_val, Xte, yte,
    )
