"""One clip (or still image) through the face pipeline, in the main process or a worker.

Two passes over the video, so that long clips never sit in memory:
  1. decode at the source resolution, number the shots (emotiw.face.shots), find the faces
     (emotiw.face.clip: MTCNN on every frame, or tracked), then choose the subject (emotiw.face.track);
  2. decode again (at the recipe's frame width: DSN's 1024) and crop the subject's frames
     (emotiw.face.align) into `OUT/faces/<split>/<clip>/<frame:06d>.png`.
Decoding runs in a thread ahead of detection and cropping, and PNGs are written by another, so one
clip keeps both cores busy. Boxes and landmarks in the outputs are in source pixels: the video's own
pixel grid, upright. `process_item` writes the clip's parts (emotiw.stages.preprocess.layout), its
manifest rows last: that file marks the clip finished.
"""

import collections
import json
import queue
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from emotiw.errors import UserError
from emotiw.face.align import align_face, resize_whole, to_gray
from emotiw.face.clip import REDETECT_EVERY, detection_width, find_faces, min_face_pixels
from emotiw.face.frontal import frontal_crop
from emotiw.face.mesh import MIN_FACE, PRESENCE_THRESHOLD, FaceMesh, head_pose
from emotiw.face.mtcnn import FACENET, LANDMARK_NAMES, Detections, FaceDetector
from emotiw.face.shots import SHOT_THRESHOLD, ShotDetector
from emotiw.face.track import choose_subject
from emotiw.face.video import VideoError, display_size, iter_frames, probe, save_png
from emotiw.formats.files import atomic_path, atomic_write_text
from emotiw.formats.images import read_rgb
from emotiw.output import WRITE_FIXES
from emotiw.recipes import get_recipe
from emotiw.stages.preprocess.layout import (
    DETECTION_COLUMNS,
    MANIFEST_COLUMNS,
    detections_path,
    face_dir,
    info_path,
    mesh_path,
    part_path,
    write_rows,
)

PREFETCH_FRAMES = 8  # decoded frames waiting for detection, cropping or writing
MAX_RESIDUAL = 0.15  # of the interocular distance: a mesh the canonical face explains worse is not frontalised


@dataclass(frozen=True)
class Settings:
    """Everything that decides the content of the outputs; stored in OUT/preprocess.json."""
    recipe: str
    size: int
    gray: bool
    fps: float | None
    every: int | None
    max_frames: int | None
    aligned: bool
    align: str | None = None  # facenet, similarity or frontal; None: the recipe's alignment
    min_face: str | None = None  # "N" px, "P%" of the short side; None: emotiw.face.clip's automatic size
    subject: str = "facenet"
    detect: str = "tracked"
    redetect_every: int = REDETECT_EVERY
    shot_threshold: float = SHOT_THRESHOLD
    # facenet's MTCNN settings, which DSN used (lists, as preprocess.json stores them)
    detector: dict = field(default_factory=lambda: {key: list(value) if isinstance(value, tuple) else value
                                                    for key, value in FACENET.items()})

    @property
    def alignment(self):
        return self.align or get_recipe(self.recipe).alignment

    @property
    def margin(self):
        return get_recipe(self.recipe).margin

    @property
    def frame_width(self):
        """The width crops are cut at (DSN's 1024), or None: as decoded."""
        return get_recipe(self.recipe).frame_width


@dataclass
class ClipResult:
    item: object
    frames: int = 0  # frames decoded and searched in this run
    error: str | None = None


@dataclass
class ClipOutput:
    rows: list  # manifest rows
    detections: list  # detections.csv rows
    info: dict  # the clip's entry in preprocess.json
    meshes: dict = field(default_factory=dict)  # frame index -> FrontalFace (--align frontal)


@dataclass
class FrontalFace:
    """What --align frontal found for one crop: the mesh (source pixels) and pose, or why not."""
    points: np.ndarray | None  # (468, 3)
    presence: float
    pose: object  # emotiw.face.mesh.Pose, or None
    align: str  # "frontal", or "similarity (<why>)" for a face the mesh cannot take



_detector = None


def detector(settings):
    global _detector
    if _detector is None:
        options = settings.detector
        _detector = FaceDetector(min_face_size=options["min_face_size"], thresholds=tuple(options["thresholds"]),
                                 scale_factor=options["scale_factor"], backend="auto")
    return _detector


def _face_columns(score, box, landmarks):
    row = {"score": f"{score:.6f}"}
    row.update(zip(("x1", "y1", "x2", "y2"), (f"{value:.2f}" for value in box)))
    for name, (x, y) in zip(LANDMARK_NAMES, landmarks):
        row[f"{name}_x"], row[f"{name}_y"] = f"{x:.2f}", f"{y:.2f}"
    return row


def _row(item, frame, time_s, shot=0, crop="", face=None, track="", frontal=None):
    """One manifest row; `face` (score, box, landmarks) only where the subject was found, `frontal`
    (a FrontalFace) with --align frontal."""
    row = dict.fromkeys(MANIFEST_COLUMNS, "")
    row.update(split=item.split, clip=item.clip, label=item.label, frame=frame, time=f"{time_s:.6f}",
               shot=shot, detected=int(bool(crop)), track=track, crop=crop)
    if face is not None:
        row.update(_face_columns(*face))
    if frontal is not None:
        row["align"] = frontal.align
        if frontal.pose is not None:
            row.update(yaw=f"{frontal.pose.yaw:.2f}", pitch=f"{frontal.pose.pitch:.2f}", roll=f"{frontal.pose.roll:.2f}")
    return row


def _detection_rows(item, frame, time_s, shot, faces, track_ids, subject):
    rows = []
    for k, (score, box, landmarks) in enumerate(zip(faces.scores, faces.boxes, faces.landmarks)):
        rows.append({"split": item.split, "clip": item.clip, "frame": frame, "time": f"{time_s:.6f}",
                     "shot": shot, "face": k, **_face_columns(score, box, landmarks), "track": track_ids[k],
                     "subject": int(k == subject)})
    return rows


def _save_face(out, item, frame_index, face):
    crop = face_dir(out, item) / f"{frame_index:06d}.png"
    save_png(crop, face)
    return crop.relative_to(out).as_posix()


_face_mesh = None


def face_mesh():
    global _face_mesh
    if _face_mesh is None:
        _face_mesh = FaceMesh()
    return _face_mesh


def frontal_face(image, box, landmarks):
    """The FrontalFace of one face; a face too small, not seen by the mesh, or one the canonical
    face cannot explain falls back to the similarity crop, saying so."""
    side = max(box[2] - box[0], box[3] - box[1])
    if side < MIN_FACE:
        return FrontalFace(None, 0.0, None, f"similarity (face {side:.0f} px, under {MIN_FACE})")
    mesh = face_mesh().mesh(image, [box], [landmarks])
    points, presence = mesh.points[0], float(mesh.presence[0])
    if presence < PRESENCE_THRESHOLD:
        return FrontalFace(points, presence, None, f"similarity (mesh presence {presence:.2f})")
    pose = head_pose(points)
    if pose.residual > MAX_RESIDUAL:
        return FrontalFace(points, presence, pose, f"similarity (mesh fit residual {pose.residual:.2f})")
    return FrontalFace(points, presence, pose, "frontal")


def _crop_and_save(out, item, frame_index, image, box, landmarks, settings):
    """(the crop's path relative to OUT, its FrontalFace or None)."""
    if settings.alignment != "frontal":
        face = align_face(image, box, landmarks, settings.alignment, settings.size, settings.margin, settings.gray)
        return _save_face(out, item, frame_index, face), None
    found = frontal_face(image, box, landmarks)
    if found.align == "frontal":
        face = frontal_crop(image, found.points, settings.size, found.pose)
        face = to_gray(face) if settings.gray else face
    else:
        face = align_face(image, box, landmarks, "similarity", settings.size, 0, settings.gray)
    return _save_face(out, item, frame_index, face), found


def prefetched(iterable, depth=PREFETCH_FRAMES):
    """Runs `iterable` in a background thread, up to `depth` items ahead. Decoding then overlaps
    detection and cropping: PyAV, OpenCV and numpy release the GIL in their heavy loops."""
    items = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def produce():
        try:
            for element in iterable:
                items.put((element, None))
                if stop.is_set():
                    break
            items.put((end, None))
        except BaseException as error:  # re-raised in the consumer
            items.put((end, error))
        finally:
            getattr(iterable, "close", lambda: None)()

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            element, error = items.get()
            if element is end:
                if error is not None:
                    raise error
                return
            yield element
    finally:  # a consumer that stops early: let the producer finish its last put and exit
        stop.set()
        while thread.is_alive():
            try:
                items.get(timeout=0.05)
            except queue.Empty:
                pass


def _video_frames(item, settings, width=None, interpolation="BICUBIC"):
    return prefetched(iter_frames(item.source, fps=settings.fps, every=settings.every,
                                  max_frames=settings.max_frames, width=width, interpolation=interpolation))


def _scaled(points, factors):
    return np.asarray(points, dtype=np.float64) * np.resize(factors, np.shape(points)[-1])


def detection_frame_width(info, settings):
    """The width the frames searched are decoded at (None: as decoded), from --min-face. DSN's own
    rule, facenet's 20 px on every full frame, stays what `--recipe dsn --detect every-frame` does."""
    full = display_size(info)
    smallest = settings.detector["min_face_size"]
    if settings.min_face is None and settings.recipe == "dsn" and settings.detect == "every-frame":
        return None
    return detection_width(full[0], min_face_pixels(settings.min_face, min(full), smallest), smallest)


def process_video(item, out, settings, progress):
    info = probe(item.source)
    detect_width = detection_frame_width(info, settings)
    detect_size = display_size(info, detect_width)
    source_size = info.source_size
    shots = ShotDetector(settings.shot_threshold, frame_rate=float(info.frame_rate or 25))
    found = []
    # frames searched scaled down: area averaging, as fast as decoding alone and without aliasing
    searched = _video_frames(item, settings, detect_width, "AREA" if detect_width else "BICUBIC")
    for faces in find_faces(searched, detector(settings), settings.detect, settings.redetect_every, shots):
        found.append(faces)
        progress(1)
    subject = choose_subject([f.faces.boxes for f in found], settings.subject, [f.shot for f in found],
                             image_shape=detect_size[::-1])
    crop_width = settings.frame_width
    crop_size = display_size(info, crop_width)
    crops = _crop_subject(item, out, settings, found, subject.chosen, crop_width,
                          np.divide(crop_size, detect_size))
    to_source = np.divide(source_size, detect_size)
    crop_to_source = np.divide(source_size, crop_size)
    rows, detections, meshes = [], [], {}
    for f, k, track_ids in zip(found, subject.chosen, subject.track_ids):
        faces = f.faces
        boxes, landmarks = _scaled(faces.boxes, to_source), _scaled(faces.landmarks, to_source)
        if k is None:
            rows.append(_row(item, f.index, f.time, f.shot))
        else:
            crop, frontal = crops[f.index]
            rows.append(_row(item, f.index, f.time, f.shot, crop,
                             (faces.scores[k], boxes[k], landmarks[k]), track_ids[k], frontal))
            if frontal is not None and frontal.points is not None:
                meshes[f.index] = (_scaled(frontal.points, np.append(crop_to_source, crop_to_source[0])), frontal)
        detections += _detection_rows(item, f.index, f.time, f.shot,
                                      Detections(boxes, faces.scores, landmarks), track_ids, k)
    clip_info = {"source_size": list(source_size), "detect_size": list(detect_size), "crop_size": list(crop_size),
                 "rotation": info.rotation, "frames": len(found), "shots": len({f.shot for f in found})}
    return ClipOutput(rows, detections, clip_info, meshes)


def _crop_subject(item, out, settings, found, chosen, width, to_crop):
    """Pass 2: decodes the clip again at the crop resolution and writes the subject's crops;
    returns {frame index: crop path relative to OUT}."""
    wanted = {f.index: (f.faces, k) for f, k in zip(found, chosen) if k is not None}
    if not wanted:
        return {}
    crops, writing = {}, collections.deque()
    with ThreadPoolExecutor(1) as writer:
        for frame in _video_frames(item, settings, width):
            if frame.index in wanted:
                faces, k = wanted[frame.index]
                crops[frame.index] = writer.submit(
                    _crop_and_save, out, item, frame.index, frame.image, _scaled(faces.boxes[k], to_crop),
                    _scaled(faces.landmarks[k], to_crop), settings)
                writing.append(crops[frame.index])
                if len(writing) > PREFETCH_FRAMES:  # each holds a whole frame: never let them pile up
                    writing.popleft().result()
                if len(crops) == len(wanted):
                    break
    return {index: future.result() for index, future in crops.items()}


def process_image(item, out, settings, progress):
    """A still image is a one-frame clip; with several faces, facenet's choice (big and central)."""
    image = read_rgb(item.source)
    progress(1)
    height, width = image.shape[:2]
    info = {"source_size": [width, height], "detect_size": [width, height], "crop_size": [width, height],
            "rotation": 0, "frames": 1, "shots": 1}
    if settings.aligned:
        face = resize_whole(image, settings.size, settings.gray)
        crop = _save_face(out, item, 0, face)
        row = _row(item, 0, 0.0, crop=crop, track=0)
        row.update(zip(("x1", "y1", "x2", "y2"), (f"{value:.2f}" for value in (0, 0, width, height))))
        return ClipOutput([row], [], info)
    faces = detector(settings).detect(image)
    subject = choose_subject([faces.boxes], "facenet", image_shape=image.shape)
    k, track_ids = subject.chosen[0], subject.track_ids[0]
    detections = _detection_rows(item, 0, 0.0, 0, faces, track_ids, k)
    if k is None:
        return ClipOutput([_row(item, 0, 0.0)], detections, info)
    crop, frontal = _crop_and_save(out, item, 0, image, faces.boxes[k], faces.landmarks[k], settings)
    face = (faces.scores[k], faces.boxes[k], faces.landmarks[k])
    meshes = {0: (frontal.points, frontal)} if frontal is not None and frontal.points is not None else {}
    return ClipOutput([_row(item, 0, 0.0, crop=crop, face=face, track=track_ids[k], frontal=frontal)], detections,
                      info, meshes)


def write_meshes(path, meshes):
    """The subject's mesh per kept frame as .npz (numpy, scipy.io-free readers, MATLAB via h5 or
    py.numpy): frames (N,), points (N, 468, 3) float32 in source pixels, presence (N,), pose (N, 3)
    yaw, pitch, roll in degrees (NaN where not fitted)."""
    frames = sorted(meshes)
    poses = [meshes[f][1].pose for f in frames]
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, frames=np.array(frames, dtype=np.int64),
                                points=np.array([meshes[f][0] for f in frames], dtype=np.float32),
                                presence=np.array([meshes[f][1].presence for f in frames], dtype=np.float32),
                                pose=np.array([(p.yaw, p.pitch, p.roll) if p else (np.nan,) * 3 for p in poses],
                                              dtype=np.float32))


def process_item(item, out, settings, kind, progress=None):
    """Processes one clip from scratch and writes its parts; errors become the result's."""
    progress = progress or (lambda n: None)
    faces = face_dir(out, item)
    if faces.exists():  # leftovers of a killed run
        shutil.rmtree(faces)
    result = ClipResult(item)

    def counted(n):
        result.frames += n
        progress(n)

    try:
        process = process_video if kind == "video" else process_image
        output = process(item, out, settings, counted)
    except (VideoError, UserError) as error:
        result.error = str(error)
        return result
    except Exception as error:  # a long run should not die on one clip; the message says what broke
        if isinstance(error, OSError) and error.errno in WRITE_FIXES:
            raise  # a full disk or a read-only OUT: every later clip would fail too
        result.error = f"internal error ({type(error).__name__}: {error})"
        return result
    write_rows(detections_path(out, item), output.detections, DETECTION_COLUMNS)
    if output.meshes:
        write_meshes(mesh_path(out, item), output.meshes)
    atomic_write_text(info_path(out, item), json.dumps(output.info) + "\n")
    write_rows(part_path(out, item), output.rows)  # last: marks the clip finished
    return result


