"""Feature export as SSE's test scripts do it: Caffe's `extract_features` into LevelDB/LMDB, then .mat.

`emotiw extract` points the test net's ImageData layer at a frame list, runs Caffe's own
`extract_features` for exactly ceil(N / batch) mini-batches (N = list length) and converts the
store with leveldb2mat. ImageData wraps around at the end of its list, so the last mini-batch
repeats the first images; --num-images drops those rows.

`emotiw leveldb2mat DIR BATCH_NUM BATCH_SIZE DIM OUT.mat` keeps the released leveldb2mat.py's
arguments and result: MATLAB variable `feats`, one row per image in key order, one column per
feature value. Keys are extract_features' running image indices; every key must decode, every
Datum must hold DIM values and the indices must be 0..BATCH_NUM*BATCH_SIZE-1. Datum is decoded
without pycaffe (emotiw.formats.db).
"""

import contextlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emotiw.caffe.fold import fold_files
from emotiw.caffe.proto import data_layers_in_test, read_net_param
from emotiw.caffe.runtime import caffe_inference, check_precision
from emotiw.caffe.transform import find_mean_file
from emotiw.caffe.tools import first_fatal_line, run_logged, tool_command
from emotiw.caffe.weights import check_weights
from emotiw.errors import UserError
from emotiw.execution import Executor, Progress
from emotiw.formats.db import read_store, read_store_features, write_store
from emotiw.formats.files import atomic_write_text, file_identity, replace_dir, safe_name
from emotiw.formats.lists import list_frames, read_clips, read_list, read_paths, resolve_listed_path, write_list
from emotiw.formats.mat import save_mat
from emotiw.memory import check_batch_fits
from emotiw.nets.reference import resolve_net
from emotiw.output import output_folder, read_state

EXTRACTED = re.compile(r"Extracted features of (\d+) query images")


# ------------------------------------------------------------------------------------------
# Per-video features

def frame_owners(folders, num_rows, frames=None, video_list=""):
    """Video index of every feature row (-1: no video). With the extracted frame list, by each
    frame's folder; without it, rows follow the clip folders' sorted images, clip after clip."""
    if frames is None:
        counts = [len(list_frames(folder)) if folder.is_dir() else 0 for folder in folders]
        if sum(counts) != num_rows:
            raise UserError(f"the clip folders of {video_list} hold {sum(counts)} frames but there are "
                            f"{num_rows} feature rows; pass --num-images, or --frames with the extracted list")
        return np.repeat(np.arange(len(folders)), counts)
    if len(frames) != num_rows:
        raise UserError(f"the frame list has {len(frames)} frames but there are {num_rows} feature rows; "
                        "pass --num-images with the frame list's length")
    index = {os.path.realpath(folder): number for number, folder in enumerate(folders)}
    return np.array([index.get(os.path.realpath(Path(frame).parent), -1) for frame in frames], dtype=np.int64)


def video_features(feats, video_list, frames=None):
    """MATLAB variables video_feats (mean row per clip), video_names, video_labels, video_n_frames."""
    entries, labels = read_list(video_list)
    folders = [resolve_listed_path(entry, video_list) for entry in entries]
    owner = frame_owners(folders, len(feats), frames, video_list)
    assigned = owner >= 0
    sums = np.zeros((len(entries), feats.shape[1]))
    np.add.at(sums, owner[assigned], feats[assigned])
    counts = np.bincount(owner[assigned], minlength=len(entries))
    if not assigned.all():
        print(f"warning: {int((~assigned).sum())} frame(s) belong to no clip of {video_list}", file=sys.stderr)
    if (counts == 0).any():
        print(f"warning: {int((counts == 0).sum())} clip(s) without frames get a zero row, e.g. "
              f"{entries[int(np.argmin(counts))]} (video_n_frames is 0 for them)", file=sys.stderr)
    variables = {"video_feats": sums / np.maximum(counts, 1)[:, None], "video_names": np.array(entries),
                 "video_n_frames": counts.reshape(-1, 1).astype(np.float64)}
    if labels is not None:
        variables["video_labels"] = labels.reshape(-1, 1).astype(np.float64)
    return variables


def leveldb2mat(store, batch_num, batch_size, dim, out, num_images=None, videos=None, frames=None,
                use_lmdb=False, v73=False):
    """The released leveldb2mat: `feats` of the store into OUT.mat, plus per-video means with `videos`
    (a video list); `frames`: the extracted frame paths, or the frame list, mapping rows to clips."""
    for flag, value in (("batch_num", batch_num), ("batch_size", batch_size), ("dim", dim)):
        if value is not None and value < 1:
            raise UserError(f"{flag.upper()} must be at least 1, not {value}")
    if frames is not None and videos is None:
        raise UserError("--frames maps rows to clips and needs --videos")
    if isinstance(frames, (str, Path)):
        frames = read_paths(frames)[0]
    feats = read_store_features(store, batch_num, batch_size, dim, use_lmdb, num_images)
    variables = {"feats": feats}
    if videos is not None:
        variables.update(video_features(feats, videos, frames))
    save_mat(out, variables, v73)
    return variables


# ------------------------------------------------------------------------------------------
# Running extract_features

DATABASES = ("leveldb", "lmdb")


def image_data_layer(net, path):
    layers = [layer for layer in data_layers_in_test(net) if layer.type == "ImageData"]
    if len(layers) != 1:
        raise UserError(f"{path}: extract needs a test net with exactly one TEST-phase ImageData layer "
                        f"(found {len(layers)})")
    return layers[0]


def frames_to_extract(layer, test_file, frame_list=None, video_list=None):
    """(frame paths, labels): the given frame list, the clips' sorted frames, or the net's own source."""

    if frame_list is not None:
        return read_paths(frame_list)
    if video_list is not None:
        clips = read_clips(video_list)
        return ([frame for clip in clips for frame in clip.frames],
                [clip.label for clip in clips for _ in clip.frames])
    source = Path(layer.image_data_param.root_folder + layer.image_data_param.source)
    if not source.is_file():
        raise UserError(f"{test_file} reads {source}, which does not exist; give the frames with --list")
    return read_paths(source)


def write_extract_net(net, layer, list_file, batch, path):
    """The test net reading `list_file` in order, `batch` images per mini-batch."""
    from google.protobuf import text_format

    param = layer.image_data_param
    param.source, param.root_folder, param.batch_size = str(list_file), "", batch
    param.shuffle, param.rand_skip = False, 0
    atomic_write_text(path, text_format.MessageToString(net))


@contextlib.contextmanager
def folded_files(net, net_file, weights, out, blob):
    """(prototxt, caffemodel) for extract_features with BatchNorm and Scale folded (emotiw.caffe.fold),
    written into a temporary folder inside `out`, removed afterwards; the given files when nothing folds."""
    with tempfile.TemporaryDirectory(prefix=".fold-", dir=out) as scratch:
        folded = Path(scratch) / Path(net_file).name, Path(scratch) / Path(weights).name
        yield folded if fold_files(net, weights, *folded, keep=[blob]) else (net_file, weights)


def run_extract_features(weights, net_file, blob, store, num_batches, db, log_path, progress, precision):
    """Caffe's extract_features into a fresh `store`, built beside it and renamed when complete, its
    convolutions in `precision`; `progress` gets the number of images done since its last call."""
    partial = store.with_name(f".{store.name}.partial")
    if partial.exists():
        shutil.rmtree(partial)  # an interrupted run's leftovers: extract_features refuses an existing store
    command = tool_command("extract_features", weights, net_file, blob, partial, num_batches, db, "CPU")
    reported = 0

    def on_line(line, _process):
        nonlocal reported
        if match := EXTRACTED.search(line):
            progress(int(match.group(1)) - reported)
            reported = int(match.group(1))

    with caffe_inference(precision):  # the tool's environment
        status, logged = run_logged(command, log_path, on_line)
    if status != 0:
        raise UserError(f"extract_features failed (exit {status}): {first_fatal_line(logged)}; "
                        f"full log in {log_path}")
    replace_dir(partial, store)


def run_features(net, net_file, weights, blob, store, num_batches, db, log_path, fold, progress, precision):
    """run_extract_features on `net` (written at net_file), with fold on copies of the net and weights
    with BatchNorm and Scale folded, in a temporary folder beside net_file."""
    unfolded = contextlib.nullcontext((net_file, weights))
    with folded_files(net, net_file, weights, Path(net_file).parent, blob) if fold else unfolded as (run_net, run_weights):
        run_extract_features(run_weights, run_net, blob, store, num_batches, db, log_path, progress, precision)


# ------------------------------------------------------------------------------------------
# Tasks: pieces of the mini-batches (emotiw.execution)

PIECES_PER_WORKER = 4  # on Ray, a slow node or a killed worker holds up only a small piece
PIECES = ".pieces"  # the pieces' work folders, inside OUT


def extract_piece(net, weights, frames, labels, batch, blob, db, fold, precision, work, progress=None):
    """One task: extract_features over `frames` (whole mini-batches) into `work/store`, in the folder
    `work` inside OUT (made anew: a killed try leaves it). Returns extract_features' log."""
    work = Path(work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    list_file, net_file, store, log = (work / name for name in ("frames.txt", "test.prototxt", "store", "log"))
    write_list(list_file, frames, labels)
    write_extract_net(net, image_data_layer(net, net_file), list_file, batch, net_file)
    run_features(net, net_file, weights, blob, store, len(frames) // batch, db, log, fold, progress, precision)
    return log.read_text()


def extract_pieces(executor, net, weights, frames, labels, batch, num_batches, blob, db, fold, precision, store,
                   log_path):
    """extract_features in contiguous pieces of the mini-batches: one here, a few per worker on Ray.
    A local run's mini-batches cross clip boundaries (and a frame list has no clips), so each piece
    is given the very frames of its batches in one uninterrupted run (the last one the wrap-around
    rows ImageData adds from the list's start), and its values go into the store under that run's
    keys, in a folder renamed into place when complete."""
    from uuid import uuid4

    out = store.parent
    with executor:
        size = 1 if executor.local else executor.cluster.size * PIECES_PER_WORKER
        pieces = np.array_split(np.arange(num_batches), min(num_batches, size))
        rows = [np.arange(piece[0] * batch, (piece[-1] + 1) * batch) % len(frames) for piece in pieces]
        works = [out / PIECES / f"{uuid4().hex}-{index}" for index in range(len(pieces))]
        calls = [(net, weights, [frames[r] for r in piece], [labels[r] for r in piece], batch, blob, db, fold,
                  precision, work)
                 for piece, work in zip(rows, works)]
        names = [f"mini-batches {piece[0]} to {piece[-1]}" for piece in pieces]
        logs = [""] * len(pieces)
        partial = store.with_name(f".{store.name}.partial")
        if partial.exists():
            shutil.rmtree(partial)
        progress = Progress("images", total=num_batches * batch)
        if len(pieces) == 1:  # the piece's store is the whole store
            (_, logs[0]), = executor.map(extract_piece, calls, names, progress)
            os.replace(works[0] / "store", partial)
        else:
            with write_store(partial, db) as put:
                for index, log in executor.map(extract_piece, calls, names, progress):
                    first = int(pieces[index][0]) * batch
                    values = [value for _, value in read_store(works[index] / "store", db == "lmdb")]
                    put([(b"%010d" % (first + row), value) for row, value in enumerate(values)])  # extract_features' keys
                    logs[index] = log
    shutil.rmtree(out / PIECES)
    atomic_write_text(log_path, "".join(logs))
    replace_dir(partial, store)


@dataclass
class ExtractResult:
    """What `extract` wrote: the store, the .mat and the variables in it."""
    store: Path
    mat: Path
    variables: dict


def extract(net, weights, out, blob="prob", frame_list=None, video_list=None, db="leveldb", batch=None,
            v73=False, allow_partial=False, fold=True, ray=None, mean_file=None, precision="fp32") -> ExtractResult:
    """Features of every listed frame with Caffe's extract_features, into a LevelDB/LMDB and a .mat.

    net: a registered name or a test.prototxt with one TEST-phase ImageData layer; weights: its
    .caffemodel; out: the output folder (<blob>_<db>/, features.mat, frames.txt, test.prototxt,
    extract.json, extract_features.log); frame_list: an ImageData list (default: the frames of the
    video_list clips, else the net's own source); video_list: also per-video means (video_feats,
    video_names, video_labels, video_n_frames); db: leveldb or lmdb; batch: the mini-batch size
    (default the test net's); v73: a MATLAB v7.3 (HDF5) .mat; allow_partial: go on when the weights
    leave layers of the deploy net at their random filler init (refused by default); fold: run
    extract_features on copies of the net and weights with BatchNorm and Scale folded into the
    convolution before them (in a temporary folder inside `out`); ray: run extract_features on a Ray
    cluster, a few pieces of the mini-batches per worker, into the same store (extract_pieces):
    True for `ray.init()`, or the head node's HOST:PORT; every node must see the net, the weights
    and the frames at the same paths; mean_file: the mean.binaryproto the test net's ImageData layer
    subtracts (default: the one the net names, found from the working directory or the repository);
    precision: fp32, or bf16 for the convolutions on oneDNN in bfloat16 (CPUs with AVX512-BF16 or AMX).
    A rerun with the same inputs skips extract_features and only rewrites the .mat.
    """
    if db not in DATABASES:
        raise UserError(f"unknown database {db!r}; choose leveldb or lmdb")
    check_precision(precision)
    if not Path(weights).is_file():
        raise UserError(f"weights file {weights} not found; pass the trained .caffemodel with --weights")
    ref = resolve_net(net, "test")
    test_file = ref.file
    executor = Executor(ray=ray, needs=[weights, test_file, out])
    deploy = ref.sibling("deploy")
    if deploy is not None:  # the test net has ImageData, whose shapes need images; its deploy twin does not
        check_weights(resolve_net(str(deploy)).param_shapes(), weights, str(deploy), allow_partial=allow_partial)
    net_param = read_net_param(test_file)
    layer = image_data_layer(net_param, test_file)
    if mean_file is not None and not Path(mean_file).is_file():
        raise UserError(f"--mean-file {mean_file} not found; give the net's mean.binaryproto")
    if mean_file is not None or layer.transform_param.mean_file:
        layer.transform_param.mean_file = str(Path(mean_file).resolve() if mean_file is not None else
                                              find_mean_file(layer.transform_param.mean_file, test_file).resolve())
    frames, labels = frames_to_extract(layer, test_file, frame_list, video_list)
    if not frames:
        raise UserError("no frames to extract: the list is empty or its clip folders hold no images")
    missing = [frame for frame in frames if not frame.is_file()]
    if missing:
        raise UserError(f"{len(missing)} listed image(s) do not exist, e.g. {missing[0]}; "
                        "ImageData would abort on them")
    batch = batch or layer.image_data_param.batch_size
    if batch < 1:
        raise UserError(f"--batch must be at least 1, not {batch}")
    num_batches = math.ceil(len(frames) / batch)
    if deploy is not None:
        check_batch_fits(read_net_param(deploy), batch)
    out = Path(out)
    with output_folder(out, "extract", inputs=[frame_list, video_list]):
        list_file, net_file = out / "frames.txt", out / "test.prototxt"
        write_list(list_file, frames, labels)
        write_extract_net(net_param, layer, list_file.resolve(), batch, net_file)
        store = out / f"{safe_name(blob)}_{db}"
        record = {"weights": file_identity(weights), "net": net_file.read_text(), "frames": list_file.read_text(),
                  "blob": blob, "batches": num_batches, "backend": db, "fold": fold}
        if precision != "fp32":  # fp32 runs keep the records of stores written before bf16 existed
            record["precision"] = precision
        record_file = out / "extract.json"
        done = store.is_dir() and read_state(record_file, "extract") == record
        if done:
            print(f"{store} is up to date; not extracting again", file=sys.stderr)
        else:
            record_file.unlink(missing_ok=True)
            extract_pieces(executor, net_param, weights, frames, labels, batch, num_batches, blob, db, fold, precision,
                           store, out / "extract_features.log")
            atomic_write_text(record_file, json.dumps(record))
        mat = out / "features.mat"
        variables = leveldb2mat(store, num_batches, batch, None, mat, num_images=len(frames),
                                videos=video_list, frames=frames if video_list is not None else None,
                                use_lmdb=db == "lmdb", v73=v73)
        return ExtractResult(store=store, mat=mat, variables=variables)
