"""What preprocessing reads: the clips (or images) of an input folder, their splits and labels.

Input layouts: AFEW-style folders (`DIR/<Emotion>/<clip>`, the emotion from the folder name) or a
flat folder with a label file (`clip,label` CSV, or RAF-DB's `list_patition_label.txt`:
`train_00001.jpg 5`). Unlabelled items get label -1 in the manifest and 0 in Caffe lists.
"""

from dataclasses import dataclass
from pathlib import Path

from emotiw.formats.lists import NO_LABEL, item_key, parse_label, read_label_file


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
            label = NO_LABEL if label_text is None else parse_label(label_text, label_map)
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
