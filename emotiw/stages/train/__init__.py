"""The `train` stage: write the net's prototxts with the user's data and overrides, check the data, then
run the real `caffe train` binary while showing its progress and plotting its curves."""

import collections
import contextlib
import csv
import math
import os
import re
import shlex
import signal
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from emotiw import EMOTIONS, nets
from emotiw.caffe.env import caffe_build_info, caffe_tool
from emotiw.caffe.log import TrainingCurves
from emotiw.caffe.tools import first_fatal_line, run_tool, start_logged
from emotiw.caffe.weights import check_weights
from emotiw.errors import UserError
from emotiw.formats.db import lmdb_labels
from emotiw.formats.features import (
    feature_set_of,
    read_feature_vectors,
    standardisation,
    write_feature_file,
    write_standardisation,
)
from emotiw.formats.files import atomic_open, atomic_path
from emotiw.formats.lists import read_list, resolve_listed_path, source_type
from emotiw.nets.options import NetOptions
from emotiw.processes import Terminated

MIN_IMAGE_SIDE = 8
GPU_LIST = re.compile(r"all|\d+(,\d+)*")
SOLVERS = re.compile(r"\] (?:Use CPU\.|Using GPUs (.+))$")  # caffe train's device line
MEAN_SAMPLE = 1000  # images whose mean colour stands for a list's when the images are not checked


def standardise(train, val, out):
    """Standardised copies of the train and val features (emotiw.formats.features: the train mean and
    std) in OUT/standardised/, those statistics in OUT/standardisation.json; returns (train source,
    val source, dimension)."""
    (train_data, train_labels), (val_data, val_labels) = read_feature_vectors(train), read_feature_vectors(val)
    if train_data.shape[1] != val_data.shape[1] or feature_set_of(train) != feature_set_of(val):
        raise UserError(f"--train {train} holds {train_data.shape[1]} values of {feature_set_of(train)} per clip "
                        f"but --val {val} {val_data.shape[1]} of {feature_set_of(val)}; describe both the same way")
    mean, std = standardisation(train_data)
    sources = []
    for name, data, labels in (("train", train_data, train_labels), ("val", val_data, val_labels)):
        sources.append(write_feature_file(out / "standardised", name, (data - mean) / std, labels))
    write_standardisation(out, feature_set_of(train), mean, std, train)
    return sources[0], sources[1], int(train_data.shape[1])


@contextlib.contextmanager
def quiet_opencv():
    """OpenCV logs `[ WARN:0@...] imread_(...): can't open/read file` for a bad image; our own error
    line says the same, so its warnings are kept off the terminal while the images are read."""
    import cv2

    previous = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    try:
        yield cv2
    finally:
        cv2.utils.logging.setLogLevel(previous)


def mean_colour(channel_means):
    import numpy as np

    return tuple(round(float(v), 3) for v in np.mean(channel_means, axis=0))


def scan_list(path, check_images=True):
    """Labels of a list and the mean BGR colour of its images, after checking that every image
    exists and decodes at a usable size (mean None when the images are not checked)."""
    from tqdm import tqdm

    entries, labels = read_list(path, "ImageData list", label_required=True)
    if not check_images:
        return list(labels), None
    channel_means = []
    with quiet_opencv() as cv2:
        for entry in tqdm(entries, desc=f"checking {Path(path).name}", unit="img", leave=False,
                          disable=not sys.stderr.isatty()):
            image = str(resolve_listed_path(entry, path))
            if not Path(entry).is_absolute() and image != str(Path.cwd() / entry):
                raise UserError(f"{path}: {entry} lies beside the list, but Caffe reads relative paths from "
                                f"the working directory; run from {Path(path).resolve().parent} or write "
                                "absolute paths")
            decoded = cv2.imread(image, cv2.IMREAD_COLOR)
            if decoded is None:
                reason = "not found" if not os.path.exists(image) else "not a readable image"
                raise UserError(f"{path}: {image} is {reason}; fix or remove that line")
            if min(decoded.shape[:2]) < MIN_IMAGE_SIDE:
                raise UserError(f"{path}: {image} is {decoded.shape[1]}x{decoded.shape[0]} pixels, "
                                f"smaller than {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}")
            channel_means.append(decoded.reshape(-1, 3).mean(axis=0))
    return list(labels), mean_colour(channel_means)


def sampled_mean_colour(path):
    """The mean BGR colour of up to MEAN_SAMPLE evenly spaced images of a list that decode: what
    stands for the training images' mean colour when they are not all checked."""
    entries, _ = read_list(path, "ImageData list", label_required=True)
    sample = entries[::math.ceil(len(entries) / MEAN_SAMPLE)]
    channel_means = []
    with quiet_opencv() as cv2:
        for entry in sample:
            decoded = cv2.imread(str(resolve_listed_path(entry, path)), cv2.IMREAD_COLOR)
            if decoded is not None:
                channel_means.append(decoded.reshape(-1, 3).mean(axis=0))
    if not channel_means:
        raise UserError(f"{path}: none of {len(sample)} sampled images decodes; run without "
                        "--skip-image-check to find the bad lines")
    return mean_colour(channel_means), len(channel_means)


def check_labels(name, labels, num_classes):
    bad = sorted({label for label in labels if not 0 <= label < num_classes})
    if bad:
        raise UserError(f"{name}: labels {bad[:10]} are outside 0..{num_classes - 1}; "
                        f"the net has {num_classes} classes (AFEW order, see `emotiw nets --list`)")
    return collections.Counter(labels)


def print_histogram(name, counts, num_classes):
    names = EMOTIONS if num_classes == len(EMOTIONS) else [str(i) for i in range(num_classes)]
    total = sum(counts.values())
    print(f"{name}: {total} images")
    for index, label in enumerate(names):
        share = counts.get(index, 0) / total
        print(f"  {index} {label:<9} {counts.get(index, 0):>7}  {'#' * round(40 * share)}")


def preflight(train, val, num_classes, check_images=True):
    """Checks both sources; returns the training images' mean BGR colour (None for LMDBs)."""
    means = {}
    for name, path in (("train", train), ("val", val)):
        kind = source_type(path)
        if kind == "list":
            labels, means[name] = scan_list(path, check_images)
        elif kind == "hdf5":
            labels, means[name] = [int(label) for label in read_feature_vectors(path)[1]], None
        else:
            labels, means[name] = lmdb_labels(path), None
        print_histogram(f"{name} ({path})", check_labels(name, labels, num_classes), num_classes)
    return means["train"]


def training_mean(net, train, out, mean, train_mean):
    """`mean` (a mean.binaryproto) if given; else the net's released mean values; else (the released
    nets that used a mean file we do not have) the mean colour of the training images, or
    compute_image_mean's mean of a training LMDB."""
    if mean:
        if not Path(mean).is_file():
            raise UserError(f"--mean {mean} not found")
        return {"mean_file": str(Path(mean).resolve())}
    if nets.get(net).preprocessing.mean_values or nets.get(net).preprocessing.channels == 0:
        return {}  # feature vectors are standardised instead
    if train_mean is not None:
        print(f"no --mean given and {net} used a mean file: subtracting the training images' "
              f"mean colour (B, G, R) = {train_mean}")
        return {"mean_values": train_mean}
    if source_type(train) == "list":  # --skip-image-check: compute_image_mean only reads LMDBs
        sampled, count = sampled_mean_colour(train)
        print(f"no --mean given and {net} used a mean file: subtracting the mean colour of {count} "
              f"training images, (B, G, R) = {sampled}")
        return {"mean_values": sampled}
    mean_file = Path(out) / "mean.binaryproto"
    if not mean_file.exists():
        run_tool("compute_image_mean", train, mean_file)
    print(f"no --mean given: using the mean image of {train} ({mean_file})")
    return {"mean_file": str(mean_file.resolve())}


# ---------------------------------------------------------------- prototxts

def write_training_files(net, train, val, out, options, overrides):
    """DIR/{train_val,test,deploy,solver}.prototxt with the user's sources and overrides."""
    kind = source_type(train)
    if source_type(val) != kind:
        raise UserError("--train and --val must both be list files, both LMDBs or both HDF5 feature lists")
    options = replace(options, train_source=str(Path(train).resolve()), val_source=str(Path(val).resolve()),
                      source_type=kind)
    (out / "snapshots").mkdir(exist_ok=True)
    paths = nets.write_net(net, out, options, net_path=(out / "train_val.prototxt").resolve(),
                           snapshot_prefix=(out / "snapshots" / net).resolve(), solver_overrides=overrides)
    return paths["solver"], nets.solver(net, paths["train_val"], overrides=overrides), options


def snapshot_iteration(path):
    """N of Caffe's `<prefix>_iter_N.solverstate` (-1 for another name)."""
    _, separator, number = Path(path).stem.rpartition("_iter_")
    return int(number) if separator and number.isdigit() else -1


def newest_solverstate(out):
    states = sorted((out / "snapshots").glob("*.solverstate"), key=snapshot_iteration)
    return states[-1] if states else None


def resumed_curves(out, state):
    """The curves a resumed run continues: the rows of curves.csv before the snapshot's iteration.
    Caffe logs that iteration's test again, and rows after it belong to an abandoned later part."""
    curves = TrainingCurves(iteration=max(snapshot_iteration(state), 0))
    path = out / "curves.csv"
    if not path.is_file():
        return curves
    try:
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                if int(row["iteration"]) < curves.iteration:
                    curves.add_row(int(row["iteration"]), row["phase"], row["name"], float(row["value"]))
    except (csv.Error, KeyError, TypeError, ValueError) as error:
        print(f"warning: {path} is damaged ({error}); the curves restart at iteration {curves.iteration}",
              file=sys.stderr)
        return TrainingCurves(iteration=curves.iteration)
    return curves


# ---------------------------------------------------------------- running caffe

def check_gpu(gpu):
    """`--gpu` as caffe train takes it ("all", "0" or "0,1": one solver per GPU, synchronised with
    NCCL), refused at once on a CPU-only build of Caffe; None stays None (the CPU)."""
    if gpu is None:
        return None
    gpu = str(gpu).replace(" ", "")
    if not GPU_LIST.fullmatch(gpu):
        raise UserError(f"--gpu {gpu}: give `all`, one GPU id (0) or a comma-separated list (0,1)")
    build = caffe_build_info()
    if build is not None and not build["gpu"]:
        raise UserError(f"--gpu {gpu}: the Caffe linked into this venv is a CPU-only build; build the CUDA one "
                        "with `CAFFE_GPU=1 make install` on a machine with a GPU (docs/gpu.md), or train "
                        "without --gpu")
    return gpu


def solver_line(line):
    """caffe train's device line as ours: `1 solver on the CPU` or `N solvers on GPUs 0, 1`; None
    for other lines."""
    match = SOLVERS.search(line.rstrip())
    if not match:
        return None
    if match.group(1) is None:
        return "1 solver on the CPU"
    gpus = match.group(1).split(", ")
    return f"{len(gpus)} solver{'s' if len(gpus) > 1 else ''} on GPU{'s' if len(gpus) > 1 else ''} {match.group(1)}"


def resume_command(net, train, val, out, settings):
    """The `emotiw train` command line that continues this run from its newest snapshot."""
    words = ["emotiw", "train", net, "--train", train, "--val", val, "--out", out]
    for name, value in settings.items():
        if value is True:
            words.append(f"--{name}")
        elif value is not None and value is not False:
            words += [f"--{name}", value]
    return shlex.join(map(str, [*words, "--resume"]))


class TrainingStopped(Terminated):
    """Ctrl-C or SIGTERM stopped `caffe train` after its snapshot. A Terminated, so that the CLI
    prints `stopped by <message>` and exits 128 + signum (130, 143); the message says where
    training stopped and the command that resumes it."""

    def __init__(self, signum, message):
        super().__init__(signum)
        self.args = (message,)


def stopped_message(signum, curves, resume):
    """Where an interrupted training stopped (the solverstate caffe wrote on the way out) and how to
    go on."""
    what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    states = [path for path in curves.snapshots if path.endswith(".solverstate")]
    if not states:
        return f"{what} before caffe wrote a snapshot; run the same command again"
    return (f"{what}: training stopped at iteration {snapshot_iteration(states[-1])} (snapshot {states[-1]}); "
            f"resume with: {resume}")


def caffe_command(solver_path, weights=None, snapshot=None, gpu=None):
    # "stop" ends the loop at the next iteration and Solve() then snapshots (snapshot_after_train):
    # the snapshot-then-exit the user expects. Caffe's "snapshot" effect would snapshot and go on.
    command = [caffe_tool("caffe"), "train", f"--solver={solver_path}",
               "--sigint_effect=stop", "--sighup_effect=snapshot"]
    if snapshot:
        command.append(f"--snapshot={snapshot}")
    elif weights:
        command.append(f"--weights={weights}")
    if gpu is not None:
        command.append(f"--gpu={gpu}")
    return command


def write_curves(curves, out):
    rows = curves.rows()
    with atomic_open(out / "curves.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["iteration", "phase", "name", "value"])
        writer.writerows(rows)
    plot_curves(curves, out / "curves.png")


def plot_curves(curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    names = sorted({name for _, name, _ in curves.train})
    for name in names:
        points = [(i, v) for i, n, v in curves.train if n == name]
        loss_ax.plot(*zip(*points), label=name, linewidth=2 if name == "total_loss" else 1)
    loss_ax.set(xlabel="iteration", ylabel="training loss", title="training losses")
    if names:
        loss_ax.legend(fontsize="small")
    for name in sorted({n for _, n, _ in curves.test if "acc" in n}):
        points = [(i, v) for i, n, v in curves.test if n == name]
        acc_ax.plot(*zip(*points), marker="o", label=name)
    acc_ax.set(xlabel="iteration", ylabel="accuracy", title="validation accuracy", ylim=(0, 1))
    if curves.test:
        acc_ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def run_caffe(command, out, max_iter, curves):
    """Runs caffe train, logging to DIR/train.log and adding to `curves`; returns (status, diverged,
    stopped_by, solvers): the signal (SIGINT, SIGTERM) that made caffe snapshot and stop, or None, and
    caffe's solver count and devices as solver_line says them (printed as they come)."""
    from tqdm import tqdm

    process, stopped_by, solvers = None, [], None

    def stop(signum, _frame):
        stopped_by.append(signum)
        if process is not None:
            process.send_signal(signal.SIGINT)  # caffe snapshots on SIGINT, then stops

    # installed before caffe starts, so that no signal finds emotiw without a handler and caffe running
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    diverged = False
    bar = tqdm(total=max_iter, initial=curves.iteration, desc="caffe train", unit="it", disable=None)
    try:
        process = start_logged(command, log_level="0")  # the iteration lines are INFO
        if stopped_by:  # the signal came while caffe was starting
            process.send_signal(signal.SIGINT)
        with open(out / "train.log", "a", buffering=1) as log:  # line by line, for `tail -f`
            for line in process.stdout:
                log.write(line)
                if solvers is None and (solvers := solver_line(line)):
                    tqdm.write(f"caffe train: {solvers}")
                event = curves.feed(line)
                if event == "iteration":
                    bar.update(curves.iteration - bar.n)
                    loss = curves.latest(curves.train, "total_loss")
                    postfix = {"loss": f"{loss:.4g}"}
                    if curves.learning_rate:
                        postfix["lr"] = f"{curves.learning_rate[-1][1]:.3g}"
                    accuracy = curves.latest(curves.test, "accuracy")
                    if accuracy is not None:
                        postfix["val_acc"] = f"{accuracy:.3f}"
                    bar.set_postfix(postfix)
                    if math.isnan(loss) or math.isinf(loss):
                        diverged = True
                        process.kill()  # no snapshot of diverged weights: the last good one stays last
                if event in ("test", "snapshot"):
                    write_curves(curves, out)
            status = process.wait()
    finally:
        bar.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if process is not None and process.poll() is None:
            process.kill()
    write_curves(curves, out)
    return status, diverged, stopped_by[0] if stopped_by else None, solvers


@dataclass
class TrainResult:
    """What `train` left in its folder."""
    out: Path
    model: Path | None             # the last snapshot's .caffemodel
    best_val: tuple | None         # (iteration, accuracy) of the best validation score
    iterations: int
    files: dict = field(default_factory=dict)  # train_val, test, deploy, solver, log, curves
    solvers: str | None = None     # "1 solver on the CPU", "2 solvers on GPUs 0, 1"


def feature_base_lr(net, dimension):
    """The solver's base_lr suits eGeMAPS's 88 standardised inputs. A linear layer's SGD step
    diverges once base_lr * |x|^2 passes about 2, and |x|^2 of a standardised vector is its
    dimension, so longer vectors (LBP-TOP: thousands) get base_lr * 88 / D."""
    from emotiw.nets.classifiers import DIMENSION

    default = nets.get(net).solver_values["base_lr"]
    if dimension <= DIMENSION:
        return None
    scaled = default * DIMENSION / dimension
    print(f"{dimension} inputs: base_lr {default:g} scaled to {scaled:.3g} (x {DIMENSION}/{dimension}); "
          "--base-lr sets it")
    return scaled


def train(net, train, val, out, weights=None, resume=False, max_iter=None, base_lr=None, batch_size=None,
          test_batch_size=None, test_interval=None, test_iter=None, snapshot=None, display=None,
          input_size=None, num_classes=7, mean=None, bn_moving_average_fraction=None, gpu=None, seed=1,
          check_images=True) -> TrainResult:
    """Trains a registered net with the real `caffe train` binary.

    net: registry name; train/val: ImageData lists or LMDB folders; out: the run folder (prototxts,
    train.log, curves.csv/png, snapshots/); weights: a caffemodel to fine-tune from (checked layer by
    layer first); resume: continue from the newest .solverstate in out. The solver fields (max_iter,
    base_lr, test_interval, test_iter, snapshot, display) default to the paper's; batch sizes,
    input_size and num_classes to the net's. mean: a mean.binaryproto (default: the net's mean values,
    else the training images' mean colour); bn_moving_average_fraction: BatchNorm's running-average
    decay (default Caffe's 0.999); gpu: on a CUDA build, caffe's --gpu: "all", "0" or "0,1" (one
    solver per GPU, each with the net's batch size); seed: Caffe's random_seed;
    check_images: decode every listed image before training.
    """
    out = Path(out)
    gpu = check_gpu(gpu)
    settings = {"max-iter": max_iter, "base-lr": base_lr, "batch-size": batch_size,
                "test-batch-size": test_batch_size, "test-interval": test_interval, "test-iter": test_iter,
                "snapshot": snapshot, "display": display, "input-size": input_size, "num-classes": num_classes,
                "mean": mean, "bn-moving-average-fraction": bn_moving_average_fraction, "gpu": gpu,
                "seed": seed, "skip-image-check": not check_images}  # the CLI flags, for the resume command
    out.mkdir(parents=True, exist_ok=True)
    nets.get(net)  # an unknown name fails first, listing the valid ones
    fraction = bn_moving_average_fraction
    if fraction is not None and not 0 < fraction < 1:
        raise UserError(f"--bn-moving-average-fraction must be between 0 and 1 (exclusive), not {fraction}")
    reads_features = nets.get(net).preprocessing.channels == 0
    if reads_features != (source_type(train) == "hdf5"):
        raise UserError(f"{net} reads {'feature vectors: give the HDF5 lists emotiw features writes' if reads_features else 'images: give ImageData lists or LMDBs'} as --train and --val")
    train_mean = preflight(train, val, num_classes, check_images=check_images)
    sources = (train, val)
    if reads_features:
        *sources, input_size = standardise(train, val, out)
        if base_lr is None:
            base_lr = feature_base_lr(net, input_size)
    options = NetOptions(train_batch=batch_size, test_batch=test_batch_size, num_classes=num_classes,
                         input_size=input_size, bn_moving_average_fraction=fraction,
                         **training_mean(net, train, out, mean, train_mean))
    overrides = {field: value for field, value in (
        ("max_iter", max_iter), ("base_lr", base_lr), ("test_interval", test_interval),
        ("snapshot", snapshot), ("test_iter", test_iter), ("display", display)) if value is not None}
    overrides.update(random_seed=seed, snapshot_after_train=True)
    if gpu is not None:
        overrides["solver_mode"] = 1  # SolverParameter.GPU
    solver_path, solver, options = write_training_files(net, *sources, out, options, overrides)
    state = None
    if resume:
        state = newest_solverstate(out)
        if state is None:
            raise UserError(f"--resume: no .solverstate in {out / 'snapshots'}; start without --resume")
        print(f"resuming from {state}")
    elif weights:
        if not Path(weights).is_file():
            raise UserError(f"--weights {weights} not found")
        check_weights(nets.shapes(net, options).params, weights, net, show_report=True)
    command = caffe_command(solver_path, weights, state, gpu)
    print("running: " + " ".join(command))
    curves = resumed_curves(out, state) if state else TrainingCurves()
    status, diverged, stopped_by, solvers = run_caffe(command, out, solver.max_iter, curves)
    last_model = sorted((out / "snapshots").glob("*.caffemodel"), key=os.path.getmtime)
    last = str(last_model[-1]) if last_model else "none"
    if diverged:
        raise UserError(f"the loss diverged (NaN/inf) at iteration {curves.iteration}; training stopped, "
                        f"last snapshot: {last}; lower --base-lr and start again")
    if stopped_by is not None:
        raise TrainingStopped(stopped_by, stopped_message(stopped_by, curves, resume_command(
            net, train, val, out, settings)))
    if status != 0:
        reason = first_fatal_line((out / "train.log").read_text(errors="replace"))
        raise UserError(f"caffe train stopped with status {status} at iteration {curves.iteration} "
                        f"({reason}); full log: {out / 'train.log'}; last snapshot: {last}")
    best = curves.best_test()
    print(f"final model: {last}")
    if best:
        print(f"best val accuracy {best[1]:.4f} at iteration {best[0]}")
    print(f"log {out / 'train.log'}, curves {out / 'curves.png'}")
    files = {kind: out / f"{kind}.prototxt" for kind in ("train_val", "test", "deploy", "solver")}
    files.update(log=out / "train.log", curves=out / "curves.csv", plot=out / "curves.png")
    return TrainResult(out=out, model=Path(last) if last_model else None, best_val=best,
                       iterations=curves.iteration, files=files, solvers=solvers)
