"""The `test` stage: per-video testing of a deploy net on every face frame, as DSN's test_video.py does.

A video list holds one clip per line, `<clip frame folder> <label>`; every image in the folder (in
sorted file-name order) is one face frame. The frames go through the net in batches, with pycaffe or
OpenCV DNN, and a clip's score is the mean (or, as in DSN, the sum) of its frames' `prob` rows. A
clip without a readable face frame gets a fallback score, the class prior of a training list
(--prior-list) or else the uniform distribution, and is flagged in predictions.csv.

Preprocessing follows the net's paper unless `preprocess` says otherwise (emotiw.caffe.transform).
"""

import contextlib
import csv
import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from emotiw import EMOTIONS
from emotiw.caffe.runtime import check_backend, load_net
from emotiw.caffe.transform import choose_preprocessing
from emotiw.caffe.weights import check_weights
from emotiw.errors import UserError
from emotiw.formats.files import atomic_open, atomic_write_text, file_identity
from emotiw.formats.lists import NO_LABEL, list_frames, read_list, resolve_listed_path
from emotiw.formats.scores import format_score, write_predictions_csv, write_scores_txt
from emotiw.metrics import classification_metrics, compact_json, plot_confusion
from emotiw.nets.reference import resolve_net
from emotiw.stages.train import feature_set_of, read_features, source_type

AGGREGATIONS = ("mean", "sum")
CHECKPOINT_NAME = ".test-checkpoint.npz"
CHECKPOINT_SECONDS = 60
SHOWN_PROBLEMS = 10  # clip folders named on the terminal; metrics.json lists them all


# ------------------------------------------------------------------------------------------
# Lists, clips and nets

@dataclass
class Clip:
    entry: str        # the clip as written in the list
    label: int        # NO_LABEL when the list has none
    frames: list      # image paths, sorted
    problem: str = ""  # "missing" or "empty" when the folder gives no frame


def read_clips(video_list):
    """The clips of a video list, with their frames; missing or empty folders are kept and flagged."""
    entries, labels = read_list(video_list)
    if labels is None:
        labels = [NO_LABEL] * len(entries)
    clips = []
    for entry, label in zip(entries, labels):
        folder = resolve_listed_path(entry, video_list)
        frames = list_frames(folder) if folder.is_dir() else []
        problem = "" if frames else ("empty" if folder.is_dir() else "missing")
        clips.append(Clip(entry=entry, label=int(label), frames=frames, problem=problem))
    return clips


# ------------------------------------------------------------------------------------------
# Frame scoring with a resumable checkpoint

def run_signature(deploy, weights, backend, blobs, preprocessing, frames, fold):
    """What the frame scores depend on; a checkpoint from another run is not reused."""
    description = [file_identity(deploy), file_identity(weights), backend, list(blobs),
                   preprocessing.describe(), [str(frame) for frame in frames], fold]
    return hashlib.sha256(json.dumps(description, default=str).encode()).hexdigest()


def _load_checkpoint(path, signature, scores, readable):
    """Fills `scores`/`readable` from a checkpoint of the same run; returns the frames already done."""
    if not path.is_file():
        return 0
    with np.load(path) as saved:
        if str(saved["signature"]) != signature:
            return 0
        done = int(saved["done"])
        readable[:done] = saved["readable"][:done]
        for index, rows in enumerate(scores.values()):
            rows[:done] = saved[f"blob{index}"][:done]
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


def score_batch(backend, preprocessing, paths, blobs):
    """One forward pass: ({blob: a row per readable image}, the readable mask)."""
    images = [preprocessing.load(path) for path in paths]
    ok = np.array([image is not None for image in images])
    if not ok.any():
        return {}, ok
    outputs = backend.forward(np.stack([image for image in images if image is not None]), blobs)
    return {name: outputs[name].reshape(int(ok.sum()), -1) for name in blobs}, ok


def score_clip(net, preprocessing, frames, blobs, batch_size, progress=None):
    """One clip's frames (or those left of it after a checkpoint) on a Ray worker, which keeps the net
    loaded between clips (emotiw.distributed): [(offset, rows, readable)] per forward pass. net:
    load_net's arguments."""
    backend, _ = load_net(*net)
    parts = []
    for start, stop in batch_spans([len(frames)], batch_size):
        parts.append((start, *score_batch(backend, preprocessing, frames[start:stop], blobs)))
        if progress is not None:
            progress(stop - start)
    return parts


def _local_parts(backend, preprocessing, frames, blobs, spans, progress):
    for start, stop in spans:
        part = (start, *score_batch(backend, preprocessing, frames[start:stop], blobs))
        progress(stop - start)
        yield part


def _cluster_parts(cluster, net, preprocessing, frames, blobs, batch_size, clip_sizes, done, progress):
    """Each clip with frames left is one Ray task; a checkpoint ends on a forward pass's end, so a
    clip taken up there gets the same passes as an uninterrupted run."""
    bounds = np.cumsum([0, *clip_sizes])
    ranges = [(max(int(first), done), int(stop)) for first, stop in zip(bounds[:-1], bounds[1:])]
    ranges = [(first, stop) for first, stop in ranges if stop > first]  # not empty, not checkpointed
    calls = [(net, preprocessing, frames[first:stop], blobs, batch_size) for first, stop in ranges]
    labels = [f"frames {first} to {stop - 1}" for first, stop in ranges]
    for index, parts in cluster.run(score_clip, calls, labels, progress):
        for offset, rows, ok in parts:
            yield ranges[index][0] + offset, rows, ok


def score_frames(backend, preprocessing, frames, blobs, batch_size, checkpoint=None, signature="",
                 clip_sizes=None, cluster=None, net=None):
    """Per-frame rows of every blob (NaN rows for unreadable images) and the readable mask.

    clip_sizes: the frames of each clip, in order (default: one clip); no forward pass crosses a
    clip boundary (batch_spans). With a checkpoint path, progress is saved every CHECKPOINT_SECONDS
    and a rerun resumes there. cluster: a connected emotiw.distributed.Cluster that scores the clips,
    one Ray task each, its workers loading the net with load_net(*net); `backend` then only gives
    the blobs' sizes."""
    from tqdm import tqdm

    probe = backend.forward(np.zeros((1, *backend.input_shape), dtype=np.float32), blobs)
    scores = {name: np.full((len(frames), probe[name][0].size), np.nan) for name in blobs}
    readable = np.zeros(len(frames), dtype=bool)
    done = _load_checkpoint(checkpoint, signature, scores, readable) if checkpoint else 0
    finished = np.arange(len(frames)) < done
    clip_sizes = [len(frames)] if clip_sizes is None else clip_sizes
    saved_at = time.monotonic()
    with tqdm(total=len(frames), initial=done, unit="frame", desc="frames", disable=None) as bar:
        if cluster is None:
            spans = [(start, stop) for start, stop in batch_spans(clip_sizes, batch_size) if stop > done]
            parts = _local_parts(backend, preprocessing, frames, blobs, spans, bar.update)
        else:
            parts = _cluster_parts(cluster, net, preprocessing, frames, blobs, batch_size, clip_sizes, done, bar.update)
        for start, rows, ok in parts:
            stop = start + len(ok)
            for name, values in rows.items():
                scores[name][start:stop][ok] = values
            readable[start:stop] = ok
            finished[start:stop] = True
            if checkpoint and time.monotonic() - saved_at > CHECKPOINT_SECONDS:
                # the frames before the first unfinished one: Ray's clips finish in any order
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


def clip_metrics(labels, clip_scores, faces):
    """metrics.json's scores, over the labelled clips; None when the list has no label."""
    labelled = labels != NO_LABEL
    if not labelled.any():
        return None
    predictions = clip_scores.argmax(axis=1)
    metrics = classification_metrics(labels[labelled], predictions[labelled])
    with_face = labelled & (faces > 0)
    metrics["accuracy_with_faces"] = (float((predictions[with_face] == labels[with_face]).mean())
                                      if with_face.any() else None)
    metrics["labelled_clips"] = int(labelled.sum())
    metrics["labelled_clips_with_faces"] = int(with_face.sum())
    return metrics


# ------------------------------------------------------------------------------------------
# Outputs

def blob_scores_name(blob):
    """File of an extra blob's clip scores: scores_<blob>.txt with a file-name-safe blob name."""
    return "scores_" + re.sub(r"[^A-Za-z0-9_.-]", "_", blob) + ".txt"


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


def write_clip_outputs(out_dir, clips, labels, scores, metrics, config, n_frames=None, fallback=None):
    """The per-clip files every test writes: scores.txt, predictions.csv, metrics.json and, with
    labels, confusion.png; returns their paths."""
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
    """What `test` wrote and measured: metrics.json's content and the output files."""
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


def test(net, weights, videos, out, backend="auto", batch=16, agg="mean", blobs=("prob",), preprocess=None,
         mean_file=None, prior_list=None, allow_partial=False, fold=True, ray=None):
    """Tests a deploy net on every clip of a video list: per-frame blobs, per-clip scores and metrics.

    net: a registered name or a deploy prototxt; weights: its .caffemodel; videos: a video list
    (`<clip frame folder> <label>` per line); out: the output folder (scores.txt, scores_<blob>.txt,
    predictions.csv, frames.csv, metrics.json, confusion.png); backend: auto, pycaffe or opencv;
    batch: frames per forward pass; agg: mean or sum of a clip's frame scores; blobs: the first gives
    scores.txt and must hold the 7 class scores; preprocess: dsn, sse or none (default: the net's
    paper); mean_file: a mean.binaryproto for sse; prior_list: a training list whose class prior
    scores clips without a face (default uniform); allow_partial: run even when the weights leave
    layers at their random filler init (refused by default); fold: pycaffe runs the net with BatchNorm
    and Scale folded into the convolution before them (emotiw.caffe.fold; the files stay as they are);
    ray: score the clips on a Ray cluster, one task per clip (emotiw.distributed): True for
    `ray.init()`, or the head node's HOST:PORT; every node must see the list, its frames and the net
    at the same paths (feature classifiers, one forward pass for all clips, run here).
    A rerun resumes from a checkpoint in `out`. Refuses a list none of whose clips has a readable face frame.
    """
    blobs = list(dict.fromkeys(blobs))
    if batch < 1:
        raise UserError(f"--batch must be at least 1, not {batch}")
    check_backend(backend)
    ref = resolve_net(net, "deploy")
    if Path(videos).is_file() and source_type(videos) == "hdf5":
        return test_features(ref, weights, videos, out, backend, batch, allow_partial, fold)
    deploy = ref.file
    cluster = None
    if ray:
        from emotiw.distributed import Cluster

        cluster = Cluster(ray, needs=[videos, deploy, weights])
    clips = read_clips(videos)
    if not any(clip.frames for clip in clips):
        raise UserError(no_frames_message(clips, videos))
    prior = class_prior(prior_list) if prior_list else np.full(len(EMOTIONS), 1.0 / len(EMOTIONS))
    check_weights(str(deploy), weights, allow_partial=allow_partial)
    runner, backend = load_net(deploy, weights, backend, ref.preferred_backend, fold, keep=blobs)
    unknown = [name for name in blobs if name not in runner.blob_names]
    if unknown:
        raise UserError(f"no blob {', '.join(unknown)} in {deploy}; blobs: {', '.join(runner.blob_names)}")
    kind = preprocess or ref.paper
    preprocessing = choose_preprocessing(kind, deploy, runner.input_shape, mean_file)
    frames = [frame for clip in clips for frame in clip.frames]
    out = Path(out)
    checkpoint = out / CHECKPOINT_NAME
    signature = run_signature(deploy, weights, backend, blobs, preprocessing, frames, fold and backend == "pycaffe")
    with cluster or contextlib.nullcontext():  # connected before the bar starts
        scores, readable = score_frames(runner, preprocessing, frames, blobs, batch, checkpoint, signature,
                                        [len(clip.frames) for clip in clips], cluster,
                                        (deploy, weights, backend, ref.preferred_backend, fold, blobs))
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
              "backend": backend, "fold": fold, "batch": batch, "aggregation": agg, "blobs": blobs, "preprocess": kind,
              "preprocessing": preprocessing.describe(),
              "fallback": f"class prior of {prior_list}" if prior_list else "uniform",
              "fallback_scores": prior.tolist()}
    files = write_outputs(out, clips, blobs, scores, readable, clip_scores, faces, metrics, config)
    checkpoint.unlink(missing_ok=True)
    return TestResult(out=out, metrics={**metrics, "config": config}, files=files)


def test_features(ref, weights, source, out, backend="auto", batch=16, allow_partial=False, fold=True):
    """`test` for a classifier of feature vectors (audio_linear_svm, audio_mlp): the HDF5 features
    `emotiw features` wrote, standardised with the statistics the training stored beside the deploy
    net (standardisation.json), one row per clip; the same scores.txt, predictions.csv and
    metrics.json as for videos (no frames.csv)."""
    deploy = ref.file
    stats_file = deploy.parent / "standardisation.json"
    if not stats_file.is_file():
        raise UserError(f"{stats_file} not found: feature nets are tested with the deploy.prototxt of their "
                        "training run (emotiw train writes standardisation.json beside it)")
    stats = json.loads(stats_file.read_text())
    data, labels = read_features(source)
    if data.shape[1] != stats["dimension"] or feature_set_of(source) != stats["feature_set"]:
        raise UserError(f"{source} holds {data.shape[1]} values of {feature_set_of(source)} per clip but the "
                        f"net was trained on {stats['dimension']} of {stats['feature_set']} ({stats_file})")
    check_weights(str(deploy), weights, allow_partial=allow_partial)
    runner, backend = load_net(deploy, weights, backend, ref.preferred_backend, fold)
    standardised = ((data - np.asarray(stats["mean"])) / np.asarray(stats["std"])).astype(np.float32)
    scores = np.concatenate([runner.forward(standardised[start:start + batch], ["prob"])["prob"].reshape(-1, len(EMOTIONS))
                             for start in range(0, len(standardised), batch)])
    clips_file = Path(source).with_name(f"{Path(source).stem}_clips.csv")
    if clips_file.is_file():
        with open(clips_file, newline="") as handle:
            clips = [row["clip"] for row in csv.DictReader(handle)]
    else:
        clips = [f"{index:04d}" for index in range(1, len(scores) + 1)]
    labels = labels.astype(np.int64)
    metrics = {"clips": len(clips), "clips_with_faces": len(clips), "fallback_clips": 0, "frames": 0,
               **(clip_metrics(labels, scores, np.ones(len(clips))) or {"accuracy": None})}
    config = {"net": str(deploy), "net_name": ref.name, "weights": str(weights), "features": str(source),
              "backend": backend, "fold": fold, "batch": batch, "standardisation": str(stats_file)}
    out = Path(out)
    files = write_clip_outputs(out, clips, labels, scores, metrics, config)
    return TestResult(out=out, metrics={**metrics, "config": config}, files=files)


def summary_line(metrics):
    parts = [f"{metrics['clips']} clips ({metrics['fallback_clips']} without a face)"]
    if metrics["accuracy"] is not None:
        parts.append(f"accuracy {metrics['accuracy']:.4f}")
        if metrics["accuracy_with_faces"] is not None:
            parts.append(f"on clips with faces {metrics['accuracy_with_faces']:.4f}")
        parts.append(f"macro F1 {metrics['macro_f1']:.4f}")
    else:
        parts.append("no labels: accuracy not computed")
    return ", ".join(parts)
