"""Test media made on the spot: the scikit-image astronaut's face moving over a real photograph
(scikit-image's coffee), encoded with PyAV, plus broken files. Every generator returns the
ground-truth face boxes it drew, so tests can check what the pipeline found.
"""

import numpy as np

from testmedia.scene import astronaut_head, coffee_background, paste  # noqa: F401  (tests paste too)
from emotiw.face.video import write_video

WIDTH, HEIGHT = 320, 240
FPS = 10


def background(shift=0):
    """scikit-image's coffee photograph at WIDTH x HEIGHT (no face in it), shifted right by `shift`."""
    return coffee_background(WIDTH, HEIGHT, shift)


def head(flip=False):
    return astronaut_head(flip)


def _interpolate(start, end, count):
    return np.linspace(start, end, count).round().astype(int)


def moving_face_frames(frames=10):
    """The astronaut's head drifting right and growing from 90 to 130 px: (RGB frames, its boxes)."""
    xs, ys, heights = _interpolate(40, 140, frames), _interpolate(60, 40, frames), _interpolate(90, 130, frames)
    images, boxes = [], []
    for x, y, height in zip(xs, ys, heights):
        image = background()
        boxes.append(paste(image, head(), x, y, height))
        images.append(image)
    return images, np.array(boxes)


def moving_face_clip(path, frames=10, sample_aspect_ratio=None):
    """moving_face_frames encoded at `path`; returns the head's boxes."""
    images, boxes = moving_face_frames(frames)
    write_video(path, images, sample_aspect_ratio=sample_aspect_ratio)
    return boxes


def two_face_clip(path, frames=10, subject_missing=5, other_from=3):
    """Subject A (90 px, left, moving right) in every frame but `subject_missing`; B (right,
    mirrored) from frame `other_from`, growing from 60 to 135 px, so B is the larger face in the
    later frames. A's track is the longest. Returns (A's boxes, None where absent; B's boxes)."""
    a_xs, b_heights = _interpolate(10, 60, frames), _interpolate(60, 135, frames)
    images, a_boxes, b_boxes = [], [], []
    for index in range(frames):
        image = background()
        a_boxes.append(None if index == subject_missing else paste(image, head(), a_xs[index], 30, 90))
        b_boxes.append(None if index < other_from else paste(image, head(flip=True), 190, 140 - b_heights[index] // 2, b_heights[index]))
        images.append(image)
    write_video(path, images)
    return a_boxes, b_boxes


def no_face_clip(path, frames=6):
    """The coffee photograph panning, no face anywhere."""
    write_video(path, [background(shift) for shift in _interpolate(0, 30, frames)])
    return path


def corrupt_file(path, size=4000):
    """Seeded random bytes under a video file name."""
    path.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def truncated_copy(source, path, keep=0.5):
    """The first `keep` fraction of a real video file."""
    data = source.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def face_image(flip=False, height=150, size=(240, 200)):
    """A still: the astronaut's head centred on the coffee photograph; returns (image, box)."""
    import cv2

    canvas = cv2.resize(background(), size[::-1], interpolation=cv2.INTER_AREA)
    patch = head(flip)
    width = round(patch.shape[1] * height / patch.shape[0])
    box = paste(canvas, patch, (size[1] - width) // 2, (size[0] - height) // 2, height)
    return canvas, box
