"""`preprocess --dsn-frames`: DSN's extract_frames.py, every frame of every clip 1024 wide as PNG."""

import shutil
import time

from emotiw.errors import UserError
from emotiw.face.video import VideoError, write_dsn_frames
from emotiw.formats.files import inside
from emotiw.inputs import Problem
from emotiw.recipes import get_recipe
from emotiw.stages.preprocess.coverage import print_problem
from emotiw.stages.preprocess.layout import PreprocessResult, update_errors


def dsn_frames_only(out, root, items, problems, started):
    """--dsn-frames: DSN's extract_frames.py into OUT/frames/<split>/<clip>/<clip>-001.png."""
    from tqdm import tqdm

    written = 0
    for item in tqdm(items, desc="clips", unit="clip", disable=None):
        target = inside(out, "frames", item.split, item.clip)
        if target.is_dir():
            continue
        work = inside(out, "frames", item.split, f".{item.clip}.partial")
        shutil.rmtree(work, ignore_errors=True)
        try:
            written += write_dsn_frames(item.source, work, get_recipe("dsn").frame_width)
        except VideoError as error:
            problems.append(Problem(item.split, item.clip, str(item.source), str(error)))
            shutil.rmtree(work, ignore_errors=True)
            continue
        work.rename(target)
    for problem in problems:
        print_problem(problem)
    update_errors(out, str(root.resolve()), problems)
    print(f"{written} frames of {len(items)} clips written under {out / 'frames'} in "
          f"{time.monotonic() - started:.1f} s; {len(problems)} problems")
    if not any((out / "frames" / i.split / i.clip).is_dir() for i in items):
        raise UserError(f"no clip could be decoded; see {out / 'errors.csv'}")
    return PreprocessResult(out=out, summary={"clips": len(items), "frames_written": written}, problems=problems)
