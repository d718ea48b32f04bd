"""`emotiw fuse SCORES… --out DIR`: weighted score fusion, given or searched weights (emotiw.stages.fuse)."""

import argparse
from pathlib import Path

from emotiw.stages.fuse import NORMALIZATIONS, fuse


def register(subparsers):
    parser = subparsers.add_parser(
        "fuse", help="fuse per-clip score files (weighted mean; weights given or searched on validation)",
        description=__doc__.splitlines()[0])
    parser.add_argument("scores", nargs="+", metavar="SCORES",
                        help="test score files: EmotiW .txt, predictions.csv, or FILE.mat[:VARIABLE]")
    parser.add_argument("--model-weights", nargs="+", type=float, metavar="W",
                        help="one fusion weight per score file (default: equal weights)")
    parser.add_argument("--weights", dest="model_weights", nargs="+", type=float, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)  # the earlier spelling
    parser.add_argument("--search", action="store_true", help="search the weights on validation scores")
    parser.add_argument("--val-scores", nargs="+", metavar="VAL",
                        help="validation score files, one per test score file, same order")
    parser.add_argument("--val-labels", metavar="LIST",
                        help="validation video list with labels (`<clip> <label>` per line)")
    parser.add_argument("--step", type=float, default=0.05, help="weight grid step (default 0.05)")
    parser.add_argument("--normalize", choices=NORMALIZATIONS, default="none",
                        help="per-row normalisation of every input before fusing (default none)")
    parser.add_argument("--names", nargs="+", help="model names for the report (default: file names)")
    parser.add_argument("--videos", metavar="LIST", help="test video list: checks row counts, names the clips")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.set_defaults(func=run)


def run(args):
    result = fuse(args.scores, args.out, model_weights=args.model_weights, search=args.search, val_scores=args.val_scores,
                  val_labels=args.val_labels, step=args.step, normalize=args.normalize, names=args.names,
                  videos=args.videos)
    print(result.table)
    print(f"wrote {args.out}/scores.txt, predictions.csv, submission/ ({len(result.clips)} clips), fusion.json")
    return 0
