"""`emotiw detect IMAGE…`: MTCNN boxes and landmarks as JSON (emotiw.stages.detect.detect)."""

import json
import sys

from emotiw.cli.options import add_backend, add_max_pixels
from emotiw.face.mtcnn import FACENET
from emotiw.stages.detect import detect


def register(subparsers):
    parser = subparsers.add_parser("detect", help="detect faces and landmarks with MTCNN (prints JSON)",
                                   description="Detect faces and 5 landmarks with MTCNN on Caffe; "
                                               "prints one JSON list (0-based pixel coordinates).")
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--min-face-size", type=float, default=FACENET["min_face_size"])
    parser.add_argument("--thresholds", type=float, nargs=3, default=FACENET["thresholds"], metavar=("P", "R", "O"))
    parser.add_argument("--scale-factor", type=float, default=FACENET["scale_factor"])
    add_backend(parser)
    parser.add_argument("--draw", metavar="OUT.png", help="write the (single) image with boxes and landmarks")
    parser.add_argument("--mesh", action="store_true",
                        help="also the 468 face mesh points (source pixels) and head pose (yaw, pitch, roll in "
                             "degrees) of every face (docs/preprocessing.md)")
    add_max_pixels(parser)
    parser.set_defaults(func=run)


def run(args):
    results = detect(args.images, args.min_face_size, args.thresholds, args.scale_factor, args.backend,
                     draw_to=args.draw, mesh=args.mesh)
    report = [{"image": str(path), "faces": found.to_json()} for path, found in zip(args.images, results)]
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0
