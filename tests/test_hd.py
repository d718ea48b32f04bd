"""Detection at the resolution faces need (issue 28): --min-face, frames searched scaled down by the
decoder, boxes mapped back to source pixels, checked on real footage composed at 1080p."""

import csv
import json

import numpy as np
import pytest

from emotiw.errors import UserError
from emotiw.face.clip import detection_width, min_face_pixels
from emotiw.face.track import iou_matrix

FRAMES = 60  # the first two shots: carphone, then bikes traffic


@pytest.mark.parametrize("spec, short_side, expected", [
    (None, 360, 20), (None, 400, 20), (None, 480, 24), (None, 1080, 54), (None, 2160, 108), ("48", 1080, 48),
    ("5%", 1080, 54)])
def test_the_smallest_face_scales_with_the_frame(spec, short_side, expected):
    assert min_face_pixels(spec, short_side) == pytest.approx(expected)


@pytest.mark.parametrize("spec", ["0", "-3", "abc", "0%", "100%", "5 %%"])
def test_a_wrong_min_face_is_one_line(spec):
    with pytest.raises(UserError, match="--min-face"):
        min_face_pixels(spec, 1080)


def test_frames_are_searched_where_the_smallest_face_is_20_pixels():
    assert detection_width(1920, 54) == 712 and detection_width(3840, 108) == 712
    assert detection_width(640, 20) is None and detection_width(640, 12) is None


@pytest.fixture(scope="module")
def hd_clip(tmp_path_factory):
    from testmedia import footage

    from emotiw.face.video import write_video

    frames, truth = footage.carphone_with_cuts(1920, 1080)
    folder = tmp_path_factory.mktemp("hd")
    write_video(folder / "clips" / "hd.mp4", frames[:FRAMES], fps=footage.FPS)
    return folder / "clips", truth[:FRAMES]


def manifest_boxes(out):
    with open(out / "manifest.csv", newline="") as handle:
        return {int(row["frame"]): np.array([float(row[k]) for k in ("x1", "y1", "x2", "y2")])
                for row in csv.DictReader(handle) if row["crop"]}


def test_1080p_keeps_the_subject_as_a_full_search_does(hd_clip, tmp_path):
    """The automatic size searches 712x400 frames; the full search (--min-face 20) 1920x1080 ones.
    The subject is kept in the same frames, with boxes in source pixels within IoU 0.9."""
    from emotiw.stages.preprocess import preprocess

    clips, truth = hd_clip
    scaled = preprocess(tmp_path / "auto", videos=clips, split="val", recipe="sse")
    full = preprocess(tmp_path / "full", videos=clips, split="val", recipe="sse", min_face="20")
    sizes = {name: json.loads((tmp_path / name / "preprocess.json").read_text())["clips"]["val/hd"]
             for name in ("auto", "full")}
    assert sizes["auto"]["detect_size"] == [712, 400] and sizes["full"]["detect_size"] == [1920, 1080]
    assert sizes["auto"]["source_size"] == [1920, 1080]
    ours, reference = manifest_boxes(scaled.out), manifest_boxes(full.out)
    faces = [index for index, shown in enumerate(truth) if shown.faces]
    assert set(reference) >= set(faces[: len(faces) * 9 // 10])  # the full search finds him
    kept = [index for index in reference if index in ours]
    assert len(kept) >= 0.95 * len(reference)
    assert np.mean([iou_matrix(ours[index], reference[index])[0, 0] >= 0.9 for index in kept]) >= 0.95
