"""MTCNN on Caffe (emotiw.face.mtcnn, emotiw.face.mtcnn_nets) against the `mtcnn` package's own pipeline.

The golden fixtures in tests/fixtures/mtcnn were written by tests/fixtures/make_mtcnn_fixtures.py,
which runs the package's TensorFlow models; the images are rebuilt here from their recipes.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from emotiw.cli import main
from emotiw.errors import UserError
from emotiw.face import mtcnn_nets as mtcnn_caffe
from emotiw.face.mtcnn import Detections, FaceDetector

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MTCNN_DIR = Path(__file__).resolve().parents[1] / "models" / "mtcnn"  # committed prototxts, converted weights
FIXTURE_FILES = sorted(path for path in (FIXTURES / "mtcnn").glob("*.json") if path.name != "nets.json")
IOU_MIN, LANDMARK_PX, SCORE_TOL = 0.95, 2.0, 0.01
# Read at collection, before any test's detector rewrites a stale prototxt.
COMMITTED_PROTOTXTS = {name: (MTCNN_DIR / f"{name}.prototxt").read_text()
                       for name in mtcnn_caffe.NET_NAMES}


def load_recipes():
    spec = importlib.util.spec_from_file_location("make_mtcnn_fixtures", FIXTURES / "make_mtcnn_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


recipes = load_recipes()


def fixture_image(name):
    return recipes.build_image(json.loads((FIXTURES / "mtcnn" / f"{name}.json").read_text())["recipe"])


@pytest.fixture(scope="module")
def detector():
    return FaceDetector()


def iou(a, b):
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def assert_same_faces(ours, reference):
    """Same count; each reference face matched by our best-overlapping box within the tolerances."""
    assert len(ours) == len(reference), f"{len(ours)} faces, the reference found {len(reference)}"
    unmatched = list(range(len(ours)))
    for face in reference:
        best = max(unmatched, key=lambda k: iou(ours.boxes[k], face["box"]))
        unmatched.remove(best)
        assert iou(ours.boxes[best], face["box"]) >= IOU_MIN, (ours.boxes[best], face["box"])
        distances = np.linalg.norm(ours.landmarks[best] - np.array(face["landmarks"]), axis=1)
        assert distances.max() <= LANDMARK_PX, (ours.landmarks[best], face["landmarks"])
        assert abs(ours.scores[best] - face["score"]) <= SCORE_TOL


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=[path.stem for path in FIXTURE_FILES])
def test_matches_the_reference_pipeline(detector, path):
    fixture = json.loads(path.read_text())
    image = recipes.build_image(fixture["recipe"])
    assert list(image.shape) == fixture["shape"]
    assert_same_faces(detector.detect(image), fixture["faces"])


def test_fixtures_cover_the_required_cases():
    names = {path.stem for path in FIXTURE_FILES}
    faces = {path.stem: len(json.loads(path.read_text())["faces"]) for path in FIXTURE_FILES}
    assert len([name for name in names if faces[name] and name != "astronaut"]) >= 8
    assert len([name for name in names if name.startswith("no_face") and faces[name] == 0]) >= 2


def test_backends_give_the_same_detections():
    images = [fixture_image("two_faces_in_rocket_scene"), fixture_image("cut_at_border")]
    pycaffe = FaceDetector(backend="pycaffe").detect_batch(images)
    opencv = FaceDetector(backend="opencv").detect_batch(images)
    for a, b in zip(pycaffe, opencv):
        assert len(a) == len(b) > 0
        np.testing.assert_allclose(a.boxes, b.boxes, atol=0.01)
        np.testing.assert_allclose(a.landmarks, b.landmarks, atol=0.01)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)


def test_batch_equals_one_by_one(detector):
    images = [fixture_image("two_faces_in_rocket_scene"), fixture_image("no_face_flat"), fixture_image("gray")]
    for batched, image in zip(detector.detect_batch(images), images):
        single = detector.detect(image)
        assert len(batched) == len(single)
        np.testing.assert_allclose(batched.boxes, single.boxes, atol=1e-4)
        np.testing.assert_allclose(batched.landmarks, single.landmarks, atol=1e-4)


@pytest.mark.parametrize("image", [np.zeros((0, 0, 3), np.uint8), np.full((8, 8, 3), 200, np.uint8),
                                   np.zeros((120, 160, 3), np.uint8), np.full((90, 70), 255, np.uint8)],
                         ids=["empty", "smaller_than_a_window", "black", "white_gray"])
def test_faceless_images_give_empty_detections(detector, image):
    found = detector.detect(image)
    assert isinstance(found, Detections) and len(found) == 0
    assert found.boxes.shape == (0, 4) and found.scores.shape == (0,) and found.landmarks.shape == (0, 5, 2)


def test_grayscale_and_rgba_inputs_equal_rgb(detector):
    gray = fixture_image("gray")
    rgb = detector.detect(np.dstack([gray] * 3))
    rgba = detector.detect(np.dstack([gray] * 3 + [np.zeros_like(gray)]))
    for found in (detector.detect(gray), detector.detect(gray[:, :, None]), rgba):
        assert len(found) == len(rgb) == 1
        np.testing.assert_allclose(found.boxes, rgb.boxes)


def test_bad_image_shape_is_a_user_error(detector):
    with pytest.raises(UserError, match="HxW"):
        detector.detect(np.zeros((10, 10, 2), np.uint8))


def test_bad_parameters_are_user_errors():
    with pytest.raises(UserError, match="scale_factor"):
        FaceDetector(scale_factor=1.2)
    with pytest.raises(UserError, match="backend"):
        FaceDetector(backend="tensorflow")


# ---------------------------------------------------------------------------- the converted nets

def keras_conv_prelu(image_nhwc, kernel, bias, alpha):
    """Keras Conv2D (valid, stride 1, HWIO kernel) + PReLU, written out in numpy."""
    size = kernel.shape[0]
    windows = np.lib.stride_tricks.sliding_window_view(image_nhwc, (size, size), axis=(1, 2))
    out = np.einsum("nhwcij,ijco->nhwo", windows, kernel) + bias
    return np.where(out > 0, out, alpha.reshape(-1) * out)


def test_first_pnet_layer_equals_keras_math():
    weights = mtcnn_caffe.load_keras_weights(mtcnn_caffe.keras_weights_dir() / "pnet.lz4")
    image = np.random.default_rng(0).uniform(-1, 1, (1, 13, 12, 3))  # P-Net's smallest input: 12 px.astype(np.float32)
    expected = keras_conv_prelu(image, *weights[:3])
    nets = mtcnn_caffe.MtcnnNets(mtcnn_caffe.ensure_models(), "pycaffe")
    nets.forward("pnet", image.transpose(0, 3, 1, 2))
    conv1 = nets.nets["pnet"].net.blobs["conv1"].data  # PReLU runs in place on conv1
    np.testing.assert_allclose(conv1.transpose(0, 2, 3, 1), expected, atol=1e-5)


def test_dense_rows_follow_the_keras_flatten_order():
    rng = np.random.default_rng(1)
    feature_map = rng.normal(size=(2, 4, 3, 5))           # Caffe NCHW, H != W
    kernel = rng.normal(size=(4 * 3 * 5, 6))              # Keras (in, out)
    keras_flat = feature_map.transpose(0, 3, 2, 1).reshape(2, -1)  # NHWC, Permute((2, 1, 3)), Flatten
    caffe_weights = mtcnn_caffe.dense_rows_to_caffe(kernel, feature_map.shape)
    np.testing.assert_allclose(feature_map.reshape(2, -1) @ caffe_weights.T, keras_flat @ kernel)


@pytest.mark.parametrize("backend", ["pycaffe", "opencv"])
def test_converted_nets_equal_the_keras_models(backend):
    """Raw outputs of the package's Keras nets on seeded inputs (recorded in nets.json)."""
    reference = json.loads((FIXTURES / "mtcnn" / "nets.json").read_text())["nets"]
    nets = mtcnn_caffe.MtcnnNets(mtcnn_caffe.ensure_models(), backend)
    assert nets.backend == backend
    for name, recorded in reference.items():
        outputs = nets.forward(name, recipes.net_input(recorded).transpose(0, 3, 1, 2))
        for ours, keras in zip(outputs, recorded["outputs"]):
            keras = np.array(keras)
            if ours.ndim == 4:  # P-Net maps come back NCHW, Keras wrote NHWC
                ours = ours.transpose(0, 2, 3, 1)
            np.testing.assert_allclose(ours, keras, atol=1e-5, err_msg=name)


def test_converted_weights_go_beside_the_committed_prototxts():
    assert mtcnn_caffe.DEFAULT_MODEL_DIR == MTCNN_DIR
    assert all(prototxt.parent == MTCNN_DIR for prototxt, _ in mtcnn_caffe.ensure_models().values())


def test_committed_prototxts_are_the_generated_ones():
    for name in mtcnn_caffe.NET_NAMES:
        assert COMMITTED_PROTOTXTS[name] == mtcnn_caffe.prototxt_text(name), f"regenerate {name}.prototxt"


def test_conversion_is_cached_and_redone_when_inputs_change(tmp_path, monkeypatch):
    files = mtcnn_caffe.ensure_models(tmp_path)
    caffemodels = [caffemodel for _, caffemodel in files.values()]
    first = [path.stat().st_ino for path in caffemodels]  # an atomic rewrite gives a new inode
    assert mtcnn_caffe.ensure_models(tmp_path) == files
    assert [path.stat().st_ino for path in caffemodels] == first  # reused

    monkeypatch.setattr(mtcnn_caffe, "CONVERTER_VERSION", mtcnn_caffe.CONVERTER_VERSION + 1)
    mtcnn_caffe.ensure_models(tmp_path)
    assert all(path.stat().st_ino != old for path, old in zip(caffemodels, first))

    caffemodels[1].unlink()
    mtcnn_caffe.ensure_models(tmp_path)
    assert caffemodels[1].is_file()
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no partial file


def test_unreadable_weights_are_a_user_error(tmp_path):
    broken = tmp_path / "pnet.lz4"
    broken.write_bytes(b"not an lz4 joblib file")
    with pytest.raises(UserError, match="cannot read MTCNN weights"):
        mtcnn_caffe.load_keras_weights(broken)


# ---------------------------------------------------------------------------- command line

def test_cli_prints_json_and_draws(tmp_path, capsys):
    import cv2
    image_path, drawn = tmp_path / "face.png", tmp_path / "drawn.png"
    cv2.imwrite(str(image_path), cv2.cvtColor(fixture_image("small_face"), cv2.COLOR_RGB2BGR))
    assert main(["detect", str(image_path), "--draw", str(drawn)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report[0]["image"] == str(image_path) and len(report[0]["faces"]) == 1
    assert set(report[0]["faces"][0]["landmarks"]) == {"left_eye", "right_eye", "nose", "mouth_left", "mouth_right"}
    assert cv2.imread(str(drawn)).shape == cv2.imread(str(image_path)).shape


@pytest.mark.parametrize("content", [None, b"this is not an image"], ids=["missing", "not_an_image"])
def test_cli_bad_image_is_a_one_line_error(tmp_path, content):
    path = tmp_path / "input.png"
    if content is not None:
        path.write_bytes(content)
    result = subprocess.run([sys.executable, "-m", "emotiw.cli", "detect", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "cannot read image" in result.stderr
