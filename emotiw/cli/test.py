"""`emotiw test`: per-video testing of a deploy net on every face frame (emotiw.stages.test.test)."""

from pathlib import Path

from emotiw.cli.options import (
    add_allow_partial,
    add_backend,
    add_fold,
    add_mean_file,
    add_net,
    add_precision,
    add_ray,
    add_recipe,
    add_weights,
)
from emotiw.metrics import metrics_line
from emotiw.stages.test import AGGREGATIONS, test


def register(subparsers):
    parser = subparsers.add_parser(
        "test", help="per-video testing of a deploy net on every face frame",
        description="Runs every face frame of every clip of a video list (`<clip frame folder> <label>` "
                    "per line) through a deploy net, aggregates the frame scores per clip and writes "
                    "scores.txt, predictions.csv, frames.csv, metrics.json and confusion.png.")
    add_net(parser, "deploy")
    add_weights(parser)
    parser.add_argument("--videos", required=True, type=Path, metavar="LIST", help="video list")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR")
    add_backend(parser)
    add_precision(parser)
    parser.add_argument("--batch", type=int, default=16, help="frames per forward pass (default 16)")
    parser.add_argument("--agg", choices=AGGREGATIONS, default="mean",
                        help="per-clip aggregation of frame scores (DSN used sum; default mean)")
    parser.add_argument("--blobs", default="prob",
                        help="comma-separated blobs; the first gives scores.txt (default prob), the others "
                             "scores_<blob>.txt")
    add_recipe(parser, "whose test-time transform: dsn (DSN's resize 256, crop 224, BGR mean), sse or fer2013 "
                       "(the net's test.prototxt data layer), none (a plain resize); default: the net's recipe",
               "--preprocess", none=True)
    add_mean_file(parser)
    parser.add_argument("--prior-list", type=Path, metavar="TRAINLIST",
                        help="training list whose class prior scores clips without a face (default uniform)")
    add_allow_partial(parser, "test")
    add_fold(parser, "scores")
    add_ray(parser)
    parser.set_defaults(func=run)


def run(args):
    result = test(args.net, args.weights, args.videos, args.out, backend=args.backend, batch=args.batch,
                  agg=args.agg, blobs=[b for b in args.blobs.split(",") if b], recipe=args.recipe,
                  mean_file=args.mean_file, prior_list=args.prior_list, allow_partial=args.allow_partial,
                  fold=args.fold, ray=args.ray, precision=args.precision)
    print(f"{metrics_line(result.metrics)}; outputs in {args.out}")
    return 0
