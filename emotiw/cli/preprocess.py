"""`emotiw preprocess`: video clips or face images -> aligned face crops, manifest, lists (emotiw.stages.preprocess)."""

from emotiw.cli.options import (
    add_align,
    add_detect,
    add_max_pixels,
    add_min_face,
    add_ray,
    add_recipe,
    add_sampling,
)
from emotiw.face.clip import REDETECT_EVERY
from emotiw.face.shots import SHOT_THRESHOLD
from emotiw.face.track import SUBJECT_RULES
from emotiw.formats.lists import LABEL_MAPS
from emotiw.stages.preprocess import preprocess


def register(subparsers):
    parser = subparsers.add_parser(
        "preprocess", help="video clips or face images -> aligned face crops, manifest, Caffe lists, LMDB",
        description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--videos", metavar="DIR", help="AFEW-style DIR/<Emotion>/<clip>, or a flat folder (with --labels)")
    source.add_argument("--images", metavar="DIR", help="a folder of still face images (e.g. RAF-DB), with --labels")
    parser.add_argument("--out", metavar="DIR", required=True, help="output folder; a run into it again resumes")
    parser.add_argument("--labels", metavar="FILE", help="`clip,label` CSV or RAF-DB list_patition_label.txt")
    parser.add_argument("--label-map", choices=LABEL_MAPS, default="afew",
                        help="how label numbers read: afew 0..6 (default), rafdb 1..7 in RAF-DB order, none: as is")
    parser.add_argument("--aligned", action="store_true", help="--images are aligned face crops: resize only")
    add_recipe(parser, "how faces are cropped (emotiw.recipes): dsn (default): facenet crop, margin 100, 400x400 "
                       "from frames 1024 wide; sse: 5-point similarity warp, 128x128; fer2013: sse's at 64x64 gray",
               "--mode", default="dsn")
    parser.add_argument("--subject", choices=SUBJECT_RULES,
                        help="facenet: the big central face of every frame (dsn's default, as DSN); "
                             "track: the longest face track of every shot (the other recipes' default)")
    add_detect(parser)
    parser.add_argument("--redetect-every", type=int, default=REDETECT_EVERY, metavar="K",
                        help=f"--detect tracked: frames between full detections (default {REDETECT_EVERY})")
    parser.add_argument("--shot-threshold", type=float, default=SHOT_THRESHOLD, metavar="T",
                        help=f"PySceneDetect ContentDetector threshold for shot cuts (default {SHOT_THRESHOLD:g}; "
                             "0: one shot per clip)")
    parser.add_argument("--min-coverage", type=float, metavar="PERCENT",
                        help="list clips whose subject is in fewer than PERCENT of the frames in errors.csv")
    parser.add_argument("--size", type=int, help="output size in pixels (default: the mode's)")
    parser.add_argument("--gray", action="store_true", default=None,
                        help="single-channel crops (and LMDB); default: the recipe's (fer2013's are gray)")
    add_sampling(parser)
    parser.add_argument("--max-frames", type=int, metavar="N", help="keep at most the first N kept frames of a clip")
    parser.add_argument("--workers", type=int, default=1, metavar="N", help="clips processed in parallel (processes)")
    add_ray(parser)
    parser.add_argument("--lmdb", action="store_true", help="also an LMDB per split (convert_imageset) and its mean")
    parser.add_argument("--split", metavar="NAME",
                        help="split name, letters, digits, _ and - (default: RAF-DB file prefix with --label-map rafdb, "
                             "else the input folder's name)")
    parser.add_argument("--dsn-frames", action="store_true",
                        help="only write every frame 1024 wide as PNG, as DSN's extract_frames.py did")
    add_align(parser)
    add_min_face(parser)
    add_max_pixels(parser)
    parser.set_defaults(func=run)


def run(args):
    preprocess(args.out, videos=args.videos, images=args.images, labels=args.labels, label_map=args.label_map,
               aligned=args.aligned, recipe=args.recipe, size=args.size, gray=args.gray, fps=args.fps,
               every=args.every, max_frames=args.max_frames, workers=args.workers, lmdb=args.lmdb,
               split=args.split, dsn_frames=args.dsn_frames, subject=args.subject, detect=args.detect,
               redetect_every=args.redetect_every, shot_threshold=args.shot_threshold,
               min_coverage=args.min_coverage, ray=args.ray, align=args.align, min_face=args.min_face)
    return 0
