"""`python -m emotiw.cli`: the same as the `emotiw` command."""

import sys

from emotiw.cli import main

sys.exit(main())
