"""What `train` checks and prepares before Caffe starts: the lists and their labels, the images
(decoded once), the mean to subtract, and feature vectors standardised with the training statistics."""

import collections
import contextlib
import math
import os
import sys
from pathlib import Path

from emotiw import EMOTIONS, nets
from emotiw.caffe.proto import read_mean_file
from emotiw.caffe.tools import run_tool
from emotiw.errors import UserError
from emotiw.formats.db import lmdb_labels
from emotiw.formats.features import (
    feature_set_of,
    read_feature_vectors,
    standardisation,
    write_feature_file,
    write_standardisation,
)
from emotiw.formats.lists import read_list, resolve_listed_path, source_type

MIN_IMAGE_SIDE = 8
MEAN_SAMPLE = 1000  # images whose mean colour stands for a list's when the images are not checked


def standardise(train, val, out):
    """Standardised copies of the train and val features (emotiw.formats.features: the train mean and
    std) in OUT/standardised/, those statistics in OUT/standardisation.json; returns (train source,
    val source, dimension)."""
    (train_data, train_labels), (val_data, val_labels) = read_feature_vectors(train), read_feature_vectors(val)
    if train_data.shape[1] != val_data.shape[1] or feature_set_of(train) != feature_set_of(val):
        raise UserError(f"--train {train} holds {train_data.shape[1]} values of {feature_set_of(train)} per clip "
                        f"but --val {val} {val_data.shape[1]} of {feature_set_of(val)}; describe both the same way")
    mean, std = standardisation(train_data)
    sources = []
    for name, data, labels in (("train", train_data, train_labels), ("val", val_data, val_labels)):
        sources.append(write_feature_file(out / "standardised", name, (data - mean) / std, labels))
    write_standardisation(out, feature_set_of(train), mean, std, train)
    return sources[0], sources[1], int(train_data.shape[1])


@contextlib.contextmanager
def quiet_opencv():
    """OpenCV logs `[ WARN:0@...] imread_(...): can't open/read file` for a bad image; our own error
    line says the same, so its warnings are kept off the terminal while the images are read."""
    import cv2

    previous = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    try:
        yield cv2
    finally:
        cv2.utils.logging.setLogLevel(previous)


def mean_colour(channel_means):
    import numpy as np

    return tuple(round(float(v), 3) for v in np.mean(channel_means, axis=0))


def scan_list(path, check_images=True):
    """Labels of a list and the mean BGR colour of its images, after checking that every image
    exists and decodes at a usable size (mean None when the images are not checked)."""
    from tqdm import tqdm

    entries, labels = read_list(path, "ImageData list", label_required=True)
    if not check_images:
        return list(labels), None
    channel_means = []
    with quiet_opencv() as cv2:
        for entry in tqdm(entries, desc=f"checking {Path(path).name}", unit="img", leave=False,
                          disable=not sys.stderr.isatty()):
            image = str(resolve_listed_path(entry, path))
            if not Path(entry).is_absolute() and image != str(Path.cwd() / entry):
                raise UserError(f"{path}: {entry} lies beside the list, but Caffe reads relative paths from "
                                f"the working directory; run from {Path(path).resolve().parent} or write "
                                "absolute paths")
            decoded = cv2.imread(image, cv2.IMREAD_COLOR)
            if decoded is None:
                reason = "not found" if not os.path.exists(image) else "not a readable image"
                raise UserError(f"{path}: {image} is {reason}; fix or remove that line")
            if min(decoded.shape[:2]) < MIN_IMAGE_SIDE:
                raise UserError(f"{path}: {image} is {decoded.shape[1]}x{decoded.shape[0]} pixels, "
                                f"smaller than {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}")
            channel_means.append(decoded.reshape(-1, 3).mean(axis=0))
    return list(labels), mean_colour(channel_means)


def sampled_mean_colour(path):
    """The mean BGR colour of up to MEAN_SAMPLE evenly spaced images of a list that decode: what
    stands for the training images' mean colour when they are not all checked."""
    entries, _ = read_list(path, "ImageData list", label_required=True)
    sample = entries[::math.ceil(len(entries) / MEAN_SAMPLE)]
    channel_means = []
    with quiet_opencv() as cv2:
        for entry in sample:
            decoded = cv2.imread(str(resolve_listed_path(entry, path)), cv2.IMREAD_COLOR)
            if decoded is not None:
                channel_means.append(decoded.reshape(-1, 3).mean(axis=0))
    if not channel_means:
        raise UserError(f"{path}: none of {len(sample)} sampled images decodes; run without "
                        "--skip-image-check to find the bad lines")
    return mean_colour(channel_means), len(channel_means)


def check_labels(name, labels, num_classes):
    bad = sorted({int(label) for label in labels if not 0 <= label < num_classes})
    if bad:
        raise UserError(f"{name}: labels {bad[:10]} are outside 0..{num_classes - 1}; "
                        f"the net has {num_classes} classes (AFEW order, see `emotiw nets --list`)")
    return collections.Counter(labels)


def print_histogram(name, counts, num_classes):
    names = EMOTIONS if num_classes == len(EMOTIONS) else [str(i) for i in range(num_classes)]
    total = sum(counts.values())
    print(f"{name}: {total} images")
    for index, label in enumerate(names):
        share = counts.get(index, 0) / total
        print(f"  {index} {label:<9} {counts.get(index, 0):>7}  {'#' * round(40 * share)}")


def preflight(train, val, num_classes, check_images=True):
    """Checks both sources; returns the training images' mean BGR colour (None for LMDBs)."""
    means = {}
    for name, path in (("train", train), ("val", val)):
        kind = source_type(path)
        if kind == "list":
            labels, means[name] = scan_list(path, check_images)
        elif kind == "hdf5":
            labels, means[name] = [int(label) for label in read_feature_vectors(path)[1]], None
        else:
            labels, means[name] = lmdb_labels(path), None
        print_histogram(f"{name} ({path})", check_labels(name, labels, num_classes), num_classes)
    return means["train"]


def training_mean(net, train, out, mean, train_mean):
    """`mean` (a mean.binaryproto) if given; else the net's released mean values; else (the released
    nets that used a mean file we do not have) the mean colour of the training images, or
    compute_image_mean's mean of a training LMDB."""
    if mean:
        if not Path(mean).is_file():
            raise UserError(f"--mean {mean} not found")
        try:
            read_mean_file(mean)
        except UserError as error:
            raise UserError(f"--mean: {error}; give a mean.binaryproto, e.g. from `emotiw preprocess --lmdb`") from None
        return {"mean_file": str(Path(mean).resolve())}
    if nets.get(net).preprocessing.mean_values or nets.get(net).preprocessing.channels == 0:
        return {}  # feature vectors are standardised instead
    if train_mean is not None:
        print(f"no --mean given and {net} used a mean file: subtracting the training images' "
              f"mean colour (B, G, R) = {train_mean}")
        return {"mean_values": train_mean}
    if source_type(train) == "list":  # --skip-image-check: compute_image_mean only reads LMDBs
        sampled, count = sampled_mean_colour(train)
        print(f"no --mean given and {net} used a mean file: subtracting the mean colour of {count} "
              f"training images, (B, G, R) = {sampled}")
        return {"mean_values": sampled}
    mean_file = Path(out) / "mean.binaryproto"
    if not mean_file.exists():
        run_tool("compute_image_mean", train, mean_file)
    print(f"no --mean given: using the mean image of {train} ({mean_file})")
    return {"mean_file": str(mean_file.resolve())}
