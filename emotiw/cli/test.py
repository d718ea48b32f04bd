"""`emotiw test`: per-video testing of a deploy net on every face frame (emotiw.stages.test.test)."""

from pathlib import Path

from emotiw.caffe.runtime import BACKENDS
from emotiw.caffe.transform import PREPROCESSING_KINDS
from emotiw.distributed import RAY_HELP
from emotiw.stages.test import AGGREGATIONS, summary_line, test


def register(subparsers):
    parser = subparsers.add_parser(
        "test", help="per-video testing of a deploy net on every face frame",
        description="Runs every face frame of every clip of a video list (`<clip frame folder> <label>` "
                    "per line) through a deploy net, aggregates the frame scores per clip and writes "
                    "scores.txt, predictions.csv, frames.csv, metrics.json and confusion.png.")
    parser.add_argument("--net", required=True, help="registered net name (prototxt/NAME/deploy.prototxt) "
                                                     "or a deploy.prototxt path")
    parser.add_argument("--weights", required=True, type=Path, metavar="FILE.caffemodel")
    parser.add_argument("--videos", required=True, type=Path, metavar="LIST", help="video list")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="pycaffe, opencv (OpenCV DNN) or auto (default): the one `make bench` "
                             "measured faster for the net: pycaffe for the ResNet nets and nets outside the "
                             "registry, OpenCV for the others")
    parser.add_argument("--batch", type=int, default=16, help="frames per forward pass (default 16)")
    parser.add_argument("--agg", choices=AGGREGATIONS, default="mean",
                        help="per-clip aggregation of frame scores (DSN used sum; default mean)")
    parser.add_argument("--blobs", default="prob",
                        help="comma-separated blobs; the first gives scores.txt (default prob), the others "
                             "scores_<blob>.txt")
    parser.add_argument("--preprocess", choices=PREPROCESSING_KINDS,
                        help="default: the net's paper (sse_* nets: sse, others: dsn)")
    parser.add_argument("--mean-file", type=Path, help="mean.binaryproto for SSE preprocessing")
    parser.add_argument("--prior-list", type=Path, metavar="TRAINLIST",
                        help="training list whose class prior scores clips without a face (default uniform)")
    parser.add_argument("--allow-partial", action="store_true",
                        help="test even when the weights leave layers at their random filler init "
                             "(refused by default: a truncated caffemodel still loads)")
    parser.add_argument("--no-fold", dest="fold", action="store_false",
                        help="with pycaffe, run BatchNorm and Scale as layers of their own instead of folding "
                             "them into the convolution before them (the same scores within 1e-5, slower)")
    parser.add_argument("--ray", nargs="?", const=True, metavar="ADDRESS", help=RAY_HELP)
    parser.set_defaults(func=run)


def run(args):
    result = test(args.net, args.weights, args.videos, args.out, backend=args.backend, batch=args.batch,
                  agg=args.agg, blobs=[b for b in args.blobs.split(",") if b], preprocess=args.preprocess,
                  mean_file=args.mean_file, prior_list=args.prior_list, allow_partial=args.allow_partial,
                  fold=args.fold, ray=args.ray)
    print(f"{summary_line(result.metrics)}; outputs in {args.out}")
    return 0
