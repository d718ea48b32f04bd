"""Inputs and Caffe-facing outputs of preprocessing: labels, input layouts, ImageData lists, LMDB.

Input layouts: AFEW-style folders (`DIR/<Emotion>/<clip>`, the emotion from the folder name) or a
flat folder with a label file (`clip,label` CSV, or RAF-DB's `list_patition_label.txt`:
`train_00001.jpg 5`). Unlabelled items get label -1 in the manifest and 0 in Caffe lists.
"""

import hashlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emotiw import EMOTIONS
from emotiw.caffe_env import caffe_tool
from emotiw.errors import UserError
from emotiw.fileio import atomic_open, replace_dir

UNLABELLED = -1
# RAF-DB basic numbers its classes 1..7 in this order.
RAFDB_CLASSES = ("Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral")
# Other spellings of the AFEW class names (RAF-DB's among them), lower case.
ALIASES = {"anger": "Angry", "happiness": "Happy", "sadness": "Sad", "surprised": "Surprise",
           "disgusted": "Disgust", "fearful": "Fear"}
LABEL_MAPS = ("afew", "rafdb", "none")
LMDB_SHUFFLE_SEED = 0


@dataclass(frozen=True)
class Item:
    """One clip (or one still image) to preprocess."""
    clip: str  # unique within its split; names the output folder
    split: str
    label: int
    source: Path


@dataclass(frozen=True)
class Problem:
    """An input that cannot be processed, for errors.csv."""
    split: str
    clip: str
    source: str
    message: str


def emotion_index(name):
    """The AFEW index of an emotion name (case-insensitive, common variants accepted), or None."""
    lowered = name.strip().lower()
    lowered = ALIASES.get(lowered, lowered).lower()
    for index, emotion in enumerate(EMOTIONS):
        if emotion.lower() == lowered:
            return index
    return None


def parse_label(text, label_map="afew"):
    """A label as our 0..6 index (AFEW order). Raises ValueError with a readable message.

    afew: a name or 0..6 in AFEW order; rafdb: a name or 1..7 in RAF-DB order; none: a name, or any
    non-negative integer kept as it is (other class sets).
    """
    text = text.strip()
    if not re.fullmatch(r"-?\d+", text):
        index = emotion_index(text)
        if index is None:
            raise ValueError(f"unknown label {text!r}; expected one of {', '.join(EMOTIONS)}")
        return index
    number = int(text)
    if label_map == "rafdb":
        if not 1 <= number <= len(RAFDB_CLASSES):
            raise ValueError(f"RAF-DB label {number} is not in 1..7")
        return emotion_index(RAFDB_CLASSES[number - 1])
    if label_map == "afew" and not 0 <= number < len(EMOTIONS):
        raise ValueError(f"label {number} is not in 0..6 (AFEW order: {', '.join(EMOTIONS)})")
    if number < 0:
        raise ValueError(f"label {number} is negative")
    return number


def item_key(name):
    """What an item is called in a label file: the file stem, without RAF-DB's `_aligned` suffix
    (so the labels of `train_00001.jpg` apply to `train_00001_aligned.jpg`)."""
    stem = Path(name).stem
    return stem[: -len("_aligned")] if stem.endswith("_aligned") else stem


def read_label_file(path):
    """{item key: label text} from a `clip,label` CSV or a whitespace-separated list; a header
    line (`clip,label`) is skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"label file {path} does not exist; give --labels a CSV `clip,label` or "
                        f"RAF-DB's list_patition_label.txt")
    labels = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = [f for f in re.split(r"[,\s]+", line.strip()) if f]
        if not fields:
            continue
        if len(fields) != 2:
            raise UserError(f"{path}:{number}: expected `clip,label`, got {line!r}")
        if number == 1 and fields[1].lower() == "label":
            continue
        labels[item_key(fields[0])] = fields[1]
    return labels


def _visible_files(folder, skip=()):
    """Regular, non-hidden files of `folder`, sorted; `skip`: resolved paths to leave out."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.resolve() not in skip)


def _split_of(source, root, split, rafdb_prefix):
    if split:
        return split
    if rafdb_prefix:  # RAF-DB names say the split: train_00001.jpg, test_0001.jpg
        return item_key(source.name).split("_", 1)[0].lower()
    return root.name.lower()


def discover(root, labels_file=None, label_map="afew", split=None, rafdb_prefix=False):
    """The items under `root` and the Problems found. Items come sorted by split then clip.

    Without a label file and with sub-folders, the layout is AFEW's (`root/<Emotion>/<clip>`);
    otherwise a flat folder, labelled by the label file or unlabelled. The split is `split`, else
    (with `rafdb_prefix`) each file name's prefix, else the lower-cased name of `root`.
    """
    root = Path(root)
    if not root.is_dir():
        return [], [Problem(split or "", "", str(root), "missing directory: no such folder")]
    candidates = []  # (source, label text or None)
    problems = []
    if labels_file:
        labels = read_label_file(labels_file)
        found = set()
        for source in _visible_files(root, skip={Path(labels_file).resolve()}):
            key = item_key(source.name)
            if key in labels:
                found.add(key)
                candidates.append((source, labels[key]))
            else:
                problems.append(Problem(_split_of(source, root, split, rafdb_prefix), key, str(source),
                                        f"no label in {labels_file}"))
        for key in sorted(set(labels) - found):
            problems.append(Problem(split or root.name.lower(), key, str(root / key),
                                    f"listed in {labels_file} but no such file in {root}"))
    else:
        candidates += [(source, None) for source in _visible_files(root)]
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            candidates += [(source, folder.name) for source in _visible_files(folder)]
    items, seen = [], set()
    for source, label_text in candidates:
        item_split, clip = _split_of(source, root, split, rafdb_prefix), item_key(source.name)
        try:
            label = UNLABELLED if label_text is None else parse_label(label_text, label_map)
        except ValueError as error:
            problems.append(Problem(item_split, clip, str(source), str(error)))
            continue
        if (item_split, clip) in seen:
            problems.append(Problem(item_split, clip, str(source),
                                    f"duplicate clip name {clip!r} in split {item_split!r}"))
            continue
        seen.add((item_split, clip))
        items.append(Item(clip, item_split, label, source))
    return sorted(items, key=lambda i: (i.split, i.clip)), problems


def caffe_label(label):
    """Caffe lists need an int: unlabelled items get 0."""
    return max(label, 0)


def write_lists(out_dir, rows):
    """`lists/<split>.txt` (`<crop> <label>` per face frame) and `lists/<split>_videos.txt`
    (`<clip frame folder> <label>` per clip with at least one face), absolute paths.

    `rows`: manifest rows (dicts) sorted by split, clip, frame. Returns {split: list path}.
    """
    out_dir = Path(out_dir).resolve()
    frames, videos = {}, {}
    for row in rows:
        if not row["crop"]:
            continue
        crop = out_dir / row["crop"]
        label = caffe_label(int(row["label"]))
        frames.setdefault(row["split"], []).append(f"{crop} {label}\n")
        videos.setdefault(row["split"], {})[str(crop.parent)] = label
    paths = {}
    for split, lines in frames.items():
        paths[split] = out_dir / "lists" / f"{split}.txt"
        with atomic_open(paths[split]) as handle:
            handle.writelines(lines)
        with atomic_open(out_dir / "lists" / f"{split}_videos.txt") as handle:
            handle.writelines(f"{folder} {label}\n" for folder, label in videos[split].items())
    return paths


def _run_tool(command):
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise UserError(f"{Path(command[0]).name} failed (exit {result.returncode}): {' | '.join(tail)}")


def lmdb_order(lines, split):
    """Training LMDBs are read in order by Caffe's Data layer, which never shuffles: shuffle
    training lists with a fixed seed (convert_imageset's own --shuffle is seeded from the clock).
    Other splits keep the list order, so results map back to frames."""
    if not split.startswith("train"):
        return list(lines)
    order = np.random.default_rng(LMDB_SHUFFLE_SEED).permutation(len(lines))
    return [lines[i] for i in order]


def build_lmdb(list_path, out_dir, split, gray=False):
    """`lmdb/<split>_lmdb` with Caffe's convert_imageset and `lmdb/<split>_mean.binaryproto` with
    compute_image_mean. Both are rebuilt only when the list (or --gray) changed."""
    lmdb_dir = Path(out_dir) / "lmdb"
    lmdb_dir.mkdir(parents=True, exist_ok=True)
    target = lmdb_dir / f"{split}_lmdb"
    mean = lmdb_dir / f"{split}_mean.binaryproto"
    lines = lmdb_order(Path(list_path).read_text().splitlines(keepends=True), split)
    stamp = hashlib.sha256(f"gray={gray}\n{''.join(lines)}".encode()).hexdigest()
    stamp_path = lmdb_dir / f".{split}_lmdb.sha256"
    if target.is_dir() and mean.is_file() and stamp_path.is_file() and stamp_path.read_text() == stamp:
        return target, mean
    with tempfile.TemporaryDirectory(prefix=f".{split}_lmdb.", dir=lmdb_dir) as work:
        work = Path(work)
        (work / "list.txt").write_text("".join(lines))
        db = work / "db"
        # The list holds absolute paths, so the root folder is empty.
        _run_tool([caffe_tool("convert_imageset"), "--backend=lmdb", f"--gray={str(gray).lower()}",
                   "", str(work / "list.txt"), str(db)])
        _run_tool([caffe_tool("compute_image_mean"), "--backend=lmdb", str(db), str(work / "mean.binaryproto")])
        os.replace(work / "mean.binaryproto", mean)
        replace_dir(db, target)
    with atomic_open(stamp_path) as handle:
        handle.write(stamp)
    return target, mean
