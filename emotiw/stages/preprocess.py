"""The `preprocess` stage: video clips (or face images) -> aligned face crops, manifest, Caffe lists, LMDB.

Per clip: decode (emotiw.face.video), detect faces with MTCNN (emotiw.face.mtcnn), keep the main subject
(emotiw.face.track), crop it (emotiw.face.align) into `OUT/faces/<split>/<clip>/<frame:06d>.png`, then write
the clip's manifest rows to `OUT/clips/<split>/<clip>.csv`: that file marks the clip finished, so
a killed run started again skips it. At the end the parts are merged into `OUT/manifest.csv`, and
`OUT/lists/`, `OUT/errors.csv`, `OUT/summary.json` (and with --lmdb `OUT/lmdb/`) are rewritten.
"""

import csv
import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from emotiw.errors import UserError
from emotiw.face.align import MODES, align_face, crop_mode, resize_whole
from emotiw.face.mtcnn import FACENET, LANDMARK_NAMES, FaceDetector
from emotiw.face.track import facenet_choice, subject_detections
from emotiw.face.video import VideoError, check_sampling, iter_frames, save_png, write_dsn_frames
from emotiw.formats.db import build_lmdb
from emotiw.formats.files import atomic_open, atomic_write_text
from emotiw.formats.lists import write_lists
from emotiw.inputs import Problem, discover

MANIFEST_COLUMNS = (["split", "clip", "label", "frame", "time", "detected", "score", "x1", "y1", "x2", "y2"]
                    + [f"{name}_{axis}" for name in LANDMARK_NAMES for axis in "xy"]
                    + ["track", "crop"])
ERROR_COLUMNS = ["input", "split", "clip", "source", "message"]
DETECT_BATCH = 8  # frames per detector call
DSN_VIDEO_WIDTH = 1024  # DSN detected faces on frames extracted 1024 wide (see emotiw.face.video)


@dataclass(frozen=True)
class Settings:
    """Everything that decides the content of the outputs; stored in OUT/preprocess.json."""
    mode: str
    size: int
    gray: bool
    fps: float | None
    every: int | None
    max_frames: int | None
    aligned: bool
    # facenet's MTCNN settings, which DSN used (lists, as preprocess.json stores them)
    detector: dict = field(default_factory=lambda: {key: list(value) if isinstance(value, tuple) else value
                                                    for key, value in FACENET.items()})

    @property
    def crop_mode(self):
        return crop_mode(self.mode, self.size)


@dataclass
class ClipResult:
    item: object
    frames: int = 0  # frames decoded and searched in this run
    error: str | None = None


# ---------------------------------------------------------------------------------------------
# Per clip (runs in the main process, or in a worker process with its own detector)

_detector = None
_worker_progress = None


def detector(settings):
    global _detector
    if _detector is None:
        options = settings.detector
        _detector = FaceDetector(min_face_size=options["min_face_size"], thresholds=tuple(options["thresholds"]),
                                 scale_factor=options["scale_factor"], backend="auto")
    return _detector


def part_path(out, item):
    return Path(out) / "clips" / item.split / f"{item.clip}.csv"


def face_dir(out, item):
    return Path(out) / "faces" / item.split / item.clip


def _row(item, frame, time_s, crop="", score=None, box=(), landmarks=(), track=""):
    """One manifest row; a frame without the subject has only the first six columns filled."""
    row = dict.fromkeys(MANIFEST_COLUMNS, "")
    row.update(split=item.split, clip=item.clip, label=item.label, frame=frame, time=f"{time_s:.6f}",
               detected=int(bool(crop)), track=track, crop=crop)
    if score is not None:
        row["score"] = f"{score:.6f}"
    row.update(zip(("x1", "y1", "x2", "y2"), (f"{value:.2f}" for value in box)))
    for name, (x, y) in zip(LANDMARK_NAMES, landmarks):
        row[f"{name}_x"], row[f"{name}_y"] = f"{x:.2f}", f"{y:.2f}"
    return row


def _save_face(out, item, frame_index, face):
    crop = face_dir(out, item) / f"{frame_index:06d}.png"
    save_png(crop, face)
    return crop.relative_to(out).as_posix()


def _chunks(iterable, size):
    chunk = []
    for element in iterable:
        chunk.append(element)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _video_frames(item, settings):
    width = DSN_VIDEO_WIDTH if settings.mode == "dsn" else None
    return iter_frames(item.source, fps=settings.fps, every=settings.every,
                       max_frames=settings.max_frames, width=width)


def process_video(item, out, settings, progress):
    """Two passes over the clip, so that long videos never sit in memory: detect on every kept
    frame, choose the subject's track, then decode again and crop the subject's frames."""
    found = []  # (frame index, time, Detections)
    for chunk in _chunks(_video_frames(item, settings), DETECT_BATCH):
        detections = detector(settings).detect_batch([frame.image for frame in chunk])
        found += [(frame.index, frame.time, d) for frame, d in zip(chunk, detections)]
        progress(len(chunk))
    subject, chosen = subject_detections([d.boxes for _, _, d in found])
    faces = {}
    wanted = {index: (d, k) for (index, _, d), k in zip(found, chosen) if k is not None}
    if wanted:
        for frame in _video_frames(item, settings):
            if frame.index in wanted:
                d, k = wanted[frame.index]
                face = align_face(frame.image, d.boxes[k], d.landmarks[k], settings.crop_mode, settings.gray)
                faces[frame.index] = _save_face(out, item, frame.index, face)
                if len(faces) == len(wanted):
                    break
    rows = []
    for index, time_s, d in found:
        if index in wanted:
            k = wanted[index][1]
            rows.append(_row(item, index, time_s, faces[index], d.scores[k], d.boxes[k], d.landmarks[k],
                             subject.track_id))
        else:
            rows.append(_row(item, index, time_s))
    return rows


def read_image(path):
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)  # gray images come back as 3 channels, as facenet's to_rgb
    if image is None:
        raise UserError(f"{path}: not an image OpenCV can read")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def process_image(item, out, settings, progress):
    """A still image is a one-frame clip; with several faces, facenet's choice (big and central)."""
    image = read_image(item.source)
    progress(1)
    if settings.aligned:
        height, width = image.shape[:2]
        face = resize_whole(image, settings.crop_mode, settings.gray)
        crop = _save_face(out, item, 0, face)
        return [_row(item, 0, 0.0, crop, box=(0, 0, width, height), track=0)]
    d = detector(settings).detect(image)
    if len(d.boxes) == 0:
        return [_row(item, 0, 0.0)]
    k = facenet_choice(d.boxes, image.shape)
    face = align_face(image, d.boxes[k], d.landmarks[k], settings.crop_mode, settings.gray)
    return [_row(item, 0, 0.0, _save_face(out, item, 0, face), d.scores[k], d.boxes[k], d.landmarks[k], 0)]


def process_item(item, out, settings, kind, progress=None):
    """Processes one clip from scratch and writes its manifest part; errors become the result's."""
    progress = progress or _worker_progress or (lambda n: None)
    shutil.rmtree(face_dir(out, item), ignore_errors=True)  # leftovers of a killed run
    result = ClipResult(item)

    def counted(n):
        result.frames += n
        progress(n)

    try:
        process = process_video if kind == "video" else process_image
        rows = process(item, out, settings, counted)
    except (VideoError, UserError) as error:
        result.error = str(error)
        return result
    except Exception as error:  # a long run should not die on one clip; the message says what broke
        result.error = f"internal error ({type(error).__name__}: {error})"
        return result
    write_rows(part_path(out, item), rows)
    return result


def _init_worker(queue, threads):
    """Each worker gets its share of the cores: N workers each running OpenCV's and OpenBLAS's
    all-core pools oversubscribe the machine (bench/NOTES.md). OpenBLAS reads its variable when
    Caffe loads it, which happens later, in detector(); a value the user set is kept."""
    global _worker_progress
    import cv2

    _worker_progress = queue.put
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(threads))
    cv2.setNumThreads(threads)


# ---------------------------------------------------------------------------------------------
# Files

def write_rows(path, rows, columns=MANIFEST_COLUMNS):
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def merge_parts(out):
    """All finished clips' rows under OUT (every split, this run's and earlier ones'), sorted."""
    rows = []
    for part in sorted((Path(out) / "clips").glob("*/*.csv")):
        rows += read_rows(part)
    return sorted(rows, key=lambda r: (r["split"], r["clip"], int(r["frame"])))


def remove_stale_temporaries(out):
    """A killed run leaves hidden temporaries behind: files from emotiw.formats.files, LMDB work folders."""
    for folder in [out, out / "lists", *(out / "clips").glob("*")]:
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
    wanted = json.dumps(asdict(settings), indent=2, sort_keys=True) + "\n"
    if path.exists() and path.read_text() != wanted:
        raise UserError(f"{out} holds crops made with other settings ({path}: "
                        f"{json.loads(path.read_text())}); use a new --out or the same options")
    atomic_write_text(path, wanted)


def update_errors(out, input_root, problems):
    """errors.csv: this run's problems replace the earlier ones of the same input folder."""
    path = out / "errors.csv"
    kept = [row for row in read_rows(path) if row["input"] != input_root] if path.exists() else []
    rows = kept + [{"input": input_root, **asdict(p)} for p in problems]
    rows.sort(key=lambda r: (r["input"], r["split"], r["clip"], r["source"]))
    write_rows(path, rows, ERROR_COLUMNS)


# ---------------------------------------------------------------------------------------------
# The run

def run_items(pending, out, settings, kind, workers):
    """Processes the pending clips, `workers` at a time; yields each ClipResult when done."""
    from tqdm import tqdm

    clip_bar = tqdm(total=len(pending), desc="clips", unit="clip", disable=None)
    frame_bar = tqdm(desc="frames", unit="frame", disable=None)
    try:
        if workers <= 1:
            for item in pending:
                yield process_item(item, out, settings, kind, frame_bar.update)
                clip_bar.update()
            return
        yield from _run_parallel(pending, out, settings, kind, workers, clip_bar, frame_bar)
    finally:
        frame_bar.close()
        clip_bar.close()


def _run_parallel(pending, out, settings, kind, workers, clip_bar, frame_bar):
    import multiprocessing
    import queue as queues
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    # spawn: each worker imports Caffe and builds its own detector, nothing is shared by fork
    context = multiprocessing.get_context("spawn")
    progress = context.Queue()
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(progress, threads)) as pool:
        running = {pool.submit(process_item, item, out, settings, kind) for item in pending}
        while running:
            done, running = wait(running, timeout=0.2, return_when=FIRST_COMPLETED)
            try:
                while True:
                    frame_bar.update(progress.get_nowait())
            except queues.Empty:
                pass
            for future in done:
                clip_bar.update()
                yield future.result()


def print_problem(problem):
    from tqdm import tqdm

    tqdm.write(f"emotiw preprocess: {problem.split}/{problem.clip or '-'}: {problem.message}", file=sys.stderr)


def summarise(rows, items, processed, no_face, problems, elapsed):
    mine = {(i.split, i.clip) for i in items}
    rows = [r for r in rows if (r["split"], r["clip"]) in mine]
    faces = sum(int(r["detected"]) for r in rows)
    frames_processed = sum(r.frames for r in processed)
    return {
        "clips": len(items),
        "clips_processed_now": len(processed),
        "clips_failed": sum(1 for r in processed if r.error),
        "clips_without_face": len(no_face),
        "errors": len(problems),
        "frames": len(rows),
        "faces": faces,
        "faces_found_percent": round(100.0 * faces / len(rows), 2) if rows else 0.0,
        "elapsed_s": round(elapsed, 2),
        "frames_per_s": round(frames_processed / elapsed, 2) if elapsed > 0 else 0.0,
    }


@dataclass
class PreprocessResult:
    """What `preprocess` wrote into its output folder, and summary.json's figures."""
    out: Path
    summary: dict
    problems: list  # Problem rows of errors.csv from this input folder
    manifest: Path | None = None
    lists: dict = field(default_factory=dict)  # split -> lists/<split>.txt


def preprocess(out, videos=None, images=None, labels=None, label_map="afew", aligned=False, mode="dsn",
               size=None, gray=False, fps=None, every=None, max_frames=None, workers=1, lmdb=False, split=None,
               dsn_frames=False) -> PreprocessResult:
    """Video clips (or still face images) -> MTCNN faces -> the subject's aligned crops and Caffe lists.

    out: the output folder; a run into it again resumes (same settings only). videos: an AFEW-style
    folder (`<Emotion>/<clip>`) or a flat folder with `labels`; images: a folder of still face images
    (e.g. RAF-DB) with `labels`; labels: a `clip,label` CSV or RAF-DB's list_patition_label.txt;
    label_map: afew (0..6), rafdb (1..7 in RAF-DB order) or none; aligned: the images are aligned
    crops (resize only); mode: dsn (facenet crop, margin 100, 400x400) or sse (5-point similarity
    warp, 128x128); size: the crop side (default the mode's); gray: one-channel crops; fps / every /
    max_frames: frame sampling; workers: clips processed in parallel; lmdb: also an LMDB and its mean
    per split; split: the split name (default the input folder's name); dsn_frames: only write every
    frame 1024 wide as DSN's extract_frames.py did.
    """
    started = time.monotonic()
    out = Path(out)
    if (videos is None) == (images is None):
        raise UserError("give one of --videos or --images")
    if dsn_frames:
        return dsn_frames_only(out, videos, labels, label_map, split, started)
    if images is None and aligned:
        raise UserError("--aligned applies to --images (already-aligned face crops), not to --videos")
    if (size is not None and size < 1) or workers < 1:
        raise UserError("--size and --workers must be positive")
    check_sampling(fps, every, max_frames)
    settings = Settings(mode=mode, size=size or MODES[mode].size, gray=gray, fps=fps, every=every,
                        max_frames=max_frames, aligned=aligned)
    kind = "image" if images else "video"
    root = Path(images or videos)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, settings)
    remove_stale_temporaries(out)
    items, problems = discover(root, labels, label_map, split, rafdb_prefix=kind == "image" and label_map == "rafdb")
    for problem in problems:
        print_problem(problem)
    pending = [item for item in items if not part_path(out, item).exists()]
    processed = []
    for result in run_items(pending, out, settings, kind, workers):
        processed.append(result)
        if result.error:
            problems.append(Problem(result.item.split, result.item.clip, str(result.item.source), result.error))
            print_problem(problems[-1])
    rows = merge_parts(out)
    write_rows(out / "manifest.csv", rows)
    lists = write_lists(out, rows)
    no_face = _clips_without_face(rows, items)
    processed_now = {(r.item.split, r.item.clip) for r in processed}
    for problem in no_face:
        if (problem.split, problem.clip) in processed_now:  # earlier runs reported the others
            print_problem(problem)
    problems += no_face
    update_errors(out, str(root.resolve()), problems)
    if lmdb:
        for name in sorted({item.split for item in items}):
            list_path = out / "lists" / f"{name}.txt"
            if list_path.exists():
                build_lmdb(list_path, out, name, settings.gray)
    summary = summarise(rows, items, processed, no_face, problems, time.monotonic() - started)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print_summary(summary, out)
    if summary["clips"] - summary["clips_failed"] - summary["clips_without_face"] <= 0:
        raise UserError(f"no clip gave a face crop; see {out / 'errors.csv'}")
    return PreprocessResult(out=out, summary=summary, problems=problems, manifest=out / "manifest.csv",
                            lists=lists)


def _clips_without_face(rows, items):
    frames, faces = Counter(), Counter()
    for row in rows:
        frames[row["split"], row["clip"]] += 1
        faces[row["split"], row["clip"]] += row["detected"] == "1"
    return [Problem(i.split, i.clip, str(i.source), f"no face found in any of its {frames[i.split, i.clip]} frames")
            for i in items if frames[i.split, i.clip] and not faces[i.split, i.clip]]


def print_summary(summary, out):
    print(f"clips {summary['clips']} ({summary['clips_processed_now']} processed now, "
          f"{summary['clips_failed']} failed, {summary['clips_without_face']} without a face, "
          f"{summary['errors']} errors); "
          f"frames {summary['frames']}, faces found {summary['faces']} ({summary['faces_found_percent']}%); "
          f"{summary['elapsed_s']} s, {summary['frames_per_s']} frames/s -> {out}")


def dsn_frames_only(out, videos, labels, label_map, split, started):
    """--dsn-frames: DSN's extract_frames.py into OUT/frames/<split>/<clip>/<clip>-001.png."""
    from tqdm import tqdm

    if videos is None:
        raise UserError("--dsn-frames extracts video frames; give --videos")
    root = Path(videos)
    items, problems = discover(root, labels, label_map, split)
    written = 0
    for item in tqdm(items, desc="clips", unit="clip", disable=None):
        target = out / "frames" / item.split / item.clip
        if target.is_dir():
            continue
        work = target.with_name(f".{item.clip}.partial")
        shutil.rmtree(work, ignore_errors=True)
        try:
            written += write_dsn_frames(item.source, work)
        except VideoError as error:
            problems.append(Problem(item.split, item.clip, str(item.source), str(error)))
            shutil.rmtree(work, ignore_errors=True)
            continue
        work.rename(target)
    for problem in problems:
        print_problem(problem)
    update_errors(out, str(root.resolve()), problems)
    print(f"{written} frames of {len(items)} clips written under {out / 'frames'} in "
          f"{time.monotonic() - started:.1f} s; {len(problems)} problems")
    if not any((out / "frames" / i.split / i.clip).is_dir() for i in items):
        raise UserError(f"no clip could be decoded; see {out / 'errors.csv'}")
    return PreprocessResult(out=out, summary={"clips": len(items), "frames_written": written}, problems=problems)
