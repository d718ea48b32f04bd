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
                 (emotiw.demo.report)

Everything goes under OUT/work (default demo/work); a stage whose outputs exist is skipped, so an
interrupted demo started again goes on where it stopped. The settings are stored in
OUT/work/demo.json; a run with other settings needs another --work.
"""

import json
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from emotiw.demo.data import SPLITS, generate
from emotiw.errors import UserError
from emotiw.formats.files import atomic_write_text
from emotiw.stages.extract import extract
from emotiw.stages.features import features
from emotiw.stages.fuse import fuse
from emotiw.stages.preprocess import preprocess
from emotiw.stages.score_features import score_features
from emotiw.stages.test import test
from emotiw.stages.train import newest_snapshot, train

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
                    "--recipe", "sse", "--size", self.config.face_size]
            done = self.video_list(split).is_file()
            lmdb = split == "train"  # the LMDB's mean image is the nets' mean file
            if lmdb:
                argv.append("--lmdb")
                done = done and self.mean_file.is_file()
            self.command(f"preprocess {split}", argv,
                         lambda split=split, lmdb=lmdb: preprocess(self.faces, videos=self.data / split, split=split,
                                                                   recipe="sse", size=self.config.face_size, lmdb=lmdb),
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
        options["resume"] = not self.model(net).is_file() and newest_snapshot(self.train_dir(net), ".solverstate") is not None
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
                       features=self.descriptors(kind, split), out=self.test_dir(kind, split))
        self.command(f"test {kind} {split}", ["score-features", *command_flags(options)],
                     lambda: score_features(**options), done=(options["out"] / "metrics.json").is_file())

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
            options["model_weights"] = self.sse_weights()
        self.command(f"fuse ({weighting} weights)", ["fuse", *scores, *command_flags(options)],
                     lambda: fuse(scores, **options), done=(options["out"] / "fusion.json").is_file())


def read_json(path):
    return json.loads(Path(path).read_text())
