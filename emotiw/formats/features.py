"""Per-clip feature vectors in the files Caffe's HDF5Data layer reads, and their standardisation.

A feature file `<split>.h5` holds `data` (N x D float32) and `label` (N float32, NO_LABEL for an
unlabelled clip); its HDF5Data source `<split>.txt` lists the .h5 file's path; `features.json`
beside them names the feature set. Training standardises the vectors with the training set's mean
and standard deviation (a deviation of 0 counts as 1) and stores both in `standardisation.json`
beside the net's prototxts, which scoring then applies to the vectors it reads.
"""

import json
from pathlib import Path

import numpy as np

from emotiw.errors import UserError
from emotiw.formats.files import atomic_path, atomic_write_text, inside
from emotiw.formats.lists import resolve_listed_path

STANDARDISATION = "standardisation.json"


def read_feature_vectors(source):
    """(data N x D float64, labels N) of every .h5 file an HDF5Data source lists."""
    import h5py

    data, labels = [], []
    for entry in Path(source).read_text().split():
        path = resolve_listed_path(entry, source)
        try:
            with h5py.File(path, "r") as handle:
                data.append(handle["data"][()].reshape(len(handle["data"]), -1))
                labels.append(handle["label"][()].reshape(-1))
        except (OSError, KeyError) as error:
            raise UserError(f"{source}: {path} is no HDF5 file with `data` and `label` ({error}); "
                            "make it with emotiw features") from None
    return np.concatenate(data).astype(np.float64), np.concatenate(labels)


def feature_set_of(source):
    """features.json's feature set beside an HDF5Data source, or None."""
    described = Path(source).parent / "features.json"
    return json.loads(described.read_text()).get("feature_set") if described.is_file() else None


def write_feature_file(folder, split, data, labels):
    """`folder/<split>.h5` (`data` N x D and `label` N, float32, for Caffe's HDF5Data) and the
    source file that lists it, `folder/<split>.txt`; returns the source file."""
    import h5py

    h5 = inside(folder, f"{split}.h5")
    with atomic_path(h5) as tmp:
        with h5py.File(tmp, "w") as handle:
            handle.create_dataset("data", data=np.asarray(data, dtype=np.float32))
            handle.create_dataset("label", data=np.asarray(labels, dtype=np.float32))
    source = inside(folder, f"{split}.txt")
    atomic_write_text(source, f"{h5.resolve()}\n")
    return source


def standardisation(train_data):
    """(mean, std) of the training vectors, a std of 0 counting as 1."""
    mean, std = train_data.mean(axis=0), train_data.std(axis=0)
    return mean, np.where(std > 0, std, 1.0)


def write_standardisation(folder, feature_set, mean, std, train):
    atomic_write_text(Path(folder) / STANDARDISATION, json.dumps(
        {"feature_set": feature_set, "dimension": int(len(mean)), "mean": mean.tolist(), "std": std.tolist(),
         "train": str(Path(train).resolve())}) + "\n")


def read_standardisation(folder):
    """The statistics a training run stored beside its deploy net."""
    path = Path(folder) / STANDARDISATION
    if not path.is_file():
        raise UserError(f"{path} not found: feature nets are scored with the deploy.prototxt of their training "
                        "run (emotiw train writes standardisation.json beside it)")
    return path, json.loads(path.read_text())


def standardised(data, stats):
    return ((data - np.asarray(stats["mean"])) / np.asarray(stats["std"])).astype(np.float32)
