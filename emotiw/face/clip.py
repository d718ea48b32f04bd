"""Faces in every kept frame of one clip: shot numbers, and MTCNN on every frame or tracked.

`every-frame` runs the full detector on each frame, as DSN's facenet aligner did. `tracked` runs
it at the first frame of each shot, every `redetect_every` frames and whenever a face it was
following is not found again; in the frames between, only the neighbourhood of the previous
frame's faces is searched (FaceDetector.detect_around), which costs a few milliseconds instead
of a full image pyramid. A face lost for a few frames (hidden, turned away, out of the picture)
is searched for where it was last seen; a face that enters elsewhere mid-shot is found at the
next full detection.

The smallest face searched for scales with the frame (`min_face_pixels`): facenet's 20 px at a
360-pixel short side, 27 px at 480p, 60 px at 1080p, 120 px at 4K, so that detection costs about
the same at any resolution; the frames searched are decoded scaled down to where that face is 20 px
(`detection_width`: a 360-pixel short side), and boxes map back to source pixels. Crops are still
cut from full-size frames. A frame is thus searched at the pyramid levels of its own 360p version,
relative to the frame, and its boxes agree with that version's: a search at a 400-pixel short side
fell between those levels and moved 10-15 % of the boxes by more than IoU 0.9 (bench/NOTES.md).
MTCNN still finds faces of about half the smallest size (9-12 px at the searched size).
"""

from dataclasses import dataclass

import numpy as np

from emotiw.face.mtcnn import Detections, overlaps

DETECT_MODES = ("every-frame", "tracked")
REDETECT_EVERY = 10  # tracked: frames between full detections within a shot
FOLLOWED_IOU = 0.3  # tracked: least IoU of a face's new box with its box in the previous frame
REMEMBER_LOST = 10  # tracked: frames a lost face is still searched for where it was last seen
REFERENCE_SHORT_SIDE = 360  # the automatic smallest face is facenet's 20 px at this short side


def min_face_pixels(spec, short_side, detector_min=20):
    """The smallest face to find, in source pixels. spec: None (automatic: detector_min at a
    360-pixel short side, scaled with the frame, never below detector_min), "N" pixels, or "P%"
    of the frame's short side."""
    from emotiw.errors import UserError

    if spec is None:
        return max(float(detector_min), detector_min * short_side / REFERENCE_SHORT_SIDE)
    text = str(spec).strip()
    try:
        value = float(text[:-1]) if text.endswith("%") else float(text)
    except ValueError:
        value = float("nan")
    if text.endswith("%"):
        if not 0 < value < 100:
            raise UserError(f"--min-face {spec}: a share of the frame's short side is between 0 and 100 %")
        return value / 100 * short_side
    if not value > 0:
        raise UserError(f"--min-face {spec}: give pixels (48) or a share of the short side (5%)")
    return value


def detection_width(display_width, min_face, detector_min=20):
    """The width to decode the frames searched at, so that a min_face face is detector_min pixels
    there; None (as decoded) when min_face is not larger than detector_min."""
    if min_face <= detector_min:
        return None
    return max(2 * round(display_width * detector_min / min_face / 2), 2)


@dataclass
class FrameFaces:
    index: int  # the frame's index in the full decoded clip
    time: float
    shot: int
    faces: Detections  # in the coordinates of the frame searched
    full: bool  # found by a full-frame detection


def find_faces(frames, detector, detect="tracked", redetect_every=REDETECT_EVERY, shots=None):
    """Yields a FrameFaces per Frame of `frames`. `shots`: a ShotDetector, or None for one shot."""
    previous, lost, since_full, last_shot = empty_detections(), [], 0, None
    for frame in frames:
        shot = shots.shot(frame.image) if shots is not None else 0
        if shot != last_shot:
            lost = []
        full = detect == "every-frame" or shot != last_shot or since_full >= redetect_every
        faces = empty_detections()  # nobody to follow: wait for the next full detection
        searched = np.vstack([previous.boxes, *(box[None] for box, _ in lost)])
        if not full and len(searched):
            faces = detector.detect_around(frame.image, searched)
            full = not followed(previous.boxes, faces.boxes).all()
        if full:
            faces, since_full = detector.detect(frame.image), 0
        since_full += 1
        lost = still_lost(lost, previous.boxes, faces.boxes)
        previous, last_shot = faces, shot
        yield FrameFaces(frame.index, frame.time, shot, faces, full)


def followed(before, after):
    """Whether each box of `before` overlaps some box of `after` by FOLLOWED_IOU or more."""
    if len(after) == 0 or len(before) == 0:
        return np.zeros(len(before), dtype=bool)
    return np.nan_to_num(overlaps(before, after, "union")).max(axis=1) >= FOLLOWED_IOU


def still_lost(lost, before, after):
    """Faces not found again, with the frames since: those of `before` missing from `after` join,
    those found again leave, and none is remembered longer than REMEMBER_LOST frames."""
    boxes = [box for box, _ in lost]
    found_again = followed(np.reshape(boxes, (-1, 4)), after)
    kept = [(box, age + 1) for (box, age), found in zip(lost, found_again) if not found and age < REMEMBER_LOST]
    return kept + [(box, 1) for box, found in zip(before, followed(before, after)) if not found]


def empty_detections():
    return Detections(np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2)))
