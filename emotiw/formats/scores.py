"""Per-clip score files: read and write the EmotiW score format, .mat exports and predictions.csv.

A score file holds one row of class scores per clip, in the order of a video list. Three formats:
- EmotiW txt: N rows of C space-separated numbers, no header (SSE's submitted files; DSN's
  test_video.py writes the same with a trailing space).
- .mat: a 2-D variable with one row per clip (leveldb2mat's `feats` / `video_feats`).
- predictions.csv: clip,label,prediction,<one column per class in EMOTIONS order>,n_frames,fallback.
"""

import csv
import io
import math
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from emotiw import EMOTIONS
from emotiw.errors import UserError
from emotiw.formats.files import atomic_open, atomic_write_text, current_umask, replace_dir
from emotiw.formats.lists import NO_LABEL, labels_or_unlabelled, parse_list_label
from emotiw.formats.mat import load_mat
from emotiw.metrics import compact_json, plot_confusion

PREDICTION_COLUMNS = ("clip", "label", "prediction", *EMOTIONS, "n_frames", "fallback")


@dataclass
class ScoreTable:
    """Scores of one model: row i belongs to clip i. `clips`/`labels` are None when the file has none."""

    clips: list[str] | None
    scores: np.ndarray
    labels: np.ndarray | None = None
    path: Path | None = None

    def __len__(self):
        return len(self.scores)


def clip_stem(clip):
    """`/data/Face/Val/000029320` and `000029320.avi` both name clip `000029320`."""
    return Path(str(clip).rstrip("/")).stem


def read_scores(path, variable=None, num_classes=len(EMOTIONS)):
    """Reads a score file of any supported format; `variable` picks the .mat variable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: score file not found")
    suffix = path.suffix.lower()
    if suffix == ".mat":
        table = _read_mat(path, variable, num_classes)
    elif variable is not None:
        raise UserError(f"{path}: a variable name ({variable}) only applies to .mat files")
    elif suffix == ".csv":
        table = _read_predictions_csv(path, num_classes)
    else:
        table = ScoreTable(clips=None, scores=_read_txt(path, num_classes), path=path)
    if len(table) == 0:
        raise UserError(f"{path}: the file holds no scores")
    return table


def _parse_row(path, where, tokens, num_classes):
    """Numbers of one row, or a UserError naming the file, the row (`where`) and what is wrong."""
    if len(tokens) != num_classes:
        raise UserError(f"{path}: {where}: expected {num_classes} scores, found {len(tokens)}")
    values = []
    for column, token in enumerate(tokens, start=1):
        try:
            value = float(token)
        except ValueError:
            raise UserError(f"{path}: {where}, column {column}: {token!r} is not a number") from None
        if not math.isfinite(value):
            raise UserError(f"{path}: {where}, column {column}: {token} is not a finite number")
        values.append(value)
    return values


def _read_text(path):
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: byte {error.start + 1} is not UTF-8 text; is this a score file?") from None


def _read_txt(path, num_classes):
    lines = _read_text(path).splitlines()
    while lines and not lines[-1].strip():
        lines.pop()  # a final blank line is harmless; blank lines inside are rows with 0 scores
    rows = [_parse_row(path, f"row {number}", line.split(), num_classes)
            for number, line in enumerate(lines, start=1)]
    return np.array(rows, dtype=np.float64).reshape(len(rows), num_classes)


def _read_predictions_csv(path, num_classes):
    if num_classes != len(EMOTIONS):
        raise UserError(f"{path}: predictions.csv holds {len(EMOTIONS)} classes, not {num_classes}")
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    try:
        missing = [name for name in ("clip", *EMOTIONS) if name not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{path}: not a predictions.csv: missing column(s) {', '.join(missing)}")
        clips, labels, rows = [], [], []
        for row_number, record in enumerate(reader, start=1):
            where = f"row {row_number} (line {reader.line_num})"
            rows.append(_parse_row(path, where, [record[name] or "" for name in EMOTIONS], num_classes))
            if not record["clip"]:
                raise UserError(f"{path}: {where}: the clip name is empty")
            clips.append(record["clip"])
            labels.append(parse_list_label(path, where, record.get("label") or ""))
    except csv.Error as error:
        raise UserError(f"{path}: line {reader.line_num}: not valid CSV ({error})") from None
    scores = np.array(rows, dtype=np.float64).reshape(len(rows), num_classes)
    label_array = np.array(labels, dtype=np.int64)
    has_labels = bool(np.any(label_array != NO_LABEL))
    return ScoreTable(clips=clips, scores=scores, labels=label_array if has_labels else None, path=path)


def _is_numeric_matrix(value):
    return isinstance(value, np.ndarray) and value.dtype.kind in "iuf" and value.ndim == 2


def _read_mat(path, variable, num_classes):
    variables = {name: value for name, value in load_mat(path).items() if not name.startswith("__")}
    listing = ", ".join(f"{name} {getattr(value, 'shape', '?')}" for name, value in variables.items())
    if variable is None:
        candidates = [name for name, value in variables.items()
                      if _is_numeric_matrix(value) and value.shape[1] == num_classes]
        if len(candidates) != 1:
            raise UserError(f"{path}: {'several' if candidates else 'no'} 2-D variables with {num_classes} "
                            f"columns; name one as FILE.mat:VARIABLE (variables: {listing or 'none'})")
        variable = candidates[0]
    if variable not in variables:
        raise UserError(f"{path}: no variable {variable!r} (variables: {listing or 'none'})")
    value = variables[variable]
    if not _is_numeric_matrix(value):
        raise UserError(f"{path}: variable {variable!r} is not a 2-D numeric matrix ({listing})")
    rows = value.astype(np.float64)
    if rows.shape[1] != num_classes:
        raise UserError(f"{path}: variable {variable!r} has {rows.shape[1]} columns, expected {num_classes}")
    bad = np.argwhere(~np.isfinite(rows))
    if len(bad):
        row, column = bad[0] + 1
        raise UserError(f"{path}: variable {variable!r} row {row}, column {column}: "
                        f"{rows[row - 1, column - 1]} is not a finite number")
    clips, labels = _mat_video_names(path, variables, variable, len(rows))
    return ScoreTable(clips=clips, scores=rows, labels=labels, path=path)


def _mat_video_names(path, variables, variable, num_rows):
    """leveldb2mat --videos stores `video_names` and `video_labels` beside `video_feats`."""
    if variable != "video_feats" or "video_names" not in variables:
        return None, None
    names = _mat_strings(variables["video_names"])
    if len(names) != num_rows:
        raise UserError(f"{path}: video_names has {len(names)} entries but video_feats has {num_rows} rows")
    labels = variables.get("video_labels")
    if labels is not None:
        labels = np.asarray(labels).ravel()
        if len(labels) != num_rows:
            raise UserError(f"{path}: video_labels has {len(labels)} entries but video_feats has {num_rows} rows")
        valid = labels.dtype.kind in "iuf" and bool(np.all(np.isin(labels, [NO_LABEL, *range(len(EMOTIONS))])))
        if not valid:
            raise UserError(f"{path}: video_labels must be class indices 0..{len(EMOTIONS) - 1} "
                            f"or {NO_LABEL} (no label)")
        labels = labels.astype(np.int64)
    return names, labels


def _mat_strings(value):
    """MATLAB strings come back as a padded char matrix or as a cell array of 1-element arrays."""
    value = np.asarray(value)
    if value.dtype.kind == "U":
        return [str(item).rstrip() for item in value.ravel()]
    return [str(np.asarray(item).ravel()[0]).rstrip() if np.size(item) else "" for item in value.ravel()]


def format_score(value):
    return f"{value:.6g}"


def write_scores_txt(path, scores):
    """EmotiW score format: one row per clip, values separated by single spaces, no header."""
    scores = np.asarray(scores, dtype=np.float64)
    with atomic_open(path, "w") as handle:
        for row in scores:
            handle.write(" ".join(format_score(value) for value in row) + "\n")


def write_predictions_csv(path, clips, labels, scores, n_frames=None, fallback=None):
    """One row per clip: label (-1 when unknown), argmax prediction, the class scores, frame count, flag."""
    scores = np.asarray(scores, dtype=np.float64)
    count = len(scores)
    labels = labels_or_unlabelled(labels, count)
    n_frames = [""] * count if n_frames is None else [int(n) for n in n_frames]
    fallback = [""] * count if fallback is None else [int(bool(flag)) for flag in fallback]
    if not len(clips) == len(labels) == len(n_frames) == len(fallback) == count:
        raise ValueError("clips, labels, scores, n_frames and fallback must have one entry per clip")
    predictions = scores.argmax(axis=1)
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(PREDICTION_COLUMNS)
        for index in range(count):
            writer.writerow([clips[index], labels[index], int(predictions[index]),
                             *(format_score(value) for value in scores[index]),
                             n_frames[index], fallback[index]])


def write_clip_outputs(out_dir, clips, labels, scores, metrics, config, n_frames=None, fallback=None):
    """The per-clip files every scoring run writes: scores.txt, predictions.csv, metrics.json and,
    with labels, confusion.png; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "scores.txt", out_dir / "predictions.csv", out_dir / "metrics.json"]
    write_scores_txt(files[0], scores)
    write_predictions_csv(files[1], clips, labels, scores, n_frames=n_frames, fallback=fallback)
    atomic_write_text(files[2], compact_json({**metrics, "config": config}))
    if metrics.get("confusion_matrix") is not None:
        files.append(out_dir / "confusion.png")
        plot_confusion(metrics["confusion_matrix"], files[-1],
                       f"{config['net_name']}: accuracy {metrics['accuracy']:.4f}")
    return files


@dataclass
class TestResult:
    """What a scoring run (`test`, `score_features`) wrote and measured: metrics.json's content and
    the output files."""
    out: Path
    metrics: dict
    files: list = field(default_factory=list)

    @property
    def accuracy(self):
        return self.metrics["accuracy"]

    @property
    def clips(self):
        """predictions.csv (one row per clip: label, prediction, the 7 scores) as a pandas DataFrame."""
        import pandas as pd

        return pd.read_csv(self.out / "predictions.csv")

    @property
    def frames(self):
        """frames.csv (one row per face frame: its probabilities) as a pandas DataFrame."""
        import pandas as pd

        return pd.read_csv(self.out / "frames.csv")


def _usable_stem(stem):
    """`<stem>.txt` can be created: a non-empty stem, no NUL, encodable, at most 255 bytes in all."""
    try:
        encoded = os.fsencode(f"{stem}.txt")
    except UnicodeEncodeError:
        return False
    return bool(stem) and b"\0" not in encoded and len(encoded) <= 255


def write_submission(directory, clips, predicted_indices):
    """EmotiW submission folder: one `<clip stem>.txt` per clip holding the predicted class name.

    The folder is built beside the target and swapped in, so it never mixes two runs' files.
    """
    directory = Path(directory)
    stems = [clip_stem(clip) for clip in clips]
    duplicates = sorted(stem for stem, count in Counter(stems).items() if count > 1)
    if duplicates:
        raise UserError(f"clip names must be unique for a submission folder; repeated: {', '.join(duplicates[:5])}")
    unusable = [stem for stem in stems if not _usable_stem(stem)]
    if unusable:
        raise UserError(f"clip name {unusable[0]!r} cannot name a submission file (empty, with a NUL or "
                        "an unencodable character, or longer than 255 bytes); fix the clip names")
    if len(stems) != len(predicted_indices):
        raise ValueError("one predicted class per clip is needed")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        for stem, index in zip(stems, predicted_indices):
            (staging / f"{stem}.txt").write_text(EMOTIONS[int(index)])
        os.chmod(staging, 0o777 & ~current_umask())
        replace_dir(staging, directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
