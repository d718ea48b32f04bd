"""`emotiw doctor`: what Caffe and libraries this installation uses, and what is missing."""

import sys

from emotiw.doctor import collect


def run(args):
    facts, problems = collect()
    width = max(len(label) for label, _ in facts)
    for label, value in facts:
        print(f"{label:<{width}}  {value}")
    for problem in problems:
        print(f"emotiw doctor: {problem}", file=sys.stderr)
    return 1 if problems else 0


def register(subparsers):
    parser = subparsers.add_parser("doctor", help="check the Caffe installation and libraries")
    parser.set_defaults(func=run)
