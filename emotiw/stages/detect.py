"""The `detect` stage: MTCNN faces and landmarks of image files, optionally drawn (emotiw.face.mtcnn)."""

from pathlib import Path

import numpy as np

from emotiw.errors import UserError
from emotiw.face.mtcnn import FACENET, Detections, FaceDetector
from emotiw.formats.files import atomic_open
from emotiw.formats.images import read_rgb


def draw(image, detections, path):
    """Boxes in green, landmarks in red, mesh points in yellow; written atomically (format from the
    file extension)."""
    import cv2
    canvas = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    for points in detections.mesh.points if detections.mesh is not None else ():
        for x, y in np.round(points[:, :2]).astype(int):
            cv2.circle(canvas, (x, y), 1, (0, 255, 255), -1)
    for box, points in zip(detections.boxes, detections.landmarks):
        x1, y1, x2, y2 = np.round(box).astype(int)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), (0, 255, 0), 2)
        for x, y in np.round(points).astype(int):
            cv2.circle(canvas, (x, y), 2, (0, 0, 255), -1)
    ok, encoded = cv2.imencode(Path(path).suffix, canvas)
    if not ok:
        raise UserError(f"cannot encode {path}")
    with atomic_open(path, "wb") as handle:
        handle.write(encoded.tobytes())


def detect(images, min_face_size=FACENET["min_face_size"], thresholds=FACENET["thresholds"],
           scale_factor=FACENET["scale_factor"], backend="auto", draw_to=None, mesh=False) -> list[Detections]:
    """MTCNN on image files (paths) or RGB arrays; one Detections per image, best face first.

    Defaults are facenet's, which DSN used. backend: auto, pycaffe or opencv. draw_to: a .png/.jpg
    path to draw the boxes and landmarks of a single image into. mesh: also the 468 face mesh points
    and the head pose of every face (emotiw.face.mesh), in `Detections.mesh` and `.poses`.
    """
    import cv2

    images = list(images)
    if draw_to is not None:
        if len(images) != 1:
            raise UserError("--draw takes a single IMAGE")
        if not cv2.haveImageWriter(str(draw_to)):
            raise UserError(f"cannot write {draw_to}: unknown image format; use .png or .jpg")
    pixels = [image if isinstance(image, np.ndarray) else read_rgb(image) for image in images]
    results = FaceDetector(min_face_size, thresholds, scale_factor, backend).detect_batch(pixels)
    if mesh:
        from emotiw.face.mesh import FaceMesh, head_pose

        face_mesh = FaceMesh()
        for image, found in zip(pixels, results):
            found.mesh = face_mesh.mesh(image, found.boxes, found.landmarks)
            found.poses = [head_pose(points) for points in found.mesh.points]
    if draw_to is not None:
        draw(pixels[0], results[0], draw_to)
    return results
