"""`emotiw score-features`: a classifier of per-clip feature vectors on `emotiw features`' HDF5 files
(emotiw.stages.score_features)."""

from pathlib import Path

from emotiw.cli.options import add_allow_partial, add_backend, add_fold, add_net, add_weights
from emotiw.metrics import metrics_line
from emotiw.stages.score_features import score_features


def register(subparsers):
    parser = subparsers.add_parser(
        "score-features", help="score per-clip feature vectors (audio, LBP-TOP) with a trained classifier",
        description="Runs the HDF5 feature vectors `emotiw features` wrote through a classifier trained on "
                    "them (audio_linear_svm, audio_mlp), standardised as its training run stored, and writes "
                    "scores.txt, predictions.csv, metrics.json and confusion.png.")
    add_net(parser, "deploy")
    add_weights(parser)
    parser.add_argument("--features", required=True, type=Path, metavar="LIST",
                        help="the HDF5Data source emotiw features wrote (OUT/<kind>/<split>.txt)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR")
    add_backend(parser)
    parser.add_argument("--batch", type=int, default=16, help="clips per forward pass (default 16)")
    add_allow_partial(parser, "score")
    add_fold(parser, "scores")
    parser.set_defaults(func=run)


def run(args):
    result = score_features(args.net, args.weights, args.features, args.out, backend=args.backend,
                            batch=args.batch, allow_partial=args.allow_partial, fold=args.fold)
    print(f"{metrics_line(result.metrics)}; outputs in {args.out}")
    return 0
