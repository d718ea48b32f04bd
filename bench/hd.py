"""Bench rows on the footage people record today (issue 28): the real-footage clip composed at
640x360 and scaled up to 1280x720, 1920x1080 and 3840x2160 (no real 4K clip ships offline),
`preprocess` with both recipes and `predict --no-video` in a fresh process each, frames/s, and the
subject's coverage against the `mtcnn` package's detections on the 640x360 frames, scaled (our own
full every-frame search where the bench environment is missing)."""

import shutil
import subprocess
import sys

import numpy as np

BASE = (640, 360)
SIZES = ((640, 360), (1280, 720), (1920, 1080), (3840, 2160))
UHD_FRAMES = 80  # frames of the 4K clip: its encoding and runs are long


def bench_hd(plan, results, reference, work, measure, footage_coverage, our_faces, detector_options):
    import cv2
    from testmedia import footage

    from emotiw.face.video import write_video

    frames, _ = footage.carphone_with_cuts(*BASE)
    if plan.quick:
        frames = frames[:60]
    np.savez(work / "hd_base.npz", frames=np.stack(frames))
    ref = reference.run("detect", label="hd base", frames=str(work / "hd_base.npz"), repeats=1, warmup=0,
                        warmup_frames=2, **detector_options)
    base_faces = ref["faces"] if ref else None
    for width, height in SIZES[:2] if plan.quick else SIZES:
        count = min(len(frames), UHD_FRAMES) if width > 1920 else len(frames)
        scale = width / BASE[0]
        folder = work / f"hd_{width}" / "clips"
        path = write_video(folder / "clip.mp4", [cv2.resize(frame, (width, height), interpolation=cv2.INTER_CUBIC)
                                                 for frame in frames[:count]], fps=footage.FPS)
        name = f"real footage {width}x{height}, {count} frames"
        for number, (label, command) in enumerate((
                ("preprocess --recipe sse", ["preprocess", "--videos", str(folder), "--recipe", "sse"]),
                ("preprocess --recipe dsn", ["preprocess", "--videos", str(folder), "--recipe", "dsn"]),
                ("predict --no-video", ["predict", str(path), "--no-video"]))):
            runs, last = iter(range(10 ** 6)), {}

            def run_once():  # a fresh process and output folder each time, as a user runs it
                out = work / f"hd_{width}_{number}_{next(runs)}"
                subprocess.run([sys.executable, "-m", "emotiw.cli", *command, "--out", str(out)], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                if "out" in last:
                    shutil.rmtree(last["out"])
                last["out"] = out

            rates = measure(run_once, count, plan)
            extra = {}
            if label.startswith("preprocess"):
                if base_faces is None:  # our full search of the base clip (SIZES[0]) stands in for the package's
                    base_faces = our_faces(_full_search(work, folder), len(frames))
                scaled = [[list(np.array(face) * scale) for face in faces] for faces in base_faces[:count]]
                coverage, close = footage_coverage(last["out"] / "manifest.csv", scaled)
                extra = {"coverage": coverage, "close_boxes": close,
                         "reference": "mtcnn (640x360, scaled)" if ref else "our full search (640x360, scaled)"}
            results.add("hd", name, f"emotiw {label}", rates, "frames/s", **extra)


def _full_search(work, folder):
    """detections.csv of our every-frame search of the clips in `folder` with the full pyramid
    (--min-face 20)."""
    out = work / "hd_reference_out"
    subprocess.run([sys.executable, "-m", "emotiw.cli", "preprocess", "--videos", str(folder), "--out", str(out),
                    "--recipe", "sse", "--detect", "every-frame", "--min-face", "20"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out / "detections.csv"
