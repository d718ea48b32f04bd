"""MTCNN face detection (Zhang et al., 2016): the algorithm in plain numpy, the nets on Caffe.

Parameters default to facenet's (which DSN used): minimum face 20 px, thresholds 0.6/0.7/0.7,
pyramid factor 0.709. The steps are those of the `mtcnn` package 1.0.0, the reference our test
fixtures come from, so that our output equals its output:
  1. P-Net slides a 12x12 window (stride 2) over an image pyramid (first scale 12/min_face_size,
     then x factor while the short side stays >= 12 px). Windows scoring > threshold are moved by
     their box regression, then NMS 0.5 'Union' per scale and 0.7 'Union' across scales; squaring.
  2. R-Net scores 24x24 crops of those squares: score > threshold, regression, NMS 0.7 'Union',
     squaring.
  3. O-Net scores 48x48 crops: five landmarks decoded in the crop box, regression,
     score > threshold, NMS 0.7 'Min' (a box mostly inside a better one is dropped).
Crops of all images go through R-Net and O-Net in one forward each (in chunks of MAX_BATCH).

Where the `mtcnn` package differs from facenet and the original MATLAB code, we follow the package:
the regression is applied before each NMS (facenet applies it after), a box is also suppressed by
a better box that was itself suppressed, crops are sampled bilinearly from the box's first to last
pixel with mid-gray outside the image (facenet: area resize, black), boxes are not truncated to
integers, and coordinates are 0-based pixels (facenet's are the MATLAB code's 1-based numbers).
The pyramid keeps facenet's rule: the package counts levels with a rounded logarithm that ignores
min_face_size and, at 20 px, only drops a last level whose short side would be 12 to 12.06 px.
On the astronaut image facenet's order picks another of the overlapping candidates, whose box
differs by a few pixels (IoU 0.89); landmarks agree within 1.5 px.
"""

from dataclasses import dataclass

import numpy as np

from emotiw.errors import UserError
from emotiw.face.mtcnn_nets import load_nets

# facenet's settings, which DSN used
FACENET = {"min_face_size": 20, "thresholds": (0.6, 0.7, 0.7), "scale_factor": 0.709}

NMS_PER_SCALE = 0.5
NMS_ACROSS_SCALES = 0.7
NMS_RNET = 0.7
NMS_ONET = 0.7
PNET_STRIDE = 2
PNET_CELL = 12
MAX_BATCH = 1024  # crops per R-Net/O-Net forward: bounds memory on images with many candidates
NMS_BLOCK = 512   # rows of the overlap matrix computed at once: bounds memory for many boxes
OUTPUT_SIZES = {"rnet": (4, 2), "onet": (4, 10, 2)}  # columns of each net's outputs, in order
AROUND_REGION = 3.0  # detect_around: the searched square's side, in face box sides
AROUND_SCALE = 3.0  # detect_around: the P-Net window sizes searched, from side / this to side x this
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")  # image left/right


@dataclass
class Detections:
    boxes: np.ndarray      # (N, 4) float x1, y1, x2, y2 in pixels
    scores: np.ndarray     # (N,)
    landmarks: np.ndarray  # (N, 5, 2) x, y in LANDMARK_NAMES order
    # Faces come best score first; coordinates are 0-based pixels, not clipped to the image.
    mesh: object = None    # emotiw.face.mesh.Mesh of the faces, when asked for
    poses: list = None     # emotiw.face.mesh.Pose per face, with the mesh

    def __len__(self):
        return len(self.scores)

    def to_json(self):
        faces = [{"box": box.tolist(), "score": float(score), "landmarks": dict(zip(LANDMARK_NAMES, points.tolist()))}
                 for box, score, points in zip(self.boxes, self.scores, self.landmarks)]
        if self.mesh is not None:
            for face, points, presence, pose in zip(faces, self.mesh.points, self.mesh.presence, self.poses):
                face["mesh"] = {"presence": round(float(presence), 6), "points": np.round(points, 2).tolist()}
                face["pose"] = {"yaw": round(pose.yaw, 2), "pitch": round(pose.pitch, 2), "roll": round(pose.roll, 2)}
        return faces


# ---------------------------------------------------------------------------- images and crops

def normalised_rgb(image):
    """HxW, HxWx1, HxWx3 or HxWx4 (alpha ignored) with values 0..255 -> float32 HxWx3 scaled as
    MTCNN expects, (x - 127.5) / 128."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise UserError(f"an image must be HxW, HxWx3 or HxWx4, got shape {image.shape}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return (image[:, :, :3].astype(np.float32) - 127.5) * 0.0078125


def nchw(batch):
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


def resize_area(image, width, height):
    import cv2
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def crop_patches(image, boxes, side):
    """side x side bilinear crops whose first and last samples fall on each box's corners
    (TensorFlow's crop_and_resize on the box divided by the image size, as the `mtcnn` package
    calls it); samples outside the image are 0, i.e. mid-gray. Returns (N, side, side, 3)."""
    height, width = image.shape[:2]
    steps = np.arange(side) / (side - 1)
    rows = (boxes[:, 1:2] + steps * (boxes[:, 3:4] - boxes[:, 1:2])) * (height - 1) / height
    cols = (boxes[:, 0:1] + steps * (boxes[:, 2:3] - boxes[:, 0:1])) * (width - 1) / width
    inside = ((rows >= 0) & (rows <= height - 1))[:, :, None] & ((cols >= 0) & (cols <= width - 1))[:, None, :]
    rows, cols = np.clip(rows, 0, height - 1), np.clip(cols, 0, width - 1)
    top, left = np.floor(rows).astype(np.int64)[:, :, None], np.floor(cols).astype(np.int64)[:, None, :]
    bottom, right = np.ceil(rows).astype(np.int64)[:, :, None], np.ceil(cols).astype(np.int64)[:, None, :]
    row_frac = (rows[:, :, None, None] - top[..., None]).astype(np.float32)  # float32 as TensorFlow,
    col_frac = (cols[:, None, :, None] - left[..., None]).astype(np.float32)  # and half the memory
    upper = image[top, left] + (image[top, right] - image[top, left]) * col_frac
    lower = image[bottom, left] + (image[bottom, right] - image[bottom, left]) * col_frac
    patches = upper + (lower - upper) * row_frac
    return np.where(inside[..., None], patches, np.float32(0))


# ---------------------------------------------------------------------------- box arithmetic

def pyramid_scales(height, width, min_face_size, factor):
    """Scales mapping a min_face_size face to P-Net's 12 px window, down to a 12 px short side."""
    scales = []
    scale = 12.0 / min_face_size
    while min(height, width) * scale >= 12:  # the product _pnet_level truncates: never below 12 px
        scales.append(scale)
        scale *= factor
    return scales


def best_first(scores):
    """Indices by decreasing score, with the `mtcnn` package's (unstable) tie order."""
    return np.argsort(scores)[::-1]


def overlaps(boxes_a, boxes_b, method):
    """(len(a), len(b)) intersection over union, or over the smaller box for "min"."""
    width = np.minimum(boxes_a[:, None, 2], boxes_b[None, :, 2]) - np.maximum(boxes_a[:, None, 0], boxes_b[None, :, 0])
    height = np.minimum(boxes_a[:, None, 3], boxes_b[None, :, 3]) - np.maximum(boxes_a[:, None, 1], boxes_b[None, :, 1])
    inter = np.maximum(0.0, width) * np.maximum(0.0, height)
    area_a = ((boxes_a[:, 2] - boxes_a[:, 0]) * (boxes_a[:, 3] - boxes_a[:, 1]))[:, None]
    area_b = ((boxes_b[:, 2] - boxes_b[:, 0]) * (boxes_b[:, 3] - boxes_b[:, 1]))[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):  # empty boxes give NaN: never suppress
        if method == "min":
            return inter / np.minimum(area_a, area_b)
        return inter / (area_a + area_b - inter)


def nms(boxes, threshold, method="union"):
    """Indices (of `boxes`, sorted best first) of the boxes kept: a box goes if any better box,
    kept or not, overlaps it by more than `threshold` (the `mtcnn` package's rule)."""
    count = len(boxes)
    suppressed = np.zeros(count, dtype=bool)
    for start in range(0, count, NMS_BLOCK):
        better = np.arange(start, min(start + NMS_BLOCK, count))
        worse = np.arange(count)[None, :] > better[:, None]
        suppressed |= np.any((overlaps(boxes[better], boxes, method) > threshold) & worse, axis=0)
    return np.flatnonzero(~suppressed)


def regress(boxes, offsets):
    """Moves each corner by offset x the box's inclusive pixel size."""
    sizes = boxes[:, 2:4] - boxes[:, 0:2] + 1
    return boxes + offsets * np.hstack([sizes, sizes])


def square(boxes):
    """rerec: the square with the box's centre and its longer side."""
    sizes = boxes[:, 2:4] - boxes[:, 0:2]
    side = sizes.max(axis=1, keepdims=True)
    top_left = boxes[:, 0:2] + sizes * 0.5 - side * 0.5
    return np.hstack([top_left, top_left + side])


def decode_landmarks(boxes, points):
    """O-Net's 10 outputs (x1..x5, y1..y5 as fractions of the box) -> (N, 5, 2) pixels."""
    sizes = boxes[:, 2:4] - boxes[:, 0:2] + 1
    xs = sizes[:, 0:1] * points[:, 0:5] + boxes[:, 0:1] - 1
    ys = sizes[:, 1:2] * points[:, 5:10] + boxes[:, 1:2] - 1
    return np.stack([xs, ys], axis=2)


def pnet_windows(score_map, offset_map, scale, threshold, origin=(0, 0)):
    """Regressed windows of one pyramid level scoring > threshold, in image pixels, best first.
    As in facenet and the `mtcnn` package, a cell spans 2x + 1 .. 2x + 12 and moves by offset x 11.
    `origin`: where the maps' first cell lies in the level, in level pixels."""
    ys, xs = np.nonzero(score_map > threshold)
    cells = PNET_STRIDE * np.stack([xs, ys], axis=1) + np.asarray(origin)
    top_left, bottom_right = cells + 1, cells + PNET_CELL
    corners = np.hstack([top_left, bottom_right])
    boxes = (corners + offset_map[:, ys, xs].T * (PNET_CELL - 1)) / scale
    scores = score_map[ys, xs].astype(np.float64)
    order = best_first(scores)
    return boxes[order], scores[order]


def suppress(boxes, scores, threshold, method="union"):
    """Sorts best first and applies nms; returns the kept boxes, their scores and their indices."""
    order = best_first(scores)
    keep = order[nms(boxes[order], threshold, method)]
    return boxes[keep], scores[keep], keep


# ---------------------------------------------------------------------------- the detector

class FaceDetector:
    """MTCNN with facenet's defaults. `backend`: "auto", "opencv" or "pycaffe" (same files)."""

    def __init__(self, min_face_size=FACENET["min_face_size"], thresholds=FACENET["thresholds"],
                 scale_factor=FACENET["scale_factor"], backend="auto"):
        if not min_face_size > 0:
            raise UserError(f"min_face_size must be positive, got {min_face_size}")
        if not 0 < scale_factor < 1:
            raise UserError(f"scale_factor must be between 0 and 1, got {scale_factor}")
        if len(thresholds) != 3 or not all(0 <= t <= 1 for t in thresholds):
            raise UserError(f"thresholds must be three probabilities (P-Net, R-Net, O-Net), got {thresholds}")
        self.min_face_size = min_face_size
        self.thresholds = tuple(thresholds)
        self.scale_factor = scale_factor
        self.nets = load_nets(backend)

    def detect(self, image):
        """Faces in one HxWx3 uint8 RGB image (grayscale and RGBA are accepted too)."""
        return self.detect_batch([image])[0]

    def detect_batch(self, images):
        images = [normalised_rgb(image) for image in images]
        boxes = [self._propose(image, self._whole_image(image)) for image in images]
        boxes = self._refine(images, boxes)
        return self._finish(images, boxes)

    def detect_around(self, image, boxes):
        """Faces near `boxes` only (faces found in the previous frame): P-Net scores only the
        windows of a square AROUND_REGION times each box's side, at the pyramid levels for faces
        AROUND_SCALE times smaller to larger than it; R-Net and O-Net then run as in `detect`.
        The windows are cut from the same resized pyramid levels as in `detect`, so each scores
        exactly as it would there. A few ms per face instead of a whole pyramid."""
        image = normalised_rgb(image)
        height, width = image.shape[:2]
        scales = pyramid_scales(height, width, self.min_face_size, self.scale_factor)
        searches = {}  # scale -> regions of the image
        for box in np.asarray(boxes).reshape(-1, 4):
            side = float(max(box[2] - box[0], box[3] - box[1]))
            centre_x, centre_y, half = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, side * AROUND_REGION / 2
            region = (centre_x - half, centre_y - half, centre_x + half, centre_y + half)
            for scale in scales:
                if side / AROUND_SCALE <= PNET_CELL / scale <= side * AROUND_SCALE:
                    searches.setdefault(scale, []).append(region)
        proposals = self._propose(image, searches)
        return self._finish([image], self._refine([image], [proposals]))[0]

    def _whole_image(self, image):
        height, width = image.shape[:2]
        return {scale: [None] for scale in pyramid_scales(height, width, self.min_face_size, self.scale_factor)}

    def _propose(self, image, searches):
        """P-Net stage: squared candidate boxes. `searches`: pyramid scale -> regions (x1, y1, x2,
        y2 in image pixels, or None for the whole image) whose windows are scored."""
        levels = [self._pnet_level(image, scale, regions) for scale, regions in searches.items()]
        levels = [level for level in levels if len(level[0])]
        if not levels:
            return np.zeros((0, 4))
        boxes, scores = (np.concatenate(parts) for parts in zip(*levels))
        boxes, _, _ = suppress(boxes, scores, NMS_ACROSS_SCALES)
        return square(boxes)

    def _pnet_level(self, image, scale, regions):
        height, width = image.shape[:2]
        scaled = resize_area(image, int(width * scale), int(height * scale))
        found = [self._pnet_windows(scaled, scale, region) for region in regions]
        boxes, scores = (np.concatenate(parts) for parts in zip(*found))
        if len(regions) > 1:  # windows of overlapping regions are scored twice
            boxes, index = np.unique(boxes, axis=0, return_index=True)
            scores = scores[index]
            order = best_first(scores)
            boxes, scores = boxes[order], scores[order]
        keep = nms(boxes, NMS_PER_SCALE)
        return boxes[keep], scores[keep]

    def _pnet_windows(self, scaled, scale, region):
        """P-Net on the level's cells inside `region`: cut at an even offset, so that P-Net's
        stride-2 cells are the whole level's."""
        height, width = scaled.shape[:2]
        x1, y1, x2, y2 = (0, 0, width, height) if region is None else (
            max(0, int(np.floor(region[0] * scale / 2)) * 2), max(0, int(np.floor(region[1] * scale / 2)) * 2),
            min(width, int(np.ceil(region[2] * scale))), min(height, int(np.ceil(region[3] * scale))))
        if x2 - x1 < PNET_CELL or y2 - y1 < PNET_CELL:
            return np.zeros((0, 4)), np.zeros(0)
        offset_maps, probabilities = self.nets.forward("pnet", nchw(scaled[None, y1:y2, x1:x2]))
        return pnet_windows(probabilities[0, 1], offset_maps[0], scale, self.thresholds[0], (x1, y1))

    def _refine(self, images, boxes):
        """R-Net stage: per image, squared boxes that R-Net accepts."""
        refined = []
        for image_boxes, (offsets, probabilities) in zip(boxes, self._score_crops("rnet", images, boxes)):
            scores = probabilities[:, 1].astype(np.float64)
            passed = scores > self.thresholds[1]
            image_boxes = regress(image_boxes[passed], offsets[passed])
            image_boxes, _, _ = suppress(image_boxes, scores[passed], NMS_RNET)
            refined.append(square(image_boxes))
        return refined

    def _finish(self, images, boxes):
        """O-Net stage: final boxes, scores and landmarks."""
        results = []
        for image_boxes, (offsets, points, probabilities) in zip(boxes, self._score_crops("onet", images, boxes)):
            scores = probabilities[:, 1].astype(np.float64)
            passed = scores > self.thresholds[2]
            landmarks = decode_landmarks(image_boxes[passed], points[passed])
            image_boxes = regress(image_boxes[passed], offsets[passed])
            image_boxes, scores, keep = suppress(image_boxes, scores[passed], NMS_ONET, method="min")
            results.append(Detections(image_boxes, scores, landmarks[keep]))
        return results

    def _score_crops(self, net, images, boxes):
        """Runs `net` on the crops of every image's boxes at once; returns its outputs per image."""
        side = 24 if net == "rnet" else 48
        patches = [crop_patches(image, image_boxes, side) for image, image_boxes in zip(images, boxes)]
        outputs = self._forward_chunks(net, np.concatenate(patches))
        bounds = np.cumsum([0] + [len(image_boxes) for image_boxes in boxes])
        return [[output[start:end] for output in outputs] for start, end in zip(bounds[:-1], bounds[1:])]

    def _forward_chunks(self, net, patches):
        if len(patches) == 0:
            return [np.zeros((0, size)) for size in OUTPUT_SIZES[net]]
        chunks = [self.nets.forward(net, nchw(patches[start:start + MAX_BATCH]))
                  for start in range(0, len(patches), MAX_BATCH)]
        return [np.concatenate(parts).reshape(len(patches), -1) for parts in zip(*chunks)]
