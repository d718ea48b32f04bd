"""The `preprocess` stage: video clips (or face images) -> aligned face crops, manifest, Caffe lists, LMDB.

Per clip, two passes over the video, so that long clips never sit in memory:
  1. decode at the source resolution, number the shots (emotiw.face.shots), find the faces
     (emotiw.face.clip: MTCNN on every frame, or tracked), then choose the subject (emotiw.face.track);
  2. decode again (1024 wide in dsn mode, as DSN's frames were) and crop the subject's frames
     (emotiw.face.align) into `OUT/faces/<split>/<clip>/<frame:06d>.png`.
Decoding runs in a thread ahead of detection and cropping, and PNGs are written by another, so one
clip keeps both cores busy. The clip's faces go to `OUT/detections/<split>/<clip>.csv`, its sizes to
`OUT/clips/<split>/<clip>.json`, and last its manifest rows to `OUT/clips/<split>/<clip>.csv`: that
file marks the clip finished, so a killed run started again skips it. At the end the parts are
merged into `OUT/manifest.csv`, `OUT/detections.csv` and `OUT/preprocess.json`, and `OUT/lists/`,
`OUT/errors.csv`, `OUT/summary.json` (and with --lmdb `OUT/lmdb/`) are rewritten. Boxes and
landmarks in the outputs are in source pixels: the video's own pixel grid, upright.

A run holds `OUT/.lock` (one run per output folder at a time). A write that fails because the disk
is full or OUT is read-only stops the run with one line: it is no problem of one clip, every later
clip would fail the same way. Ctrl-C and SIGTERM stop the workers at once; a killed run's workers
die with it.
"""

import collections
import contextlib
import csv
import errno
import json
import os
import queue
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from emotiw.caffe.env import BLAS_THREADS_VARIABLES
from emotiw.errors import UserError
from emotiw.face.align import MODES, align_face, crop_mode, resize_whole
from emotiw.face.clip import DETECT_MODES, REDETECT_EVERY, find_faces
from emotiw.face.mtcnn import FACENET, LANDMARK_NAMES, Detections, FaceDetector
from emotiw.face.shots import SHOT_THRESHOLD, ShotDetector
from emotiw.face.track import SUBJECT_RULES, choose_subject
from emotiw.face.video import (DSN_FRAME_WIDTH, VideoError, check_sampling, display_size, iter_frames, probe,
                               save_png, write_dsn_frames)
from emotiw.formats.db import build_lmdb
from emotiw.formats.files import atomic_open, atomic_write_text, exclusive_lock, inside
from emotiw.formats.lists import write_lists
from emotiw.inputs import Problem, discover
from emotiw.processes import die_with_parent

BOX_COLUMNS = ["score", "x1", "y1", "x2", "y2"] + [f"{name}_{axis}" for name in LANDMARK_NAMES for axis in "xy"]
MANIFEST_COLUMNS = ["split", "clip", "label", "frame", "time", "shot", "detected", *BOX_COLUMNS, "track", "crop"]
DETECTION_COLUMNS = ["split", "clip", "frame", "time", "shot", "face", *BOX_COLUMNS, "track", "subject"]
ERROR_COLUMNS = ["input", "split", "clip", "source", "message"]
DEFAULT_SUBJECT = {"dsn": "facenet", "sse": "track"}
PREFETCH_FRAMES = 8  # decoded frames waiting for detection, cropping or writing
# What a write says when the disk is full or OUT is not writable, and how to fix it
WRITE_FIXES = {errno.ENOSPC: "free disk space", errno.EDQUOT: "free space or raise your disk quota",
               errno.EFBIG: "raise the file size limit (ulimit -f) or use a file system that takes larger files",
               **dict.fromkeys((errno.EROFS, errno.EACCES, errno.EPERM),
                               "make the output folder writable or choose another --out")}


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
    subject: str = "facenet"
    detect: str = "tracked"
    redetect_every: int = REDETECT_EVERY
    shot_threshold: float = SHOT_THRESHOLD
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


@dataclass
class ClipOutput:
    rows: list  # manifest rows
    detections: list  # detections.csv rows
    info: dict  # the clip's entry in preprocess.json


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
    return inside(out, "clips", item.split, f"{item.clip}.csv")


def info_path(out, item):
    return inside(out, "clips", item.split, f"{item.clip}.json")


def detections_path(out, item):
    return inside(out, "detections", item.split, f"{item.clip}.csv")


def face_dir(out, item):
    return inside(out, "faces", item.split, item.clip)


def _face_columns(score, box, landmarks):
    row = {"score": f"{score:.6f}"}
    row.update(zip(("x1", "y1", "x2", "y2"), (f"{value:.2f}" for value in box)))
    for name, (x, y) in zip(LANDMARK_NAMES, landmarks):
        row[f"{name}_x"], row[f"{name}_y"] = f"{x:.2f}", f"{y:.2f}"
    return row


def _row(item, frame, time_s, shot=0, crop="", face=None, track=""):
    """One manifest row; `face` (score, box, landmarks) only where the subject was found."""
    row = dict.fromkeys(MANIFEST_COLUMNS, "")
    row.update(split=item.split, clip=item.clip, label=item.label, frame=frame, time=f"{time_s:.6f}",
               shot=shot, detected=int(bool(crop)), track=track, crop=crop)
    if face is not None:
        row.update(_face_columns(*face))
    return row


def _detection_rows(item, frame, time_s, shot, faces, track_ids, subject):
    rows = []
    for k, (score, box, landmarks) in enumerate(zip(faces.scores, faces.boxes, faces.landmarks)):
        rows.append({"split": item.split, "clip": item.clip, "frame": frame, "time": f"{time_s:.6f}",
                     "shot": shot, "face": k, **_face_columns(score, box, landmarks), "track": track_ids[k],
                     "subject": int(k == subject)})
    return rows


def _save_face(out, item, frame_index, face):
    crop = face_dir(out, item) / f"{frame_index:06d}.png"
    save_png(crop, face)
    return crop.relative_to(out).as_posix()


def _crop_and_save(out, item, frame_index, image, box, landmarks, settings):
    return _save_face(out, item, frame_index, align_face(image, box, landmarks, settings.crop_mode, settings.gray))


def prefetched(iterable, depth=PREFETCH_FRAMES):
    """Runs `iterable` in a background thread, up to `depth` items ahead. Decoding then overlaps
    detection and cropping: PyAV, OpenCV and numpy release the GIL in their heavy loops."""
    items = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def produce():
        try:
            for element in iterable:
                items.put((element, None))
                if stop.is_set():
                    break
            items.put((end, None))
        except BaseException as error:  # re-raised in the consumer
            items.put((end, error))
        finally:
            getattr(iterable, "close", lambda: None)()

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            element, error = items.get()
            if element is end:
                if error is not None:
                    raise error
                return
            yield element
    finally:  # a consumer that stops early: let the producer finish its last put and exit
        stop.set()
        while thread.is_alive():
            try:
                items.get(timeout=0.05)
            except queue.Empty:
                pass


def _video_frames(item, settings, width=None):
    return prefetched(iter_frames(item.source, fps=settings.fps, every=settings.every,
                                  max_frames=settings.max_frames, width=width))


def _scaled(points, factors):
    return np.asarray(points, dtype=np.float64) * np.resize(factors, np.shape(points)[-1])


def process_video(item, out, settings, progress):
    info = probe(item.source)
    detect_size = display_size(info)
    source_size = info.source_size
    shots = ShotDetector(settings.shot_threshold, frame_rate=float(info.frame_rate or 25))
    found = []
    for faces in find_faces(_video_frames(item, settings), detector(settings), settings.detect,
                            settings.redetect_every, shots):
        found.append(faces)
        progress(1)
    subject = choose_subject([f.faces.boxes for f in found], settings.subject, [f.shot for f in found],
                             image_shape=detect_size[::-1])
    crop_width = DSN_FRAME_WIDTH if settings.mode == "dsn" else None
    crop_size = display_size(info, crop_width)
    crops = _crop_subject(item, out, settings, found, subject.chosen, crop_width,
                          np.divide(crop_size, detect_size))
    to_source = np.divide(source_size, detect_size)
    rows, detections = [], []
    for f, k, track_ids in zip(found, subject.chosen, subject.track_ids):
        faces = f.faces
        boxes, landmarks = _scaled(faces.boxes, to_source), _scaled(faces.landmarks, to_source)
        if k is None:
            rows.append(_row(item, f.index, f.time, f.shot))
        else:
            rows.append(_row(item, f.index, f.time, f.shot, crops[f.index],
                             (faces.scores[k], boxes[k], landmarks[k]), track_ids[k]))
        detections += _detection_rows(item, f.index, f.time, f.shot,
                                      Detections(boxes, faces.scores, landmarks), track_ids, k)
    clip_info = {"source_size": list(source_size), "detect_size": list(detect_size), "crop_size": list(crop_size),
                 "rotation": info.rotation, "frames": len(found), "shots": len({f.shot for f in found})}
    return ClipOutput(rows, detections, clip_info)


def _crop_subject(item, out, settings, found, chosen, width, to_crop):
    """Pass 2: decodes the clip again at the crop resolution and writes the subject's crops;
    returns {frame index: crop path relative to OUT}."""
    wanted = {f.index: (f.faces, k) for f, k in zip(found, chosen) if k is not None}
    if not wanted:
        return {}
    crops, writing = {}, collections.deque()
    with ThreadPoolExecutor(1) as writer:
        for frame in _video_frames(item, settings, width):
            if frame.index in wanted:
                faces, k = wanted[frame.index]
                crops[frame.index] = writer.submit(
                    _crop_and_save, out, item, frame.index, frame.image, _scaled(faces.boxes[k], to_crop),
                    _scaled(faces.landmarks[k], to_crop), settings)
                writing.append(crops[frame.index])
                if len(writing) > PREFETCH_FRAMES:  # each holds a whole frame: never let them pile up
                    writing.popleft().result()
                if len(crops) == len(wanted):
                    break
    return {index: future.result() for index, future in crops.items()}


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
    height, width = image.shape[:2]
    info = {"source_size": [width, height], "detect_size": [width, height], "crop_size": [width, height],
            "rotation": 0, "frames": 1, "shots": 1}
    if settings.aligned:
        face = resize_whole(image, settings.crop_mode, settings.gray)
        crop = _save_face(out, item, 0, face)
        row = _row(item, 0, 0.0, crop=crop, track=0)
        row.update(zip(("x1", "y1", "x2", "y2"), (f"{value:.2f}" for value in (0, 0, width, height))))
        return ClipOutput([row], [], info)
    faces = detector(settings).detect(image)
    subject = choose_subject([faces.boxes], "facenet", image_shape=image.shape)
    k, track_ids = subject.chosen[0], subject.track_ids[0]
    detections = _detection_rows(item, 0, 0.0, 0, faces, track_ids, k)
    if k is None:
        return ClipOutput([_row(item, 0, 0.0)], detections, info)
    crop = _crop_and_save(out, item, 0, image, faces.boxes[k], faces.landmarks[k], settings)
    face = (faces.scores[k], faces.boxes[k], faces.landmarks[k])
    return ClipOutput([_row(item, 0, 0.0, crop=crop, face=face, track=track_ids[k])], detections, info)


def process_item(item, out, settings, kind, progress=None):
    """Processes one clip from scratch and writes its parts; errors become the result's."""
    progress = progress or _worker_progress or (lambda n: None)
    faces = face_dir(out, item)
    if faces.exists():  # leftovers of a killed run
        shutil.rmtree(faces)
    result = ClipResult(item)

    def counted(n):
        result.frames += n
        progress(n)

    try:
        process = process_video if kind == "video" else process_image
        output = process(item, out, settings, counted)
    except (VideoError, UserError) as error:
        result.error = str(error)
        return result
    except Exception as error:  # a long run should not die on one clip; the message says what broke
        if isinstance(error, OSError) and error.errno in WRITE_FIXES:
            raise  # a full disk or a read-only OUT: every later clip would fail too
        result.error = f"internal error ({type(error).__name__}: {error})"
        return result
    write_rows(detections_path(out, item), output.detections, DETECTION_COLUMNS)
    atomic_write_text(info_path(out, item), json.dumps(output.info) + "\n")
    write_rows(part_path(out, item), output.rows)  # last: marks the clip finished
    return result


def limit_threads(threads):
    """Each worker gets its share of the cores: N workers each running OpenCV's and the BLAS's
    all-core pools oversubscribe the machine (bench/NOTES.md). OpenBLAS and MKL read their variables
    when Caffe loads them, which happens later, in detector(); a value the user set is kept."""
    import cv2

    for variable in BLAS_THREADS_VARIABLES.values():
        os.environ.setdefault(variable, str(threads))
    cv2.setNumThreads(threads)


def _init_worker(progress_queue, threads):
    """A worker (limit_threads) dies with the main process, even a killed one (the pool starts
    workers from the main thread, whose end is what PR_SET_PDEATHSIG watches), and leaves Ctrl-C to it."""
    global _worker_progress
    import multiprocessing

    die_with_parent()
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before die_with_parent took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal sends Ctrl-C to every process of the run
    _worker_progress = progress_queue.put
    limit_threads(threads)


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
    for folder in [out, out / "lists", *(out / "clips").glob("*"), *(out / "detections").glob("*")]:
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


# ---------------------------------------------------------------------------------------------
# The run

def run_items(pending, out, settings, kind, workers, cluster=None):
    """Processes the pending clips, `workers` at a time (or on a Ray `cluster`, one task per clip);
    yields each ClipResult when done."""
    from tqdm import tqdm

    clip_bar = tqdm(total=len(pending), desc="clips", unit="clip", disable=None)
    frame_bar = tqdm(desc="frames", unit="frame", disable=None)
    try:
        if cluster is not None and pending:
            calls = [(item, out, settings, kind) for item in pending]
            labels = [f"{item.split}/{item.clip}" for item in pending]
            for _, result in cluster.run(process_item, calls, labels, frame_bar.update):
                clip_bar.update()
                yield result
            return
        if workers <= 1 or len(pending) <= 1:
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
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    # spawn: each worker imports Caffe and builds its own detector, nothing is shared by fork
    context = multiprocessing.get_context("spawn")
    progress = context.Queue()
    workers = min(workers, len(pending))  # so that a single clip still gets every core
    threads = max(1, (os.cpu_count() or 1) // workers)
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(progress, threads))
    try:
        running = {pool.submit(process_item, item, out, settings, kind) for item in pending}
        while running:
            done, running = wait(running, timeout=0.2, return_when=FIRST_COMPLETED)
            try:
                while True:
                    frame_bar.update(progress.get_nowait())
            except queue.Empty:
                pass
            for future in done:
                clip_bar.update()
                yield future.result()
    except BrokenProcessPool:
        stop_pool(pool)
        raise UserError("a worker process ended abruptly (killed, by the out-of-memory killer for one); run the "
                        "same command again to go on from the finished clips, with fewer --workers if memory "
                        "is short") from None
    except BaseException:  # Ctrl-C, SIGTERM, a full disk: stop now, not after every pending clip
        stop_pool(pool)
        raise
    pool.shutdown()


def stop_pool(pool):
    """Cancels the clips not started and ends the workers at once; their clips are redone by the
    next run. (Python 3.14's pool.terminate_workers; 3.11 keeps the processes in _processes.)"""
    processes = list(pool._processes.values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join()


def print_problem(problem):
    from tqdm import tqdm

    tqdm.write(f"emotiw preprocess: {problem.split}/{problem.clip or '-'}: {problem.message}", file=sys.stderr)


def clip_coverage(rows, items):
    """Per (split, clip) of `items` with rows: frames, frames with the subject, shots, shots with it."""
    mine = {(i.split, i.clip) for i in items}
    coverage = {}
    for row in rows:
        key = row["split"], row["clip"]
        if key in mine:
            clip = coverage.setdefault(key, {"frames": 0, "faces": 0, "shots": set(), "shots_with_face": set()})
            clip["frames"] += 1
            clip["shots"].add(row["shot"])
            if row["detected"] == "1":
                clip["faces"] += 1
                clip["shots_with_face"].add(row["shot"])
    for clip in coverage.values():
        clip["shots"], clip["shots_with_face"] = len(clip["shots"]), len(clip["shots_with_face"])
        clip["coverage_percent"] = round(100.0 * clip["faces"] / clip["frames"], 2)
    return coverage


def coverage_problems(coverage, items, min_coverage):
    """A line for each clip without any face, and with min_coverage for each clip below it."""
    problems = []
    for item in items:
        clip = coverage.get((item.split, item.clip))
        if clip is None:
            continue
        if clip["faces"] == 0:
            shots = f" ({clip['shots']} shots)" if clip["shots"] > 1 else ""
            problems.append(Problem(item.split, item.clip, str(item.source),
                                    f"no face found in any of its {clip['frames']} frames{shots}"))
        elif min_coverage is not None and clip["coverage_percent"] < min_coverage:
            problems.append(Problem(item.split, item.clip, str(item.source),
                                    f"the subject is in {clip['coverage_percent']}% of the frames "
                                    f"({clip['faces']} of {clip['frames']}; {clip['shots_with_face']} of "
                                    f"{clip['shots']} shots), below --min-coverage {min_coverage}%"))
    return problems


def summarise(items, coverage, processed, problems, elapsed):
    frames = sum(clip["frames"] for clip in coverage.values())
    faces = sum(clip["faces"] for clip in coverage.values())
    frames_processed = sum(r.frames for r in processed)
    return {
        "clips": len(items),
        "clips_processed_now": len(processed),
        "clips_failed": sum(1 for r in processed if r.error),
        "clips_without_face": sum(1 for clip in coverage.values() if clip["faces"] == 0),
        "errors": len(problems),
        "frames": frames,
        "faces": faces,
        "faces_found_percent": round(100.0 * faces / frames, 2) if frames else 0.0,
        "elapsed_s": round(elapsed, 2),
        "frames_per_s": round(frames_processed / elapsed, 2) if elapsed > 0 else 0.0,
        "coverage_percent": {f"{split}/{clip}": figures["coverage_percent"]
                             for (split, clip), figures in sorted(coverage.items())},
    }


@dataclass
class PreprocessResult:
    """What `preprocess` wrote into its output folder, and summary.json's figures."""
    out: Path
    summary: dict
    problems: list  # Problem rows of errors.csv from this input folder
    manifest: Path | None = None
    detections: Path | None = None
    lists: dict = field(default_factory=dict)  # split -> lists/<split>.txt


def check_options(size, workers, subject, detect, redetect_every, shot_threshold, min_coverage):
    if (size is not None and size < 1) or workers < 1 or redetect_every < 1:
        raise UserError("--size, --workers and --redetect-every must be positive")
    if subject is not None and subject not in SUBJECT_RULES:
        raise UserError(f"--subject must be one of {', '.join(SUBJECT_RULES)}, got {subject!r}")
    if detect not in DETECT_MODES:
        raise UserError(f"--detect must be one of {', '.join(DETECT_MODES)}, got {detect!r}")
    if not shot_threshold >= 0:
        raise UserError(f"--shot-threshold must be >= 0 (0: no shot detection), got {shot_threshold}")
    if min_coverage is not None and not 0 <= min_coverage <= 100:
        raise UserError(f"--min-coverage is a percentage, 0 to 100, got {min_coverage}")


def preprocess(out, videos=None, images=None, labels=None, label_map="afew", aligned=False, mode="dsn",
               size=None, gray=False, fps=None, every=None, max_frames=None, workers=1, lmdb=False, split=None,
               dsn_frames=False, subject=None, detect="tracked", redetect_every=REDETECT_EVERY,
               shot_threshold=SHOT_THRESHOLD, min_coverage=None, ray=None) -> PreprocessResult:
    """Video clips (or still face images) -> MTCNN faces -> the subject's aligned crops and Caffe lists.

    out: the output folder; a run into it again resumes (same settings only). videos: an AFEW-style
    folder (`<Emotion>/<clip>`) or a flat folder with `labels`; images: a folder of still face images
    (e.g. RAF-DB) with `labels`; labels: a `clip,label` CSV or RAF-DB's list_patition_label.txt;
    label_map: afew (0..6), rafdb (1..7 in RAF-DB order) or none; aligned: the images are aligned
    crops (resize only); mode: dsn (facenet crop, margin 100, 400x400) or sse (5-point similarity
    warp, 128x128); size: the crop side (default the mode's); gray: one-channel crops; fps / every /
    max_frames: frame sampling; workers: clips processed in parallel; lmdb: also an LMDB and its mean
    per split; split: the split name (default the input folder's name); dsn_frames: only write every
    frame 1024 wide as DSN's extract_frames.py did; subject: facenet (the big central face of every
    frame; dsn's default) or track (the longest track of every shot; sse's default); detect:
    every-frame or tracked (full MTCNN at shot starts and every `redetect_every` frames, the
    neighbourhood of the previous faces between); shot_threshold: PySceneDetect's ContentDetector
    threshold (0: no shot detection); min_coverage: clips whose subject is in fewer than this
    percentage of frames get a line in errors.csv; ray: run the clips on a Ray cluster instead of
    `workers` processes, one task per clip (emotiw.distributed): True for `ray.init()`, or the head
    node's HOST:PORT; every node must see the inputs and `out` at the same paths.
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
    settings = Settings(mode=mode, size=size or MODES[mode].size, gray=gray, fps=fps, every=every,
                        max_frames=max_frames, aligned=aligned, subject=subject or DEFAULT_SUBJECT[mode],
                        detect=detect, redetect_every=redetect_every, shot_threshold=float(shot_threshold))
    kind = "image" if images else "video"
    root = Path(images or videos)
    items, problems = discover(root, labels, label_map, split, rafdb_prefix=kind == "image" and label_map == "rafdb")
    if not items and not problems:
        raise UserError(f"no {'images' if images else 'video clips'} found in {root}; give the folder that holds "
                        f"them (AFEW's layout: {root}/<Emotion>/<clip>, or the files in {root} itself)")
    cluster = None
    if ray:
        from emotiw.distributed import Cluster

        cluster = Cluster(ray, needs=[root, out])
    with writing_into(out):
        if dsn_frames:
            return dsn_frames_only(out, root, items, problems, started)
        return _preprocess_items(out, root, items, problems, settings, kind, workers, lmdb, min_coverage, started,
                                 cluster)


@contextlib.contextmanager
def writing_into(out):
    """Creates OUT and holds OUT/.lock for the block. A write that fails for want of space or
    permission becomes one line naming the file and the fix."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the output folder {out}: {error.strerror}; choose another --out") from None
    try:
        with exclusive_lock(out / ".lock", f"another emotiw preprocess is writing into {out} (it holds "
                                           f"{out / '.lock'}); wait for it to end or choose another --out"):
            yield
    except OSError as error:
        if error.errno not in WRITE_FIXES:
            raise
        raise UserError(f"cannot write {error.filename or out}: {error.strerror}; {WRITE_FIXES[error.errno]}, then "
                        f"run the same command again (finished clips are kept)") from None


def _preprocess_items(out, root, items, problems, settings, kind, workers, lmdb, min_coverage, started, cluster):
    check_settings(out, settings)
    remove_stale_temporaries(out)
    for problem in problems:
        print_problem(problem)
    pending = [item for item in items if not part_path(out, item).exists()]
    processed = []
    connected = cluster if cluster is not None and pending else contextlib.nullcontext()  # before the bars start
    with connected, contextlib.closing(run_items(pending, out, settings, kind, workers, cluster)) as results:
        for result in results:
            processed.append(result)
            if result.error:
                problems.append(Problem(result.item.split, result.item.clip, str(result.item.source), result.error))
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


COVERAGE_LINES = 20  # clips whose coverage is printed, lowest first


def print_summary(summary, coverage, out):
    shown = sorted((figures["coverage_percent"], key) for key, figures in coverage.items())
    for percent, (split, clip) in shown[:COVERAGE_LINES]:
        figures = coverage[split, clip]
        print(f"  {split}/{clip}: subject in {percent}% of {figures['frames']} frames "
              f"({figures['shots_with_face']} of {figures['shots']} shots)")
    if len(shown) > COVERAGE_LINES:
        print(f"  ... {len(shown) - COVERAGE_LINES} more clips (the lowest coverage first), all in {out / 'summary.json'}")
    print(f"clips {summary['clips']} ({summary['clips_processed_now']} processed now, "
          f"{summary['clips_failed']} failed, {summary['clips_without_face']} without a face, "
          f"{summary['errors']} errors); "
          f"frames {summary['frames']}, faces found {summary['faces']} ({summary['faces_found_percent']}%); "
          f"{summary['elapsed_s']} s, {summary['frames_per_s']} frames/s -> {out}")


def dsn_frames_only(out, root, items, problems, started):
    """--dsn-frames: DSN's extract_frames.py into OUT/frames/<split>/<clip>/<clip>-001.png."""
    from tqdm import tqdm

    written = 0
    for item in tqdm(items, desc="clips", unit="clip", disable=None):
        target = inside(out, "frames", item.split, item.clip)
        if target.is_dir():
            continue
        work = inside(out, "frames", item.split, f".{item.clip}.partial")
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
