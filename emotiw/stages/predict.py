"""The `predict` stage: your own videos -> emotions per frame, a picture of them, an annotated video.

Per video, the same stages as the pipeline, in a work folder inside OUT: `preprocess` (one clip,
split "predict") and `test` (the net on the subject's crops). Then, in `OUT/<video>/`:
  * frames.csv: every kept frame with its time, shot, the subject's box in source pixels and the
    7 probabilities (empty where no face was kept);
  * summary.json: the video's scores (the mean over its face frames, as `emotiw test`), the
    predicted emotion, coverage, and what made them (net, weights, settings);
  * timeline.png: the probabilities over time, shot cuts marked, frames without a face shaded;
  * annotated.mp4: the video with the subject's box and a bar per emotion, H.264, its audio copied.
Without --net, the embedded model runs: fer2013_mini_xception (emotiw/nets/fer.py), on 64x64
grayscale crops. A finished video is skipped when its summary.json says it was made from the same
video file, net, weights and options (unless `overwrite`).
"""

import contextlib
import csv
import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from emotiw import EMOTIONS
from emotiw.caffe.runtime import check_precision, reusing_nets
from emotiw.errors import UserError
from emotiw.formats.files import (
    atomic_open,
    atomic_path,
    atomic_write_text,
    file_identity,
    inside,
    replace_dir,
    sha256_of,
)
from emotiw.output import output_folder, read_state
from emotiw.stages.preprocess import preprocess
from emotiw.stages.test import test

SPLIT = "predict"
COLOURS = ("#d62728", "#8c564b", "#9467bd", "#2ca02c", "#7f7f7f", "#1f77b4", "#ff7f0e")  # per emotion
OUTPUTS = ("frames.csv", "summary.json", "timeline.png", "annotated.mp4")
POSE = ("yaw", "pitch", "roll")  # degrees, emotiw.face.mesh's convention
WORK = ".work"  # OUT/.work/<video>/: preprocess and test of the video being predicted


@dataclass(frozen=True)
class Model:
    """The net a prediction runs, and the recipe its input crops are made by (emotiw.recipes)."""
    net: str
    weights: Path
    recipe: str


def default_model():
    from emotiw.nets import fer

    return Model(fer.NAME, fer.ensure_model(), "fer2013")


def model_for(net, weights, recipe=None):
    """A registered net (or deploy prototxt) with its weights; crops by its recipe unless `recipe`."""
    from emotiw.nets.reference import resolve_net

    ref = resolve_net(net, "deploy")
    if not Path(weights).is_file():
        raise UserError(f"weights {weights} not found")
    if not (recipe or ref.recipe):
        raise UserError(f"{net} classifies feature vectors, not faces; give --recipe or a net of the DSN or SSE recipes")
    return Model(str(net), Path(weights), recipe or ref.recipe)


@dataclass
class VideoPrediction:
    video: Path
    folder: Path | None  # OUT/<video>/, None when no face was found
    emotion: str | None = None
    scores: list = field(default_factory=list)
    skipped: bool = False  # finished by an earlier run
    problem: str | None = None

    @property
    def frames(self):
        """frames.csv as a pandas DataFrame (None without a face)."""
        return None if self.folder is None else read_frames(self.folder / "frames.csv")


@dataclass
class PredictResult:
    out: Path
    videos: list  # VideoPrediction per video, in the order given

    @property
    def summary(self):
        """One row per video with a face: its emotion and the 7 scores, a pandas DataFrame."""
        import pandas as pd

        done = [video for video in self.videos if video.folder is not None]
        return pd.DataFrame({"video": [str(video.video) for video in done], "emotion": [v.emotion for v in done],
                             **{emotion: [v.scores[index] for v in done] for index, emotion in enumerate(EMOTIONS)}})


def predict(videos, out, net=None, weights=None, recipe=None, backend="auto", detect="tracked", fps=None,
            every=None, overwrite=False, annotate=True, mean_file=None, align=None, min_face=None,
            precision="fp32") -> PredictResult:
    """Emotions per frame of each video in `videos` (paths), into `out`/<video name>/.

    net / weights: a registered net or deploy prototxt and its caffemodel (default: the embedded
    fer2013_mini_xception); recipe: how crops are made, dsn, sse or fer2013 (default: the net's,
    emotiw.recipes); backend: auto, pycaffe or opencv; detect, fps, every: as for preprocess;
    overwrite: redo finished videos; annotate: also write annotated.mp4; mean_file: the
    mean.binaryproto of the net's data layer (as for test); align: as preprocess's (frontal adds
    the head pose, yaw, pitch and roll, to frames.csv); min_face: as preprocess's; precision: the
    emotion net's, as for test (the face detector stays fp32). The nets load once for all the videos.
    A finished video is skipped only when its summary.json records the same video file, net,
    weights and options; otherwise it is done again, with one line saying what changed.
    """
    if (net is None) != (weights is None):
        raise UserError("give --net and --weights together, or neither for the embedded model")
    videos = [Path(video) for video in videos]
    if not videos:
        raise UserError("no video given")
    names = [video_folder_name(video) for video in videos]
    if len(set(names)) != len(names):
        raise UserError(f"two videos share a name ({', '.join(sorted({n for n in names if names.count(n) > 1}))}); "
                        "their outputs would collide in OUT/<name>/")
    if mean_file is not None and not Path(mean_file).is_file():
        raise UserError(f"--mean-file {mean_file} not found; give the net's mean.binaryproto")
    model = default_model() if net is None else model_for(net, weights, recipe)
    options = {"recipe": model.recipe, "backend": backend, "detect": detect, "fps": fps, "every": every,
               "annotate": annotate, "mean_file": None if mean_file is None else file_identity(mean_file),
               "align": align, "min_face": min_face, "precision": check_precision(precision, backend)}
    made_by = {"net": model.net, "weights_sha256": sha256_of(model.weights), "options": options}
    with output_folder(out, "predict", inputs=videos) as out:
        shutil.rmtree(inside(out, WORK), ignore_errors=True)  # a killed run's
        with reusing_nets():
            results = _predict_all(videos, names, out, model, made_by, overwrite, mean_file)
        shutil.rmtree(inside(out, WORK), ignore_errors=True)
    if all(result.folder is None for result in results):
        failed = [result for result in results if result.problem]
        detail = f"{failed[0].video}: {failed[0].problem}" + (f" (and {len(failed) - 1} more, above)"
                                                              if len(failed) > 1 else "")
        raise UserError(f"no video was predicted; {detail}")
    return PredictResult(out, results)


def video_folder_name(video):
    """OUT/<name>/ of a video: its stem as a safe, visible folder name (no leading dot, no control
    character or slash, at most 100 characters, with a hash of the whole stem when shortened)."""
    stem = re.sub(r"[\x00-\x1f\x7f/\\]", "_", Path(video).stem).lstrip(".") or "video"
    if len(stem) > 100:
        stem = f"{stem[:83]}-{hashlib.sha256(stem.encode()).hexdigest()[:16]}"
    return stem


def _predict_all(videos, names, out, model, made_by, overwrite, mean_file):
    from tqdm import tqdm

    results = []
    for video, name in zip(tqdm(videos, desc="videos", unit="video", disable=None), names):
        folder = inside(out, name)
        identity = {"video": file_identity(video) if video.is_file() else str(video), **made_by}
        if not overwrite and all((folder / output).is_file() for output in OUTPUTS[:3]):
            summary = read_state(folder / "summary.json", "predict")
            if summary is not None and summary.get("made_by") == identity:
                results.append(VideoPrediction(video, folder, summary["emotion"], summary["scores"], skipped=True))
                continue
            if summary is not None:
                changed = [key for key in identity if summary.get("made_by", {}).get(key) != identity[key]]
                tqdm.write(f"emotiw predict: {video}: {folder} was made from another {' and '.join(changed)}; "
                           f"predicting again", file=sys.stderr)
        try:
            results.append(_predict_video(video, out, name, model, identity, mean_file))
        except UserError as error:
            tqdm.write(f"emotiw predict: {video}: {error}", file=sys.stderr)
            results.append(VideoPrediction(video, None, problem=str(error)))
    return results


def _predict_video(video, out, name, model, identity, mean_file):
    if not video.exists():
        raise UserError("no such file")
    if not video.is_file():
        raise UserError("not a video file (a folder?); give video files")
    if video.stat().st_size == 0:
        raise UserError("the file is empty")
    options = identity["options"]
    started = time.monotonic()
    work = inside(out, WORK, name)
    (work / "input").mkdir(parents=True)
    try:
        (work / "input" / f"{name}{re.sub(r'[^A-Za-z0-9.]', '', video.suffix)}").symlink_to(video.resolve())
        faces = work / "faces"
        try:
            with quiet():
                prep = preprocess(faces, videos=work / "input", split=SPLIT, recipe=model.recipe,
                                  detect=options["detect"], fps=options["fps"], every=options["every"],
                                  align=options["align"], min_face=options["min_face"])
        except UserError as error:
            raise UserError(_first_problem(faces / "errors.csv") or str(error)) from None
        with quiet():
            scored = test(model.net, model.weights, prep.lists[SPLIT].with_name(f"{SPLIT}_videos.txt"),
                          work / "scores", backend=options["backend"], mean_file=mean_file,
                          precision=options["precision"])
        rows = _frame_rows(prep, scored.out / "frames.csv")
        (clip,) = prep.summary["coverage_percent"]  # the one clip, named as preprocess names it
        sizes = json.loads((faces / "preprocess.json").read_text())["clips"][clip]
        finished = work / "finished"
        finished.mkdir()
        _write_frames(finished / "frames.csv", frames_table(rows))
        scores = [float(value) for value in np.loadtxt(scored.out / "scores.txt", ndmin=2)[0]]
        summary = {"video": str(video), "emotion": EMOTIONS[int(np.argmax(scores))],
                   "scores": dict(zip(EMOTIONS, scores)), "aggregation": "mean of the face frames' probabilities",
                   "frames": len(rows), "faces": sum(row["detected"] for row in rows),
                   "coverage_percent": prep.summary["coverage_percent"][clip],
                   "net": model.net, "weights": str(model.weights), "recipe": model.recipe,
                   "source_size": sizes["source_size"], "elapsed_s": None, "made_by": identity}
        write_timeline(finished / "timeline.png", rows, video.name)
        if options["annotate"]:
            write_annotated(video, finished / "annotated.mp4", rows, sizes)
        summary["elapsed_s"] = round(time.monotonic() - started, 2)
        summary["scores"] = list(summary["scores"].values())
        atomic_write_text(finished / "summary.json", json.dumps(summary, indent=2) + "\n")
        replace_dir(finished, inside(out, name))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return VideoPrediction(video, inside(out, name), summary["emotion"], summary["scores"])


def _first_problem(errors):
    """The message of errors.csv's first line, or None."""
    if not errors.is_file():
        return None
    with open(errors, newline="") as handle:
        return next((row["message"] for row in csv.DictReader(handle)), None)


@contextlib.contextmanager
def quiet():
    """The inner stages' summaries and progress bars stay out of predict's own output."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def _frame_rows(prep, test_frames):
    """The manifest's frames joined with the test's per-crop probabilities."""
    probabilities = {}
    with open(test_frames, newline="") as handle:
        for row in csv.DictReader(handle):
            if row["readable"] == "1":
                probabilities[Path(row["frame"]).name] = [float(row[emotion]) for emotion in EMOTIONS]
    rows = []
    with open(prep.manifest, newline="") as handle:
        for row in csv.DictReader(handle):
            probs = probabilities.get(Path(row["crop"]).name) if row["crop"] else None
            rows.append({"frame": int(row["frame"]), "time": float(row["time"]), "shot": int(row["shot"]),
                         "detected": int(probs is not None),
                         "box": [float(row[name]) for name in ("x1", "y1", "x2", "y2")] if probs else None,
                         "probabilities": probs,
                         "pose": [float(row[name]) for name in POSE] if probs and row.get("yaw") else None})
    return rows


def frames_table(rows):
    """The per-frame DataFrame that frames.csv holds (NaN box and probabilities without a face)."""
    import pandas as pd

    table = pd.DataFrame({
        "frame": [row["frame"] for row in rows], "time": [row["time"] for row in rows],
        "shot": [row["shot"] for row in rows], "detected": [row["detected"] for row in rows]})
    boxes = np.array([row["box"] or [np.nan] * 4 for row in rows], dtype=np.float64).reshape(-1, 4)
    probs = np.array([row["probabilities"] or [np.nan] * len(EMOTIONS) for row in rows], dtype=np.float64)
    probs = probs.reshape(-1, len(EMOTIONS))
    for index, name in enumerate(("x1", "y1", "x2", "y2")):
        table[name] = boxes[:, index].round(2)
    if any(row.get("pose") for row in rows):  # --align frontal: the head pose of each face frame
        poses = np.array([row.get("pose") or [np.nan] * 3 for row in rows], dtype=np.float64).reshape(-1, 3)
        for index, name in enumerate(POSE):
            table[name] = poses[:, index].round(2)
    table["prediction"] = [EMOTIONS[int(np.argmax(p))] if row["probabilities"] else None
                           for p, row in zip(probs, rows)]
    for index, emotion in enumerate(EMOTIONS):
        table[emotion] = probs[:, index].round(6)
    return table


def read_frames(path):
    """frames.csv back as the DataFrame it was written from."""
    import pandas as pd

    return pd.read_csv(path)


def _write_frames(path, table):
    with atomic_open(path, "w", newline="") as handle:
        table.to_csv(handle, index=False, lineterminator="\n")


def write_timeline(path, rows, title):
    """The 7 probabilities over time; shot cuts dashed, frames without a face shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = np.array([row["time"] for row in rows])
    probs = np.array([row["probabilities"] or [np.nan] * len(EMOTIONS) for row in rows])
    with_pose = any(row.get("pose") for row in rows)  # --align frontal: a head-pose strip below
    figure, panels = plt.subplots(2 if with_pose else 1, figsize=(10, 5.4 if with_pose else 3.6), dpi=100,
                                  sharex=True, squeeze=False, gridspec_kw={"height_ratios": [2, 1][:1 + with_pose]})
    axes = panels[0, 0]
    for index, emotion in enumerate(EMOTIONS):
        axes.plot(times, probs[:, index], color=COLOURS[index], label=emotion, linewidth=1.4)
    step = float(np.median(np.diff(times))) if len(times) > 1 else 0.04
    for row in rows:
        if not row["detected"]:
            axes.axvspan(row["time"] - step / 2, row["time"] + step / 2, color="0.9", linewidth=0)
    for before, after in zip(rows, rows[1:]):
        if after["shot"] != before["shot"]:
            axes.axvline(after["time"], color="0.3", linestyle="--", linewidth=0.8)
    axes.set(xlabel="" if with_pose else "time (s)", ylabel="probability", ylim=(0, 1),
             title=f"{title}: emotions per frame (dashed: shot cuts; grey: no face)")
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    if with_pose:
        strip = panels[1, 0]
        poses = np.array([row.get("pose") or [np.nan] * 3 for row in rows], dtype=np.float64)
        for index, (name, colour) in enumerate(zip(POSE, ("#1f77b4", "#ff7f0e", "#2ca02c"))):
            strip.plot(times, poses[:, index], color=colour, label=name, linewidth=1.2)
        strip.axhline(0, color="0.6", linewidth=0.6)
        strip.set(xlabel="time (s)", ylabel="head pose (deg)")
        strip.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    figure.tight_layout()
    with atomic_open(path, "wb") as handle:
        figure.savefig(handle, format="png")
    plt.close(figure)


def write_annotated(video, path, rows, sizes):
    """The video as players show it, with the subject's box and the probabilities drawn, H.264;
    the source's first audio stream is copied, interleaved by time."""
    import av
    import cv2

    from emotiw.face.video import iter_frames

    by_frame = {row["frame"]: row for row in rows}
    to_display = np.divide(sizes["detect_size"], sizes["source_size"])
    with av.open(str(video)) as source:
        rate = source.streams.video[0].average_rate or 25
        audio_in = source.streams.audio[0] if source.streams.audio else None
    with atomic_path(path) as tmp, av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.pix_fmt, stream.thread_count, stream.options = "yuv420p", 1, {"qp": "23", "preset": "veryfast"}
        width, height = (size // 2 * 2 for size in sizes["detect_size"])  # yuv420p: even sizes
        stream.width, stream.height = width, height
        audio = _AudioCopy(video, container) if audio_in is not None else None
        for frame in iter_frames(video):
            image = np.ascontiguousarray(frame.image[:height, :width])
            shown = by_frame.get(frame.index)
            if shown is not None and shown["detected"]:
                x1, y1, x2, y2 = (np.array(shown["box"]) * np.tile(to_display, 2)).round().astype(int)
                cv2.rectangle(image, (x1, y1), (x2, y2), (255, 210, 0), 2)
            if shown is not None and shown["probabilities"]:
                _draw_bars(image, shown["probabilities"])
            if shown is not None and shown.get("pose"):
                _draw_axes(image, (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, shown["pose"])
            if audio is not None:
                audio.mux_until(frame.time)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
        if audio is not None:
            audio.mux_until(float("inf"))
            audio.close()


def _draw_axes(image, x, y, length, pose):
    """The head's axes from the face's centre (--align frontal): its right red, its up green, where
    the nose points blue (emotiw.face.mesh's convention)."""
    import cv2

    from emotiw.face.mesh import rotation_of

    rotation = rotation_of(*pose)
    for axis, colour in (((1, 0, 0), (230, 40, 40)), ((0, -1, 0), (40, 200, 40)), ((0, 0, -1), (40, 120, 255))):
        dx, dy, _ = rotation @ np.array(axis, dtype=np.float64)
        cv2.line(image, (int(x), int(y)), (int(x + length * dx), int(y + length * dy)), colour, 2, cv2.LINE_AA)


def _draw_bars(image, probabilities):
    """A bar per emotion in the top-left corner, the largest highlighted."""
    import cv2

    scale = max(image.shape[0] / 480.0, 0.5)
    row_height, width = int(16 * scale), int(120 * scale)
    best = int(np.argmax(probabilities))
    for index, (emotion, p) in enumerate(zip(EMOTIONS, probabilities)):
        top = int(8 * scale) + index * row_height
        colour = tuple(int(COLOURS[index][k:k + 2], 16) for k in (1, 3, 5))
        cv2.rectangle(image, (int(70 * scale), top + 2), (int(70 * scale) + int(width * p), top + row_height - 2),
                      colour, -1)
        cv2.putText(image, emotion, (int(4 * scale), top + row_height - 4), cv2.FONT_HERSHEY_SIMPLEX,
                    0.4 * scale, (255, 255, 255) if index == best else (200, 200, 200), 1, cv2.LINE_AA)


class _AudioCopy:
    """The source's first audio stream, copied packet by packet into another container."""

    def __init__(self, video, container):
        import av

        self.source = av.open(str(video))
        self.input = self.source.streams.audio[0]
        self.output = container.add_stream_from_template(self.input)
        self.container = container
        self.packets = (packet for packet in self.source.demux(self.input) if packet.dts is not None)
        self.pending = next(self.packets, None)

    def mux_until(self, seconds):
        while self.pending is not None and float(self.pending.pts * self.pending.time_base) <= seconds:
            self.pending.stream = self.output
            self.container.mux(self.pending)
            self.pending = next(self.packets, None)

    def close(self):
        self.source.close()
