"""`emotiw demo-data`: a small labelled set of short video clips for the 7 AFEW classes, made from
real face photographs that scikit-image ships, for the end-to-end demo (`emotiw demo`).

Faces: scikit-image's astronaut (Eileen Collins) and the faces of its `lfw_subset` (25 x 25 crops
from Labeled Faces in the Wild, upscaled), each kept only if our MTCNN finds it; its 5 landmarks
place the expression control points. Expressions: each class moves mouth corners (up/down, wider
or narrower), opens the mouth (jaw down, a dark mouth cavity), raises or lowers the brows and opens
or narrows the eyes, by its own amounts (EXPRESSIONS), with a piecewise-affine warp
(skimage.transform.PiecewiseAffineTransform) between control points derived from the landmarks.
Each clip: one identity, the class's expression ramping up from a weaker start, per-clip jitter of
every expression parameter, random pose (rotation), scale, motion across the frames, lighting
(gain, colour tint, a light gradient), sensor noise, and a moving crop of one of scikit-image's
photographs (none with a face) as background; H.264 in mp4 via PyAV. Sound: a short sentence
spoken by espeak-ng (the same sentences for every class) in the identity's voice, with the class's
pitch, rate and loudness (VOICES), each jittered per clip, plus a little noise, as long as the
clip's video; AAC in the same file.

Layout (AFEW's): OUT/<split>/<Emotion>/<clip>.mp4 for the splits train, val and test; clip names
are unique across splits (`train_happy_03`), so OUT/labels.csv (`clip,label`) works as an
`emotiw preprocess --labels` file; OUT/clips.csv adds each clip's split, identity, background and
expression strength. The identities are shared by the splits: every split shows the same people
with every expression, so a small net learns the expression, not the person.

Deterministic: every clip draws from its own generator seeded by (seed, split, class, clip number),
so the same seed gives identical frames, and a run into an existing OUT (same settings, stored in
OUT/demo_data.json) only makes the clips still missing.
"""

import csv
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from emotiw import EMOTIONS
from emotiw.demo.expressions import EXPRESSIONS, PARAMETERS, FaceFrame, apply_field, draw_mouth_cavity, expression_field
from emotiw.errors import UserError
from emotiw.face.mtcnn import FaceDetector
from emotiw.face.video import write_video
from emotiw.formats.files import atomic_open, atomic_write_text

SPLITS = ("train", "val", "test")
FPS = 10
JITTER = 0.12  # per-clip standard deviation of every expression parameter, cut at 3 sigma
INTENSITY = (0.8, 1.2)  # per-clip range of the expression's intensity, times --strength
MAX_STRENGTH = 1.0  # the warp never folds up to here (tests/test_demo_data.py checks the extremes)
SPRITE_EYE_DISTANCE = 40  # faces are warped at this size, then scaled into the frame
SPRITE_HALF = 1.6  # half side of a face sprite around its centre, in eye distances
DETECTION_SCORE = 0.95  # a source face is used only when MTCNN finds it this surely
# Per class: espeak-ng's pitch (0-99), rate (words per minute) and amplitude (0-200). Loosely
# after vocal-affect findings: high arousal (anger, fear, joy, surprise) is louder, faster and
# higher; sadness low, slow and quiet; disgust slow and low.
VOICES = {
    "Angry":    (40, 190, 170),
    "Disgust":  (30, 120, 110),
    "Fear":     (80, 210, 80),
    "Happy":    (70, 175, 140),
    "Neutral":  (45, 150, 100),
    "Sad":      (15, 95, 60),
    "Surprise": (90, 160, 150),
}
VOICE_JITTER = (6, 0.08, 0.1)  # per-clip sd of the pitch (points), the rate and amplitude (fractions)
# espeak-ng voice variants, one per identity in turn
VARIANTS = ("f2", "m3", "f4", "m1", "f1", "m2", "f3", "m4")
SENTENCES = ("I did not expect that at all", "Look at what they have done here", "We have to talk about it now",
             "So this is where you were", "Tell me what happened today", "It was the last one they had")
AUDIO_RATE = 22050  # espeak-ng's own rate
SPEECH_NOISE = 0.002  # sd of the noise under the speech, full scale 1
# scikit-image photographs without a face in them (the cameraman and the cat are left out).
BACKGROUNDS = ("coffee", "rocket", "hubble_deep_field", "coins", "brick", "grass", "gravel", "page",
               "text", "moon", "immunohistochemistry", "retina", "clock")

# ---------------------------------------------------------------------------- source faces

@dataclass
class Identity:
    name: str
    sprite: np.ndarray     # float32 RGB, square, the face centred at SPRITE_EYE_DISTANCE
    landmarks: np.ndarray  # (5, 2) in sprite pixels
    alpha: np.ndarray      # float32 in 0..1: the face oval, feathered


def cut_sprite(image, landmarks):
    """A square around the face, scaled so the eyes are SPRITE_EYE_DISTANCE apart, edges
    replicated where it runs out of the photograph; landmarks moved along."""
    import cv2

    face = FaceFrame(landmarks)
    scale = SPRITE_EYE_DISTANCE / face.eye_distance
    side = int(round(2 * SPRITE_HALF * SPRITE_EYE_DISTANCE))
    shift = side / 2 - scale * face.centre
    matrix = np.array([[scale, 0, shift[0]], [0, scale, shift[1]]])
    sprite = cv2.warpAffine(image.astype(np.float32), matrix, (side, side), flags=cv2.INTER_CUBIC,
                            borderMode=cv2.BORDER_REPLICATE)
    return np.clip(sprite, 0, 255), landmarks * scale + shift


def face_oval(side, landmarks):
    """Alpha of the face oval (forehead to chin, ear to ear), feathered at its edge."""
    import cv2

    face = FaceFrame(landmarks)
    d = face.eye_distance
    mask = np.zeros((side, side), np.float32)
    centre = tuple(int(round(c)) for c in face.centre)
    cv2.ellipse(mask, centre, (int(1.25 * d), int(1.6 * d)), 0, 0, 360, 1.0, -1, cv2.LINE_AA)
    return cv2.GaussianBlur(mask, (0, 0), 0.1 * d)


def source_faces(detector, count):
    """Up to `count` identities: the astronaut, then lfw_subset faces in their order, each one
    where MTCNN finds exactly one face with score >= DETECTION_SCORE."""
    import cv2
    from skimage import data

    candidates = [("astronaut", data.astronaut())]
    faces = data.lfw_subset()[:100]  # the first 100 images are faces, the rest are not
    for index, face in enumerate(faces):
        gray = cv2.resize((face * 255).astype(np.uint8), (125, 125), interpolation=cv2.INTER_CUBIC)
        candidates.append((f"lfw_{index:03d}", np.repeat(gray[:, :, None], 3, axis=2)))
    identities = []
    for name, image in candidates:
        if len(identities) == count:
            break
        found = detector.detect(image)
        if len(found) != 1 or found.scores[0] < DETECTION_SCORE:
            continue
        sprite, landmarks = cut_sprite(image, found.landmarks[0])
        identities.append(Identity(name, sprite, landmarks, face_oval(sprite.shape[0], landmarks)))
    if not identities:
        raise UserError("MTCNN found none of scikit-image's faces; check `emotiw detect` on the astronaut")
    return identities


def background_images():
    from skimage import data

    images = []
    for name in BACKGROUNDS:
        image = getattr(data, name)()
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        images.append((name, image[:, :, :3].astype(np.float32)))
    return images


# ---------------------------------------------------------------------------- one clip

@dataclass(frozen=True)
class Settings:
    """Everything that decides the clips; stored in OUT/demo_data.json."""
    seed: int
    clips: tuple  # clips per class in train, val, test
    frames: int
    width: int
    height: int
    strength: float
    identities: int
    audio: bool = True  # a spoken sound track (espeak-ng)


@dataclass(frozen=True)
class ClipPlan:
    split: str
    emotion: str
    number: int

    @property
    def name(self):
        return f"{self.split}_{self.emotion.lower()}_{self.number:02d}"

    def path(self, out):
        return Path(out) / self.split / self.emotion / f"{self.name}.mp4"


def clip_rng(settings, plan):
    keys = [settings.seed, SPLITS.index(plan.split), EMOTIONS.index(plan.emotion), plan.number]
    return np.random.default_rng(np.random.SeedSequence(keys))


def onset(frame, frames):
    """Expression level over a clip: from 40% at the first frame to the peak at 40% of the clip."""
    peak_at = max(1.0, 0.4 * (frames - 1))
    return min(1.0, 0.4 + 0.6 * frame / peak_at)


@dataclass
class Clip:
    """A clip's random choices; `render` turns them into frames."""
    plan: ClipPlan
    identity: Identity
    background: str
    expression: dict      # the peak expression, PARAMETERS -> value
    intensity: float
    scene: np.ndarray     # the background photograph, scaled
    pan: np.ndarray       # (2, 2): top-left corner of the view at the first and the last frame
    centre: np.ndarray    # (2, 2): the face centre at the first and the last frame
    eye_distance: np.ndarray  # (2,) in frame pixels, first and last frame
    angle: np.ndarray     # (2,) degrees, first and last frame
    light: np.ndarray     # H x W x 3 multiplier: gain, tint, gradient
    noise_sigma: float
    noise_seed: int
    voice: dict           # espeak-ng's variant, pitch, rate, amplitude and the sentence

    def details(self):
        return {"split": self.plan.split, "clip": self.plan.name, "label": self.plan.emotion,
                "identity": self.identity.name, "background": self.background,
                "intensity": round(self.intensity, 3), **{f"voice_{key}": value for key, value in self.voice.items()}}


def plan_clip(settings, plan, identities, backgrounds):
    """Draws every random choice of a clip from its own generator."""
    import cv2

    rng = clip_rng(settings, plan)
    width, height = settings.width, settings.height
    identity = identities[rng.integers(len(identities))]
    background, photograph = backgrounds[rng.integers(len(backgrounds))]
    # the class's parameters, each jittered a little, scaled by a per-clip intensity
    intensity = settings.strength * rng.uniform(*INTENSITY)
    base = np.array(EXPRESSIONS[plan.emotion])
    values = base + np.clip(rng.normal(0, JITTER, base.shape), -3 * JITTER, 3 * JITTER)
    values[PARAMETERS.index("open")] = max(0.0, values[PARAMETERS.index("open")])  # lips cannot overlap
    expression = dict(zip(PARAMETERS, (intensity * values).tolist()))
    # the background: a crop of the photograph, panning slowly
    cover = max(1.3 * width / photograph.shape[1], 1.3 * height / photograph.shape[0]) * rng.uniform(1, 1.6)
    scene = cv2.resize(photograph, None, fx=cover, fy=cover, interpolation=cv2.INTER_AREA)
    room = np.array([scene.shape[1] - width, scene.shape[0] - height])
    # the face: size, position and rotation, each drifting over the clip
    eye_distance = min(width, height) * rng.uniform(0.2, 0.25) * np.array([1.0, rng.uniform(0.9, 1.1)])
    low = np.full(2, 1.6 * eye_distance.max())
    high = np.array([width, height]) - low
    start = rng.uniform(low, high)
    end = np.clip(start + rng.normal(0, 0.06 * min(width, height), 2), low, high)
    # lighting: gain, colour tint, a linear gradient in a random direction
    direction = rng.normal(size=2)
    direction /= np.linalg.norm(direction)
    ys, xs = np.mgrid[0:height, 0:width]
    ramp = ((xs - width / 2) * direction[0] + (ys - height / 2) * direction[1]) / max(width, height)
    light = rng.uniform(0.8, 1.15) * (1 + rng.uniform(0, 0.3) * ramp)[..., None] * rng.uniform(0.94, 1.06, 3)
    # the voice, drawn last so that the frames stay those of the clips made before there was sound
    pitch, rate, amplitude = VOICES[plan.emotion]
    voice = {"variant": VARIANTS[identities.index(identity) % len(VARIANTS)],
             "pitch": int(np.clip(round(pitch + rng.normal(0, VOICE_JITTER[0])), 0, 99)),
             "rate": int(round(rate * (1 + rng.normal(0, VOICE_JITTER[1])))),
             "amplitude": int(np.clip(round(amplitude * (1 + rng.normal(0, VOICE_JITTER[2]))), 10, 200)),
             "sentence": SENTENCES[rng.integers(len(SENTENCES))]}
    return Clip(plan=plan, identity=identity, background=background, expression=expression,
                intensity=float(intensity), scene=scene, pan=rng.uniform(0, 1, (2, 2)) * room,
                centre=np.stack([start, end]), eye_distance=eye_distance,
                angle=rng.uniform(-10, 10) + np.array([0.0, rng.normal(0, 3)]), light=light.astype(np.float32),
                noise_sigma=float(rng.uniform(1, 4)), noise_seed=int(rng.integers(2**32)), voice=voice)


def render(clip, settings):
    """The clip's frames, RGB uint8."""
    import cv2

    width, height, count = settings.width, settings.height, settings.frames
    sprite, landmarks = clip.identity.sprite, clip.identity.landmarks
    field = expression_field(sprite.shape, landmarks, clip.expression)
    noise = np.random.default_rng(clip.noise_seed)
    frames = []
    for index in range(count):
        t = index / max(1, count - 1)
        level = onset(index, count)
        face = draw_mouth_cavity(apply_field(sprite, field, level), landmarks,
                                 {name: level * value for name, value in clip.expression.items()})
        x, y = np.round(clip.pan[0] + t * (clip.pan[1] - clip.pan[0])).astype(int)
        canvas = clip.scene[y:y + height, x:x + width]
        matrix = placement(clip.identity, clip.centre[0] + t * (clip.centre[1] - clip.centre[0]),
                           np.interp(t, [0, 1], clip.eye_distance), np.interp(t, [0, 1], clip.angle))
        pasted = cv2.warpAffine(face, matrix, (width, height), flags=cv2.INTER_AREA)
        alpha = cv2.warpAffine(clip.identity.alpha, matrix, (width, height), flags=cv2.INTER_LINEAR)[..., None]
        canvas = (canvas * (1 - alpha) + pasted * alpha) * clip.light
        canvas += noise.normal(0, clip.noise_sigma, canvas.shape)
        frames.append(np.clip(np.round(canvas), 0, 255).astype(np.uint8))
    return frames


def speak(clip, settings):
    """The clip's sound: its sentence from espeak-ng, cut or padded with silence to the length of
    the video, over a little noise; float32 mono at AUDIO_RATE."""
    import subprocess
    import wave

    voice = clip.voice
    command = ["espeak-ng", "--stdout", "-v", f"en+{voice['variant']}", "-p", str(voice["pitch"]),
               "-s", str(voice["rate"]), "-a", str(voice["amplitude"]), voice["sentence"]]
    try:
        spoken = subprocess.run(command, capture_output=True, check=True).stdout
    except FileNotFoundError:
        raise UserError("espeak-ng is not installed: `apt-get install espeak-ng` (make install adds it), "
                        "or make silent clips with --no-audio") from None
    except subprocess.CalledProcessError as error:
        raise UserError(f"espeak-ng failed ({error.stderr.decode(errors='replace').strip()})") from None
    with wave.open(io.BytesIO(spoken)) as reader:  # --stdout leaves the length in the header unset
        samples = np.frombuffer(reader.readframes(2**31 - 1), dtype="<i2").astype(np.float32) / 32768
    length = round(settings.frames / FPS * AUDIO_RATE)
    sound = np.zeros(length, np.float32)
    sound[:min(length, len(samples))] = samples[:length]
    noise = np.random.default_rng(clip.noise_seed + 1).normal(0, SPEECH_NOISE, length)
    return np.clip(sound + noise, -1, 1).astype(np.float32)


def placement(identity, centre, eye_distance, angle):
    """The similarity that puts the sprite's face centre at `centre`, eyes `eye_distance` apart,
    turned by `angle` degrees."""
    import cv2

    face_centre = FaceFrame(identity.landmarks).centre
    matrix = cv2.getRotationMatrix2D(tuple(map(float, face_centre)), float(angle),
                                     float(eye_distance / SPRITE_EYE_DISTANCE))
    matrix[:, 2] += centre - face_centre
    return matrix


# ---------------------------------------------------------------------------- the set

def plans(settings):
    return [ClipPlan(split, emotion, number)
            for split, count in zip(SPLITS, settings.clips)
            for emotion in EMOTIONS
            for number in range(1, count + 1)]


def check_settings(out, settings):
    path = out / "demo_data.json"
    wanted = json.dumps(asdict(settings), indent=2, sort_keys=True) + "\n"
    if path.exists() and path.read_text() != wanted:
        raise UserError(f"{out} holds clips made with other settings ({path}); use a new --out or the same options")
    atomic_write_text(path, wanted)


def validate(settings):
    if settings.frames < 2:
        raise UserError(f"--frames must be at least 2, got {settings.frames}")
    if settings.width < 64 or settings.height < 64 or settings.width % 2 or settings.height % 2:
        raise UserError(f"--size {settings.width}x{settings.height}: both sides must be even and at least 64 "
                        f"(H.264 in yuv420p needs even sides; MTCNN needs faces of 20 px or more)")
    if not 0 < settings.strength <= MAX_STRENGTH:
        raise UserError(f"--strength must be in (0, {MAX_STRENGTH}], got {settings.strength}")
    if min(settings.clips) < 1:
        raise UserError(f"every split needs at least one clip per class, got {settings.clips}")
    if settings.identities < 1:
        raise UserError(f"--identities must be at least 1, got {settings.identities}")


def generate(out, seed=0, clips=(40, 5, 5), frames=8, size=(160, 120), strength=1.0, identities=8, audio=True,
             detector=None):
    """Makes the clips still missing under `out`; returns the rows of clips.csv. `audio`: give
    every clip a spoken sound track (needs espeak-ng)."""
    from tqdm import tqdm

    out = Path(out)
    settings = Settings(seed=seed, clips=tuple(clips), frames=frames, width=size[0], height=size[1],
                        strength=strength, identities=identities, audio=audio)
    validate(settings)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, settings)
    if detector is None:

        detector = FaceDetector()
    people = source_faces(detector, identities)
    backgrounds = background_images()
    rows = []
    for plan in tqdm(plans(settings), desc="demo clips", unit="clip", disable=None):
        clip = plan_clip(settings, plan, people, backgrounds)
        if not plan.path(out).exists():
            sound = speak(clip, settings) if audio else None
            write_video(plan.path(out), render(clip, settings), fps=FPS, audio=sound, audio_rate=AUDIO_RATE)
        rows.append(clip.details())
    write_tables(out, rows)
    return rows


def write_tables(out, rows):
    with atomic_open(out / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["clip", "label"])
        writer.writerows([row["clip"], row["label"]] for row in rows)
    with atomic_open(out / "clips.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
