"""`emotiw extract` (Caffe's extract_features, then .mat) and `emotiw leveldb2mat` (the released script)."""

from pathlib import Path

import numpy as np

from emotiw.cli.options import add_allow_partial, add_fold, add_mean_file, add_net, add_precision, add_ray, add_weights
from emotiw.stages.extract import DATABASES, extract, leveldb2mat


def register(subparsers):
    parser = subparsers.add_parser(
        "extract", help="features of a frame list with Caffe's extract_features, into LevelDB/LMDB and .mat",
        description="Runs Caffe's extract_features on the net's test.prototxt (its ImageData layer pointed at "
                    "the frame list) for ceil(N / batch) mini-batches, then writes DIR/features.mat (feats, "
                    "and with --videos video_feats/video_names/video_labels).")
    add_net(parser, "test")
    add_weights(parser)
    parser.add_argument("--list", type=Path, metavar="FRAMELIST",
                        help="ImageData list `<image> <label>` (default: the test net's own source, or the "
                             "frames of the --videos clips)")
    parser.add_argument("--videos", type=Path, metavar="LIST", help="video list: also per-video mean features")
    parser.add_argument("--blob", default="prob", help="blob to extract (default prob)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR")
    parser.add_argument("--db", choices=DATABASES, default="leveldb", help="store format (default leveldb)")
    parser.add_argument("--batch", type=int, help="mini-batch size (default: the test net's)")
    parser.add_argument("--v73", action="store_true", help="write an HDF5-based MATLAB v7.3 .mat")
    add_allow_partial(parser, "extract")
    add_fold(parser, "features")
    add_ray(parser)
    add_mean_file(parser)
    add_precision(parser)
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
    result = extract(args.net, args.weights, args.out, blob=args.blob, frame_list=args.list,
                     video_list=args.videos, db=args.db, batch=args.batch, v73=args.v73,
                     allow_partial=args.allow_partial, fold=args.fold, ray=args.ray, mean_file=args.mean_file,
                     precision=args.precision)
    print(f"wrote {result.mat}: {describe(result.variables)}")
    return 0


def run_leveldb2mat(args):
    variables = leveldb2mat(args.store, args.batch_num, args.batch_size, args.dim, args.out,
                            num_images=args.num_images, videos=args.videos, frames=args.frames,
                            use_lmdb=args.lmdb, v73=args.v73)
    print(f"wrote {args.out}: {describe(variables)}")
    return 0
