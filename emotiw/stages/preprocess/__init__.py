"""The `preprocess` stage: video clips (or face images) -> aligned face crops, manifest, Caffe lists, LMDB.

Each clip goes through the face pipeline (emotiw.stages.preprocess.clip) on its own, here, in
`workers` processes or on a Ray cluster (emotiw.execution), and leaves its parts in the output
folder (emotiw.stages.preprocess.layout); the run then merges them into `OUT/manifest.csv`,
`OUT/detections.csv` and `OUT/preprocess.json`, and rewrites `OUT/lists/`, `OUT/errors.csv`,
`OUT/summary.json` (and with --lmdb `OUT/lmdb/`). Ctrl-C and SIGTERM stop the workers at once; a
killed run's workers die with it, and the run started again goes on from the finished clips.
"""

import contextlib
import json
import time
from pathlib import Path

from emotiw.errors import UserError
from emotiw.execution import Executor, Progress
from emotiw.face.clip import DETECT_MODES, REDETECT_EVERY, min_face_pixels
from emotiw.face.shots import SHOT_THRESHOLD
from emotiw.face.track import SUBJECT_RULES
from emotiw.face.video import check_sampling
from emotiw.formats.db import build_lmdb
from emotiw.formats.files import atomic_write_text
from emotiw.formats.lists import write_lists
from emotiw.inputs import Problem, discover
from emotiw.memory import check_fits
from emotiw.output import output_folder
from emotiw.recipes import ALIGNMENTS, get_recipe
from emotiw.stages.preprocess.clip import Settings, process_item
from emotiw.stages.preprocess.coverage import clip_coverage, coverage_problems, print_problem, print_summary, summarise
from emotiw.stages.preprocess.frames import dsn_frames_only
from emotiw.stages.preprocess.layout import (
    PreprocessResult,
    check_settings,
    merge_parts,
    part_path,
    remove_stale_temporaries,
    update_errors,
    write_detections,
    write_preprocess_json,
    write_rows,
)

__all__ = ["preprocess", "PreprocessResult"]


def check_options(size, workers, subject, detect, redetect_every, shot_threshold, min_coverage):
    if (size is not None and size < 1) or workers < 1 or redetect_every < 1:
        raise UserError("--size, --workers and --redetect-every must be positive")
    if size is not None:  # each worker holds a few crops of size x size (and their float copies)
        check_fits(size * size * 3 * 4 * workers * 4, f"--size {size} makes crops that take", "lower --size")
    if subject is not None and subject not in SUBJECT_RULES:
        raise UserError(f"--subject must be one of {', '.join(SUBJECT_RULES)}, got {subject!r}")
    if detect not in DETECT_MODES:
        raise UserError(f"--detect must be one of {', '.join(DETECT_MODES)}, got {detect!r}")
    if not shot_threshold >= 0:
        raise UserError(f"--shot-threshold must be >= 0 (0: no shot detection), got {shot_threshold}")
    if min_coverage is not None and not 0 <= min_coverage <= 100:
        raise UserError(f"--min-coverage is a percentage, 0 to 100, got {min_coverage}")


def preprocess(out, videos=None, images=None, labels=None, label_map="afew", aligned=False, recipe="dsn",
               size=None, gray=None, fps=None, every=None, max_frames=None, workers=1, lmdb=False, split=None,
               dsn_frames=False, subject=None, detect="tracked", redetect_every=REDETECT_EVERY,
               shot_threshold=SHOT_THRESHOLD, min_coverage=None, ray=None, align=None,
               min_face=None) -> PreprocessResult:
    """Video clips (or still face images) -> MTCNN faces -> the subject's aligned crops and Caffe lists.

    out: the output folder; a run into it again resumes (same settings only). videos: an AFEW-style
    folder (`<Emotion>/<clip>`) or a flat folder with `labels`; images: a folder of still face images
    (e.g. RAF-DB) with `labels`; labels: a `clip,label` CSV or RAF-DB's list_patition_label.txt;
    label_map: afew (0..6), rafdb (1..7 in RAF-DB order) or none; aligned: the images are aligned
    crops (resize only); recipe: how faces are cropped (emotiw.recipes): dsn (facenet crop, margin
    100, 400x400, from frames 1024 wide), sse (5-point similarity warp, 128x128) or fer2013 (sse's at
    64x64 gray); size: the crop side (default the recipe's); gray: one-channel crops (default the
    recipe's); fps / every / max_frames: frame sampling; workers: clips processed in parallel;
    lmdb: also an LMDB and its mean per split; split: the split name (default the input folder's
    name); dsn_frames: only write every frame 1024 wide as DSN's extract_frames.py did; subject:
    facenet (the big central face of every frame; dsn's default) or track (the longest track of
    every shot; the default of the others); detect: every-frame or tracked (full MTCNN at shot
    starts and every `redetect_every` frames, the neighbourhood of the previous faces between);
    shot_threshold: PySceneDetect's ContentDetector threshold (0: no shot detection); min_coverage:
    clips whose subject is in fewer than this percentage of frames get a line in errors.csv; ray:
    run the clips on a Ray cluster instead of `workers` processes, one task per clip
    (emotiw.execution): True for `ray.init()`, or the head node's HOST:PORT; every node must see the
    inputs and `out` at the same paths; align: how a face becomes a crop, facenet, similarity or
    frontal (default: the recipe's); frontal also writes yaw, pitch, roll and align to the manifest
    and the subject's 468 mesh points to OUT/mesh/<split>/<clip>.npz; min_face: the smallest face
    to find, "N" source pixels or "P%" of the short side (default: 20 px at a 360-pixel short
    side, scaled with the frame; emotiw.face.clip), which also sets the size frames are searched at.
    """
    started = time.monotonic()
    out = Path(out)
    if (videos is None) == (images is None):
        raise UserError("give one of --videos or --images")
    if dsn_frames and videos is None:
        raise UserError("--dsn-frames extracts video frames; give --videos")
    if images is None and aligned:
        raise UserError("--aligned applies to --images (already-aligned face crops), not to --videos")
    check_options(size, workers, subject, detect, redetect_every, shot_threshold, min_coverage)
    check_sampling(fps, every, max_frames)
    if ray and (workers > 1 or dsn_frames):
        raise UserError("--ray runs one clip per CPU of the cluster; drop --workers (and --dsn-frames, which "
                        "runs on this machine only)")
    chosen = get_recipe(recipe)
    if align is not None and align not in ALIGNMENTS:
        raise UserError(f"--align must be one of {', '.join(ALIGNMENTS)}, got {align!r}")
    if min_face is not None:
        min_face_pixels(min_face, 480)  # the spelling, checked before any clip
    settings = Settings(recipe=chosen.name, size=size or chosen.crop_size, gray=chosen.gray if gray is None else gray,
                        fps=fps, every=every, max_frames=max_frames, aligned=aligned, align=align,
                        min_face=None if min_face is None else str(min_face),
                        subject=subject or chosen.subject, detect=detect, redetect_every=redetect_every,
                        shot_threshold=float(shot_threshold))
    kind = "image" if images else "video"
    root = Path(images or videos)
    items, problems = discover(root, labels, label_map, split, rafdb_prefix=kind == "image" and label_map == "rafdb")
    if not items and not problems:
        raise UserError(f"no {'images' if images else 'video clips'} found in {root}; give the folder that holds "
                        f"them (AFEW's layout: {root}/<Emotion>/<clip>, or the files in {root} itself)")
    executor = Executor(workers, ray, needs=[root, out])
    with output_folder(out, "preprocess", inputs=[root],
                       rerun="run the same command again (finished clips are kept)"):
        if dsn_frames:
            return dsn_frames_only(out, root, items, problems, started)
        return _preprocess_items(out, root, items, problems, settings, kind, executor, lmdb, min_coverage, started)


def _preprocess_items(out, root, items, problems, settings, kind, executor, lmdb, min_coverage, started):
    check_settings(out, settings)
    remove_stale_temporaries(out)
    for problem in problems:
        print_problem(problem)
    pending = [item for item in items if not part_path(out, item).exists()]
    processed = []
    if pending:
        calls = [(item, out, settings, kind) for item in pending]
        labels = [f"{item.split}/{item.clip}" for item in pending]
        with executor, contextlib.closing(executor.map(process_item, calls, labels,
                                                       Progress("frames", tasks="clips"))) as results:
            for _, result in results:
                processed.append(result)
                if result.error:
                    problems.append(Problem(result.item.split, result.item.clip, str(result.item.source),
                                            result.error))
                    print_problem(problems[-1])
    remove_stale_temporaries(out)  # those of Ray workers killed mid-clip, whose clips were run again
    rows = merge_parts(out)
    write_rows(out / "manifest.csv", rows)
    write_detections(out)
    write_preprocess_json(out, settings)
    lists = write_lists(out, rows)
    coverage = clip_coverage(rows, items)
    found = coverage_problems(coverage, items, min_coverage)
    processed_now = {(r.item.split, r.item.clip) for r in processed}
    for problem in found:
        if (problem.split, problem.clip) in processed_now:  # earlier runs reported the others
            print_problem(problem)
    problems += found
    update_errors(out, str(root.resolve()), problems)
    if lmdb:
        for name in sorted({item.split for item in items}):
            list_path = out / "lists" / f"{name}.txt"
            if list_path.exists():
                build_lmdb(list_path, out, name, settings.gray)
    summary = summarise(items, coverage, processed, problems, time.monotonic() - started)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print_summary(summary, coverage, out)
    if summary["clips"] - summary["clips_failed"] - summary["clips_without_face"] <= 0:
        raise UserError(f"no clip gave a face crop; see {out / 'errors.csv'}")
    return PreprocessResult(out=out, summary=summary, problems=problems, manifest=out / "manifest.csv",
                            detections=out / "detections.csv", lists=lists)


