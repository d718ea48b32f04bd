"""Which face is the clip's subject: an IoU tracker over the frames' detections, and two rules.

Each frame's boxes are linked to the open tracks by greedy best-IoU matching, so with two faces
each keeps its own track and identities never swap. Boxes are compared grown around their centres
(GROWTH), so that a face moving more than its own width between kept frames (fast motion, --every,
--fps) still overlaps its previous box. A shot cut ends every track.

The subject, by one of SUBJECT_RULES:
  * `track` (SSE located and tracked its target face): in every shot, the longest track of the
    shot (ties: the larger mean box), joined by the tracks of the shot that run wholly before or
    after it (the same face, lost for a while); frames of the shot where none of them was
    detected are missing.
  * `facenet` (DSN ran facenet's align_dataset_mtcnn on every frame): in every frame with a face,
    the face with the largest box area minus twice the squared distance of its centre from the
    image centre.
"""

from dataclasses import dataclass, field

import numpy as np

IOU_THRESHOLD = 0.3  # least overlap of the grown boxes for a detection to continue a track
GROWTH = 2.0  # boxes are compared at twice their width and height, around the same centre
MAX_GAP = 10  # kept frames a track may go undetected (profile, blur) before it is closed


SUBJECT_RULES = ("facenet", "track")


@dataclass
class Track:
    track_id: int
    shot: int = 0
    # position in the frame sequence -> index of the detection in that frame
    detections: dict = field(default_factory=dict)
    areas: list = field(default_factory=list)
    last_box: np.ndarray = None
    last_position: int = -1

    def add(self, position, detection, box):
        self.detections[position] = detection
        self.areas.append(box_area(box))
        self.last_box, self.last_position = box, position

    @property
    def length(self):
        return len(self.detections)

    @property
    def span(self):
        return min(self.detections), max(self.detections)

    @property
    def mean_area(self):
        return float(np.mean(self.areas))


def box_area(box):
    return max(0.0, float(box[2] - box[0])) * max(0.0, float(box[3] - box[1]))


def iou_matrix(boxes_a, boxes_b):
    """IoU of every box in `boxes_a` (N x 4, x1 y1 x2 y2) with every box in `boxes_b` (M x 4)."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)[:, None, :]
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)[None, :, :]
    width = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    height = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    intersection = width * height
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - intersection
    return np.divide(intersection, union, out=np.zeros_like(union), where=union > 0)


def grown(boxes, factor=GROWTH):
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    centres, half_sizes = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]) / 2 * factor
    return np.hstack([centres - half_sizes, centres + half_sizes])


def link_tracks(boxes_per_frame, shots=None, iou_threshold=IOU_THRESHOLD, max_gap=MAX_GAP):
    """Links detections across frames. `boxes_per_frame`: one (N_i x 4) array per kept frame;
    `shots`: each frame's shot number (default: one shot).

    Returns every Track, in order of creation.
    """
    tracks = []
    shots = [0] * len(boxes_per_frame) if shots is None else shots
    for position, (boxes, shot) in enumerate(zip(boxes_per_frame, shots)):
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        open_tracks = [t for t in tracks if position - t.last_position <= max_gap + 1 and t.shot == shot]
        unmatched = set(range(len(boxes)))
        if open_tracks and len(boxes):
            ious = iou_matrix(grown([t.last_box for t in open_tracks]), grown(boxes))
            # Best pairs first: the face that overlaps a track most claims it.
            for flat in np.argsort(-ious, axis=None, kind="stable"):
                track_index, detection = np.unravel_index(flat, ious.shape)
                if ious[track_index, detection] < iou_threshold:
                    break
                track = open_tracks[track_index]
                if detection in unmatched and track.last_position < position:
                    track.add(position, int(detection), boxes[detection])
                    unmatched.discard(detection)
        for detection in sorted(unmatched):
            track = Track(track_id=len(tracks), shot=shot)
            track.add(position, detection, boxes[detection])
            tracks.append(track)
    return tracks


@dataclass
class Subject:
    chosen: list  # per kept frame, the index of the subject's detection, or None
    track_ids: list  # per kept frame, the track id of each of its detections


def choose_subject(boxes_per_frame, rule="track", shots=None, image_shape=None, **tracker_options):
    """The subject's detection in every kept frame, by `rule` (SUBJECT_RULES); `image_shape`
    (the frames' height, width) is needed by the facenet rule."""
    tracks = link_tracks(boxes_per_frame, shots, **tracker_options)
    track_ids = [[-1] * len(np.asarray(boxes).reshape(-1, 4)) for boxes in boxes_per_frame]
    for track in tracks:
        for position, detection in track.detections.items():
            track_ids[position][detection] = track.track_id
    if rule == "facenet":
        chosen = [facenet_choice(boxes, image_shape) if len(ids) else None
                  for boxes, ids in zip(boxes_per_frame, track_ids)]
    else:
        chosen = [None] * len(boxes_per_frame)
        for shot in sorted({t.shot for t in tracks}):
            for track in shot_subject([t for t in tracks if t.shot == shot]):
                for position, detection in track.detections.items():
                    chosen[position] = detection
    return Subject(chosen, track_ids)


def shot_subject(tracks):
    """The subject's tracks in one shot: the main track, then, longest first, every track whose
    frames lie wholly before or after all of those taken. A face that left the picture (or
    turned away) for longer than MAX_GAP comes back as a new track; a face ever seen while the
    subject's track runs is somebody else."""
    taken = []
    for track in sorted(tracks, key=lambda t: (-t.length, -t.mean_area, t.track_id)):
        start, end = track.span
        if all(end < other.span[0] or start > other.span[1] for other in taken):
            taken.append(track)
    return taken


def facenet_choice(boxes, image_shape):
    """facenet align_dataset_mtcnn's pick among several faces in one still image: the largest box
    area minus twice the squared distance of the box centre from the image centre."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    height, width = image_shape[:2]
    sizes = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    offsets = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2 - width / 2,
                        (boxes[:, 1] + boxes[:, 3]) / 2 - height / 2])
    return int(np.argmax(sizes - 2.0 * np.sum(offsets ** 2, axis=0)))
