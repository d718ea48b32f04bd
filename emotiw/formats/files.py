"""Atomic writes: every output appears complete or not at all."""

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from emotiw.errors import UserError


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path`; renames it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600 would leave outputs unreadable to others
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as error:
        if error.filename is None:  # a failed write() names no file: name the one being written
            error.filename = str(path)
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_open(path, mode="w", **kwargs):
    """Like open(), but the file only appears at `path` once it is completely written."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as handle:
            yield handle


def atomic_write_text(path, text):
    with atomic_open(path, "w") as handle:
        handle.write(text)


def replace_dir(finished, target):
    """Puts the finished folder at `target` in one step, replacing what was there (a folder, a file
    or a link) only once the new folder is complete; nothing of the old one stays behind."""
    finished, target = Path(finished), Path(target)
    if not os.path.lexists(target):
        os.replace(finished, target)
        return
    _exchange(finished, target)  # `finished` now holds the old folder, file or link
    if os.path.isdir(finished) and not os.path.islink(finished):
        shutil.rmtree(finished)
    else:
        os.unlink(finished)


def _exchange(a, b):
    """Swaps two paths atomically (Linux renameat2 RENAME_EXCHANGE)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(b))


def file_identity(path):
    """What says a file is unchanged between runs: its resolved path, size and modification time."""
    stat = Path(path).stat()
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


def cache_root():
    """Where downloads and builds are kept between runs: $EMOTIW_CACHE, else <XDG cache>/emotiw."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.environ.get("EMOTIW_CACHE", os.path.join(base, "emotiw")))


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def safe_name(name):
    """A blob or layer name as a file-name part: anything but letters, digits, `_.-` becomes `_`."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def inside(root, *parts):
    """`root / parts`, refused unless it resolves inside `root` and is no symbolic link itself: no
    name, `..` or link may take a write, or a removal, anywhere the user did not name."""
    root = Path(root)
    path = root.joinpath(*parts)
    if path.is_symlink() or not path.resolve().is_relative_to(root.resolve()):
        raise UserError(f"{path} is a symbolic link or leads outside {root}; emotiw writes only inside {root} "
                        f"and never through a link: remove the link or choose another output folder")
    return path


@contextlib.contextmanager
def exclusive_lock(path, busy_message):
    """Holds an flock on `path` for the block; UserError(busy_message) when another process holds
    it. The kernel drops the lock when its holder dies, so a killed run never blocks the next."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)  # CLOEXEC: children do not hold it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(busy_message) from None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed the file between our open and flock: lock the new one
    try:
        yield
    finally:
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # while still locked, so that nobody locks a file about to go
        finally:
            os.close(fd)


def record_is_current(record, digest, paths):
    """Whether the JSON `record` of a conversion holds `digest` and every path it made exists; a
    damaged record means: convert again."""
    import json

    if not Path(record).is_file() or not all(Path(path).is_file() for path in paths):
        return False
    try:
        return json.loads(Path(record).read_text()).get("sha256") == digest
    except ValueError:
        return False
