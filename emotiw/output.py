"""The output folder that every stage writes into, guarded the same way for all of them.

`output_folder(out, command, inputs)` refuses an OUT that is a file, that is one of the inputs or
lies inside one (a rerun would read its own outputs as input), creates it and holds `OUT/.lock`
for the run, so two runs never write into one OUT at once. A write that fails because the disk is
full or OUT is read-only becomes one line naming the file: it is nobody's clip's fault, and every
later write would fail the same way. Paths inside OUT come from emotiw.formats.files.inside(),
which refuses symbolic links and `..`.
"""

import contextlib
import errno
import json
import sys
from pathlib import Path

from emotiw.errors import UserError
from emotiw.formats.files import exclusive_lock

# What a write says when the disk is full or OUT is not writable, and how to fix it
WRITE_FIXES = {errno.ENOSPC: "free disk space", errno.EDQUOT: "free space or raise your disk quota",
               errno.EFBIG: "raise the file size limit (ulimit -f) or use a file system that takes larger files",
               **dict.fromkeys((errno.EROFS, errno.EACCES, errno.EPERM),
                               "make the output folder writable or choose another --out")}


def check_output_folder(out, inputs=(), option="--out"):
    """UserError unless `out` can be an output folder: not a file, not an input, not inside an input folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{option} {out} is a file, not a folder; choose a folder (it is created if missing)")
    resolved = out.resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if resolved == source:
            raise UserError(f"{option} {out} is also an input; choose an output folder apart from the inputs")
        if source.is_dir() and resolved.is_relative_to(source):
            raise UserError(f"{option} {out} lies inside the input folder {given}, so a rerun would read the "
                            f"outputs as inputs; choose an output folder outside it")


def write_failure(error, path, rerun):
    """The one line for an OSError that stops every write: disk full, read-only, no permission."""
    return UserError(f"cannot write {error.filename or path}: {error.strerror}; {WRITE_FIXES[error.errno]}, then "
                     f"{rerun}")


@contextlib.contextmanager
def output_folder(out, command, inputs=(), rerun="run the same command again", option="--out"):
    """Checks, creates and locks OUT for the block, which gets OUT as a Path."""
    out = Path(out)
    check_output_folder(out, inputs, option)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the output folder {out}: {error.strerror}; choose another {option}") from None
    try:
        with exclusive_lock(out / ".lock", f"another emotiw {command} is writing into {out} (it holds "
                                           f"{out / '.lock'}); wait for it to end or choose another {option}"):
            yield out
    except OSError as error:
        if error.errno not in WRITE_FIXES:
            raise
        raise write_failure(error, out, rerun) from None


def read_state(path, command):
    """The JSON a finished step left in OUT to be checked on a rerun, or None when there is none or
    it is damaged (then the step is redone, with one line saying why)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        print(f"emotiw {command}: {path} is damaged; doing that step again", file=sys.stderr)
        return None


@contextlib.contextmanager
def output_file(path, command, inputs=(), option="--out"):
    """output_folder for a stage that writes one file (export): refuses a folder, a link or an input
    at `path`, holds `.<name>.lock` beside it for the block, and says a failed write in one line."""
    path = Path(path)
    if path.is_symlink():
        raise UserError(f"{option} {path} is a symbolic link; emotiw never writes through one: remove it or "
                        f"choose another path")
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; give the path of the file to write")
    if any(given is not None and Path(given).resolve() == path.resolve() for given in inputs):
        raise UserError(f"{option} {path} is also an input; choose another path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = path.with_name(f".{path.name}.lock")
        with exclusive_lock(lock, f"another emotiw {command} is writing {path} (it holds {lock}); wait for it "
                                  f"to end or choose another {option}"):
            yield path
    except OSError as error:
        if error.errno not in WRITE_FIXES:
            raise
        raise write_failure(error, path, "run the same command again") from None
