"""`emotiw demo`: the whole pipeline on generated clips, CPU only, in a few minutes.

Stages, each a stage function of the API called in this process (the report lists the equivalent
`emotiw` command lines, so each step can be repeated by hand):
  1. demo-data   labelled clips of scikit-image's faces with per-class expressions and espeak-ng
                 speech in per-class voices (emotiw.demo.data)
  2. preprocess  MTCNN, main-subject tracking, `sse` alignment to small crops, lists, the train mean
  3. train       two SSE-HoloNet variants with the `caffe train` binary, few iterations
  4. test        per-video testing of each model on val and test (`--backend auto`: pycaffe here)
  5. extract     each model's `prob` with Caffe's extract_features into LevelDB, then .mat (leveldb2mat)
  6. features    SSE's two other models: openSMILE functionals of the sound and LBP-TOP of the face
                 crops, each classified by a Caffe net (trained, then tested like the CNNs)
  7. fuse        all four models: weights searched on val and applied to test, and SSE's submitted
                 weights (1, 1, 1, 4, 7) beside them
  8. report      OUT/report.md with the accuracy table, training curves and confusion matrices

Everything goes under OUT/work (default demo/work); a stage whose outputs exist is skipped, so an
interrupted demo started again goes on where it stopped. The settings are stored in
OUT/work/demo.json; a run with other settings needs another --work.
"""

import csv
import json
import shlex
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from emotiw import EMOTIONS
from emotiw.demo.data import SPLITS, generate
from emotiw.errors import UserError
from emotiw.face.video import iter_frames
from emotiw.formats.files import atomic_path, atomic_write_text
from emotiw.metrics import classification_metrics, plot_confusion
from emotiw.stages.extract import extract
from emotiw.stages.features import features
from emotiw.stages.fuse import fuse
from emotiw.stages.preprocess import preprocess
from emotiw.stages.test import test
from emotiw.stages.train import newest_solverstate, train

NETS = ("sse_holonet_3conv-s_concat", "sse_holonet_3conv-s_eltwise")
# SSE's hand-crafted and audio models, in the order of its fusion weights (CNNs 1, 1, 1, then 4, 7)
DESCRIPTORS = ("lbptop", "audio")
# SSE's submitted weights with the demo's two CNNs in the places of SSE's three (weight 1 each)
SSE_WEIGHTS = {"cnn": 1.0, "lbptop": 4.0, "audio": 7.0}
EVALUATED = ("val", "test")
VAL_BATCH = 50  # validation frames per test batch while training


@dataclass(frozen=True)
class Config:
    """What decides the demo's results; stored in WORK/demo.json."""
    seed: int = 0
    clips: tuple = (40, 5, 5)   # clips per class in train, val, test
    frames: int = 8             # frames per clip
    frame_size: tuple = (160, 120)
    strength: float = 1.0       # expression strength (emotiw demo-data --strength)
    face_size: int = 48         # aligned crop side = the nets' input size
    nets: tuple = NETS
    max_iter: int = 300
    batch_size: int = 32
    test_interval: int = 100
    bn_moving_average_fraction: float = 0.9  # see docs/demo.md
    audio_net: str = "audio_mlp"         # the classifier of the openSMILE functionals
    lbptop_net: str = "audio_linear_svm"  # the classifier of the LBP-TOP histograms
    descriptor_max_iter: int = 1000


# --quick: enough to run every stage and write the report, not to learn much (tests use it).
QUICK = Config(clips=(3, 1, 1), frames=4, max_iter=6, batch_size=8, test_interval=3, descriptor_max_iter=20)


def command_flags(options):
    """Keyword arguments as the CLI's flags: `--name value`, True as a bare flag, False and None left out."""
    flags = []
    for name, value in options.items():
        if value is None or value is False:
            continue
        flags.append("--" + name.replace("_", "-"))
        if value is not True:
            flags += value if isinstance(value, list) else [value]
    return flags


def shown(arg):
    """A command-line argument as the report shows it: paths under the working directory relative."""
    if isinstance(arg, Path) and arg.is_absolute() and arg.is_relative_to(Path.cwd()):
        return str(arg.relative_to(Path.cwd()))
    return str(arg)


class Demo:
    def __init__(self, out, work, config):
        self.out = Path(out)
        self.work = Path(work)
        self.config = config
        self.commands = []  # (stage, command line) of every command this demo needs
        self.timings = {}

    # ---------------------------------------------------------------- paths

    @property
    def data(self):
        return self.work / "data"

    @property
    def faces(self):
        return self.work / "faces"

    @property
    def mean_file(self):
        return self.faces / "lmdb" / "train_mean.binaryproto"

    def frame_list(self, split):
        return self.faces / "lists" / f"{split}.txt"

    def video_list(self, split):
        return self.faces / "lists" / f"{split}_videos.txt"

    def train_dir(self, model):
        return self.work / "train" / model

    def net_of(self, model):
        """The registered net of a model: a CNN's name is its net's, a descriptor's is its kind."""
        return {"audio": self.config.audio_net, "lbptop": self.config.lbptop_net}.get(model, model)

    def model(self, model):
        iterations = self.config.descriptor_max_iter if model in DESCRIPTORS else self.config.max_iter
        return self.train_dir(model) / "snapshots" / f"{self.net_of(model)}_iter_{iterations}.caffemodel"

    def test_dir(self, model, split):
        return self.work / "test" / model / split

    def descriptors(self, kind, split):
        """The HDF5Data source of a split's descriptors."""
        return self.work / "descriptors" / kind / f"{split}.txt"

    @property
    def models(self):
        return (*self.config.nets, *DESCRIPTORS)

    def scores(self, model, split):
        """The score file fusion reads: the CNNs' extracted .mat, the descriptor models' test output."""
        if model in DESCRIPTORS:
            return str(self.test_dir(model, split) / "predictions.csv")
        return f"{self.features(model, split)}:video_feats"

    def features(self, net, split):
        return self.work / "features" / net / split / "features.mat"

    # ---------------------------------------------------------------- running

    def command(self, stage, argv, call, done):
        """Calls the stage function `call` unless `done` (its outputs exist); `argv` is the equivalent
        `emotiw` command line, which the report lists."""
        line = "emotiw " + shlex.join(shown(arg) for arg in argv)
        self.commands.append((stage, line))
        if done:
            print(f"[demo] {stage}: done before, skipped ({line})", flush=True)
            return
        print(f"[demo] {stage}: {line}", flush=True)
        started = time.monotonic()
        call()
        self.timings[stage] = self.timings.get(stage, 0.0) + time.monotonic() - started
        self.save_timings()  # after every stage: a run that fails later keeps them

    def save_timings(self):
        """WORK/timings.json: the seconds of every stage run so far, by this run or earlier ones."""
        path = self.work / "timings.json"
        timings = {**(read_json(path) if path.is_file() else {}), **self.timings}
        atomic_write_text(path, json.dumps(timings, indent=2) + "\n")

    def run(self):
        started = time.monotonic()
        self.work.mkdir(parents=True, exist_ok=True)
        self.check_config()
        self.make_data()
        self.preprocess()
        for net in self.config.nets:
            self.train(net)
        for net in self.config.nets:
            for split in EVALUATED:
                self.test(net, split)
                self.extract(net, split)
        for kind in DESCRIPTORS:
            for split in SPLITS:
                self.describe(kind, split)
            self.train_descriptor(kind)
            for split in EVALUATED:
                self.test_descriptor(kind, split)
        self.fuse("searched")
        self.fuse("sse")
        self.timings["total (this run)"] = time.monotonic() - started
        self.save_timings()
        return write_report(self)

    def check_config(self):
        path = self.work / "demo.json"
        wanted = json.dumps(asdict(self.config), indent=2) + "\n"
        if path.exists() and path.read_text() != wanted:
            raise UserError(f"{self.work} holds a demo run with other settings ({path}); "
                            f"remove it or give another --work")
        atomic_write_text(path, wanted)

    # ---------------------------------------------------------------- stages

    def make_data(self):
        c = self.config
        self.command("demo-data", ["demo-data", "--out", self.data, "--seed", c.seed,
                                   "--clips-per-class", ",".join(map(str, c.clips)), "--frames", c.frames,
                                   "--size", "x".join(map(str, c.frame_size)), "--strength", c.strength],
                     lambda: generate(self.data, seed=c.seed, clips=c.clips, frames=c.frames, size=c.frame_size,
                                      strength=c.strength),
                     done=(self.data / "clips.csv").is_file())

    def preprocess(self):
        for split in SPLITS:
            argv = ["preprocess", "--videos", self.data / split, "--split", split, "--out", self.faces,
                    "--mode", "sse", "--size", self.config.face_size]
            done = self.video_list(split).is_file()
            lmdb = split == "train"  # the LMDB's mean image is the nets' mean file
            if lmdb:
                argv.append("--lmdb")
                done = done and self.mean_file.is_file()
            self.command(f"preprocess {split}", argv,
                         lambda split=split, lmdb=lmdb: preprocess(self.faces, videos=self.data / split, split=split,
                                                                   mode="sse", size=self.config.face_size, lmdb=lmdb),
                         done)

    def shuffled_val_list(self):
        """The released SSE train_val normalises with batch statistics in the TEST phase too, so a
        validation batch of one or two classes (the list is sorted by clip) would be scored wrongly:
        training validates on a shuffled copy of the list."""
        path = self.work / "train" / "val_shuffled.txt"
        if not path.is_file():
            lines = self.frame_list("val").read_text().splitlines(keepends=True)
            order = np.random.default_rng(self.config.seed).permutation(len(lines))
            atomic_write_text(path, "".join(lines[i] for i in order))
        return path

    def train(self, net):
        c = self.config
        val_frames = len(self.frame_list("val").read_text().splitlines())
        options = dict(train=self.frame_list("train"), val=self.shuffled_val_list(), out=self.train_dir(net),
                       mean=self.mean_file, input_size=c.face_size, batch_size=c.batch_size,
                       test_batch_size=VAL_BATCH, test_iter=-(-val_frames // VAL_BATCH),
                       test_interval=c.test_interval, max_iter=c.max_iter, snapshot=c.max_iter,
                       display=max(1, c.test_interval // 5), seed=c.seed + 1,
                       bn_moving_average_fraction=c.bn_moving_average_fraction)
        # an interrupted run left a snapshot: go on from it
        options["resume"] = not self.model(net).is_file() and newest_solverstate(self.train_dir(net)) is not None
        self.command(f"train {net}", ["train", net, *command_flags(options)], lambda: train(net, **options),
                     done=self.model(net).is_file())

    def test(self, net, split):
        options = dict(net=self.train_dir(net) / "deploy.prototxt", weights=self.model(net),
                       videos=self.video_list(split), out=self.test_dir(net, split), mean_file=self.mean_file,
                       prior_list=self.frame_list("train"))
        self.command(f"test {net} {split}", ["test", *command_flags(options)], lambda: test(**options),
                     done=(options["out"] / "metrics.json").is_file())

    def extract(self, net, split):
        features = self.features(net, split)
        options = dict(net=self.train_dir(net) / "test.prototxt", weights=self.model(net),
                       videos=self.video_list(split), blob="prob", out=features.parent)
        self.command(f"extract {net} {split}", ["extract", *command_flags(options)],
                     lambda: extract(options["net"], options["weights"], options["out"], blob="prob",
                                     video_list=options["videos"]),
                     done=features.is_file())

    def describe(self, kind, split):
        source = self.descriptors(kind, split)
        inputs = dict(videos=self.data / split) if kind == "audio" else dict(faces=self.faces)
        options = dict(kind=kind, **inputs, split=split, out=source.parent.parent)
        self.command(f"features {kind} {split}", ["features", *command_flags(options)],
                     lambda: features(**options), done=source.is_file())

    def train_descriptor(self, kind):
        c = self.config
        val_clips = len(self.video_list("val").read_text().splitlines())
        options = dict(train=self.descriptors(kind, "train"), val=self.descriptors(kind, "val"),
                       out=self.train_dir(kind), batch_size=32, test_batch_size=val_clips, test_iter=1,
                       test_interval=max(1, c.descriptor_max_iter // 10), max_iter=c.descriptor_max_iter,
                       snapshot=c.descriptor_max_iter, display=max(1, c.descriptor_max_iter // 50), seed=c.seed + 1)
        net = self.net_of(kind)
        self.command(f"train {kind}", ["train", net, *command_flags(options)], lambda: train(net, **options),
                     done=self.model(kind).is_file())

    def test_descriptor(self, kind, split):
        options = dict(net=self.train_dir(kind) / "deploy.prototxt", weights=self.model(kind),
                       videos=self.descriptors(kind, split), out=self.test_dir(kind, split))
        self.command(f"test {kind} {split}", ["test", *command_flags(options)], lambda: test(**options),
                     done=(options["out"] / "metrics.json").is_file())

    def fusion_dir(self, weighting):
        return self.work / "fusion" / weighting

    def sse_weights(self):
        return [SSE_WEIGHTS.get(model, SSE_WEIGHTS["cnn"]) for model in self.models]

    def fuse(self, weighting):
        """`searched`: weights searched on val; `sse`: SSE's submitted weights."""
        scores = [self.scores(model, "test") for model in self.models]
        options = dict(val_scores=[self.scores(model, "val") for model in self.models],
                       val_labels=self.video_list("val"), videos=self.video_list("test"), names=list(self.models),
                       out=self.fusion_dir(weighting))
        if weighting == "searched":
            options["search"] = True
        else:
            options["weights"] = self.sse_weights()
        self.command(f"fuse ({weighting} weights)", ["fuse", *scores, *command_flags(options)],
                     lambda: fuse(scores, **options), done=(options["out"] / "fusion.json").is_file())


# ---------------------------------------------------------------------------- the report

def read_json(path):
    return json.loads(Path(path).read_text())


def percent(value):
    return "-" if value is None else f"{100 * value:.1f}"


WEIGHTINGS = {"searched": "weights searched on val", "sse": "SSE's weights 1/1/1/4/7"}
DESCRIPTOR_TITLES = {"audio": "audio: openSMILE eGeMAPSv02", "lbptop": "hand-crafted: LBP-TOP"}


def fusion_confusion(demo, weighting):
    """Confusion matrix of the fused test predictions (predictions.csv of `emotiw fuse`)."""
    with open(demo.fusion_dir(weighting) / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    labels = np.array([int(row["label"]) for row in rows])
    predictions = np.array([int(row["prediction"]) for row in rows])
    return classification_metrics(labels, predictions)["confusion_matrix"]


def copy_figures(demo):
    """The report's PNGs beside it: training curves, test confusion matrices, sample frames."""
    figures = {}
    for model in demo.models:
        figures[f"curves_{model}"] = shutil.copyfile(demo.train_dir(model) / "curves.png",
                                                     demo.out / f"curves_{model}.png")
        figures[f"confusion_{model}"] = shutil.copyfile(demo.test_dir(model, "test") / "confusion.png",
                                                        demo.out / f"confusion_{model}_test.png")
    for weighting, title in WEIGHTINGS.items():
        fusion = read_json(demo.fusion_dir(weighting) / "fusion.json")
        path = demo.out / f"confusion_fusion_{weighting}_test.png"
        plot_confusion(fusion_confusion(demo, weighting), path,
                       f"fusion, {title}: test accuracy {fusion['test']['fusion']:.4f}")
        figures[f"confusion_fusion_{weighting}"] = path
    figures["samples"] = plot_samples(demo, demo.out / "samples.png")
    return figures


def plot_samples(demo, path):
    """One test clip per class: its middle frame and the aligned face crops of its frames."""
    import cv2
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 1.6 * len(EMOTIONS)))
    grid = figure.subplots(len(EMOTIONS), 2, gridspec_kw={"width_ratios": [1, 2.2]}, squeeze=False)
    for row, emotion in enumerate(EMOTIONS):
        clip = sorted((demo.data / "test" / emotion).glob("*.mp4"))[0]
        frames = [frame.image for frame in iter_frames(clip)]
        crops = sorted((demo.faces / "faces" / "test" / clip.stem).glob("*.png"))
        strip = [cv2.cvtColor(cv2.imread(str(crop)), cv2.COLOR_BGR2RGB) for crop in crops]
        grid[row, 0].imshow(frames[len(frames) // 2])
        if strip:
            grid[row, 1].imshow(np.hstack(strip))
        grid[row, 0].set_ylabel(emotion)
        for axes in grid[row]:
            axes.set_xticks([])
            axes.set_yticks([])
    grid[0, 0].set_title("a test clip (middle frame)", fontsize="small")
    grid[0, 1].set_title("its aligned faces (emotiw preprocess --mode sse)", fontsize="small")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=80)
    return path


def accuracy_table(demo):
    """Rows (name, val, test, val from .mat, test from .mat, searched weight, SSE weight); the .mat
    columns are None for the descriptor models, which have no frames to extract, and the weights
    None for the fusion rows."""
    fused = {weighting: read_json(demo.fusion_dir(weighting) / "fusion.json") for weighting in WEIGHTINGS}
    searched = fused["searched"]
    rows = []
    for index, model in enumerate(demo.models):
        tested = {split: read_json(demo.test_dir(model, split) / "metrics.json")["accuracy"] for split in EVALUATED}
        mat = ((None, None) if model in DESCRIPTORS else
               (searched["validation"]["models"][index], searched["test"]["models"][index]))
        rows.append((model, tested["val"], tested["test"], *mat, searched["models"][index]["unit_weight"],
                     fused["sse"]["models"][index]["unit_weight"]))
    for weighting in WEIGHTINGS:
        fusion = fused[weighting]
        rows.append((f"fusion ({weighting})", fusion["validation"]["fusion"], fusion["test"]["fusion"],
                     None, None, None, None))
    return rows


def tested_backends(demo):
    """The backends `emotiw test --backend auto` ran, from the metrics it wrote."""
    names = {"pycaffe": "pycaffe", "opencv": "OpenCV DNN"}
    used = {read_json(demo.test_dir(net, split) / "metrics.json")["config"]["backend"]
            for net in demo.config.nets for split in EVALUATED}
    return " and ".join(names[backend] for backend in sorted(used))


def data_summary(demo):
    with open(demo.data / "clips.csv", newline="") as handle:
        clips = list(csv.DictReader(handle))
    summary = read_json(demo.faces / "summary.json")  # of the last preprocess call; counts come from the lists
    scored = {split: len(demo.video_list(split).read_text().splitlines()) for split in SPLITS}
    frames = {split: len(demo.frame_list(split).read_text().splitlines()) for split in SPLITS}
    made = {split: sum(row["split"] == split for row in clips) for split in SPLITS}
    identities = sorted({row["identity"] for row in clips})
    return made, scored, frames, identities, summary


def weight_cell(weight):
    return "-" if weight is None else f"{weight:.2f}"


def write_report(demo):
    demo.out.mkdir(parents=True, exist_ok=True)
    timings = read_json(demo.work / "timings.json")
    figures = copy_figures(demo)
    rows = accuracy_table(demo)
    made, scored, frames, identities, _ = data_summary(demo)
    c = demo.config
    chance = 1 / len(EMOTIONS)

    def image(key, alt):
        return f"![{alt}]({Path(figures[key]).name})"

    lines = [
        "# emotiw demo",
        "",
        f"Written by `emotiw demo` on {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; "
        f"work folder `{demo.work}`. Everything ran on the CPU with real BVLC Caffe.",
        "",
        "## Accuracy (per clip, 7 classes, chance = %.1f %%)" % (100 * chance),
        "",
        "| model | val % | test % | val % (.mat) | test % (.mat) | weight (searched) | weight (SSE) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, val, tested, val_mat, test_mat, weight, sse_weight in rows:
        if name.startswith("fusion"):
            name = f"**{name}**: {WEIGHTINGS[name[len('fusion ('):-1]]}"
        else:
            name = f"`{name}`" + (f" ({DESCRIPTOR_TITLES[name]}, `{demo.net_of(name)}`)" if name in DESCRIPTORS else "")
        lines.append(f"| {name} | {percent(val)} | {percent(tested)} | {percent(val_mat)} | {percent(test_mat)} | "
                     f"{weight_cell(weight)} | {weight_cell(sse_weight)} |")
    lines += [
        "",
        f"val % and test %: `emotiw test` (the CNNs: {tested_backends(demo)}, deploy net, mean of the frame "
        "probabilities per clip; the audio and LBP-TOP models: their Caffe classifier on the clip's "
        "descriptor vector, standardised with the training statistics). "
        "The .mat columns: the CNNs' `prob` extracted by Caffe's `extract_features` into LevelDB, "
        "converted by leveldb2mat (`video_feats`: per-clip means) and scored by `emotiw fuse`. "
        "Fusion: the weighted mean of the four models' scores (the CNNs' .mat, the others' predictions.csv), "
        "with weights searched on val and applied to test, and with SSE's submitted weights: "
        "SSE fused three CNNs (1 each), its hand-crafted model (4) and its audio model (7); here the two "
        "CNNs take weight 1 each, LBP-TOP 4 and audio 7. Weights are shown normalised to sum 1.",
        "",
        "## Data",
        "",
        f"`emotiw demo-data` made {sum(made.values())} clips ({', '.join(f'{s} {made[s]}' for s in SPLITS)}) of "
        f"{c.frames} frames at {c.frame_size[0]}x{c.frame_size[1]} from {len(identities)} faces that "
        f"scikit-image ships ({', '.join(identities)}), expression strength {c.strength}, each with a "
        "sentence spoken by espeak-ng in its identity's voice at the class's pitch, rate and loudness "
        "(docs/demo.md). "
        f"MTCNN found the face in {', '.join(f'{frames[s]} frames of {scored[s]} {s} clips' for s in SPLITS)}; "
        "clips without any face are not scored. Crops: `sse` mode (5-point similarity), "
        f"{c.face_size}x{c.face_size}.",
        "",
        image("samples", "one test clip per class and its aligned faces"),
        "",
        "## Training",
        "",
        f"Each net from scratch: {c.max_iter} iterations, batch {c.batch_size}, input {c.face_size}x{c.face_size}, "
        "the released HoloNet solver otherwise (SGD, base_lr 0.01, momentum 0.9). Validation accuracy in "
        "the curves is per frame, with batch statistics (see docs/demo.md).",
        "",
    ]
    for net in c.nets:
        lines += [f"### `{net}`", "", image(f"curves_{net}", f"training curves of {net}"), ""]
    lines += [
        "### The audio and LBP-TOP models",
        "",
        "Each clip's sound (a sentence spoken by espeak-ng, in the class's pitch, rate and loudness) gives "
        "88 openSMILE eGeMAPSv02 functionals; its aligned face crops, gray at 64x64, give LBP-TOP "
        f"histograms. `{c.audio_net}` and `{c.lbptop_net}` learn them from the train clips with "
        f"`caffe train`, {c.descriptor_max_iter} iterations, batch 32, standardised with the train mean and std.",
        "",
    ]
    for kind in DESCRIPTORS:
        lines += [image(f"curves_{kind}", f"training curves of the {kind} model"), ""]
    lines += ["## Confusion matrices (test clips)", ""]
    lines += [image(f"confusion_{model}", f"{model} test confusion") for model in demo.models]
    lines += [image(f"confusion_fusion_{weighting}", f"fusion ({weighting}) test confusion")
              for weighting in WEIGHTINGS]
    lines += [""]
    lines += ["## Commands", "", "The demo ran these commands in one process; each can be run by hand.", "", "```"]
    lines += [line for _, line in demo.commands]
    lines += ["```", "", "## Time (seconds, stages run so far)", "", "| stage | s |", "|---|---:|"]
    lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in timings.items()]
    report = demo.out / "report.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    return report, rows
