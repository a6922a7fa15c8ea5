"""Small stand-ins for downloadable datasets, in the dataset's own on-disk format.

A rehearsal (:mod:`fedtune_core.study.rehearsal`) must read a profile's data through the loader
that will read the real files, so where CIFAR is not on this machine it writes a few
images per class as torchvision's pickled batches (``cifar-10-batches-py/``,
``cifar-100-python/``) with the real class names. Where the real files are present, the
stand-in holds a few of their images (read through the real loader first). A stand-in
folder carries :data:`MARKER`, naming the checksums of its files; torchvision's loader
then checks those instead of the real archive's (:func:`loader_class`), and reads the files
exactly as it reads the real ones.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np

MARKER = "fedtune-stand-in.json"
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck")
CIFAR100_COARSE = (
    "aquatic_mammals fish flowers food_containers fruit_and_vegetables "
    "household_electrical_devices household_furniture insects large_carnivores "
    "large_man-made_outdoor_things large_natural_outdoor_scenes "
    "large_omnivores_and_herbivores medium_mammals non-insect_invertebrates people reptiles "
    "small_mammals trees vehicles_1 vehicles_2").split()
CIFAR100_NAMES = tuple((
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus "
    "butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach "
    "couch crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster "
    "house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree "
    "motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear "
    "pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road "
    "rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel "
    "streetcar sunflower sweet_pepper table tank telephone television tiger tractor train "
    "trout tulip turtle wardrobe whale willow_tree wolf woman worm").split())
# torchvision's layout: folder, training files, test file, meta file, label key, names key
LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                "batches.meta", "labels", "label_names"),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", "fine_labels",
                 "fine_label_names"),
}


def names(dataset: str) -> tuple[str, ...]:
    """The real class names of a CIFAR dataset, in label order."""
    return CIFAR10_NAMES if dataset == "cifar10" else CIFAR100_NAMES


def write_cifar(dataset: str, root: str | Path, train: tuple[np.ndarray, np.ndarray],
                test: tuple[np.ndarray, np.ndarray], source: str) -> Path:
    """Write ``(images uint8 N x 32 x 32 x 3, labels)`` pairs in torchvision's CIFAR format.

    Returns the dataset folder (``root/cifar-10-batches-py`` or ``root/cifar-100-python``).
    """
    folder, train_files, test_file, meta_file, label_key, names_key = LAYOUT[dataset]
    out = Path(root, folder)
    out.mkdir(parents=True, exist_ok=True)
    chunks = np.array_split(np.arange(len(train[1])), len(train_files))
    for name, idx in zip(train_files, chunks, strict=True):
        _batch(out / name, train[0][idx], train[1][idx], label_key, name)
    _batch(out / test_file, *test, label_key, test_file)
    meta = {names_key: list(names(dataset))}
    if dataset == "cifar100":
        meta["coarse_label_names"] = CIFAR100_COARSE
    else:
        meta |= {"num_cases_per_batch": len(chunks[0]), "num_vis": 3072}
    _pickle(out / meta_file, meta)
    files = [*train_files, test_file, meta_file]
    marker = {"dataset": dataset, "source": source, "train": len(train[1]),
              "test": len(test[1]), "md5": {f: _md5(out / f) for f in files}}
    (out / MARKER).write_text(json.dumps(marker, indent=1))
    return out


def _batch(path: Path, images: np.ndarray, labels: np.ndarray, label_key: str,
           name: str) -> None:
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)  # CIFAR's row layout
    entry = {"batch_label": name, label_key: [int(v) for v in labels], "data": rows,
             "filenames": [f"standin_{i}.png" for i in range(len(labels))]}
    if label_key == "fine_labels":
        entry["coarse_labels"] = [0] * len(labels)
    _pickle(path, entry)


def _pickle(path: Path, payload: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(payload, f, protocol=2)  # the protocol of the original files


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def loader_class(cls: type, root: str | Path) -> type:
    """``cls`` (torchvision's CIFAR10 / CIFAR100), or where ``root`` holds a stand-in, a
    subclass that checks the stand-in's checksums instead of the real files'."""
    marker = Path(root, cls.base_folder, MARKER)
    if not marker.is_file():
        return cls
    md5 = json.loads(marker.read_text())["md5"]
    return type(f"{cls.__name__}StandIn", (cls,), {
        "train_list": [[f, md5[f]] for f, _ in cls.train_list],
        "test_list": [[f, md5[f]] for f, _ in cls.test_list],
        "meta": cls.meta | {"md5": md5[cls.meta["filename"]]},
    })


def generated(dataset: str, per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` random 32x32 images of every class, coloured by class (no content)."""
    classes = len(names(dataset))
    rng = np.random.default_rng([seed, classes])
    labels = np.repeat(np.arange(classes), per_class)
    colours = rng.integers(0, 256, (classes, 1, 1, 3))
    noise = rng.integers(-64, 64, (len(labels), 32, 32, 3))
    return np.clip(colours[labels] + noise, 0, 255).astype(np.uint8), labels.astype(np.int64)


def subset(images: np.ndarray, labels: np.ndarray, per_class: int, extra: int = 0,
           classes: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` images of every class (of the first ``classes``), and ``extra`` more.

    Which ones is a seeded shuffle's choice; the images keep their order in the pool.
    """
    order = np.random.default_rng(seed).permutation(len(labels))
    top = classes or int(labels.max()) + 1
    keep = np.concatenate([order[labels[order] == c][:per_class] for c in range(top)])
    rest = np.setdiff1d(order, keep, assume_unique=True)
    keep = np.sort(np.concatenate([keep, rest[:extra]]))
    return images[keep], labels[keep]
