"""`emotiw predict`: your own videos -> emotions per frame, timeline, annotated video (emotiw.stages.predict)."""

from emotiw.cli.options import (
    add_align,
    add_backend,
    add_detect,
    add_max_pixels,
    add_mean_file,
    add_min_face,
    add_precision,
    add_recipe,
    add_sampling,
)
from emotiw.stages.predict import predict


def register(subparsers):
    parser = subparsers.add_parser(
        "predict", help="videos -> emotions per frame (frames.csv, summary.json, timeline.png, annotated.mp4)",
        description=__doc__.splitlines()[0].rstrip(".") + ". Without --net, the embedded fer2013_mini_xception model.")
    parser.add_argument("videos", nargs="+", metavar="VIDEO", help="video files (any container FFmpeg reads)")
    parser.add_argument("--out", metavar="DIR", default="predictions",
                        help="output folder: one DIR/<video>/ per video (default: ./predictions)")
    parser.add_argument("--net", help="a registered net or a deploy prototxt (with --weights)")
    parser.add_argument("--weights", metavar="FILE", help="its .caffemodel")
    add_recipe(parser, "how face crops are made: dsn, sse or fer2013 (default: the net's recipe)", "--mode")
    add_mean_file(parser)
    add_backend(parser)
    add_precision(parser)
    add_detect(parser)
    add_sampling(parser)
    parser.add_argument("--overwrite", action="store_true", help="redo videos finished by an earlier run")
    parser.add_argument("--no-video", action="store_true", help="skip annotated.mp4")
    add_align(parser)
    add_min_face(parser)
    add_max_pixels(parser)
    parser.set_defaults(func=run)


def run(args):
    result = predict(args.videos, args.out, net=args.net, weights=args.weights, recipe=args.recipe,
                     backend=args.backend, detect=args.detect, fps=args.fps, every=args.every,
                     overwrite=args.overwrite, annotate=not args.no_video, mean_file=args.mean_file,
                     align=args.align, min_face=args.min_face, precision=args.precision)
    for video in result.videos:
        if video.folder is not None:
            state = "already done" if video.skipped else "done"
            print(f"{video.video}: {video.emotion} ({max(video.scores):.2f}) -> {video.folder} ({state})")
    return 0
