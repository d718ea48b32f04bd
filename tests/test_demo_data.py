"""`emotiw demo-data`: determinism, layout, the expression warp and its directions, bad input."""

import csv
import hashlib
import itertools

import numpy as np
import pytest

from emotiw import EMOTIONS
from emotiw.cli import main
from emotiw.demo import data as demo_data
from emotiw.demo import expressions
from emotiw.errors import UserError

SMALL = {"clips": (2, 1, 1), "frames": 3, "identities": 3}  # 28 clips of 3 frames
# What each class is meant to do (the spec of EXPRESSIONS, written independently of its numbers):
# +1 up / wider / open, -1 down / narrower, 0 not at all.
INTENDED = {  # class: (mouth corners vertical, lower lip vertical, brows vertical, mouth width)
    "Angry": (0, 0, -1, -1),
    "Disgust": (-1, +1, -1, 0),
    "Fear": (-1, +1, +1, +1),
    "Happy": (+1, +1, 0, +1),
    "Neutral": (0, 0, 0, 0),
    "Sad": (-1, 0, +1, -1),
    "Surprise": (0, +1, +1, -1),
}


def warp_expression(image, landmarks, expression):
    """The face image with its features moved to the expression, mouth cavity included."""
    warped = expressions.apply_field(image, expressions.expression_field(image.shape, landmarks, expression))
    return expressions.draw_mouth_cavity(warped, landmarks, expression)


@pytest.fixture(scope="module")
def detector():
    from emotiw.face.mtcnn import FaceDetector

    return FaceDetector()


@pytest.fixture(scope="module")
def astronaut(detector):
    return demo_data.source_faces(detector, 1)[0]


@pytest.fixture(scope="module")
def generated(tmp_path_factory, detector):
    out = tmp_path_factory.mktemp("demo_data") / "set"
    rows = demo_data.generate(out, seed=3, detector=detector, **SMALL)
    return out, rows


def decoded_hash(path):
    """Of the decoded frames and sound."""
    from emotiw.descriptors.audio import decode_audio
    from emotiw.face.video import iter_frames

    digest = hashlib.sha256()
    for frame in iter_frames(path):
        digest.update(frame.image.tobytes())
    digest.update(decode_audio(path).tobytes())
    return digest.hexdigest()


def clip_hashes(out):
    return {path.relative_to(out).as_posix(): decoded_hash(path) for path in sorted(out.rglob("*.mp4"))}


def test_layout_counts_and_labels(generated):
    from emotiw.face.video import iter_frames

    out, rows = generated
    for split, per_class in zip(demo_data.SPLITS, SMALL["clips"]):
        for emotion in EMOTIONS:
            assert len(list((out / split / emotion).glob("*.mp4"))) == per_class
    with open(out / "labels.csv", newline="") as handle:
        labels = {row["clip"]: row["label"] for row in csv.DictReader(handle)}
    files = {path.stem: path.parent.name for path in out.rglob("*.mp4")}
    assert labels == files  # every clip once, labelled with its folder's class, names unique across splits
    assert {row["identity"] for row in rows} <= {"astronaut", *(f"lfw_{i:03d}" for i in range(100))}
    frames = list(iter_frames(next(out.rglob("*.mp4"))))
    assert len(frames) == SMALL["frames"]
    assert frames[0].image.shape == (120, 160, 3)


def test_every_clip_speaks_for_as_long_as_its_video(generated):
    import av

    from emotiw.descriptors.audio import RATE, SILENCE_RMS, decode_audio

    out, rows = generated
    assert {row["voice_sentence"] for row in rows} <= set(demo_data.SENTENCES)
    for path in sorted(out.rglob("*.mp4"))[::5]:
        with av.open(str(path)) as container:
            assert [stream.codec_context.name for stream in container.streams.audio] == ["aac"]
        sound = decode_audio(path)
        seconds = SMALL["frames"] / demo_data.FPS
        assert abs(len(sound) / RATE - seconds) < 2048 / RATE  # AAC pads up to two frames of 1024
        assert np.sqrt(np.mean(sound ** 2)) > 10 * SILENCE_RMS


def test_the_class_voices_differ_as_designed(astronaut):
    """openSMILE on the speech itself: Surprise is higher and louder than Sad."""
    from emotiw.descriptors.audio import AudioDescriptor

    settings = demo_data.Settings(seed=0, clips=(1, 1, 1), frames=20, width=160, height=120, strength=1.0,
                                  identities=1)
    backgrounds = demo_data.background_images()[:1]
    descriptor = AudioDescriptor()
    column = {name: index for index, name in enumerate(descriptor.names)}
    measured = {}
    for emotion in ("Sad", "Surprise"):
        clip = demo_data.plan_clip(settings, demo_data.ClipPlan("train", emotion, 1), [astronaut], backgrounds)
        values = descriptor.smile.process_signal(demo_data.speak(clip, settings), demo_data.AUDIO_RATE)
        measured[emotion] = values.to_numpy().reshape(-1)
    pitch, loudness = column["F0semitoneFrom27.5Hz_sma3nz_amean"], column["loudness_sma3_amean"]
    assert measured["Surprise"][pitch] > measured["Sad"][pitch] + 5  # semitones
    assert measured["Surprise"][loudness] > 1.5 * measured["Sad"][loudness]


def test_silent_clips_have_no_sound_track(tmp_path, detector):
    import av

    out = tmp_path / "silent"
    demo_data.generate(out, seed=3, detector=detector, clips=(1, 1, 1), frames=3, identities=1, audio=False)
    with av.open(str(next(out.rglob("*.mp4")))) as container:
        assert not container.streams.audio


def test_same_seed_gives_identical_clips_and_another_seed_does_not(generated, tmp_path, detector):
    out, _ = generated
    again = tmp_path / "again"
    demo_data.generate(again, seed=3, detector=detector, **SMALL)
    assert clip_hashes(again) == clip_hashes(out)
    assert (again / "labels.csv").read_text() == (out / "labels.csv").read_text()
    assert (again / "clips.csv").read_text() == (out / "clips.csv").read_text()

    other = tmp_path / "other"
    demo_data.generate(other, seed=4, detector=detector, clips=(1, 1, 1), frames=3, identities=3)
    first = "train/Angry/train_angry_01.mp4"
    assert decoded_hash(other / first) != clip_hashes(out)[first]


def test_a_rerun_remakes_only_missing_clips(generated, tmp_path, detector):
    import shutil

    out, _ = generated
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    missing = copy / "val" / "Happy" / "val_happy_01.mp4"
    kept = copy / "test" / "Sad" / "test_sad_01.mp4"
    missing.unlink()
    kept_time = kept.stat().st_mtime_ns
    demo_data.generate(copy, seed=3, detector=detector, **SMALL)
    assert decoded_hash(missing) == decoded_hash(out / "val" / "Happy" / "val_happy_01.mp4")
    assert kept.stat().st_mtime_ns == kept_time
    with pytest.raises(UserError, match="other settings"):
        demo_data.generate(copy, seed=4, detector=detector, **SMALL)


def test_field_is_skimage_piecewise_affine_warp(astronaut):
    from skimage.transform import PiecewiseAffineTransform

    expression = dict(zip(expressions.PARAMETERS, expressions.EXPRESSIONS["Surprise"]))
    field = expressions.expression_field(astronaut.sprite.shape, astronaut.landmarks, expression)
    height, width = astronaut.sprite.shape[:2]
    source, target = expressions.control_points(astronaut.landmarks, expression, (width, height))
    inverse = PiecewiseAffineTransform.from_estimate(target, source)
    ys, xs = np.mgrid[0:height, 0:width]
    grid = np.column_stack([xs.ravel(), ys.ravel()]).astype(np.float64)
    np.testing.assert_allclose(field.reshape(-1, 2), inverse(grid) - grid, atol=1e-3)


def test_warp_carries_image_content_to_the_moved_control_points(astronaut):
    """Warps images whose pixel values are their own coordinates: at each moved control point the
    warped images must hold the coordinates of its starting point."""
    height, width = astronaut.sprite.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    for emotion in ("Happy", "Sad", "Surprise", "Angry"):
        expression = dict(zip(expressions.PARAMETERS, expressions.EXPRESSIONS[emotion]))
        field = expressions.expression_field(astronaut.sprite.shape, astronaut.landmarks, expression)
        warped = expressions.apply_field(np.dstack([xs, ys]), field)
        for name, (start, end) in expressions.moved_points(astronaut.landmarks, expression).items():
            found = bilinear(warped, end)
            assert np.allclose(found, start, atol=0.5), (emotion, name, found, start, end)


def bilinear(image, point):
    x, y = point
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    fx, fy = x - x0, y - y0
    top = image[y0, x0] * (1 - fx) + image[y0, x0 + 1] * fx
    bottom = image[y0 + 1, x0] * (1 - fx) + image[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


@pytest.mark.parametrize("emotion", EMOTIONS)
def test_each_class_moves_mouth_and_brows_the_intended_way(astronaut, emotion):
    corners, lip, brows, width = INTENDED[emotion]
    expression = dict(zip(expressions.PARAMETERS, expressions.EXPRESSIONS[emotion]))
    moved = expressions.moved_points(astronaut.landmarks, expression)
    face = expressions.FaceFrame(astronaut.landmarks)
    eye_distance = face.eye_distance

    def rise(name):  # in eye distances, up the face positive (v points down the face)
        start, end = moved[name]
        return -np.dot(end - start, face.v) / eye_distance

    def agrees(value, intended):
        return abs(value) < 1e-9 if intended == 0 else np.sign(value) == intended and abs(value) > 0.02

    assert agrees(rise("mouth_left"), corners) and agrees(rise("mouth_right"), corners)
    assert agrees(-rise("lower_lip"), lip)
    for side in ("left", "right"):
        assert all(agrees(rise(f"{side}_brow_{part}"), brows) for part in ("inner", "mid", "outer"))
    starts = moved["mouth_right"][0] - moved["mouth_left"][0]
    ends = moved["mouth_right"][1] - moved["mouth_left"][1]
    assert agrees((np.linalg.norm(ends) - np.linalg.norm(starts)) / eye_distance, width)


def test_mtcnn_sees_happy_mouth_corners_higher_than_sad(astronaut, detector):
    """Independent of the control points: MTCNN's own mouth landmarks on the warped faces."""
    def mouth_height(emotion):
        expression = dict(zip(expressions.PARAMETERS, expressions.EXPRESSIONS[emotion]))
        face = warp_expression(astronaut.sprite, astronaut.landmarks, expression)
        found = detector.detect(np.clip(face, 0, 255).astype(np.uint8))
        assert len(found) == 1
        points = found.landmarks[0]
        return (points[3:5, 1].mean() - points[0:2, 1].mean()) / np.linalg.norm(points[1] - points[0])

    happy, neutral, sad = (mouth_height(e) for e in ("Happy", "Neutral", "Sad"))
    assert happy < neutral - 0.03  # eye-to-mouth-corner height in eye distances
    assert sad > neutral + 0.03


def test_warp_never_folds_up_to_the_maximum_strength(detector):
    """The most extreme clip expressions (jitter at 3 sigma, top intensity) of every class."""
    from scipy.spatial import Delaunay

    people = demo_data.source_faces(detector, 6)
    scale = demo_data.MAX_STRENGTH * demo_data.INTENSITY[1]
    for person, base in itertools.product(people, expressions.EXPRESSIONS.values()):
        for signs in itertools.product((-1, 1), repeat=len(base)):
            values = np.array(base) + 3 * demo_data.JITTER * np.array(signs)
            values[expressions.PARAMETERS.index("open")] = max(0.0, values[expressions.PARAMETERS.index("open")])
            expression = dict(zip(expressions.PARAMETERS, scale * values))
            source, target = expressions.control_points(person.landmarks, expression, person.sprite.shape[1::-1])
            assert not expressions.folds(Delaunay(target).simplices, source, target), (person.name, signs)


def test_folds_detects_a_point_pushed_across_its_neighbours():
    source = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0], [5.0, 4.0]])
    target = source.copy()
    target[4] = [5.0, 1.0]
    from scipy.spatial import Delaunay
    assert not expressions.folds(Delaunay(target).simplices, source, target)
    target[4] = [5.0, -3.0]  # outside the square: the triangles it shared turn over
    assert expressions.folds(Delaunay(target).simplices, source, target)


@pytest.mark.parametrize("argv, message", [
    (["--size", "161x120"], "even"),
    (["--size", "big"], "WIDTHxHEIGHT"),
    (["--strength", "2"], "--strength"),
    (["--clips-per-class", "1,2"], "TRAIN,VAL,TEST"),
    (["--clips-per-class", "1,0,1"], "at least one clip"),
    (["--frames", "1"], "--frames"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, argv, message):
    assert main(["demo-data", "--out", str(tmp_path / "x"), *argv]) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1
