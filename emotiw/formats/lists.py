"""List files and labels: the one reader and writer of every `<path or clip> <label>` list.

Three kinds of list share one format, one line per entry, the label last, separated by spaces or
tabs (the path may hold spaces):
- ImageData lists (`lists/<split>.txt`): `<image> <label>` per face frame, what Caffe reads;
- video lists (`lists/<split>_videos.txt`): `<clip frame folder> <label>` per clip;
- clip lists of score files: `<clip name> [<label>]`.
A label is a class index in AFEW order (EMOTIONS), a class name, or NO_LABEL (-1, or no label at
all). Caffe's ImageData needs an integer on every line, so unlabelled frames get 0 there only.

A relative path in a list is looked up beside the list file first (lists that travel with their
data), then in the working directory (Caffe's rule).

Label files for preprocessing (`--labels`) are a different format: `clip,label` CSV or RAF-DB's
`list_patition_label.txt`, with label maps for other class orders.
"""

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emotiw import EMOTIONS, NO_LABEL
from emotiw.errors import UserError
from emotiw.formats.files import atomic_open

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
# RAF-DB basic numbers its classes 1..7 in this order.
RAFDB_CLASSES = ("Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral")
# Other spellings of the AFEW class names (RAF-DB's among them), lower case.
ALIASES = {"anger": "Angry", "happiness": "Happy", "sadness": "Sad", "surprised": "Surprise",
           "disgusted": "Disgust", "fearful": "Fear"}
LABEL_MAPS = ("afew", "rafdb", "none")


# ------------------------------------------------------------------------------------------
# Labels

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
    if not re.fullmatch(r"-?[0-9]+", text):  # ASCII digits only: int() takes other scripts' too
        index = emotion_index(text)
        if index is None:
            raise ValueError(f"unknown label {text!r}; expected one of {', '.join(EMOTIONS)}")
        return index
    if len(text.lstrip("-")) > 9:  # Caffe's labels are 32-bit ints
        raise ValueError(f"label {text[:12]}{'...' if len(text) > 12 else ''} is too large for a class number")
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


def parse_list_label(path, where, token):
    """A list's or score file's label: a class index, a class name, or empty / -1 for NO_LABEL."""
    token = token.strip()
    if token in ("", str(NO_LABEL)):
        return NO_LABEL
    try:
        return parse_label(token)
    except ValueError:
        raise UserError(f"{path}: {where}: label {token!r} is not a class index 0..{len(EMOTIONS) - 1}, "
                        f"a class name ({', '.join(EMOTIONS)}) or -1") from None


def caffe_label(label):
    """Caffe lists need an int: unlabelled items get 0."""
    return max(int(label), 0)


def has_labels(labels):
    return labels is not None and bool(np.any(np.asarray(labels) != NO_LABEL))


def labels_or_unlabelled(labels, count):
    """`labels` as a list of ints, or NO_LABEL for each of `count` items when there are none (None)."""
    return [NO_LABEL] * count if labels is None else [int(label) for label in labels]


# ------------------------------------------------------------------------------------------
# Reading lists

def _split_line(path, number, line, label_required):
    """`entry label` when the last field is an integer or a class name; otherwise the line is the entry."""
    parts = line.rsplit(None, 1)
    numbered = len(parts) == 2 and re.fullmatch(r"-?[0-9]+", parts[1]) is not None
    if label_required:  # Caffe's ImageData reads an integer
        if not numbered:
            raise UserError(f"{path}:{number}: expected `<image path> <integer label>`, got {line!r}")
        if len(parts[1]) > 10 or not -2**31 <= int(parts[1]) < 2**31:
            raise UserError(f"{path}:{number}: label {parts[1]} does not fit Caffe's 32-bit int")
        return parts[0], int(parts[1])
    if numbered or (len(parts) == 2 and parts[1].lower() in {name.lower() for name in EMOTIONS}):
        return parts[0], parse_list_label(path, f"line {number}", parts[1])
    return line, NO_LABEL


def read_list(path, what="video list", label_required=False):
    """Entries and labels of a list file.

    Returns (entries, labels): labels is an int array with NO_LABEL where a line has none, or None
    when no line has one. `label_required` (ImageData lists) refuses a line without an integer label.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    entries, labels = [], []
    # a BOM (Windows editors) is no part of the first path; bytes that are not UTF-8 stay the
    # file-name bytes they were
    text = path.read_text(encoding="utf-8-sig", errors="surrogateescape")
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        entry, label = _split_line(path, number, line, label_required)
        entries.append(entry)
        labels.append(label)
    if not entries:
        raise UserError(f"{path}: the {what} is empty")
    label_array = np.array(labels, dtype=np.int64)
    return entries, (label_array if label_required or has_labels(label_array) else None)


def resolve_listed_path(entry, list_path):
    """A path from a list file: absolute as is; a relative one beside the list file when it is
    there, else in the working directory."""
    path = Path(entry).expanduser()
    if path.is_absolute():
        return path
    beside = Path(list_path).resolve().parent / path
    return beside if beside.exists() else Path.cwd() / path


def read_paths(path, what="frame list", label_required=False):
    """(resolved paths, labels as a list with NO_LABEL where absent) of a list file."""
    entries, labels = read_list(path, what, label_required)
    return [resolve_listed_path(entry, path) for entry in entries], labels_or_unlabelled(labels, len(entries))


def list_frames(folder):
    """The face frames of a clip folder: its visible image files, sorted by name."""
    return sorted(path for path in Path(folder).iterdir()
                  if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file())


@dataclass
class Clip:
    """One line of a video list: the clip folder as written, its label, its face frames."""
    entry: str        # the clip as written in the list
    label: int        # NO_LABEL when the list has none
    frames: list      # image paths, sorted
    problem: str = ""  # "missing" or "empty" when the folder gives no frame


def read_clips(video_list):
    """The clips of a video list, with their frames; missing or empty folders are kept and flagged."""
    entries, labels = read_list(video_list)
    clips = []
    for entry, label in zip(entries, labels_or_unlabelled(labels, len(entries))):
        folder = resolve_listed_path(entry, video_list)
        frames = list_frames(folder) if folder.is_dir() else []
        problem = "" if frames else ("empty" if folder.is_dir() else "missing")
        clips.append(Clip(entry=entry, label=label, frames=frames, problem=problem))
    return clips


def source_type(path):
    """What a training or scoring source is: an ImageData list (a text file of images), an LMDB (a
    directory with data.mdb) or HDF5 features (a text file listing .h5 files, as `emotiw features`
    writes it)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "data.mdb").exists():
            raise UserError(f"{path} is a directory but not an LMDB (no data.mdb); pass a list file or an LMDB")
        return "lmdb"
    if not path.is_file():
        raise UserError(f"{path} not found; pass an ImageData list file (`<image> <label>` per line) or an LMDB")
    with open(path, errors="replace") as handle:
        first = next((line.strip() for line in handle if line.strip()), "")
    return "hdf5" if first.lower().endswith((".h5", ".hdf5")) else "list"


# ------------------------------------------------------------------------------------------
# Writing lists

def write_list(path, entries, labels):
    """A list file, `<entry> <label>` per line, labels as Caffe takes them (NO_LABEL becomes 0)."""
    with atomic_open(path) as handle:
        handle.writelines(f"{entry} {caffe_label(label)}\n" for entry, label in zip(entries, labels))


def write_lists(out_dir, rows):
    """`lists/<split>.txt` (`<crop> <label>` per face frame) and `lists/<split>_videos.txt`
    (`<clip frame folder> <label>` per clip with at least one face), absolute paths. Only the frame
    list is Caffe's (unlabelled frames get 0); the per-video list keeps NO_LABEL, so that `test`
    does not score unlabelled clips as Angry.

    `rows`: manifest rows (dicts) sorted by split, clip, frame. Returns {split: list path}.
    """
    out_dir = Path(out_dir).resolve()
    frames, videos = {}, {}
    for row in rows:
        if not row["crop"]:
            continue
        crop = out_dir / row["crop"]
        frames.setdefault(row["split"], []).append((crop, int(row["label"])))
        videos.setdefault(row["split"], {})[str(crop.parent)] = int(row["label"])
    paths = {}
    for split, pairs in frames.items():
        paths[split] = out_dir / "lists" / f"{split}.txt"
        write_list(paths[split], *zip(*pairs))
        with atomic_open(out_dir / "lists" / f"{split}_videos.txt") as handle:
            handle.writelines(f"{folder} {label}\n" for folder, label in videos[split].items())
    return paths


# ------------------------------------------------------------------------------------------
# Label files of preprocessing

def item_key(name):
    """What an item is called in a label file: the file stem, without RAF-DB's `_aligned` suffix
    (so the labels of `train_00001.jpg` apply to `train_00001_aligned.jpg`)."""
    stem = Path(name).stem
    return stem[: -len("_aligned")] if stem.endswith("_aligned") else stem


def _label_rows(path, text):
    """(line number, fields) of a label file: CSV when it has a comma (quoted names may hold commas
    and spaces, as spreadsheets write them), else whitespace-separated fields (RAF-DB's list)."""
    if "," not in text:
        yield from ((number, line.split()) for number, line in enumerate(text.splitlines(), 1))
        return
    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True)
    try:
        for row in reader:
            fields = [field.strip() for field in row]
            while fields and not fields[-1]:  # trailing commas, as spreadsheets export empty columns
                fields.pop()
            yield reader.line_num, fields
    except csv.Error as error:
        raise UserError(f"{path}:{reader.line_num}: not a readable CSV line ({error}); "
                        f"write `clip,label` lines, quoting a name that holds a comma") from None


def read_label_file(path):
    """{item key: label text} from a `clip,label` CSV or a whitespace-separated list; a header
    line (`clip,label`) is skipped, a UTF-8 BOM ignored; a clip listed twice must have one label."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"label file {path} does not exist; give --labels a CSV `clip,label` or "
                        f"RAF-DB's list_patition_label.txt")
    try:
        # spreadsheets save CSV with a BOM; newline="": a quoted name keeps its line breaks as they are
        with open(path, encoding="utf-8-sig", newline="") as handle:
            text = handle.read()
    except UnicodeDecodeError as error:
        raise UserError(f"label file {path} is not UTF-8 text (byte {error.object[error.start]:#04x} at "
                        f"offset {error.start}); save it as UTF-8") from None
    labels, lines = {}, {}
    rows = ((number, fields) for number, fields in _label_rows(path, text) if fields)  # no blank lines
    for index, (number, fields) in enumerate(rows):
        if len(fields) != 2:
            raise UserError(f"{path}:{number}: expected `clip,label` or `clip label`, got {len(fields)} fields "
                            f"{fields!r}; quote a clip name that holds a comma")
        if index == 0 and fields[1].lower() == "label":  # the header
            continue
        key = item_key(fields[0])
        if not key:
            raise UserError(f"{path}:{number}: {fields[0]!r} is not a clip or file name")
        if labels.setdefault(key, fields[1]) != fields[1]:
            raise UserError(f"{path}:{number}: {key!r} is labelled {fields[1]!r} here but {labels[key]!r} on line "
                            f"{lines[key]}; keep one label per clip")
        lines.setdefault(key, number)
    return labels
