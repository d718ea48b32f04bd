"""`emotiw features`: per-clip audio (openSMILE) or LBP-TOP descriptors into HDF5 (emotiw.stages.features)."""

from emotiw.descriptors.audio import FEATURE_SETS
from emotiw.formats.lists import LABEL_MAPS
from emotiw.stages.features import KINDS, LBP_SIZE, features


def register(subparsers):
    parser = subparsers.add_parser(
        "features", help="per-clip audio functionals (openSMILE) or LBP-TOP histograms -> HDF5 for Caffe",
        description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument("--out", metavar="DIR", required=True, help="output folder (DIR/<kind>/)")
    parser.add_argument("--videos", metavar="DIR", help="audio: the clips, laid out as for preprocess")
    parser.add_argument("--labels", metavar="FILE", help="audio: `clip,label` CSV for a flat folder")
    parser.add_argument("--label-map", choices=LABEL_MAPS, default="afew")
    parser.add_argument("--faces", metavar="DIR", help="lbptop: a preprocess output folder")
    parser.add_argument("--split", metavar="NAME", help="the split (lbptop: which lists/<split>_videos.txt)")
    parser.add_argument("--feature-set", choices=FEATURE_SETS, default="eGeMAPSv02", help="audio: openSMILE set")
    parser.add_argument("--size", type=int, default=LBP_SIZE, help=f"lbptop: crop side (default {LBP_SIZE})")
    parser.set_defaults(func=run)


def run(args):
    features(args.out, args.kind, split=args.split, videos=args.videos, faces=args.faces, labels=args.labels,
             label_map=args.label_map, feature_set=args.feature_set, size=args.size)
    return 0
