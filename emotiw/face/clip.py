"""Faces in every kept frame of one clip: shot numbers, and MTCNN on every frame or tracked.

`every-frame` runs the full detector on each frame, as DSN's facenet aligner did. `tracked` runs
it at the first frame of each shot, every `redetect_every` frames and whenever a face it was
following is not found again; in the frames between, only the neighbourhood of the previous
frame's faces is searched (FaceDetector.detect_around), which costs a few milliseconds instead
of a full image pyramid. A face lost for a few frames (hidden, turned away, out of the picture)
is searched for where it was last seen; a face that enters elsewhere mid-shot is found at the
next full detection.
"""

from dataclasses import dataclass

import numpy as np

from emotiw.face.mtcnn import Detections, overlaps

DETECT_MODES = ("every-frame", "tracked")
REDETECT_EVERY = 10  # tracked: frames between full detections within a shot
FOLLOWED_IOU = 0.3  # tracked: least IoU of a face's new box with its box in the previous frame
REMEMBER_LOST = 10  # tracked: frames a lost face is still searched for where it was last seen


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
