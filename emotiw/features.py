"""Feature export as SSE's test scripts do it: Caffe's `extract_features` into LevelDB/LMDB, then .mat.

`emotiw extract` points the test net's ImageData layer at a frame list, runs Caffe's own
`extract_features` for exactly ceil(N / batch) mini-batches (N = list length) and converts the
store with leveldb2mat. ImageData wraps around at the end of its list, so the last mini-batch
repeats the first images; --num-images drops those rows.

`emotiw leveldb2mat DIR BATCH_NUM BATCH_SIZE DIM OUT.mat` keeps the released leveldb2mat.py's
arguments and result: MATLAB variable `feats`, one row per image in key order, one column per
feature value. Keys are extract_features' running image indices; every key must decode, every
Datum must hold DIM values and the indices must be 0..BATCH_NUM*BATCH_SIZE-1. Datum is decoded
without pycaffe (emotiw.datum).
"""

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from emotiw.errors import UserError
from emotiw.fileio import atomic_open, atomic_path, atomic_write_text
from emotiw.scores import UNKNOWN_LABEL, read_video_list

MAT_V5_LIMIT = 2**31 - 1          # bytes of one variable in a MATLAB v5 .mat
V73_USERBLOCK = 512               # MATLAB v7.3 files are HDF5 after a 512-byte user block
MATLAB_CLASSES = {"float64": "double", "float32": "single"}  # other numpy names are MATLAB's
EXTRACTED = re.compile(r"Extracted features of (\d+) query images")


# ------------------------------------------------------------------------------------------
# Reading a features store

def read_store(path, use_lmdb=False):
    """All (key, value) pairs of a LevelDB (or LMDB) folder, in key order."""
    path = Path(path)
    kind = "LMDB" if use_lmdb else "LevelDB"
    if not path.is_dir():
        raise UserError(f"{path}: no such {kind} folder")
    if use_lmdb:
        import lmdb

        try:
            env = lmdb.open(str(path), readonly=True, lock=False)
        except lmdb.Error as error:
            raise UserError(f"{path} is not an LMDB ({error}); drop --lmdb for a LevelDB") from None
        with env, env.begin() as txn:
            return list(txn.cursor())
    import plyvel

    try:
        db = plyvel.DB(str(path), create_if_missing=False)
    except plyvel.Error as error:
        raise UserError(f"{path} is not a LevelDB ({error}); pass --lmdb for an LMDB") from None
    try:
        return list(db.iterator())
    finally:
        db.close()


def decode_features(pairs, dim, where):
    """{image index: float32 values} of extract_features' (key, Datum) pairs; dim None = the first's."""
    from google.protobuf.message import DecodeError

    from emotiw.datum import Datum

    rows, keys = {}, {}
    for key, value in pairs:
        shown = key.decode("ascii", "replace")
        if not key.isdigit():
            raise UserError(f"{where}: key {shown!r} is not an image index; extract_features writes "
                            "decimal image indices as keys. Is this a features store?")
        datum = Datum()
        try:
            datum.ParseFromString(value)
        except DecodeError:
            raise UserError(f"{where}: key {shown}: the value is not a Caffe Datum") from None
        values = np.array(datum.float_data, dtype=np.float32)
        dim = len(values) if dim is None else dim
        if len(values) != dim:
            raise UserError(f"{where}: key {shown} holds {len(values)} feature values, not DIM={dim}: the store "
                            f"was extracted from a blob of another size; pass DIM={len(values)} "
                            "or extract the blob you want")
        index = int(key)
        if index in rows:
            raise UserError(f"{where}: keys {keys[index]} and {shown} are both image {index}")
        rows[index], keys[index] = values, shown
    return rows, keys


def feature_matrix(rows, keys, count, where):
    """The (count, dim) float64 matrix of rows 0..count-1; refuses gaps and a wrong image count."""
    if not rows:
        raise UserError(f"{where}: the store is empty")
    for position, index in enumerate(sorted(rows)):
        if index != position:
            raise UserError(f"{where}: keys are not contiguous: image {position} is missing "
                            f"(key {keys[index]} comes after image {position - 1})")
    if len(rows) != count:
        raise UserError(f"{where} holds {len(rows)} images (keys 0..{len(rows) - 1}), but BATCH_NUM x "
                        f"BATCH_SIZE = {count}; give the numbers extract_features ran with")
    return np.stack([rows[index] for index in range(count)]).astype(np.float64)


def read_features(path, batch_num, batch_size, dim, use_lmdb=False, num_images=None):
    """`feats` of a store: one row per image in key order, wrap-around rows past num_images dropped."""
    where = str(path)
    rows, keys = decode_features(read_store(path, use_lmdb), dim, where)
    feats = feature_matrix(rows, keys, batch_num * batch_size, where)
    if num_images is not None:
        if not 0 < num_images <= len(feats):
            raise UserError(f"--num-images {num_images} must be between 1 and the {len(feats)} images in {where}")
        feats = feats[:num_images]
    return feats


# ------------------------------------------------------------------------------------------
# Per-video features

def frame_owners(folders, num_rows, frames=None, video_list=""):
    """Video index of every feature row (-1: no video). With the extracted frame list, by each
    frame's folder; without it, rows follow the clip folders' sorted images, clip after clip."""
    from emotiw.evaluate import list_frames

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
    from emotiw.evaluate import resolve_listed_path

    entries, labels = read_video_list(video_list)
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


# ------------------------------------------------------------------------------------------
# Writing .mat files

def save_mat(path, variables, v73=False):
    """MATLAB v5 through scipy, or v7.3 (HDF5) for variables larger than v5 allows."""
    if v73:
        return save_mat_v73(path, variables)
    too_large = [name for name, value in variables.items() if np.asarray(value).nbytes > MAT_V5_LIMIT]
    if too_large:
        raise UserError(f"{', '.join(too_large)} is larger than a v5 .mat variable can be (2 GiB); pass --v73")
    import scipy.io

    with atomic_open(path, "wb") as handle:
        scipy.io.savemat(handle, variables)


def _v73_header():
    """The 128-byte MAT-file header MATLAB writes into the HDF5 user block."""
    text = (f"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: {time.strftime('%a %b %d %H:%M:%S %Y')} "
            "HDF5 schema 1.00 .")
    return text.encode("ascii").ljust(116, b" ") + bytes(8) + b"\x00\x02" + b"IM"


def _char_codes(strings):
    """A MATLAB char matrix (one space-padded row per string) as uint16 codes."""
    width = max(1, max(len(text) for text in strings))
    codes = np.asarray(strings, dtype=f"U{width}").view(np.uint32).reshape(len(strings), width)
    return np.where(codes == 0, ord(" "), codes).astype(np.uint16)


def save_mat_v73(path, variables):
    """HDF5 in MATLAB's v7.3 layout: column-major (datasets hold the transpose), MATLAB_class attributes."""
    import h5py

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", userblock_size=V73_USERBLOCK) as handle:
            for name, value in variables.items():
                value = np.asarray(value)
                if value.dtype.kind == "U":
                    dataset = handle.create_dataset(name, data=_char_codes(list(value)).T)
                    dataset.attrs["MATLAB_class"] = np.bytes_("char")
                    dataset.attrs["MATLAB_int_decode"] = np.int32(2)
                else:
                    dataset = handle.create_dataset(name, data=np.atleast_2d(value).T)
                    dataset.attrs["MATLAB_class"] = np.bytes_(MATLAB_CLASSES.get(value.dtype.name, value.dtype.name))
        with open(tmp, "r+b") as raw:
            raw.write(_v73_header())


def leveldb2mat(store, batch_num, batch_size, dim, out, num_images=None, videos=None, frames=None,
                use_lmdb=False, v73=False):
    """The released leveldb2mat: `feats` of the store into OUT.mat, plus per-video means with `videos`."""
    feats = read_features(store, batch_num, batch_size, dim, use_lmdb, num_images)
    variables = {"feats": feats}
    if videos is not None:
        variables.update(video_features(feats, videos, frames))
    save_mat(out, variables, v73)
    return variables


def read_frame_list(path):
    """Frame paths of an ImageData list (`<image> <label>` per line), resolved like the video lists."""
    from emotiw.evaluate import resolve_listed_path

    entries, labels = read_video_list(path)
    labels = [UNKNOWN_LABEL] * len(entries) if labels is None else [int(label) for label in labels]
    return [resolve_listed_path(entry, path) for entry in entries], labels


# ------------------------------------------------------------------------------------------
# Running extract_features

def image_data_layer(net, path):
    from emotiw.evaluate import data_layers_in_test

    layers = [layer for layer in data_layers_in_test(net) if layer.type == "ImageData"]
    if len(layers) != 1:
        raise UserError(f"{path}: extract needs a test net with exactly one TEST-phase ImageData layer "
                        f"(found {len(layers)})")
    return layers[0]


def frames_to_extract(layer, test_file, frame_list=None, video_list=None):
    """(frame paths, labels): the given frame list, the clips' sorted frames, or the net's own source."""
    from emotiw.evaluate import read_clips

    if frame_list is not None:
        return read_frame_list(frame_list)
    if video_list is not None:
        clips = read_clips(video_list)
        return ([frame for clip in clips for frame in clip.frames],
                [clip.label for clip in clips for _ in clip.frames])
    source = Path(layer.image_data_param.root_folder + layer.image_data_param.source)
    if not source.is_file():
        raise UserError(f"{test_file} reads {source}, which does not exist; give the frames with --list")
    return read_frame_list(source)


def write_extract_net(net, layer, list_file, batch, path):
    """The test net reading `list_file` in order, `batch` images per mini-batch."""
    from google.protobuf import text_format

    param = layer.image_data_param
    param.source, param.root_folder, param.batch_size = str(list_file), "", batch
    param.shuffle, param.rand_skip = False, 0
    atomic_write_text(path, text_format.MessageToString(net))


def run_extract_features(weights, net_file, blob, store, num_batches, backend, log_path, total):
    """Caffe's extract_features into a fresh `store`, built beside it and renamed when complete."""
    from tqdm import tqdm

    from emotiw.caffe_env import caffe_tool
    from emotiw.fileio import replace_dir

    partial = store.with_name(f".{store.name}.partial")
    if partial.exists():
        shutil.rmtree(partial)  # an interrupted run's leftovers: extract_features refuses an existing store
    command = [caffe_tool("extract_features"), str(weights), str(net_file), blob, str(partial),
               str(num_batches), backend, "CPU"]
    print(f"running {shlex.join(command)}", file=sys.stderr)
    env = dict(os.environ, GLOG_logtostderr="1", GLOG_minloglevel=os.environ.get("GLOG_minloglevel", "1"))
    with open(log_path, "w") as log, tqdm(total=total, unit="image", desc="extract_features", disable=None) as bar:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.PIPE,
                                   text=True, env=env)
        last_lines = []
        for line in process.stderr:
            log.write(line)
            last_lines = (last_lines + [line.strip()])[-20:]
            if match := EXTRACTED.search(line):
                bar.update(int(match.group(1)) - bar.n)
        process.wait()
    if process.returncode != 0:
        fatal = [line for line in last_lines if "Check failed" in line or line.startswith("F")]
        reason = (fatal or last_lines or ["no output"])[-1]
        raise UserError(f"extract_features failed (exit {process.returncode}): {reason}; full log in {log_path}")
    replace_dir(partial, store)


def extract(net, weights, out_dir, blob="prob", frame_list=None, video_list=None, backend="leveldb",
            batch=None, v73=False):
    """Features of every listed frame into out_dir/<blob>_<backend> and out_dir/features.mat."""
    from emotiw.evaluate import check_weights, file_identity, read_net_param, resolve_net_file

    if backend not in ("leveldb", "lmdb"):
        raise UserError(f"unknown store backend {backend!r}; choose leveldb or lmdb")
    if not Path(weights).is_file():
        raise UserError(f"weights file {weights} not found; pass the trained .caffemodel with --weights")
    test_file = resolve_net_file(net, "test")
    deploy = test_file.parent / "deploy.prototxt"
    if deploy.is_file():  # the test net has ImageData, whose shapes need images; its deploy twin does not
        check_weights(deploy, weights)
    net_param = read_net_param(test_file)
    layer = image_data_layer(net_param, test_file)
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
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    list_file, net_file = out_dir / "frames.txt", out_dir / "test.prototxt"
    atomic_write_text(list_file, "".join(f"{frame} {max(label, 0)}\n" for frame, label in zip(frames, labels)))
    write_extract_net(net_param, layer, list_file.resolve(), batch, net_file)
    store = out_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', blob)}_{backend}"
    record = {"weights": file_identity(weights), "net": net_file.read_text(), "frames": list_file.read_text(),
              "blob": blob, "batches": num_batches, "backend": backend}
    record_file = out_dir / "extract.json"
    done = store.is_dir() and record_file.is_file() and json.loads(record_file.read_text()) == record
    if done:
        print(f"{store} is up to date; not extracting again", file=sys.stderr)
    else:
        record_file.unlink(missing_ok=True)
        run_extract_features(weights, net_file, blob, store, num_batches, backend,
                             out_dir / "extract_features.log", num_batches * batch)
        atomic_write_text(record_file, json.dumps(record))
    variables = leveldb2mat(store, num_batches, batch, None, out_dir / "features.mat", num_images=len(frames),
                            videos=video_list, frames=frames if video_list is not None else None,
                            use_lmdb=backend == "lmdb", v73=v73)
    return variables


# ------------------------------------------------------------------------------------------
# CLI

def register(subparsers):
    parser = subparsers.add_parser(
        "extract", help="features of a frame list with Caffe's extract_features, into LevelDB/LMDB and .mat",
        description="Runs Caffe's extract_features on the net's test.prototxt (its ImageData layer pointed at "
                    "the frame list) for ceil(N / batch) mini-batches, then writes DIR/features.mat (feats, "
                    "and with --videos video_feats/video_names/video_labels).")
    parser.add_argument("--net", required=True, help="registered net name (prototxt/NAME/test.prototxt) "
                                                     "or a test.prototxt path")
    parser.add_argument("--weights", required=True, type=Path, metavar="FILE.caffemodel")
    parser.add_argument("--list", type=Path, metavar="FRAMELIST",
                        help="ImageData list `<image> <label>` (default: the test net's own source, or the "
                             "frames of the --videos clips)")
    parser.add_argument("--videos", type=Path, metavar="LIST", help="video list: also per-video mean features")
    parser.add_argument("--blob", default="prob", help="blob to extract (default prob)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR")
    parser.add_argument("--backend", choices=("leveldb", "lmdb"), default="leveldb")
    parser.add_argument("--batch", type=int, help="mini-batch size (default: the test net's)")
    parser.add_argument("--v73", action="store_true", help="write an HDF5-based MATLAB v7.3 .mat")
    parser.set_defaults(func=run_extract)

    convert = subparsers.add_parser(
        "leveldb2mat", help="extract_features' LevelDB/LMDB to a .mat (the released leveldb2mat.py)",
        description="Writes MATLAB variable feats (one row per image in key order) from an extract_features "
                    "store; checks that every key decodes, that every Datum has DIM values and that the "
                    "keys are contiguous.")
    convert.add_argument("store", type=Path, metavar="DIR")
    convert.add_argument("batch_num", type=int, metavar="BATCH_NUM")
    convert.add_argument("batch_size", type=int, metavar="BATCH_SIZE")
    convert.add_argument("dim", type=int, metavar="DIM", help="feature values per image (7 for prob)")
    convert.add_argument("out", type=Path, metavar="OUT.mat")
    convert.add_argument("--num-images", type=int, metavar="N",
                         help="keep the first N rows: drops the wrap-around rows ImageData adds after the list")
    convert.add_argument("--videos", type=Path, metavar="LIST",
                         help="video list `<clip frame folder> <label>`: also video_feats (mean per clip), "
                              "video_names, video_labels, video_n_frames")
    convert.add_argument("--frames", type=Path, metavar="FRAMELIST",
                         help="with --videos: the extracted frame list, mapping rows to clips by folder "
                              "(default: rows follow each clip folder's sorted images)")
    convert.add_argument("--lmdb", action="store_true", help="the store is an LMDB")
    convert.add_argument("--v73", action="store_true", help="write an HDF5-based MATLAB v7.3 .mat")
    convert.set_defaults(func=run_leveldb2mat)


def describe(variables):
    return ", ".join(f"{name} {list(np.shape(value))}" for name, value in variables.items())


def run_extract(args):
    variables = extract(args.net, args.weights, args.out, blob=args.blob, frame_list=args.list,
                        video_list=args.videos, backend=args.backend, batch=args.batch, v73=args.v73)
    print(f"wrote {args.out / 'features.mat'}: {describe(variables)}")
    return 0


def run_leveldb2mat(args):
    for flag in ("batch_num", "batch_size", "dim"):
        if getattr(args, flag) < 1:
            raise UserError(f"{flag.upper()} must be at least 1, not {getattr(args, flag)}")
    if args.frames is not None and args.videos is None:
        raise UserError("--frames maps rows to clips and needs --videos")
    frames = read_frame_list(args.frames)[0] if args.frames is not None else None
    variables = leveldb2mat(args.store, args.batch_num, args.batch_size, args.dim, args.out,
                            num_images=args.num_images, videos=args.videos, frames=frames,
                            use_lmdb=args.lmdb, v73=args.v73)
    print(f"wrote {args.out}: {describe(variables)}")
    return 0
