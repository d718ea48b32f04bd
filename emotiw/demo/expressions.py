"""The demo's facial expressions: five parameters per class and the piecewise-affine warp that moves a
face's features by them (emotiw.demo.data renders the clips with it)."""

import numpy as np

from emotiw.errors import UserError

PARAMETERS = ("corners", "open", "wide", "brows", "eyes")
# Per class, in -1..1: mouth corners up(+)/down(-), mouth opening, mouth wider(+)/narrower(-),
# brows raised(+)/lowered(-), eyes wide open(+)/narrowed(-). Loosely after FACS descriptions
# (Happy: AU12 lip corner puller; Sad: AU1+AU15; Surprise: AU1+2+5+26; Fear: AU1+2+5+20+26;
# Angry: AU4+23; Disgust: AU9+10+15), chosen so that every pair of classes differs clearly.
EXPRESSIONS = {
    "Angry":    (0.0, 0.0, -0.7, -1.0, 0.0),
    "Disgust":  (-0.7, 0.3, 0.0, -0.6, -1.0),
    "Fear":     (-0.5, 0.6, 1.0, 0.8, 1.0),
    "Happy":    (1.0, 0.3, 0.7, 0.0, -0.5),
    "Neutral":  (0.0, 0.0, 0.0, 0.0, 0.0),
    "Sad":      (-1.0, 0.0, -0.3, 0.6, -0.6),
    "Surprise": (0.0, 1.0, -0.4, 1.0, 1.0),
}

# Control points that move: (name, landmark or derived point, offset (u, v), {parameter: (du, dv)}).
# (u, v) are face coordinates in eye distances: u along the eye line towards the image-right eye,
# v perpendicular, downwards; a move is the displacement at parameter value 1 and strength 1.
# "left" is the image-left side (MTCNN's order). Cheek and jaw points follow the mouth corners part
# of the way, so that the skin around a moving feature moves with it instead of folding over it.
MOVING = (
    ("mouth_left", "mouth_left", (0.0, 0.0), {"corners": (0.0, -0.26), "wide": (-0.14, 0.0)}),
    ("mouth_right", "mouth_right", (0.0, 0.0), {"corners": (0.0, -0.26), "wide": (0.14, 0.0)}),
    ("upper_lip", "mouth_mid", (0.0, -0.08), {"open": (0.0, -0.06), "corners": (0.0, -0.05)}),
    ("lower_lip", "mouth_mid", (0.0, 0.08), {"open": (0.0, 0.26)}),
    ("chin", "mouth_mid", (0.0, 0.5), {"open": (0.0, 0.19)}),
    ("left_cheek", "mouth_left", (-0.1, -0.35), {"corners": (0.0, -0.12), "wide": (-0.06, 0.0)}),
    ("right_cheek", "mouth_right", (0.1, -0.35), {"corners": (0.0, -0.12), "wide": (0.06, 0.0)}),
    ("left_jaw", "mouth_left", (-0.05, 0.35), {"corners": (0.0, -0.1), "open": (0.0, 0.1)}),
    ("right_jaw", "mouth_right", (0.05, 0.35), {"corners": (0.0, -0.1), "open": (0.0, 0.1)}),
    ("left_brow_inner", "left_eye", (0.15, -0.36), {"brows": (0.0, -0.13)}),
    ("left_brow_mid", "left_eye", (0.0, -0.4), {"brows": (0.0, -0.13)}),
    ("left_brow_outer", "left_eye", (-0.2, -0.36), {"brows": (0.0, -0.11)}),
    ("right_brow_inner", "right_eye", (-0.15, -0.36), {"brows": (0.0, -0.13)}),
    ("right_brow_mid", "right_eye", (0.0, -0.4), {"brows": (0.0, -0.13)}),
    ("right_brow_outer", "right_eye", (0.2, -0.36), {"brows": (0.0, -0.11)}),
    ("left_upper_lid", "left_eye", (0.0, -0.12), {"eyes": (0.0, -0.07)}),
    ("left_lower_lid", "left_eye", (0.0, 0.1), {"eyes": (0.0, 0.035)}),
    ("right_upper_lid", "right_eye", (0.0, -0.12), {"eyes": (0.0, -0.07)}),
    ("right_lower_lid", "right_eye", (0.0, 0.1), {"eyes": (0.0, 0.035)}),
)
# Control points that stay, so that the warp stays local to the features.
FIXED = (
    ("left_eye", (0.0, 0.0)), ("right_eye", (0.0, 0.0)), ("nose", (0.0, 0.0)),
    ("eye_mid", (-0.5, -0.85)), ("eye_mid", (0.5, -0.85)), ("eye_mid", (0.0, -0.75)),
    ("eye_mid", (-1.0, -0.3)), ("eye_mid", (1.0, -0.3)),
    ("mouth_mid", (-0.95, -0.45)), ("mouth_mid", (0.95, -0.45)),
    ("mouth_mid", (-0.95, 0.4)), ("mouth_mid", (0.95, 0.4)), ("mouth_mid", (0.0, 1.05)),
)


class FaceFrame:
    """The face's own coordinates: origin between the eyes, unit = the eye distance."""

    def __init__(self, landmarks):
        self.landmarks = np.asarray(landmarks, dtype=np.float64)  # (5, 2) MTCNN order
        left_eye, right_eye, nose, mouth_left, mouth_right = self.landmarks
        self.eye_distance = float(np.linalg.norm(right_eye - left_eye))
        self.u = (right_eye - left_eye) / self.eye_distance
        self.v = np.array([-self.u[1], self.u[0]])  # u turned 90 degrees clockwise (image rows grow down)
        self.anchors = {"left_eye": left_eye, "right_eye": right_eye, "nose": nose,
                        "mouth_left": mouth_left, "mouth_right": mouth_right,
                        "eye_mid": (left_eye + right_eye) / 2, "mouth_mid": (mouth_left + mouth_right) / 2}

    def point(self, anchor, offset):
        return self.anchors[anchor] + self.eye_distance * (offset[0] * self.u + offset[1] * self.v)

    @property
    def centre(self):
        """Between the eye line and the mouth, a little up: the centre of the face oval."""
        middle = (self.anchors["eye_mid"] + self.anchors["mouth_mid"]) / 2
        return middle - 0.1 * self.eye_distance * self.v


def moved_points(landmarks, expression):
    """{name: (start, end)} of the MOVING control points under `expression` (PARAMETERS -> value)."""
    face = FaceFrame(landmarks)
    moved = {}
    for name, anchor, offset, moves in MOVING:
        start = face.point(anchor, offset)
        du = sum(expression.get(p, 0.0) * move[0] for p, move in moves.items())
        dv = sum(expression.get(p, 0.0) * move[1] for p, move in moves.items())
        moved[name] = start, start + face.eye_distance * (du * face.u + dv * face.v)
    return moved


def control_points(landmarks, expression, border):
    """(source, destination) control points, (N, 2) each: the MOVING ones, then the FIXED ones and
    the corners and edge midpoints of the image, `border` = (width, height)."""
    face = FaceFrame(landmarks)
    starts, ends = zip(*moved_points(landmarks, expression).values())
    width, height = border
    edges = [(x, y) for x in (0, width / 2, width - 1) for y in (0, height / 2, height - 1)
             if (x, y) != (width / 2, height / 2)]
    fixed = [face.point(anchor, offset) for anchor, offset in FIXED] + [np.array(e, dtype=np.float64) for e in edges]
    return np.array(list(starts) + fixed), np.array(list(ends) + fixed)


def expression_field(shape, landmarks, expression):
    """The piecewise-affine warp between the control points as a displacement field: for every
    output pixel, (dx, dy) to the pixel it takes its value from (float32, H x W x 2).

    The control points' displacements (start - end) interpolated linearly on each triangle of a
    Delaunay triangulation of the moved points: the map skimage.transform.PiecewiseAffineTransform
    gives, computed by matplotlib's triangle interpolator some 30 times faster.
    """
    import matplotlib.tri
    from scipy.spatial import Delaunay

    height, width = shape[:2]
    source, target = control_points(landmarks, expression, (width, height))
    triangles = Delaunay(target).simplices
    if folds(triangles, source, target):
        raise UserError("the expression warp folds the face (features cross each other); lower --strength")
    mesh = matplotlib.tri.Triangulation(target[:, 0], target[:, 1], triangles)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    field = [matplotlib.tri.LinearTriInterpolator(mesh, source[:, axis] - target[:, axis])(xs, ys) for axis in (0, 1)]
    if any(np.ma.is_masked(part) for part in field):  # cannot happen: the image corners are control points
        raise UserError("the expression warp does not cover the face image; lower --strength")
    return np.dstack([np.ma.getdata(part) for part in field]).astype(np.float32)


def folds(simplices, source, target):
    """Whether any triangle turns over between source and target (a point crossed an edge)."""
    def signed_areas(points):
        a, b, c = (points[simplices[:, k]] for k in range(3))
        return (b - a)[:, 0] * (c - a)[:, 1] - (b - a)[:, 1] * (c - a)[:, 0]

    return bool(np.any(np.sign(signed_areas(source)) != np.sign(signed_areas(target))))


def apply_field(image, field, level=1.0):
    """The image warped by `level` times the displacement field (0: unchanged, 1: the full warp).
    Scaling the field, rather than estimating a warp per level, keeps a clip's frames cheap."""
    import cv2

    height, width = image.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    return cv2.remap(image, xs + level * field[..., 0], ys + level * field[..., 1], cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)


def draw_mouth_cavity(image, landmarks, expression):
    """A soft dark ellipse between the lips, as tall as the mouth opened."""
    import cv2

    opening = expression.get("open", 0.0)
    if opening <= 0:
        return image
    face = FaceFrame(landmarks)
    moved = moved_points(landmarks, expression)
    (upper_before, upper), (lower_before, lower) = moved["upper_lip"], moved["lower_lip"]
    left, right = moved["mouth_left"][1], moved["mouth_right"][1]
    gap = float(np.linalg.norm(lower - upper) - np.linalg.norm(lower_before - upper_before))  # how far they parted
    if gap <= 0:
        return image
    scale = 4  # cv2 draws at integer positions: draw at 4x sub-pixel precision via `shift`
    centre = (upper + 2 * lower) / 3  # the jaw drops: the opening shows nearer the lower lip
    axes = (0.3 * float(np.linalg.norm(right - left)), 0.5 * gap)
    angle = float(np.degrees(np.arctan2(face.u[1], face.u[0])))
    mask = np.zeros(image.shape[:2], np.float32)
    cv2.ellipse(mask, tuple(int(round(c * scale)) for c in centre), tuple(int(round(a * scale)) for a in axes),
                angle, 0, 360, 1.0, -1, cv2.LINE_AA, 2)
    mask = cv2.GaussianBlur(mask, (0, 0), 0.03 * face.eye_distance + 0.5)[..., None]
    darkest = 0.2 * image.reshape(-1, image.shape[2]).mean(axis=0)
    return (image * (1 - 0.9 * mask) + darkest * 0.9 * mask).astype(image.dtype)
