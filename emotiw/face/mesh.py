"""468 face landmarks and head pose for the faces MTCNN found: plain numpy around the face mesh
network on Caffe (emotiw.face.mesh_nets).

For each face, as MediaPipe builds its own region of interest from a detection:
  1. the ROI: a square ROI_SCALE times the larger side of MTCNN's box, centred on the box, turned
     so that the line through the two eyes (MTCNN's points) is level;
  2. the ROI cut out with one affine warp to 192x192 RGB in [0, 1];
  3. the net: 468 points (x, y in crop pixels, z in the same scale, smaller is nearer the camera)
     and a presence logit, as a probability;
  4. the points mapped back through the inverse warp: x, y in source pixels, z scaled alike.

Head pose (`head_pose`) is a weighted Procrustes fit (similarity: scale, rotation, translation) of
MediaPipe's canonical face mesh (emotiw/face/geometry/, Apache-2.0) to the points, with its own
Procrustes weights (33 stable points). Under weak perspective the rotation is the head's, in the
camera's frame (x right, y down, z away from the camera): R = Rz(roll) Ry(yaw) Rx(pitch) takes the
canonical face, looking into the camera, to the observed one. In degrees: yaw > 0 turns the nose
towards the image's left, pitch > 0 tilts it down, roll > 0 turns the face clockwise on screen.
A frontal face is 0, 0, 0.
"""

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emotiw.face.mesh_nets import INPUT_SIZE, LANDMARKS, PRESENCE, ensure_model

GEOMETRY = Path(__file__).resolve().parent / "geometry"
ROI_SCALE = 1.5  # MediaPipe's face ROI: 1.5 times the detection box
MIN_FACE = 24  # px: a smaller box gives the mesh under 8 source pixels per 64 input pixels
PRESENCE_THRESHOLD = 0.5


@dataclass
class Mesh:
    """The mesh of N faces."""
    points: np.ndarray    # (N, 468, 3): x, y in source pixels, z in the same scale (nearer is smaller)
    presence: np.ndarray  # (N,) probability that a face fills the ROI
    rois: np.ndarray      # (N, 2, 3) affine maps from source pixels to the 192x192 crop

    def __len__(self):
        return len(self.presence)


@dataclass
class Pose:
    yaw: float    # degrees
    pitch: float
    roll: float
    scale: float  # source pixels per canonical-mesh centimetre
    translation: np.ndarray  # (3,) where the canonical origin lands, source pixels
    residual: float  # weighted RMS distance of the fit, as a share of the interocular distance
    rotation: np.ndarray  # (3, 3) R, in the camera's frame

    def fitted(self):
        """The canonical face (468, 3) placed by this pose: the rigid head that best explains the points."""
        return self.scale * camera_frame(canonical_face()[0]) @ self.rotation.T + self.translation


def roi_transform(box, eyes):
    """The 2x3 affine map from source pixels to the 192x192 crop of one face (see the module's notes)."""
    x1, y1, x2, y2 = box
    (left_x, left_y), (right_x, right_y) = eyes  # image left and right
    angle = np.arctan2(right_y - left_y, right_x - left_x)
    side = ROI_SCALE * max(x2 - x1, y2 - y1)
    centre = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
    cos, sin = np.cos(angle), np.sin(angle)
    rotation = np.array([[cos, sin], [-sin, cos]])  # turns the eye line level
    scale = INPUT_SIZE / side
    linear = scale * rotation
    offset = INPUT_SIZE / 2 - linear @ centre
    return np.hstack([linear, offset[:, None]])


def crop(image, transform):
    """The 192x192 float32 RGB crop in [0, 1] that `transform` maps the source image to."""
    import cv2

    patch = cv2.warpAffine(image, transform, (INPUT_SIZE, INPUT_SIZE), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return patch.astype(np.float32) / 255


class FaceMesh:
    """The face mesh net, loaded once. `backend`: as emotiw.caffe.runtime.load_net; "auto" takes
    OpenCV's DNN module, which runs the same Caffe files about 4 times faster here (its depthwise
    convolutions; pycaffe loops over the groups), with outputs within 1e-4 px of pycaffe's."""

    def __init__(self, backend="auto", model_dir=None):
        from emotiw.caffe.runtime import load_net

        deploy, weights = ensure_model() if model_dir is None else ensure_model(model_dir)
        self.net, self.backend = load_net(deploy, weights, backend, "opencv")

    def run(self, crops):
        """(points in crop pixels (N, 468, 3), presence (N,)) for float32 (N, 192, 192, 3) crops."""
        batch = np.ascontiguousarray(np.asarray(crops, dtype=np.float32).transpose(0, 3, 1, 2))
        outputs = self.net.forward(batch, [LANDMARKS, PRESENCE])
        points = outputs[LANDMARKS].reshape(len(batch), -1, 3)
        presence = 1 / (1 + np.exp(-outputs[PRESENCE].reshape(-1).astype(np.float64)))
        return points, presence

    def mesh(self, image, boxes, landmarks):
        """The Mesh of the faces MTCNN found in one RGB image (boxes (N, 4), landmarks (N, 5, 2))."""
        boxes, landmarks = np.asarray(boxes, dtype=np.float64), np.asarray(landmarks, dtype=np.float64)
        transforms = np.array([roi_transform(box, points[:2]) for box, points in zip(boxes, landmarks)])
        if not len(transforms):
            return Mesh(np.zeros((0, 468, 3)), np.zeros(0), np.zeros((0, 2, 3)))
        points, presence = self.run([crop(image, transform) for transform in transforms])
        return Mesh(np.array([to_source(p, t) for p, t in zip(points, transforms)]), presence, transforms)


def to_source(points, transform):
    """Crop points (468, 3) mapped back to source pixels by the inverse of `transform`; z scaled alike."""
    linear, offset = transform[:, :2], transform[:, 2]
    inverse = np.linalg.inv(linear)
    xy = (points[:, :2] - offset) @ inverse.T
    scale = 1 / np.sqrt(abs(np.linalg.det(linear)))
    return np.column_stack([xy, points[:, 2] * scale])


@functools.cache
def canonical_face():
    """(vertices (468, 3) in cm: x to the face's left, y up, z towards the viewer; triangles
    (898, 3) 0-based; Procrustes weights (468,), zero but for MediaPipe's 33 points)."""
    vertices, triangles = [], []
    for line in (GEOMETRY / "canonical_face_model.obj").read_text().splitlines():
        if line.startswith("v "):
            vertices.append([float(value) for value in line.split()[1:4]])
        elif line.startswith("f "):
            triangles.append([int(corner.split("/")[0]) - 1 for corner in line.split()[1:4]])
    weights = np.zeros(len(vertices))
    text = (GEOMETRY / "geometry_pipeline_metadata_landmarks.pbtxt").read_text()
    for index, weight in re.findall(r"landmark_id:\s*(\d+)\s+weight:\s*([0-9.eE+-]+)", text):
        weights[int(index)] = float(weight)
    return np.array(vertices), np.array(triangles), weights


LEFT_EYE_CORNERS, RIGHT_EYE_CORNERS = (33, 133), (362, 263)  # the face's right eye is the image's left


def interocular(points):
    """Distance between the eye centres (mean of each eye's corners) of one face's points."""
    return float(np.linalg.norm(points[list(LEFT_EYE_CORNERS), :2].mean(axis=0)
                                - points[list(RIGHT_EYE_CORNERS), :2].mean(axis=0)))


def head_pose(points):
    """The Pose of one face's 468 points (source pixels), by weighted Procrustes (see the module's notes)."""
    vertices, _, weights = canonical_face()
    model = camera_frame(vertices)
    target = np.asarray(points, dtype=np.float64)
    w = weights / weights.sum()
    model_mean, target_mean = w @ model, w @ target
    a, b = model - model_mean, target - target_mean
    covariance = (b * w[:, None]).T @ a
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.sign(np.linalg.det(u @ vt))
    correction = np.diag([1.0, 1.0, sign])
    rotation = u @ correction @ vt
    scale = float((singular * np.diag(correction)).sum() / (w @ (a ** 2).sum(axis=1)))
    translation = target_mean - scale * rotation @ model_mean
    fitted = scale * model @ rotation.T + translation
    residual = float(np.sqrt(w @ ((fitted - target) ** 2).sum(axis=1))) / max(interocular(target), 1e-6)
    yaw, pitch, roll = euler_angles(rotation)
    return Pose(yaw, pitch, roll, scale, translation, residual, rotation)


def camera_frame(vertices):
    """Canonical-face coordinates (y up, z towards the viewer) in the camera's (y down, z away)."""
    return np.asarray(vertices) * np.array([1.0, -1.0, -1.0])


def rotation_of(yaw, pitch, roll):
    """R = Rz(roll) Ry(yaw) Rx(pitch) from angles in degrees (the inverse of euler_angles)."""
    yaw, pitch, roll = np.radians([yaw, pitch, roll])
    rx = np.array([[1, 0, 0], [0, np.cos(pitch), -np.sin(pitch)], [0, np.sin(pitch), np.cos(pitch)]])
    ry = np.array([[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]])
    rz = np.array([[np.cos(roll), -np.sin(roll), 0], [np.sin(roll), np.cos(roll), 0], [0, 0, 1]])
    return rz @ ry @ rx


def euler_angles(rotation):
    """(yaw, pitch, roll) in degrees of R = Rz(roll) Ry(yaw) Rx(pitch), in the camera's frame."""
    yaw = np.degrees(np.arcsin(np.clip(-rotation[2, 0], -1, 1)))
    pitch = np.degrees(np.arctan2(rotation[2, 1], rotation[2, 2]))
    roll = np.degrees(np.arctan2(rotation[1, 0], rotation[0, 0]))
    return float(yaw), float(pitch), float(roll)
