"""A 20-minute clip is preprocessed in about the memory of a 1-minute one: frames are decoded
lazily, and crops waiting for the PNG writer are bounded. Slow (about a minute on 2 cores):
`.venv/bin/python -m pytest -m slow`.
"""

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from testmedia.scene import astronaut_head, coffee_background, paste
from emotiw.face.video import write_video

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT, FPS = 640, 360, 2
PEAK_RSS = """
import resource, subprocess, sys
result = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)
print(result.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


class Footage(Sequence):
    """`minutes` of frames made when asked for: the coffee photograph, and the astronaut's head
    drifting across it for 30 s of every minute."""

    def __init__(self, minutes):
        self.length = minutes * 60 * FPS
        self.background = coffee_background(WIDTH, HEIGHT)
        self.head = astronaut_head()

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(index)
        image = self.background.copy()
        second = index / FPS
        if second % 60 < 30:
            paste(image, self.head, 100 + round(10 * second) % 300, 80, 160)
        return image


def peak_rss_kb(clip, out):
    """The peak resident memory of one `emotiw preprocess` process, in KiB (dsn mode: its 1024-wide
    frames are the biggest that wait for the writer)."""
    command = [sys.executable, "-m", "emotiw.cli", "preprocess", "--videos", str(clip.parent), "--out", str(out),
               "--recipe", "dsn"]
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, *command], cwd=REPO, capture_output=True, text=True,
                            check=True)
    status, peak = map(int, result.stdout.split())
    assert status == 0, result.stderr
    return peak


def test_a_20_minute_clip_takes_the_memory_of_a_1_minute_clip(tmp_path):
    sizes = {}
    for minutes in (1, 20):
        clip = tmp_path / f"clips{minutes}" / f"{minutes}min.avi"
        clip.parent.mkdir()
        write_video(clip, Footage(minutes), fps=FPS)
        sizes[minutes] = peak_rss_kb(clip, tmp_path / f"out{minutes}")
        faces = list((tmp_path / f"out{minutes}" / "faces").rglob("*.png"))
        assert len(faces) == pytest.approx(minutes * 30 * FPS, rel=0.1)
    print(f"peak RSS: 1 minute {sizes[1] // 1024} MiB, 20 minutes {sizes[20] // 1024} MiB")
    assert sizes[20] <= 1.5 * sizes[1], sizes
