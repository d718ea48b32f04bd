"""The `features` stage: per-clip descriptors beside the CNNs, in files Caffe's HDF5Data reads.

  * kind "audio": each clip's audio track -> openSMILE functionals (emotiw.descriptors.audio),
    from a folder of clips laid out as for `preprocess` (AFEW's `<Emotion>/<clip>`, or flat with
    --labels);
  * kind "lbptop": each clip's aligned face sequence -> LBP-TOP histograms (emotiw.descriptors.lbptop),
    from a preprocess output's per-video list (`OUT/lists/<split>_videos.txt`), every crop gray and
    resized to size x size.

Writes `OUT/<kind>/<split>.h5` (datasets `data`, N x D float32, and `label`, N float32, as Caffe's
HDF5Data layer takes them; NO_LABEL for unlabelled clips), `OUT/<kind>/<split>.txt` (the HDF5Data
source: the .h5 file's path), `OUT/<kind>/<split>_clips.csv` (row, clip, label) and
`OUT/<kind>/features.json` (kind, feature set, dimension, names). A clip without an audio track,
with silence only, or with a face sequence too short for LBP-TOP gets one line in
`OUT/<kind>/<split>_errors.csv` and no row.
"""

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from emotiw.errors import UserError
from emotiw.formats.features import write_feature_file
from emotiw.formats.files import atomic_open, atomic_write_text, inside
from emotiw.inputs import Problem
from emotiw.output import output_folder

KINDS = ("audio", "lbptop")
LBP_SIZE = 64  # face crops are resized to this side for LBP-TOP


@dataclass
class FeaturesResult:
    out: Path  # OUT/<kind>/
    split: str
    features: Path  # the .h5 file
    clips: int  # rows written
    dimension: int
    problems: list = field(default_factory=list)


def features(out, kind, split=None, videos=None, faces=None, labels=None, label_map="afew",
             feature_set="eGeMAPSv02", size=LBP_SIZE) -> FeaturesResult:
    """Descriptors of every clip of one split: `kind` audio (from `videos`, a clip folder) or
    lbptop (from `faces`, a preprocess output folder, its `split`)."""
    if kind not in KINDS:
        raise UserError(f"unknown feature kind {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "audio":
        if videos is None:
            raise UserError("audio features are computed from the clips themselves: give --videos")
        clips, problems, describe, names = _audio_inputs(videos, labels, label_map, split, feature_set)
    else:
        if faces is None or split is None:
            raise UserError("LBP-TOP features are computed from preprocess's face crops: give --faces and --split")
        clips, problems, describe, names = _lbptop_inputs(faces, split, size)
        feature_set = f"LBP-TOP P8 R1 {size}x{size}"
    if not clips:
        raise UserError(f"no clips to describe ({len(problems)} problems)")
    with output_folder(out, "features", inputs=[videos, faces]):
        return _describe_clips(out, kind, clips, problems, describe, names, feature_set)


def _describe_clips(out, kind, clips, problems, describe, names, feature_set):
    from tqdm import tqdm

    split = clips[0][1]
    folder = inside(out, kind)
    rows, values = [], []
    for clip, clip_split, label, source in tqdm(clips, desc=f"{kind} features", unit="clip", disable=None):
        try:
            values.append(describe(source))
        except UserError as error:
            problems.append(Problem(clip_split, clip, str(source), str(error)))
            continue
        rows.append((clip, label))
    if not rows:
        errors = _write_errors(folder, split, problems)
        raise UserError(f"no clip of split {split} gave {kind} features; see {errors}")
    data = np.stack(values).astype(np.float32)
    write_feature_file(folder, split, data, [label for _, label in rows])
    h5 = folder / f"{split}.h5"
    with atomic_open(inside(out, kind, f"{split}_clips.csv"), "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["row", "clip", "label"])
        writer.writerows((row, clip, label) for row, (clip, label) in enumerate(rows))
    atomic_write_text(inside(out, kind, "features.json"), json.dumps(
        {"kind": kind, "feature_set": feature_set, "dimension": int(data.shape[1]), "names": names}, indent=1) + "\n")
    _write_errors(folder, split, problems)
    print(f"{kind} features: {len(rows)} clips x {data.shape[1]} values ({feature_set}) -> {h5}; "
          f"{len(problems)} problems")
    return FeaturesResult(folder, split, h5, len(rows), int(data.shape[1]), problems)


def _audio_inputs(videos, labels, label_map, split, feature_set):
    from emotiw.descriptors.audio import AudioDescriptor
    from emotiw.inputs import discover

    items, problems = discover(Path(videos), labels, label_map, split)
    splits = sorted({item.split for item in items})
    if len(splits) > 1:
        raise UserError(f"{videos} holds several splits ({', '.join(splits)}); describe one split at a time")
    describe = AudioDescriptor(feature_set)
    return [(item.clip, item.split, item.label, item.source) for item in items], problems, describe, describe.names


def _lbptop_inputs(faces, split, size):
    from emotiw.descriptors.lbptop import lbp_top
    from emotiw.formats.lists import labels_or_unlabelled, read_list, resolve_listed_path

    video_list = Path(faces) / "lists" / f"{split}_videos.txt"
    entries, labels = read_list(video_list)
    clips = [(Path(entry).name, split, label, resolve_listed_path(entry, video_list))
             for entry, label in zip(entries, labels_or_unlabelled(labels, len(entries)))]

    def describe(folder):
        return lbp_top(face_volume(folder, size))

    return clips, [], describe, None


def face_volume(folder, size=LBP_SIZE):
    """A clip's face crops, gray and resized to size x size, as a T x size x size uint8 volume."""
    import cv2

    from emotiw.formats.lists import list_frames

    frames = list_frames(folder) if Path(folder).is_dir() else []
    if not frames:
        raise UserError(f"{folder}: no face crops")
    images = []
    for path in frames:
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise UserError(f"{path}: not an image OpenCV can read")
        images.append(cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA))
    return np.stack(images)


def _write_errors(folder, split, problems):
    path = folder / f"{split}_errors.csv"
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["split", "clip", "source", "message"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(asdict(problem) for problem in problems)
    return path
