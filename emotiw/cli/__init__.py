"""The `emotiw` command: one subcommand per pipeline stage, each a thin layer over the API.

Each command module defines `register(subparsers)`, which adds its parser and sets `func` to a
function taking the parsed arguments and returning an exit code. The modules import the stages,
which import caffe and cv2 only when they run, so that `emotiw --help` is quick.
"""

import argparse
import contextlib
import importlib
import os
import sys

from emotiw import __version__
from emotiw.errors import UserError
from emotiw.formats.images import MAX_MEGAPIXELS_VARIABLE
from emotiw.processes import Terminated, stop_on_sigterm

COMMAND_MODULES = [
    "emotiw.cli.doctor",
    "emotiw.cli.train",
    "emotiw.cli.fuse",
    "emotiw.cli.preprocess",
    "emotiw.cli.detect",
    "emotiw.cli.nets",
    "emotiw.cli.weights",
    "emotiw.cli.test",
    "emotiw.cli.extract",
    "emotiw.cli.score_features",
    "emotiw.cli.export",
    "emotiw.cli.predict",
    "emotiw.cli.features",
    "emotiw.cli.demo",
]


def build_parser():
    parser = argparse.ArgumentParser(prog="emotiw", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"emotiw {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    stop_on_sigterm()
    try:
        with pixel_limit_of(args):
            return args.func(args) or 0
    except UserError as error:
        print(f"emotiw {args.command}: error: {error}", file=sys.stderr)
        return 2
    except Terminated as stopped:
        print(f"emotiw {args.command}: stopped by {stopped}", file=sys.stderr)
        return 128 + stopped.signum
    except KeyboardInterrupt:
        print(f"emotiw {args.command}: interrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def pixel_limit_of(args):
    """--max-pixels for the command, through the environment so that its worker processes see it too."""
    limit = getattr(args, "max_pixels", None)
    if limit is None:
        yield
        return
    if not limit > 0:
        raise UserError(f"--max-pixels must be above 0, not {limit:g}")
    previous = os.environ.get(MAX_MEGAPIXELS_VARIABLE)
    os.environ[MAX_MEGAPIXELS_VARIABLE] = repr(float(limit))
    try:
        yield
    finally:
        if previous is None:
            del os.environ[MAX_MEGAPIXELS_VARIABLE]
        else:
            os.environ[MAX_MEGAPIXELS_VARIABLE] = previous


if __name__ == "__main__":
    sys.exit(main())
