#!/usr/bin/env python3
"""The released SSE leveldb2mat.py as a thin entry point: `emotiw leveldb2mat ARGS`.

    python leveldb2mat.py DIR BATCH_NUM BATCH_SIZE DIM OUT.mat [--num-images N] [--videos LIST]
                          [--frames FRAMELIST] [--lmdb] [--v73]
"""

import sys

from emotiw.cli import main

if __name__ == "__main__":
    sys.exit(main(["leveldb2mat", *sys.argv[1:]]))
