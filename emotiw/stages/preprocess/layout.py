"""The output folder of `preprocess`: where each clip's parts go, and the merged files made from them.

Per clip: `OUT/faces/<split>/<clip>/` (the crops), `OUT/detections/<split>/<clip>.csv` (every face
found), `OUT/clips/<split>/<clip>.json` (its sizes) and, written last, `OUT/clips/<split>/<clip>.csv`
(its manifest rows), which marks the clip finished: a killed run started again skips it. At the end
the parts are merged into `OUT/manifest.csv`, `OUT/detections.csv` and `OUT/preprocess.json`, and
`OUT/errors.csv` is brought up to date.

OUT is guarded by emotiw.output like every stage's: one run at a time, and a full disk or a
read-only OUT stops the run with one line.
"""

import csv
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from emotiw.errors import UserError
from emotiw.face.mtcnn import LANDMARK_NAMES
from emotiw.formats.files import atomic_open, atomic_write_text, inside

BOX_COLUMNS = ["score", "x1", "y1", "x2", "y2"] + [f"{name}_{axis}" for name in LANDMARK_NAMES for axis in "xy"]
# yaw, pitch, roll and align: with --align frontal (emotiw.face.mesh, emotiw.face.frontal), else empty
POSE_COLUMNS = ["yaw", "pitch", "roll", "align"]
MANIFEST_COLUMNS = ["split", "clip", "label", "frame", "time", "shot", "detected", *BOX_COLUMNS, "track", "crop",
                    *POSE_COLUMNS]
DETECTION_COLUMNS = ["split", "clip", "frame", "time", "shot", "face", *BOX_COLUMNS, "track", "subject"]
ERROR_COLUMNS = ["input", "split", "clip", "source", "message"]


@dataclass
class PreprocessResult:
    """What `preprocess` wrote into its output folder, and summary.json's figures."""
    out: Path
    summary: dict
    problems: list  # Problem rows of errors.csv from this input folder
    manifest: Path | None = None
    detections: Path | None = None
    lists: dict = field(default_factory=dict)  # split -> lists/<split>.txt


def part_path(out, item):
    return inside(out, "clips", item.split, f"{item.clip}.csv")


def info_path(out, item):
    return inside(out, "clips", item.split, f"{item.clip}.json")


def detections_path(out, item):
    return inside(out, "detections", item.split, f"{item.clip}.csv")


def mesh_path(out, item):
    """OUT/mesh/<split>/<clip>.npz: the subject's 468 face mesh points per kept frame (--align frontal)."""
    return inside(out, "mesh", item.split, f"{item.clip}.npz")


def face_dir(out, item):
    return inside(out, "faces", item.split, item.clip)


def write_rows(path, rows, columns=MANIFEST_COLUMNS):
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def finished_parts(out):
    """(split, clip, manifest part) of every finished clip under OUT, this run's and earlier ones'."""
    for part in sorted((Path(out) / "clips").glob("*/*.csv")):
        yield part.parent.name, part.stem, part


def merge_parts(out):
    """All finished clips' manifest rows, sorted."""
    rows = [row for _, _, part in finished_parts(out) for row in read_rows(part)]
    return sorted(rows, key=lambda r: (r["split"], r["clip"], int(r["frame"])))


def write_detections(out):
    """OUT/detections.csv: the faces of every finished clip (a killed clip's part is left out)."""
    with atomic_open(out / "detections.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=DETECTION_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for split, clip, _ in finished_parts(out):
            with open(out / "detections" / split / f"{clip}.csv", newline="") as part:
                writer.writerows(csv.DictReader(part))


def remove_stale_temporaries(out):
    """A killed run leaves hidden temporaries behind: files from emotiw.formats.files, LMDB work folders."""
    for folder in [out, out / "lists", *(out / "clips").glob("*"), *(out / "detections").glob("*"),
                   *(out / "mesh").glob("*")]:
        for tmp in folder.glob(".*.tmp") if folder.is_dir() else ():
            tmp.unlink()
    for work in (out / "lmdb").glob(".*"):
        if work.is_dir():
            shutil.rmtree(work)
        elif work.suffix == ".tmp":
            work.unlink()


def check_settings(out, settings):
    """OUT keeps finished clips between runs, so every run into it must use the same settings."""
    path = out / "preprocess.json"
    wanted = json.loads(json.dumps(asdict(settings)))  # tuples as lists, as read back
    if path.exists():
        try:
            stored = json.loads(path.read_text()).get("settings")
        except (ValueError, AttributeError):
            stored = None
        if isinstance(stored, dict) and "mode" in stored and "recipe" not in stored:  # before recipes had a name
            stored["recipe"] = stored.pop("mode")
        if isinstance(stored, dict):
            stored.setdefault("align", None)  # before --align: the recipe's alignment
            stored.setdefault("min_face", None)  # before --min-face: the automatic size
        if stored != wanted:
            raise UserError(f"{out} holds crops made with other settings ({path}: {stored}); "
                            f"use a new --out or the same options")
    else:
        write_preprocess_json(out, settings)


def write_preprocess_json(out, settings):
    """OUT/preprocess.json: the settings, and each finished clip's sizes (source, detection, crops)."""
    clips = {f"{split}/{clip}": json.loads(part.with_suffix(".json").read_text())
             for split, clip, part in finished_parts(out)}
    atomic_write_text(out / "preprocess.json",
                      json.dumps({"settings": asdict(settings), "clips": clips}, indent=2, sort_keys=True) + "\n")


def update_errors(out, input_root, problems):
    """errors.csv: this run's problems replace the earlier ones of the same input folder."""
    path = out / "errors.csv"
    kept = [row for row in read_rows(path) if row["input"] != input_root] if path.exists() else []
    rows = kept + [{"input": input_root, **asdict(p)} for p in problems]
    rows.sort(key=lambda r: (r["input"], r["split"], r["clip"], r["source"]))
    write_rows(path, rows, ERROR_COLUMNS)
