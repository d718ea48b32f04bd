"""`emotiw predict`: your own videos -> emotions per frame, timeline, annotated video (emotiw.stages.predict)."""

from emotiw.caffe.runtime import BACKENDS
from emotiw.face.clip import DETECT_MODES
from emotiw.stages.predict import predict


def register(subparsers):
    parser = subparsers.add_parser(
        "predict", help="videos -> emotions per frame (frames.csv, summary.json, timeline.png, annotated.mp4)",
        description=__doc__.splitlines()[0] + ". Without --net, the embedded fer2013_mini_xception model.")
    parser.add_argument("videos", nargs="+", metavar="VIDEO", help="video files (any container FFmpeg reads)")
    parser.add_argument("--out", metavar="DIR", default="predictions",
                        help="output folder: one DIR/<video>/ per video (default: ./predictions)")
    parser.add_argument("--net", help="a registered net or a deploy prototxt (with --weights)")
    parser.add_argument("--weights", metavar="FILE", help="its .caffemodel")
    parser.add_argument("--mode", choices=("dsn", "sse"), help="face crops (default: the net's paper)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="inference runtime (default auto)")
    parser.add_argument("--detect", choices=DETECT_MODES, default="tracked", help="as for preprocess")
    sampling = parser.add_mutually_exclusive_group()
    sampling.add_argument("--fps", type=float, help="keep N frames per second")
    sampling.add_argument("--every", type=int, metavar="K", help="keep every K-th frame")
    parser.add_argument("--overwrite", action="store_true", help="redo videos finished by an earlier run")
    parser.add_argument("--no-video", action="store_true", help="skip annotated.mp4")
    parser.set_defaults(func=run)


def run(args):
    result = predict(args.videos, args.out, net=args.net, weights=args.weights, mode=args.mode,
                     backend=args.backend, detect=args.detect, fps=args.fps, every=args.every,
                     overwrite=args.overwrite, annotate=not args.no_video)
    for video in result.videos:
        if video.folder is not None:
            state = "already done" if video.skipped else "done"
            print(f"{video.video}: {video.emotion} ({max(video.scores):.2f}) -> {video.folder} ({state})")
    return 0
