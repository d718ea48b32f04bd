"""What preprocessing reads: the clips (or images) of an input folder, their splits and labels.

Input layouts: AFEW-style folders (`DIR/<Emotion>/<clip>`, the emotion from the folder name) or a
flat folder with a label file (`clip,label` CSV, or RAF-DB's `list_patition_label.txt`:
`train_00001.jpg 5`). Unlabelled items get label -1 in the manifest and 0 in Caffe lists.

Splits and clips name folders and files in the output folder, so a split name is letters, digits,
`_` and `-` only (anything else is refused), and a clip name is the file stem with every other
character than those and `.` replaced by `_` (two clips that then share a name are reported).
"""

import re
from dataclasses import dataclass
from pathlib import Path

from emotiw.errors import UserError
from emotiw.formats.files import safe_name
from emotiw.formats.lists import NO_LABEL, item_key, parse_label, read_label_file

SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")
MAX_CLIP_NAME = 200  # file names hold 255 bytes, and the clip's temporary files add up to 20 to it


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


def _visible_files(folder, skip=()):
    """Regular, non-hidden files of `folder`, sorted; `skip`: resolved paths to leave out."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.resolve() not in skip)


def folder_split(root):
    """The split named by the input folder: its real name (`.` and `..` resolved) in lower case."""
    name = root.resolve().name.lower()
    if not SPLIT_NAME.fullmatch(name):
        raise UserError(f"the input folder {root}'s name {name!r} cannot name a split (letters, digits, _ and - "
                        f"only); give --split NAME")
    return name


def discover(root, labels_file=None, label_map="afew", split=None, rafdb_prefix=False):
    """The items under `root` and the Problems found. Items come sorted by split then clip.

    Without a label file and with sub-folders, the layout is AFEW's (`root/<Emotion>/<clip>`);
    otherwise a flat folder, labelled by the label file or unlabelled. The split is `split`, else
    (with `rafdb_prefix`) each file name's prefix, else the lower-cased real name of `root`.
    UserError for a missing folder, a split that is no plain name, an unreadable label file.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"input folder {root} {'is not a folder' if root.exists() else 'does not exist'}; "
                        f"give --videos or --images the folder of your clips or images")
    if split is not None and not SPLIT_NAME.fullmatch(split):
        raise UserError(f"--split {split!r} cannot name a split: use letters, digits, _ and - only "
                        f"(it names folders and lists in the output folder)")
    default_split = split or (None if rafdb_prefix else folder_split(root))

    def split_of(key):  # RAF-DB names say the split: train_00001.jpg, test_0001.jpg
        return default_split or key.split("_", 1)[0].lower()

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
                problems.append(Problem(split_of(key), key, str(source), f"no label in {labels_file}"))
        for key in sorted(set(labels) - found):
            problems.append(Problem(split_of(key), key, str(root / key),
                                    f"listed in {labels_file} but no such file in {root}"))
    else:
        candidates += [(source, None) for source in _visible_files(root)]
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            candidates += [(source, folder.name) for source in _visible_files(folder)]
    items, seen = [], {}  # (split, clip) -> the first source of that name
    for source, label_text in candidates:
        key = item_key(source.name)
        item_split, clip = split_of(key), safe_name(key)
        if not SPLIT_NAME.fullmatch(item_split):
            problems.append(Problem(item_split, clip, str(source), "the file name does not start with a split "
                                    "name and `_` (train_00001.jpg); rename it or give --split NAME"))
            continue
        if not clip or len(clip) > MAX_CLIP_NAME:  # `_aligned.jpg` leaves nothing to call the clip
            problems.append(Problem(item_split, clip[:MAX_CLIP_NAME], str(source),
                                    f"the file name leaves no clip name of 1 to {MAX_CLIP_NAME} characters; rename it"))
            continue
        try:
            label = NO_LABEL if label_text is None else parse_label(label_text, label_map)
        except ValueError as error:
            problems.append(Problem(item_split, clip, str(source), str(error)))
            continue
        if (item_split, clip) in seen:
            problems.append(Problem(item_split, clip, str(source),
                                    f"duplicate clip name {clip!r} in split {item_split!r}, taken by "
                                    f"{seen[item_split, clip]} (clip names keep letters, digits and _.- only)"))
            continue
        seen[item_split, clip] = source
        items.append(Item(clip, item_split, label, source))
    return sorted(items, key=lambda i: (i.split, i.clip)), problems
