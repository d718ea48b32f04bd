"""Frontal crops (emotiw.face.frontal) on real faces: the mesh run again on them finds a frontal
head where the source was turned, while the `similarity` crop keeps the turn; expressions stay."""

import numpy as np
import pytest
import skimage.data

from emotiw.face.align import crop_sse
from emotiw.face.frontal import five_points, frontal_crop, frontal_template, mirror_triangles, mirror_vertices
from emotiw.face.mesh import FaceMesh, canonical_face, head_pose, interocular
from emotiw.face.mtcnn import FaceDetector

SIZE = 128
LOOK = 192  # crops are enlarged before MTCNN and the mesh look at them again


@pytest.fixture(scope="module")
def models():
    return FaceDetector(), FaceMesh()


def mesh_of(models, image):
    detector, face_mesh = models
    found = detector.detect(image)
    assert len(found), "no face"
    return face_mesh.mesh(image, found.boxes[:1], found.landmarks[:1]).points[0], found.landmarks[0]


def look_again(models, crop):
    """(pose, points in crop pixels) of the face in a SIZE crop."""
    import cv2

    points, _ = mesh_of(models, cv2.resize(crop, (LOOK, LOOK), interpolation=cv2.INTER_CUBIC))
    points = points * np.array([SIZE / LOOK, SIZE / LOOK, SIZE / LOOK])
    return head_pose(points), points


def test_the_canonical_mesh_is_its_own_mirror_image():
    vertices = canonical_face()[0]
    mirror = mirror_vertices()
    np.testing.assert_allclose(vertices[mirror] * [-1, 1, 1], vertices, atol=0.05)  # cm
    assert (mirror[mirror] == np.arange(len(vertices))).all()
    assert (mirror_triangles()[mirror_triangles()] == np.arange(len(canonical_face()[1]))).all()


def test_the_template_frames_a_face_as_the_similarity_crop_does():
    from emotiw.face.align import sse_template

    template, owner, barycentric = frontal_template(SIZE)
    np.testing.assert_allclose(five_points(np.column_stack([template, np.zeros(len(template))])),
                               sse_template(SIZE), atol=4)
    inside = owner >= 0
    assert 0.4 < inside.mean() < 0.9  # the face fills much of the crop, not all of it
    assert (barycentric[inside] > -0.1).all() and np.allclose(barycentric[inside].sum(axis=-1), 1)


def test_a_turned_head_is_frontal_in_the_frontal_crop_and_turned_in_the_similarity_crop(models):
    """The camera man looks half away (yaw about -50); the frontal crop faces the camera."""
    image = np.repeat(skimage.data.camera()[:, :, None], 3, axis=2)
    points, landmarks = mesh_of(models, image)
    source = head_pose(points)
    assert abs(source.yaw) >= 20
    frontal, _ = look_again(models, frontal_crop(image, points, SIZE))
    similarity, _ = look_again(models, crop_sse(image, landmarks, SIZE))
    assert abs(frontal.yaw) <= 5 and abs(frontal.pitch) <= 5, (frontal.yaw, frontal.pitch)
    assert abs(similarity.yaw) >= 20 and np.sign(similarity.yaw) == np.sign(source.yaw)


def test_frontal_landmarks_land_near_the_canonical_template_and_the_expression_stays(models):
    """carphone's open mouth stays open: the texture is read through the rigid reference head, so
    the face's own shape and expression stay too, and its landmarks lie 5-8 % of the interocular
    distance from the canonical face's (a warp onto the points would close the mouth)."""
    from testmedia import footage

    from emotiw.face.video import iter_frames

    frames = {frame.index: frame.image for frame in iter_frames(footage.footage_dir() / "carphone_pristine.mp4",
                                                                every=10)}
    template = frontal_template(SIZE)[0]
    for index in (60, 110):  # both with the mouth wide open
        points, _ = mesh_of(models, frames[index])
        crop = frontal_crop(frames[index], points, SIZE)
        _, found = look_again(models, crop)
        error = np.linalg.norm(found[:, :2] - template, axis=1).mean() / interocular(found)
        assert error < 0.09, (index, error)
        gap = np.diff(found[[13, 14], 1])[0] / interocular(found)  # upper and lower inner lip
        source_gap = np.diff(points[[13, 14], 1])[0] / interocular(points)
        assert source_gap > 0.3 and gap > 0.5 * source_gap  # the canonical face's mouth is closed


# ------------------------------------------------------------------------- preprocess and predict --align frontal

@pytest.fixture(scope="module")
def carphone_folder(tmp_path_factory):
    from testmedia import footage

    folder = tmp_path_factory.mktemp("videos")
    (folder / "carphone.mp4").symlink_to(footage.footage_dir() / "carphone_pristine.mp4")
    return folder


def test_preprocess_frontal_writes_pose_columns_and_the_mesh_per_clip(carphone_folder, tmp_path):
    import csv

    from emotiw.stages.preprocess import preprocess

    result = preprocess(tmp_path / "out", videos=carphone_folder, split="val", recipe="sse", align="frontal")
    with open(result.manifest, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["crop"]]
    assert rows and all(row["align"] == "frontal" for row in rows)
    yaws = np.array([float(row["yaw"]) for row in rows])
    assert np.abs(yaws).max() < 30 and np.ptp(yaws) > 2  # a talking head that moves a little
    mesh = np.load(tmp_path / "out" / "mesh" / "val" / "carphone.npz")
    assert mesh["points"].shape == (len(rows), 468, 3) and mesh["frames"].tolist() == [int(r["frame"]) for r in rows]
    np.testing.assert_allclose(mesh["pose"][:, 0], yaws, atol=0.01)
    boxes = np.array([[float(row[k]) for k in ("x1", "y1", "x2", "y2")] for row in rows])
    centres = mesh["points"][:, :, :2].mean(axis=1)  # source pixels, inside the MTCNN box
    assert ((centres > boxes[:, :2]) & (centres < boxes[:, 2:])).all()
    similarity = preprocess(tmp_path / "similarity", videos=carphone_folder, split="val", recipe="sse")
    with open(similarity.manifest, newline="") as handle:
        assert all(row["align"] == row["yaw"] == "" for row in csv.DictReader(handle))


def test_a_face_too_small_for_the_mesh_falls_back_to_similarity_and_says_so():
    from emotiw.stages.preprocess.clip import frontal_face

    image = skimage.data.astronaut()
    found = frontal_face(image, np.array([200.0, 100.0, 220.0, 120.0]), np.zeros((5, 2)))
    assert found.align == "similarity (face 20 px, under 24)" and found.pose is None


def test_an_out_made_before_align_existed_is_still_resumed(carphone_folder, tmp_path):
    import json

    from emotiw.stages.preprocess import preprocess

    out = tmp_path / "out"
    preprocess(out, videos=carphone_folder, split="val", recipe="sse", max_frames=5)
    stored = json.loads((out / "preprocess.json").read_text())
    del stored["settings"]["align"]
    (out / "preprocess.json").write_text(json.dumps(stored))
    preprocess(out, videos=carphone_folder, split="val", recipe="sse", max_frames=5)  # no "other settings"


def test_predict_frontal_adds_the_head_pose_to_frames_csv(carphone_folder, tmp_path):
    import emotiw

    result = emotiw.predict([carphone_folder / "carphone.mp4"], tmp_path / "out", align="frontal", every=10)
    frames = result.videos[0].frames
    assert {"yaw", "pitch", "roll"} <= set(frames.columns)
    assert frames.loc[frames.detected == 1, "yaw"].notna().all()
    from PIL import Image

    with Image.open(result.videos[0].folder / "timeline.png") as timeline:
        assert timeline.size == (1000, 540)  # the emotions, and the head-pose strip below (360 without)
    plain = emotiw.predict([carphone_folder / "carphone.mp4"], tmp_path / "plain", every=10)
    from emotiw.face.video import iter_frames

    with_axes, without = (np.stack([frame.image for frame in iter_frames(run.videos[0].folder / "annotated.mp4")])
                          for run in (result, plain))
    assert with_axes.shape == without.shape
    blue = (with_axes[..., 2].astype(int) - with_axes[..., 0] > 120) & ~(without[..., 2].astype(int) - without[..., 0] > 120)
    assert blue.sum() > 50  # the nose axis is drawn in the frontal run only
