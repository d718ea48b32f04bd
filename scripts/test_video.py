#!/usr/bin/env python3
"""DSN's test_video.py as a thin entry point: the same as `emotiw test ARGS` (see `--help`)."""

import sys

from emotiw.cli import main

if __name__ == "__main__":
    sys.exit(main(["test", *sys.argv[1:]]))
