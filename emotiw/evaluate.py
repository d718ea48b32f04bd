"""`emotiw test`: per-video testing of a deploy net on every face frame, as DSN's test_video.py does.

A video list holds one clip per line, `<clip frame folder> <label>`; every image in the folder (in
sorted file-name order) is one face frame. The frames go through the net in batches, with pycaffe or
OpenCV DNN, and a clip's score is the mean (or, as in DSN, the sum) of its frames' `prob` rows. A
clip without a readable face frame gets a fallback score, the class prior of a training list
(--prior-list) or else the uniform distribution, and is flagged in predictions.csv.

Preprocessing follows the net's paper unless --preprocess says otherwise:
- dsn: resize to 256x256, centre crop 224x224, subtract BGR (104, 117, 123), no scale (test_video.py);
- sse: what the net's test.prototxt data layer does (resize, crop, mean values or mean.binaryproto,
  scale), with images resized to the net's input size when the layer neither resizes nor crops;
- none: resize to the net's input size, nothing else.
"""

import csv
import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emotiw import EMOTIONS
from emotiw.errors import UserError
from emotiw.fileio import atomic_open, atomic_path, atomic_write_text
from emotiw.scores import UNKNOWN_LABEL, format_score, read_video_list, write_predictions_csv, write_scores_txt

REPO = Path(__file__).resolve().parent.parent
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
DSN_RESIZE, DSN_CROP, DSN_MEAN = 256, 224, (104.0, 117.0, 123.0)  # DSN's test_video.py
PREPROCESSING_KINDS = ("dsn", "sse", "none")
BACKENDS = ("auto", "caffe", "opencv")
AGGREGATIONS = ("mean", "sum")
CHECKPOINT_NAME = ".test-checkpoint.npz"
CHECKPOINT_SECONDS = 60
SHOWN_PROBLEMS = 10  # clip folders named on the terminal; metrics.json lists them all


# ------------------------------------------------------------------------------------------
# Lists, clips and nets

@dataclass
class Clip:
    entry: str        # the clip as written in the list
    label: int        # UNKNOWN_LABEL when the list has none
    frames: list      # image paths, sorted
    problem: str = ""  # "missing" or "empty" when the folder gives no frame


def resolve_listed_path(entry, list_path):
    """A path from a list file: absolute as is; a relative one is looked up beside the list file
    first (lists that travel with their data), then in the working directory (Caffe's rule)."""
    path = Path(entry).expanduser()
    if path.is_absolute():
        return path
    beside = Path(list_path).resolve().parent / path
    return beside if beside.exists() else Path.cwd() / path


def list_frames(folder):
    """The face frames of a clip folder: its visible image files, sorted by name."""
    return sorted(path for path in Path(folder).iterdir()
                  if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file())


def read_clips(video_list):
    """The clips of a video list, with their frames; missing or empty folders are kept and flagged."""
    entries, labels = read_video_list(video_list)
    if labels is None:
        labels = [UNKNOWN_LABEL] * len(entries)
    clips = []
    for entry, label in zip(entries, labels):
        folder = resolve_listed_path(entry, video_list)
        frames = list_frames(folder) if folder.is_dir() else []
        problem = "" if frames else ("empty" if folder.is_dir() else "missing")
        clips.append(Clip(entry=entry, label=int(label), frames=frames, problem=problem))
    return clips


def resolve_net_file(net, mode="deploy"):
    """`--net`: a prototxt path, or a registered name whose file is prototxt/NAME/<mode>.prototxt."""
    path = Path(net)
    if path.suffix == ".prototxt" or path.is_file():
        if not path.is_file():
            raise UserError(f"net file {path} not found")
        return path
    generated = REPO / "prototxt" / str(net) / f"{mode}.prototxt"
    if not generated.is_file():
        raise UserError(f"no {mode}.prototxt for net '{net}' ({generated} is missing); "
                        "write it with `emotiw nets`, or pass a prototxt path")
    return generated


def net_name(net):
    """The registry name behind --net: the name itself, or the folder of prototxt/NAME/x.prototxt."""
    path = Path(net)
    return path.resolve().parent.name if path.suffix == ".prototxt" else str(net)


def net_paper(net):
    """The paper whose preprocessing a net uses, dsn or sse: from the registry, else from the name."""
    name = net_name(net)
    try:
        from emotiw import nets
        return nets.get(name).paper.lower()
    except (ImportError, UserError):
        return "sse" if name.startswith("sse_") else "dsn"


def caffe_pb2():
    from emotiw.caffe_env import import_caffe

    return import_caffe().proto.caffe_pb2


def read_net_param(path):
    """A prototxt as a caffe_pb2.NetParameter."""
    from google.protobuf import text_format

    net = caffe_pb2().NetParameter()
    try:
        text_format.Parse(Path(path).read_text(), net)
    except text_format.ParseError as error:
        raise UserError(f"{path} is not a valid net prototxt: {error}") from None
    return net


def _meets_test_phase(rule):
    return not rule.HasField("phase") or rule.phase == 1  # caffe.TEST


def runs_in_test(layer):
    """Caffe's include/exclude filter for a TEST-phase net (levels and stages are not used here)."""
    if layer.include:
        return any(_meets_test_phase(rule) for rule in layer.include)
    return not any(_meets_test_phase(rule) for rule in layer.exclude)


def data_layers_in_test(net):
    """The data layers (ImageData or Data) a TEST-phase net instantiates."""
    return [layer for layer in net.layer if layer.type in ("ImageData", "Data") and runs_in_test(layer)]


def deploy_input(net):
    """(input blob name, (C, H, W)) of a deploy NetParameter: `input:` fields or an Input layer."""
    if len(net.input):
        dims = net.input_shape[0].dim if len(net.input_shape) else net.input_dim[:4]
        return net.input[0], tuple(int(d) for d in dims[1:])
    for layer in net.layer:
        if layer.type == "Input":
            return layer.top[0], tuple(int(d) for d in layer.input_param.shape[0].dim[1:])
    raise UserError(f"net '{net.name}' has no input blob (no `input:` and no Input layer); give a deploy prototxt")


def check_weights(net_file, weights):
    """Refuses weights Caffe could not load into the net (it would abort) or that load nothing."""
    from emotiw.weights import weights_report

    if not Path(weights).is_file():
        raise UserError(f"weights file {weights} not found; pass the trained .caffemodel with --weights")
    report = weights_report(str(net_file), weights)
    if not report.loadable or not report.loaded:
        print("\n".join(report.lines()), file=sys.stderr)
        raise UserError(f"{weights} does not fit {net_file}: {report.verdict}")
    if report.untrained:
        print(f"warning: {report.verdict}", file=sys.stderr)


# ------------------------------------------------------------------------------------------
# Preprocessing

@dataclass(frozen=True, eq=False)
class Preprocessing:
    """Caffe's test-time transform of one image: read, resize, subtract the mean, centre crop, scale."""
    channels: int
    resize: tuple = None      # (height, width) or None: keep the image size
    crop: tuple = None        # (height, width) centre crop or None
    mean: np.ndarray = None   # float32 BGR means (C,), or a (C, H, W) mean image
    scale: float = 1.0

    def describe(self):
        mean = self.mean
        if mean is not None:
            mean = (mean.tolist() if mean.ndim == 1 else
                    f"mean image {list(mean.shape)} sha256 {hashlib.sha256(mean.tobytes()).hexdigest()[:16]}")
        return {"channels": self.channels, "resize": self.resize, "crop": self.crop, "mean": mean,
                "scale": self.scale}

    def load(self, path):
        """The CHW float32 input for one image file, or None when it cannot be read."""
        import cv2

        flag = cv2.IMREAD_COLOR if self.channels == 3 else cv2.IMREAD_GRAYSCALE
        image = cv2.imread(str(path), flag)
        if image is None:
            return None
        if self.resize and image.shape[:2] != tuple(self.resize):
            image = cv2.resize(image, (self.resize[1], self.resize[0]))  # bilinear, as ImageData and DSN
        image = image.reshape(image.shape[0], image.shape[1], self.channels).transpose(2, 0, 1)
        blob = image.astype(np.float32)
        if self.mean is not None:
            blob -= self._mean_for(blob.shape, path)
        if self.crop:
            # Caffe subtracts a mean file at the crop's offset, the same as subtracting before cropping
            top, left = (blob.shape[1] - self.crop[0]) // 2, (blob.shape[2] - self.crop[1]) // 2
            if top < 0 or left < 0:
                raise UserError(f"{path}: image {blob.shape[1]}x{blob.shape[2]} is smaller than the crop "
                                f"{self.crop[0]}x{self.crop[1]}")
            blob = blob[:, top:top + self.crop[0], left:left + self.crop[1]]
        return blob * np.float32(self.scale) if self.scale != 1 else blob

    def _mean_for(self, shape, path):
        mean = self.mean
        if mean.ndim == 1:
            return mean[:, None, None]
        if mean.shape != shape:
            raise UserError(f"{path}: the mean file is {list(mean.shape)} but the image is {list(shape)} "
                            "before cropping; use a mean file of the input size or --preprocess none")
        return mean


def read_mean_file(path):
    """A mean.binaryproto as a (C, H, W) array."""
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"mean file {path} not found; give one with --mean-file")
    blob = caffe_pb2().BlobProto()
    try:
        blob.ParseFromString(path.read_bytes())
    except DecodeError:
        raise UserError(f"{path} is not a Caffe mean.binaryproto") from None
    legacy = (blob.num, blob.channels, blob.height, blob.width)
    shape = tuple(blob.shape.dim) if len(blob.shape.dim) else legacy
    values = np.asarray(blob.data, dtype=np.float32)
    if values.size == 0 or values.size != np.prod(shape):
        raise UserError(f"{path}: {values.size} values for a blob of shape {list(shape)}; not a mean file")
    return values.reshape(shape[-3:])


def _find_mean_file(name, prototxt):
    """A mean_file named in a prototxt: as Caffe finds it (working directory), else from the repo."""
    for candidate in (Path(name), REPO / name):
        if candidate.is_file():
            return candidate
    raise UserError(f"mean file {name} (from {prototxt}) not found; give it with --mean-file")


def dsn_preprocessing(input_shape):
    if tuple(input_shape) != (3, DSN_CROP, DSN_CROP):
        raise UserError(f"DSN preprocessing makes 3x{DSN_CROP}x{DSN_CROP} inputs but the net takes "
                        f"{'x'.join(map(str, input_shape))}; use --preprocess sse or none")
    return Preprocessing(channels=3, resize=(DSN_RESIZE, DSN_RESIZE), crop=(DSN_CROP, DSN_CROP), mean=np.array(DSN_MEAN, dtype=np.float32))


def sse_preprocessing(deploy, input_shape, mean_file=None):
    """The transform of the TEST data layer in the test.prototxt beside the deploy file."""
    channels, height, width = input_shape
    test_file = Path(deploy).parent / "test.prototxt"
    layers = data_layers_in_test(read_net_param(test_file)) if test_file.is_file() else []
    if not layers and mean_file is None:
        raise UserError(f"SSE preprocessing takes the mean from {test_file}, which has no TEST data layer "
                        "or is missing; pass --mean-file, or use --preprocess none")
    transform = layers[0].transform_param if layers else None
    images = layers[0].image_data_param if layers and layers[0].type == "ImageData" else None
    crop = (transform.crop_size,) * 2 if transform is not None and transform.crop_size else None
    resize = (images.new_height, images.new_width) if images is not None and images.new_height else None
    if crop is None and resize is None:
        resize = (height, width)  # the released test nets read faces already at the input size
    if mean_file is not None:
        mean = read_mean_file(mean_file)
    elif transform.mean_file:
        mean = read_mean_file(_find_mean_file(transform.mean_file, test_file))
    else:
        mean = np.asarray(transform.mean_value, dtype=np.float32) if len(transform.mean_value) else None
    scale = transform.scale if transform is not None else 1.0
    return Preprocessing(channels=channels, resize=resize, crop=crop, mean=mean, scale=float(scale))


def choose_preprocessing(kind, deploy, input_shape, mean_file=None):
    if kind == "dsn":
        chosen = dsn_preprocessing(input_shape)
    elif kind == "sse":
        chosen = sse_preprocessing(deploy, input_shape, mean_file)
    else:
        chosen = Preprocessing(channels=input_shape[0], resize=tuple(input_shape[1:]))
    out_size = chosen.crop or chosen.resize
    if out_size is not None and tuple(out_size) != tuple(input_shape[1:]):
        raise UserError(f"{kind} preprocessing makes {out_size[0]}x{out_size[1]} inputs but the net takes "
                        f"{input_shape[1]}x{input_shape[2]}; use another --preprocess")
    return chosen


# ------------------------------------------------------------------------------------------
# Backends: forward a (N, C, H, W) batch, return {blob: (N, values per image)}

class CaffeBackend:
    def __init__(self, deploy, weights):
        from emotiw.caffe_env import import_caffe

        caffe = import_caffe()
        caffe.set_mode_cpu()
        self.net = caffe.Net(str(deploy), caffe.TEST, weights=str(weights))
        self.input = self.net.inputs[0]
        self.input_shape = tuple(self.net.blobs[self.input].data.shape[1:])
        self.blob_names = list(self.net.blobs)

    def forward(self, batch, blobs):
        data = self.net.blobs[self.input]
        data.reshape(*batch.shape)
        data.data[...] = batch
        self.net.forward()
        return {name: self.net.blobs[name].data.reshape(len(batch), -1).copy() for name in blobs}


class OpenCVBackend:
    """cv2.dnn, which asks for layer outputs: a blob is read from the last layer that writes it."""

    def __init__(self, deploy, weights):
        import cv2

        param = read_net_param(deploy)
        self.input, self.input_shape = deploy_input(param)
        self.producers = {top: layer.name for layer in param.layer for top in layer.top}
        self.blob_names = list(self.producers)
        try:
            self.net = cv2.dnn.readNetFromCaffe(str(deploy), str(weights))
        except cv2.error as error:
            reason = str(error).strip().splitlines()[-1]
            raise UserError(f"OpenCV DNN cannot load {deploy}: {reason}; use --backend caffe") from None
        self.net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        self.net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)

    def forward(self, batch, blobs):
        self.net.setInput(batch)
        outputs = self.net.forward([self.producers[name] for name in blobs])
        return {name: np.asarray(out).reshape(len(batch), -1).copy() for name, out in zip(blobs, outputs)}


def auto_backend(net):
    """The faster backend for a registered net on the CPU, as `make bench` measured it (bench/NOTES.md):
    pycaffe (Caffe's im2col + OpenBLAS GEMM) for the ResNet nets, whose 1x1 and large-kernel
    convolutions are GEMMs (1.5-1.8x OpenCV); OpenCV DNN for VGG-Face, DenseNet-121 and HoloNet,
    where its own 3x3 convolution kernels win (1.5-1.9x pycaffe). pycaffe, the reference, for
    nets outside the registry. Both give the same scores (tests/test_opencv_registry.py)."""
    try:
        from emotiw import nets
        backbone = nets.get(net_name(net)).backbone
    except (ImportError, UserError):
        return "caffe"
    return "caffe" if "ResNet" in backbone else "opencv"


def make_backend(kind, net, deploy, weights):
    """The backend object for `net` and the name of the backend it is (auto resolved; pycaffe when
    OpenCV cannot load a net that auto gave it)."""
    if kind == "auto":
        kind = auto_backend(net)
        if kind == "opencv":
            try:
                return OpenCVBackend(deploy, weights), kind
            except UserError:
                kind = "caffe"
    return {"caffe": CaffeBackend, "opencv": OpenCVBackend}[kind](deploy, weights), kind


# ------------------------------------------------------------------------------------------
# Frame scoring with a resumable checkpoint

def file_identity(path):
    stat = Path(path).stat()
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


def run_signature(deploy, weights, backend, blobs, preprocessing, frames):
    """What the frame scores depend on; a checkpoint from another run is not reused."""
    description = [file_identity(deploy), file_identity(weights), backend, list(blobs),
                   preprocessing.describe(), [str(frame) for frame in frames]]
    return hashlib.sha256(json.dumps(description, default=str).encode()).hexdigest()


def _load_checkpoint(path, signature, scores, readable):
    """Fills `scores`/`readable` from a checkpoint of the same run; returns the frames already done."""
    if not path.is_file():
        return 0
    with np.load(path) as saved:
        if str(saved["signature"]) != signature:
            return 0
        done = int(saved["done"])
        readable[:done] = saved["readable"][:done]
        for index, rows in enumerate(scores.values()):
            rows[:done] = saved[f"blob{index}"][:done]
    return done


def _save_checkpoint(path, signature, done, scores, readable):
    arrays = {f"blob{index}": rows[:done] for index, rows in enumerate(scores.values())}
    with atomic_open(path, "wb") as handle:
        np.savez(handle, signature=signature, done=done, readable=readable[:done], **arrays)


def score_frames(backend, preprocessing, frames, blobs, batch_size, checkpoint=None, signature=""):
    """Per-frame rows of every blob (NaN rows for unreadable images) and the readable mask.

    With a checkpoint path, progress is saved every CHECKPOINT_SECONDS and a rerun resumes there."""
    from tqdm import tqdm

    probe = backend.forward(np.zeros((1, *backend.input_shape), dtype=np.float32), blobs)
    scores = {name: np.full((len(frames), probe[name].shape[1]), np.nan) for name in blobs}
    readable = np.zeros(len(frames), dtype=bool)
    done = _load_checkpoint(checkpoint, signature, scores, readable) if checkpoint else 0
    saved_at = time.monotonic()
    with tqdm(total=len(frames), initial=done, unit="frame", desc="frames", disable=None) as bar:
        for start in range(done, len(frames), batch_size):
            chunk = frames[start:start + batch_size]
            images = [preprocessing.load(path) for path in chunk]
            ok = np.array([image is not None for image in images])
            if ok.any():
                outputs = backend.forward(np.stack([image for image in images if image is not None]), blobs)
                for name in blobs:
                    scores[name][start:start + len(chunk)][ok] = outputs[name]
            readable[start:start + len(chunk)] = ok
            bar.update(len(chunk))
            if checkpoint and time.monotonic() - saved_at > CHECKPOINT_SECONDS:
                _save_checkpoint(checkpoint, signature, start + len(chunk), scores, readable)
                saved_at = time.monotonic()
    return scores, readable


# ------------------------------------------------------------------------------------------
# Clip scores and metrics

def class_prior(train_list):
    """Label frequencies of a training list (frames or clips, `<path> <label>` per line)."""
    _, labels = read_video_list(train_list)
    known = labels[labels != UNKNOWN_LABEL] if labels is not None else np.array([], dtype=int)
    if len(known) == 0:
        raise UserError(f"{train_list}: no labels, so no class prior; give a labelled training list")
    return np.bincount(known, minlength=len(EMOTIONS)) / len(known)


def fallback_row(width, prior):
    """Scores for a clip with no face frame: the prior when the blob has one value per class."""
    return prior if width == len(prior) else np.full(width, 1.0 / width)


def aggregate(clips, frame_scores, readable, how, prior):
    """(clip scores, faces per clip): mean or sum of each clip's readable frame rows, or the fallback."""
    width = frame_scores.shape[1]
    clip_scores = np.empty((len(clips), width))
    faces = np.zeros(len(clips), dtype=np.int64)
    start = 0
    for index, clip in enumerate(clips):
        stop = start + len(clip.frames)
        rows = frame_scores[start:stop][readable[start:stop]]
        faces[index] = len(rows)
        if len(rows):
            clip_scores[index] = rows.sum(axis=0) if how == "sum" else rows.mean(axis=0)
        else:
            clip_scores[index] = fallback_row(width, prior)
        start = stop
    return clip_scores, faces


def classification_metrics(labels, predictions, num_classes=len(EMOTIONS)):
    """Accuracy, per-class accuracy (recall), macro F1 over the classes present, confusion matrix."""
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    true_positives = np.diag(confusion)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    present = (support + predicted) > 0
    f1 = 2 * true_positives[present] / (support[present] + predicted[present])
    return {
        "accuracy": float(true_positives.sum() / len(labels)),
        "per_class_accuracy": {EMOTIONS[c]: (float(true_positives[c] / support[c]) if support[c] else None)
                               for c in range(num_classes)},
        "macro_f1": float(f1.mean()),
        "confusion_matrix": confusion.tolist(),
    }


def clip_metrics(labels, clip_scores, faces):
    """metrics.json's scores, over the labelled clips; None when the list has no label."""
    labelled = labels != UNKNOWN_LABEL
    if not labelled.any():
        return None
    predictions = clip_scores.argmax(axis=1)
    metrics = classification_metrics(labels[labelled], predictions[labelled])
    with_face = labelled & (faces > 0)
    metrics["accuracy_with_faces"] = (float((predictions[with_face] == labels[with_face]).mean())
                                      if with_face.any() else None)
    metrics["labelled_clips"] = int(labelled.sum())
    metrics["labelled_clips_with_faces"] = int(with_face.sum())
    return metrics


def plot_confusion(confusion, path, title):
    from matplotlib.figure import Figure

    confusion = np.asarray(confusion)
    figure = Figure(figsize=(6.5, 5.5))
    axes = figure.add_subplot()
    image = axes.imshow(confusion, cmap="Blues")
    figure.colorbar(image, ax=axes)
    ticks = range(len(EMOTIONS))
    axes.set_xticks(ticks, EMOTIONS, rotation=45, ha="right")
    axes.set_yticks(ticks, EMOTIONS)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    threshold = confusion.max() / 2 if confusion.size else 0
    for (row, column), count in np.ndenumerate(confusion):
        axes.text(column, row, str(count), ha="center", va="center",
                  color="white" if count > threshold else "black")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)


# ------------------------------------------------------------------------------------------
# Outputs

def blob_scores_name(blob):
    """File of an extra blob's clip scores: scores_<blob>.txt with a file-name-safe blob name."""
    return "scores_" + re.sub(r"[^A-Za-z0-9_.-]", "_", blob) + ".txt"


def write_frames_csv(path, clips, scores, readable, blobs):
    extras = blobs[1:]
    header = ["clip", "frame", "readable", "prediction", *EMOTIONS]
    for name in extras:
        header += [f"{name}_{index}" for index in range(scores[name].shape[1])]
    frame = 0
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        for clip in clips:
            for path_of_frame in clip.frames:
                values = [scores[name][frame] for name in blobs]
                if readable[frame]:
                    cells = [int(values[0].argmax())] + [format_score(v) for row in values for v in row]
                else:
                    cells = [""] * (1 + sum(len(row) for row in values))
                writer.writerow([clip.entry, str(path_of_frame), int(readable[frame]), *cells])
                frame += 1


def report_problems(clips, frames, readable):
    """Names the clips that gave no frame and the unreadable images; returns them for metrics.json."""
    problems = {kind: [clip.entry for clip in clips if clip.problem == kind] for kind in ("missing", "empty")}
    unreadable = [str(path) for path, ok in zip(frames, readable) if not ok]
    for kind, what in (("missing", "clip folder(s) missing"), ("empty", "clip folder(s) without face frames")):
        entries = problems[kind]
        if entries:
            more = f" and {len(entries) - SHOWN_PROBLEMS} more" if len(entries) > SHOWN_PROBLEMS else ""
            print(f"warning: {len(entries)} {what}: {', '.join(entries[:SHOWN_PROBLEMS])}{more}", file=sys.stderr)
    if unreadable:
        print(f"warning: {len(unreadable)} frame image(s) could not be read, e.g. {unreadable[0]}", file=sys.stderr)
    return {"missing_folders": problems["missing"], "empty_folders": problems["empty"],
            "unreadable_frames": unreadable}


def compact_json(value):
    """Indented JSON with every list of numbers on one line (confusion rows stay readable)."""
    text = json.dumps(value, indent=2)
    return re.sub(r"\[\s+([-+.\deE,\s]+?)\s+\]", lambda match: "[" + " ".join(match.group(1).split()) + "]",
                  text) + "\n"


def write_outputs(out_dir, clips, blobs, scores, readable, clip_scores, faces, metrics, config):
    out_dir.mkdir(parents=True, exist_ok=True)
    primary = blobs[0]
    write_scores_txt(out_dir / "scores.txt", clip_scores[primary])
    for name in blobs[1:]:
        write_scores_txt(out_dir / blob_scores_name(name), clip_scores[name])
    labels = [clip.label for clip in clips]
    write_predictions_csv(out_dir / "predictions.csv", [clip.entry for clip in clips], labels,
                          clip_scores[primary], n_frames=faces, fallback=faces == 0)
    write_frames_csv(out_dir / "frames.csv", clips, scores, readable, blobs)
    atomic_write_text(out_dir / "metrics.json", compact_json({**metrics, "config": config}))
    if metrics.get("confusion_matrix") is not None:
        plot_confusion(metrics["confusion_matrix"], out_dir / "confusion.png",
                       f"{config['net_name']}: accuracy {metrics['accuracy']:.4f}")


def evaluate_videos(net, weights, videos, out_dir, backend="auto", batch=16, agg="mean", blobs=("prob",),
                    preprocess=None, mean_file=None, prior_list=None):
    """Tests a net on every clip of a video list and writes the outputs into out_dir; returns metrics."""
    blobs = list(dict.fromkeys(blobs))
    if batch < 1:
        raise UserError(f"--batch must be at least 1, not {batch}")
    deploy = resolve_net_file(net, "deploy")
    clips = read_clips(videos)
    prior = class_prior(prior_list) if prior_list else np.full(len(EMOTIONS), 1.0 / len(EMOTIONS))
    check_weights(deploy, weights)
    runner, backend = make_backend(backend, net, deploy, weights)
    unknown = [name for name in blobs if name not in runner.blob_names]
    if unknown:
        raise UserError(f"no blob {', '.join(unknown)} in {deploy}; blobs: {', '.join(runner.blob_names)}")
    kind = preprocess or net_paper(net)
    preprocessing = choose_preprocessing(kind, deploy, runner.input_shape, mean_file)
    frames = [frame for clip in clips for frame in clip.frames]
    out_dir = Path(out_dir)
    checkpoint = out_dir / CHECKPOINT_NAME
    signature = run_signature(deploy, weights, backend, blobs, preprocessing, frames)
    scores, readable = score_frames(runner, preprocessing, frames, blobs, batch, checkpoint, signature)
    if scores[blobs[0]].shape[1] != len(EMOTIONS):
        raise UserError(f"blob {blobs[0]} has {scores[blobs[0]].shape[1]} values per frame; the first "
                        f"--blobs entry must hold the {len(EMOTIONS)} class scores (e.g. prob)")
    clip_scores, faces = {}, None
    for name in blobs:
        clip_scores[name], faces = aggregate(clips, scores[name], readable, agg, prior)
    labels = np.array([clip.label for clip in clips], dtype=np.int64)
    metrics = {"clips": len(clips), "clips_with_faces": int((faces > 0).sum()),
               "fallback_clips": int((faces == 0).sum()), "frames": len(frames),
               **(clip_metrics(labels, clip_scores[blobs[0]], faces) or {"accuracy": None})}
    metrics["blob_accuracy"] = {name: clip_metrics(labels, clip_scores[name], faces)["accuracy"]
                                for name in blobs[1:]
                                if clip_scores[name].shape[1] == len(EMOTIONS) and metrics["accuracy"] is not None}
    metrics.update(report_problems(clips, frames, readable))
    config = {"net": str(deploy), "net_name": net_name(net), "weights": str(weights), "videos": str(videos),
              "backend": backend, "batch": batch, "aggregation": agg, "blobs": blobs, "preprocess": kind,
              "preprocessing": preprocessing.describe(),
              "fallback": f"class prior of {prior_list}" if prior_list else "uniform",
              "fallback_scores": prior.tolist()}
    write_outputs(out_dir, clips, blobs, scores, readable, clip_scores, faces, metrics, config)
    checkpoint.unlink(missing_ok=True)
    return metrics


# ------------------------------------------------------------------------------------------
# CLI

def register(subparsers):
    parser = subparsers.add_parser(
        "test", help="per-video testing of a deploy net on every face frame",
        description="Runs every face frame of every clip of a video list (`<clip frame folder> <label>` "
                    "per line) through a deploy net, aggregates the frame scores per clip and writes "
                    "scores.txt, predictions.csv, frames.csv, metrics.json and confusion.png.")
    parser.add_argument("--net", required=True, help="registered net name (prototxt/NAME/deploy.prototxt) "
                                                     "or a deploy.prototxt path")
    parser.add_argument("--weights", required=True, type=Path, metavar="FILE.caffemodel")
    parser.add_argument("--videos", required=True, type=Path, metavar="LIST", help="video list")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="caffe (pycaffe), opencv (OpenCV DNN) or auto (default): the one `make bench` "
                             "measured faster for the net: pycaffe for the ResNet nets and nets outside the "
                             "registry, OpenCV for the others")
    parser.add_argument("--batch", type=int, default=16, help="frames per forward pass (default 16)")
    parser.add_argument("--agg", choices=AGGREGATIONS, default="mean",
                        help="per-clip aggregation of frame scores (DSN used sum; default mean)")
    parser.add_argument("--blobs", default="prob",
                        help="comma-separated blobs; the first gives scores.txt (default prob), the others "
                             "scores_<blob>.txt")
    parser.add_argument("--preprocess", choices=PREPROCESSING_KINDS,
                        help="default: the net's paper (sse_* nets: sse, others: dsn)")
    parser.add_argument("--mean-file", type=Path, help="mean.binaryproto for SSE preprocessing")
    parser.add_argument("--prior-list", type=Path, metavar="TRAINLIST",
                        help="training list whose class prior scores clips without a face (default uniform)")
    parser.set_defaults(func=run)


def run(args):
    metrics = evaluate_videos(args.net, args.weights, args.videos, args.out, backend=args.backend,
                              batch=args.batch, agg=args.agg, blobs=[b for b in args.blobs.split(",") if b],
                              preprocess=args.preprocess, mean_file=args.mean_file, prior_list=args.prior_list)
    print(f"{summary_line(metrics)}; outputs in {args.out}")
    return 0


def summary_line(metrics):
    parts = [f"{metrics['clips']} clips ({metrics['fallback_clips']} without a face)"]
    if metrics["accuracy"] is not None:
        parts.append(f"accuracy {metrics['accuracy']:.4f}")
        if metrics["accuracy_with_faces"] is not None:
            parts.append(f"on clips with faces {metrics['accuracy_with_faces']:.4f}")
        parts.append(f"macro F1 {metrics['macro_f1']:.4f}")
    return ", ".join(parts)
