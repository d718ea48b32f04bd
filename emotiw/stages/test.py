"""The `test` stage: per-video testing of a deploy net on every face frame, as DSN's test_video.py does.

A video list holds one clip per line, `<clip frame folder> <label>`; every image in the folder (in
sorted file-name order) is one face frame. The frames go through the net in batches, with pycaffe or
OpenCV DNN, and a clip's score is the mean (or, as in DSN, the sum) of its frames' `prob` rows. A
clip without a readable face frame gets a fallback score, the class prior of a training list
(--prior-list) or else the uniform distribution, and is flagged in predictions.csv.

The frames are scored in tasks of whole forward passes of one clip (emotiw.execution: here, or on a
Ray cluster), so a clip's scores never depend on another clip's frames. The test-time transform
follows the net's recipe (emotiw.recipes) unless `recipe` says otherwise (emotiw.caffe.transform).
"""

import csv
import hashlib
import json
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

from emotiw import EMOTIONS, NO_LABEL
from emotiw.caffe.proto import read_net_param
from emotiw.caffe.runtime import check_backend, check_precision, load_net, reusing_nets
from emotiw.caffe.transform import choose_transform
from emotiw.caffe.weights import check_weights
from emotiw.errors import UserError
from emotiw.execution import Executor, Progress
from emotiw.formats.files import atomic_open, file_identity, safe_name
from emotiw.formats.lists import read_clips, read_list, source_type
from emotiw.formats.scores import TestResult, format_score, write_clip_outputs, write_scores_txt
from emotiw.memory import check_batch_fits
from emotiw.metrics import clip_metrics
from emotiw.nets.reference import resolve_net
from emotiw.output import output_folder
from emotiw.recipes import NO_RECIPE, get_recipe

AGGREGATIONS = ("mean", "sum")
CHECKPOINT_NAME = ".test-checkpoint.npz"
CHECKPOINT_SECONDS = 60
PASSES_PER_TASK = 16  # forward passes of one clip per task: a checkpoint is never further behind
SHOWN_PROBLEMS = 10  # clip folders named on the terminal; metrics.json lists them all


# ------------------------------------------------------------------------------------------
# Frame scoring with a resumable checkpoint

def run_signature(deploy, weights, backend, blobs, transform, frames, fold, precision="fp32"):
    """What the frame scores depend on; a checkpoint from another run is not reused."""
    description = [file_identity(deploy), file_identity(weights), backend, list(blobs),
                   transform.describe(), [str(frame) for frame in frames], fold]
    if precision != "fp32":  # fp32 runs keep the signatures of checkpoints written before bf16 existed
        description.append(precision)
    return hashlib.sha256(json.dumps(description, default=str).encode()).hexdigest()


def _load_checkpoint(path, signature, scores, readable):
    """Fills `scores`/`readable` from a checkpoint of the same run; returns the frames already done."""
    if not path.is_file():
        return 0
    try:
        with np.load(path) as saved:
            if str(saved["signature"]) != signature:
                return 0
            done = int(saved["done"])
            readable[:done] = saved["readable"][:done]
            for index, rows in enumerate(scores.values()):
                rows[:done] = saved[f"blob{index}"][:done]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        print(f"emotiw test: {path} is damaged; scoring every frame again", file=sys.stderr)
        readable[:] = False
        return 0
    return done


def _save_checkpoint(path, signature, done, scores, readable):
    arrays = {f"blob{index}": rows[:done] for index, rows in enumerate(scores.values())}
    with atomic_open(path, "wb") as handle:
        np.savez(handle, signature=signature, done=done, readable=readable[:done], **arrays)


def batch_spans(clip_sizes, batch_size):
    """(start, stop) of each forward pass over the frames of clips of these sizes, one clip after the
    other: `batch_size` frames at a time, never across a clip boundary. A clip's scores then depend on
    its own frames only, and a clip scored alone (on a Ray worker) gives the same bytes."""
    spans, start = [], 0
    for size in clip_sizes:
        spans += [(first, min(first + batch_size, start + size)) for first in range(start, start + size, batch_size)]
        start += size
    return spans


def score_batch(backend, transform, paths, blobs):
    """One forward pass: ({blob: a row per readable image}, the readable mask)."""
    images = [transform.load(path) for path in paths]
    ok = np.array([image is not None for image in images])
    if not ok.any():
        return {}, ok
    outputs = backend.forward(np.stack([image for image in images if image is not None]), blobs)
    return {name: outputs[name].reshape(int(ok.sum()), -1) for name in blobs}, ok


def score_clip(net, transform, frames, blobs, batch_size, progress=None):
    """One task: forward passes over frames of one clip, from one pass's start, `batch_size` at a
    time: [(offset, rows, readable)] per pass. net: load_net's arguments (a run loads the net once,
    reusing_nets; a Ray worker keeps it loaded between tasks)."""
    backend, _ = load_net(*net)
    parts = []
    for start, stop in batch_spans([len(frames)], batch_size):
        parts.append((start, *score_batch(backend, transform, frames[start:stop], blobs)))
        if progress is not None:
            progress(stop - start)
    return parts


def scoring_tasks(clip_sizes, batch_size, done=0):
    """(first, stop) of each task: up to PASSES_PER_TASK forward passes of one clip (batch_spans),
    those ending after `done` (a checkpoint ends on a pass's end), so that a clip taken up there gets
    the passes of an uninterrupted run."""
    tasks, start = [], 0
    for size in clip_sizes:
        spans = [(start + first, start + stop) for first, stop in batch_spans([size], batch_size)
                 if start + stop > done]
        tasks += [(spans[k][0], spans[min(k + PASSES_PER_TASK, len(spans)) - 1][1])
                  for k in range(0, len(spans), PASSES_PER_TASK)]
        start += size
    return tasks


def score_frames(runner, transform, frames, blobs, batch_size, net, checkpoint=None, signature="",
                 clip_sizes=None, executor=None):
    """Per-frame rows of every blob (NaN rows for unreadable images) and the readable mask.

    runner: the loaded net, for the blobs' sizes; net: load_net's arguments for the tasks (in this
    process within reusing_nets, `runner` itself). clip_sizes: the frames of each clip, in order
    (default: one clip); no forward pass crosses a clip boundary (batch_spans). With a checkpoint
    path, progress is saved every CHECKPOINT_SECONDS and a rerun resumes there. executor: where the
    tasks run (default here)."""
    probe = runner.forward(np.zeros((1, *runner.input_shape), dtype=np.float32), blobs)
    scores = {name: np.full((len(frames), probe[name][0].size), np.nan) for name in blobs}
    readable = np.zeros(len(frames), dtype=bool)
    done = _load_checkpoint(checkpoint, signature, scores, readable) if checkpoint else 0
    finished = np.arange(len(frames)) < done
    tasks = scoring_tasks([len(frames)] if clip_sizes is None else clip_sizes, batch_size, done)
    calls = [(net, transform, frames[first:stop], blobs, batch_size) for first, stop in tasks]
    labels = [f"frames {first} to {stop - 1}" for first, stop in tasks]
    saved_at = time.monotonic()
    executor = executor or Executor()
    for index, parts in executor.map(score_clip, calls, labels, Progress("frames", total=len(frames), done=done)):
        for offset, rows, ok in parts:
            start = tasks[index][0] + offset
            stop = start + len(ok)
            for name, values in rows.items():
                scores[name][start:stop][ok] = values
            readable[start:stop] = ok
            finished[start:stop] = True
        if checkpoint and time.monotonic() - saved_at > CHECKPOINT_SECONDS:
            # the frames before the first unfinished one: Ray's tasks finish in any order
            prefix = len(frames) if finished.all() else int(np.argmin(finished))
            _save_checkpoint(checkpoint, signature, prefix, scores, readable)
            saved_at = time.monotonic()
    return scores, readable


# ------------------------------------------------------------------------------------------
# Clip scores and metrics

def class_prior(train_list):
    """Label frequencies of a training list (frames or clips, `<path> <label>` per line)."""
    _, labels = read_list(train_list, "training list")
    known = labels[labels != NO_LABEL] if labels is not None else np.array([], dtype=int)
    if len(known) == 0:
        raise UserError(f"{train_list}: no labels, so no class prior; give a labelled training list")
    return np.bincount(known, minlength=len(EMOTIONS)) / len(known)


def fallback_row(width, prior):
    """Scores for a clip with no face frame: the prior when the blob has one value per class."""
    return prior if width == len(prior) else np.full(width, 1.0 / width)


def aggregate(clips, frame_scores, readable, how, prior):
    """(clip scores, faces per clip): mean or sum of each clip's readable frame rows, or the fallback."""
    width = frame_scores.shape[1]
    clip_scores = np.empty((len(clips), width))
    faces = np.zeros(len(clips), dtype=np.int64)
    start = 0
    for index, clip in enumerate(clips):
        stop = start + len(clip.frames)
        rows = frame_scores[start:stop][readable[start:stop]]
        faces[index] = len(rows)
        if len(rows):
            clip_scores[index] = rows.sum(axis=0) if how == "sum" else rows.mean(axis=0)
        else:
            clip_scores[index] = fallback_row(width, prior)
        start = stop
    return clip_scores, faces


# ------------------------------------------------------------------------------------------
# Outputs

def blob_scores_name(blob):
    """File of an extra blob's clip scores: scores_<blob>.txt with a file-name-safe blob name."""
    return f"scores_{safe_name(blob)}.txt"


def write_frames_csv(path, clips, scores, readable, blobs):
    extras = blobs[1:]
    header = ["clip", "frame", "readable", "prediction", *EMOTIONS]
    for name in extras:
        header += [f"{name}_{index}" for index in range(scores[name].shape[1])]
    frame = 0
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        for clip in clips:
            for path_of_frame in clip.frames:
                values = [scores[name][frame] for name in blobs]
                if readable[frame]:
                    cells = [int(values[0].argmax())] + [format_score(v) for row in values for v in row]
                else:
                    cells = [""] * (1 + sum(len(row) for row in values))
                writer.writerow([clip.entry, str(path_of_frame), int(readable[frame]), *cells])
                frame += 1


def no_frames_message(clips, video_list):
    """Why a list gave no frame at all: its clip folders are missing or empty."""
    missing = [clip.entry for clip in clips if clip.problem == "missing"]
    example = (missing or [clips[0].entry])[0]
    return (f"none of the {len(clips)} clips of {video_list} has a face frame ({len(missing)} clip folders "
            f"missing, {len(clips) - len(missing)} without images; e.g. {example}); relative folders are looked "
            "up beside the list, then in the working directory: fix the paths or preprocess the clips first")


def report_problems(clips, frames, readable):
    """Names the clips that gave no frame and the unreadable images; returns them for metrics.json."""
    problems = {kind: [clip.entry for clip in clips if clip.problem == kind] for kind in ("missing", "empty")}
    unreadable = [str(path) for path, ok in zip(frames, readable) if not ok]
    for kind, what in (("missing", "clip folder(s) missing"), ("empty", "clip folder(s) without face frames")):
        entries = problems[kind]
        if entries:
            more = f" and {len(entries) - SHOWN_PROBLEMS} more" if len(entries) > SHOWN_PROBLEMS else ""
            print(f"warning: {len(entries)} {what}: {', '.join(entries[:SHOWN_PROBLEMS])}{more}", file=sys.stderr)
    if unreadable:
        print(f"warning: {len(unreadable)} frame image(s) could not be read, e.g. {unreadable[0]}", file=sys.stderr)
    return {"missing_folders": problems["missing"], "empty_folders": problems["empty"],
            "unreadable_frames": unreadable}


def write_outputs(out_dir, clips, blobs, scores, readable, clip_scores, faces, metrics, config):
    """Writes every output file of `test`; returns their paths."""
    files = write_clip_outputs(out_dir, [clip.entry for clip in clips], [clip.label for clip in clips],
                               clip_scores[blobs[0]], metrics, config, n_frames=faces, fallback=faces == 0)
    for name in blobs[1:]:
        files.append(out_dir / blob_scores_name(name))
        write_scores_txt(files[-1], clip_scores[name])
    files.append(out_dir / "frames.csv")
    write_frames_csv(files[-1], clips, scores, readable, blobs)
    return files


def test(net, weights, videos, out, backend="auto", batch=16, agg="mean", blobs=("prob",), recipe=None,
         mean_file=None, prior_list=None, allow_partial=False, fold=True, ray=None, precision="fp32") -> TestResult:
    """Tests a deploy net on every clip of a video list: per-frame blobs, per-clip scores and metrics.

    net: a registered name or a deploy prototxt; weights: its .caffemodel; videos: a video list
    (`<clip frame folder> <label>` per line); out: the output folder (scores.txt, scores_<blob>.txt,
    predictions.csv, frames.csv, metrics.json, confusion.png); backend: auto, pycaffe or opencv;
    batch: frames per forward pass; agg: mean or sum of a clip's frame scores; blobs: the first gives
    scores.txt and must hold the 7 class scores; recipe: whose test-time transform (emotiw.recipes:
    dsn, sse, fer2013, or none for a plain resize; default: the net's); mean_file: a mean.binaryproto
    for a data layer's transform; prior_list: a training list whose class prior scores clips without
    a face (default uniform); allow_partial: run even when the weights leave layers at their random
    filler init (refused by default); fold: pycaffe runs the net with BatchNorm and Scale folded into
    the convolution before them (emotiw.caffe.fold; the files stay as they are); ray: score the clips
    on a Ray cluster (emotiw.execution): True for `ray.init()`, or the head node's HOST:PORT; every
    node must see the list, its frames and the net at the same paths; precision: fp32, or bf16 for
    the convolutions on CPUs with AVX512-BF16 or AMX (emotiw.caffe.runtime).
    A rerun resumes from a checkpoint in `out`. Refuses a list none of whose clips has a readable
    face frame; feature vectors are scored by `score_features`.
    """
    blobs = list(dict.fromkeys(blobs))
    if batch < 1:
        raise UserError(f"--batch must be at least 1, not {batch}")
    check_backend(backend)
    check_precision(precision, backend)
    ref = resolve_net(net, "deploy")
    if Path(videos).is_file() and source_type(videos) == "hdf5":
        raise UserError(f"{videos} lists feature vectors, not clip folders; score them with `emotiw score-features "
                        f"--net {net} --weights {weights} --features {videos} --out {out}`")
    name = recipe or ref.recipe or NO_RECIPE
    chosen = None if name == NO_RECIPE else get_recipe(name)
    deploy = ref.file
    executor = Executor(ray=ray, needs=[videos, deploy, weights])
    clips = read_clips(videos)
    if not any(clip.frames for clip in clips):
        raise UserError(no_frames_message(clips, videos))
    prior = class_prior(prior_list) if prior_list else np.full(len(EMOTIONS), 1.0 / len(EMOTIONS))
    check_weights(ref.param_shapes(), weights, str(deploy), allow_partial=allow_partial)
    check_batch_fits(read_net_param(deploy), batch)
    spec = (deploy, weights, backend, ref.preferred_backend, fold, blobs, precision)
    out = Path(out)
    with output_folder(out, "test", inputs=[videos]):
        with reusing_nets():  # the tasks run here get back the net loaded now
            runner, backend = load_net(*spec)
            unknown = [name for name in blobs if name not in runner.blob_names]
            if unknown:
                raise UserError(f"no blob {', '.join(unknown)} in {deploy}; blobs: {', '.join(runner.blob_names)}")
            transform = choose_transform(chosen, deploy, runner.input_shape, mean_file)
            frames = [frame for clip in clips for frame in clip.frames]
            checkpoint = out / CHECKPOINT_NAME
            signature = run_signature(deploy, weights, backend, blobs, transform, frames, fold and backend == "pycaffe",
                                      precision)
            with executor:  # connected before the bar starts
                scores, readable = score_frames(runner, transform, frames, blobs, batch, spec, checkpoint, signature,
                                                [len(clip.frames) for clip in clips], executor)
        if not readable.any():
            checkpoint.unlink(missing_ok=True)
            raise UserError(f"none of the {len(frames)} frame images of the clips of {videos} could be read, "
                            f"e.g. {frames[0]}; every clip would get the fallback scores")
        if scores[blobs[0]].shape[1] != len(EMOTIONS):
            raise UserError(f"blob {blobs[0]} has {scores[blobs[0]].shape[1]} values per frame; the first "
                            f"--blobs entry must hold the {len(EMOTIONS)} class scores (e.g. prob)")
        clip_scores, faces = {}, None
        for name in blobs:
            clip_scores[name], faces = aggregate(clips, scores[name], readable, agg, prior)
        labels = np.array([clip.label for clip in clips], dtype=np.int64)
        metrics = {"clips": len(clips), "clips_with_faces": int((faces > 0).sum()),
                   "fallback_clips": int((faces == 0).sum()), "frames": len(frames),
                   **(clip_metrics(labels, clip_scores[blobs[0]], faces) or {"accuracy": None})}
        metrics["blob_accuracy"] = {name: clip_metrics(labels, clip_scores[name], faces)["accuracy"]
                                    for name in blobs[1:]
                                    if clip_scores[name].shape[1] == len(EMOTIONS) and metrics["accuracy"] is not None}
        metrics.update(report_problems(clips, frames, readable))
        config = {"net": str(deploy), "net_name": ref.name, "weights": str(weights), "videos": str(videos),
                  "backend": backend, "precision": precision, "fold": fold, "batch": batch, "aggregation": agg,
                  "blobs": blobs,
                  "recipe": chosen.name if chosen else NO_RECIPE, "preprocessing": transform.describe(),
                  "fallback": f"class prior of {prior_list}" if prior_list else "uniform",
                  "fallback_scores": prior.tolist()}
        files = write_outputs(out, clips, blobs, scores, readable, clip_scores, faces, metrics, config)
        checkpoint.unlink(missing_ok=True)
    return TestResult(out=out, metrics={**metrics, "config": config}, files=files)
