"""The face mesh on Caffe (emotiw.face.mesh_nets, emotiw.face.mesh) against TF Lite's own outputs
on 25 real face crops (tests/fixtures/make_mesh_fixtures.py), the points mapped back to source
pixels, the head pose by weighted Procrustes, `emotiw detect --mesh` and the ONNX export."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import skimage.data

from emotiw.cli import main
from emotiw.face.mesh import FaceMesh, canonical_face, crop, euler_angles, head_pose, interocular, rotation_of
from emotiw.face.mesh_nets import ensure_model
from emotiw.face.mtcnn import FaceDetector

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mesh"


@pytest.fixture(scope="module")
def face_mesh():
    return FaceMesh()


def load_recipes():
    spec = importlib.util.spec_from_file_location("make_mesh_fixtures", FIXTURES.parent / "make_mesh_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def golden():
    make_mesh_fixtures = load_recipes()
    rois = json.loads((FIXTURES / "rois.json").read_text())
    assert rois["carphone_every"] == make_mesh_fixtures.CARPHONE_EVERY
    images = make_mesh_fixtures.sources()
    crops = []
    for roi in rois["rois"]:
        crops.append(crop(images[roi["source"]], np.array(roi["transform"])))
        assert make_mesh_fixtures.crop_digest(crops[-1]) == roi["sha256"], \
            f"the crop of {roi['source']} is not the fixture's: run tests/fixtures/make_mesh_fixtures.py again"
    return np.stack(crops), np.load(FIXTURES / "tflite.npz")


@pytest.mark.parametrize("backend", ["pycaffe", "opencv"])
def test_caffe_gives_tflites_landmarks_and_presence_on_real_faces(backend, golden):
    crops, reference = golden
    assert len(crops) >= 20
    face_mesh = FaceMesh(backend)
    assert face_mesh.backend == backend
    points, presence = face_mesh.run(crops)
    assert np.abs(points[..., :2] - reference["points"][..., :2]).max() < 0.5  # crop pixels, of 192
    assert np.abs(points[..., 2] - reference["points"][..., 2]).max() < 0.5
    expected = 1 / (1 + np.exp(-reference["presence_logits"].astype(np.float64)))
    assert np.abs(presence - expected).max() < 1e-3
    assert (presence > 0.9).all()  # every crop is a face


def test_the_mesh_lands_on_the_face_mtcnn_found(face_mesh):
    image = skimage.data.astronaut()
    found = FaceDetector().detect(image)
    mesh = face_mesh.mesh(image, found.boxes[:1], found.landmarks[:1])
    points, (left_eye, right_eye, nose, _, _) = mesh.points[0], found.landmarks[0]
    distance = interocular(points)
    assert 0.8 < distance / np.linalg.norm(right_eye - left_eye) < 1.25
    eyes = points[[33, 133]].mean(axis=0)[:2], points[[362, 263]].mean(axis=0)[:2]
    assert np.linalg.norm(eyes[0] - left_eye) < 0.15 * distance
    assert np.linalg.norm(eyes[1] - right_eye) < 0.15 * distance
    assert np.linalg.norm(points[4, :2] - nose) < 0.25 * distance  # 4: the nose tip
    x1, y1, x2, y2 = found.boxes[0]
    assert ((points[:, 0] > x1 - 0.2 * (x2 - x1)) & (points[:, 0] < x2 + 0.2 * (x2 - x1))).all()


@pytest.mark.parametrize("angles", [(0, 0, 0), (30, -10, 5), (-45, 20, -15), (10, 35, 60)])
def test_head_pose_recovers_a_known_rotation_of_the_canonical_face(angles):
    np.testing.assert_allclose(euler_angles(rotation_of(*angles)), angles, atol=1e-9)
    vertices = canonical_face()[0] * np.array([1.0, -1.0, -1.0])  # the camera's frame
    points = 7.5 * vertices @ rotation_of(*angles).T + np.array([320.0, 240.0, 0.0])
    points += np.random.default_rng(0).normal(0, 0.2, points.shape)  # a little landmark noise
    pose = head_pose(points)
    np.testing.assert_allclose((pose.yaw, pose.pitch, pose.roll), angles, atol=0.5)
    assert pose.scale == pytest.approx(7.5, rel=0.01) and pose.residual < 0.02


def test_head_pose_follows_real_mirroring_and_turning(face_mesh):
    """Mirroring the image flips yaw and roll; turning it 20 degrees counter-clockwise lowers roll by 20."""
    import cv2

    astronaut = skimage.data.astronaut()
    height, width = astronaut.shape[:2]
    turned = cv2.warpAffine(astronaut, cv2.getRotationMatrix2D((width / 2, height / 2), 20, 1.0), (width, height))
    detector, poses = FaceDetector(), []
    for image in (astronaut, np.ascontiguousarray(astronaut[:, ::-1]), turned):
        found = detector.detect(image)
        poses.append(head_pose(face_mesh.mesh(image, found.boxes[:1], found.landmarks[:1]).points[0]))
    upright, mirrored, ccw = poses
    assert mirrored.yaw == pytest.approx(-upright.yaw, abs=3) and mirrored.roll == pytest.approx(-upright.roll, abs=3)
    assert ccw.roll == pytest.approx(upright.roll - 20, abs=3)
    assert all(pose.residual < 0.15 for pose in poses)


def test_detect_mesh_prints_points_and_pose(tmp_path, capsys):
    import cv2

    image = tmp_path / "astronaut.png"
    cv2.imwrite(str(image), cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR))
    assert main(["detect", str(image), "--mesh", "--draw", str(tmp_path / "drawn.png")]) == 0
    (face, *_), = [entry["faces"] for entry in json.loads(capsys.readouterr().out)]
    assert len(face["mesh"]["points"]) == 468 and face["mesh"]["presence"] > 0.9
    assert set(face["pose"]) == {"yaw", "pitch", "roll"} and abs(face["pose"]["yaw"]) < 15
    assert (tmp_path / "drawn.png").is_file()


def test_the_mesh_exports_to_onnx_with_the_same_outputs(face_mesh, golden, tmp_path):
    import onnxruntime

    deploy, weights = ensure_model()
    assert main(["export", str(deploy), "--weights", str(weights), "--onnx", str(tmp_path / "mesh.onnx")]) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "mesh.onnx"))
    crops = golden[0][:4]
    batch = np.ascontiguousarray(crops.transpose(0, 3, 1, 2))
    names = [output.name for output in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: batch})))
    points, _ = face_mesh.run(crops)
    np.testing.assert_allclose(outputs["conv2d_21"].reshape(4, -1, 3), points, atol=1e-3)
