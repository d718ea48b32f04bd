"""`emotiw demo` (the whole pipeline on generated clips) and `emotiw demo-data` (the clips alone)."""

import sys
from dataclasses import replace
from pathlib import Path

from emotiw.demo.data import MAX_STRENGTH, SPLITS, generate
from emotiw.demo.pipeline import QUICK, Config, Demo
from emotiw.demo.report import percent, write_report
from emotiw.errors import UserError


def register(subparsers):
    register_demo(subparsers)
    register_demo_data(subparsers)


def parse_size(text):
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 160x120") from None
    return width, height


def parse_clips(text):
    """`N` (N clips per class in every split) or `TRAIN,VAL,TEST`."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        counts = []
    if len(counts) == 1:
        counts = counts * len(SPLITS)
    if len(counts) != 3:
        raise UserError(f"--clips-per-class {text!r}: expected N or TRAIN,VAL,TEST, e.g. 4,2,2")
    return tuple(counts)


def register_demo(subparsers):
    parser = subparsers.add_parser(
        "demo", help="the whole pipeline on generated clips: data, preprocess, train, test, extract, fuse",
        description="Runs the whole pipeline on generated clips, CPU only: demo-data, preprocess, train "
                    "(two SSE-HoloNet variants), test, extract, fuse; writes OUT/report.md (see docs/demo.md).")
    parser.add_argument("--out", default="demo", metavar="DIR", help="report folder (default demo)")
    parser.add_argument("--work", metavar="DIR", help="intermediate files (default OUT/work); a rerun resumes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of Caffe (default 0)")
    parser.add_argument("--quick", action="store_true",
                        help="a few clips and iterations: checks that every stage runs, learns little")
    parser.set_defaults(func=run_demo)


def run_demo(args):
    config = replace(QUICK if args.quick else Config(), seed=args.seed)
    out = Path(args.out)
    demo = Demo(out, Path(args.work) if args.work else out / "work", config)
    demo.run()
    report, rows = write_report(demo)
    print(f"[demo] report: {report}", file=sys.stderr)
    for name, val, test, *_ in rows:
        print(f"  {name}: val {percent(val)} %, test {percent(test)} %")
    return 0


def register_demo_data(subparsers):
    parser = subparsers.add_parser(
        "demo-data", help="make the demo's labelled video clips from scikit-image's face photographs",
        description="Makes short labelled video clips for the 7 AFEW classes from face photographs that "
                    "scikit-image ships, with per-class expression warps (see docs/demo.md).")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder: DIR/<split>/<Emotion>/<clip>.mp4")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical clips")
    parser.add_argument("--clips-per-class", default="40,5,5", metavar="N|TRAIN,VAL,TEST",
                        help="clips per class in train, val and test (default 40,5,5; N: N in each)")
    parser.add_argument("--frames", type=int, default=8, help="frames per clip (default 8, at 10 fps)")
    parser.add_argument("--size", default="160x120", metavar="WxH", help="frame size (default 160x120)")
    parser.add_argument("--strength", type=float, default=1.0,
                        help=f"expression strength in (0, {MAX_STRENGTH}]; the default, 1, gives the designed amounts")
    parser.add_argument("--identities", type=int, default=8, help="number of different faces (default 8)")
    parser.add_argument("--no-audio", dest="audio", action="store_false",
                        help="silent clips (by default each clip has a sentence spoken by espeak-ng, in the "
                             "class's pitch, rate and loudness)")
    parser.set_defaults(func=run_demo_data)


def run_demo_data(args):
    rows = generate(args.out, seed=args.seed, clips=parse_clips(args.clips_per_class), frames=args.frames,
                    size=parse_size(args.size), strength=args.strength, identities=args.identities,
                    audio=args.audio)
    people = sorted({row["identity"] for row in rows})
    counts = ", ".join(f"{split} {sum(row['split'] == split for row in rows)}" for split in SPLITS)
    print(f"{len(rows)} clips ({counts}) of {len(people)} faces -> {args.out}; "
          f"labels in {Path(args.out) / 'labels.csv'}")
    return 0
