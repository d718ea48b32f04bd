"""The `train` stage: write the net's prototxts with the user's data and overrides, check the data, then
run the real `caffe train` binary while showing its progress and plotting its curves."""

import collections
import csv
import math
import os
import signal
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from emotiw import EMOTIONS, nets
from emotiw.caffe.env import caffe_tool
from emotiw.caffe.log import TrainingCurves
from emotiw.caffe.tools import first_fatal_line, run_tool, start_logged
from emotiw.caffe.weights import check_weights
from emotiw.errors import UserError
from emotiw.formats.db import lmdb_labels
from emotiw.formats.files import atomic_open, atomic_path
from emotiw.formats.lists import read_list, resolve_listed_path
from emotiw.nets.options import NetOptions

MIN_IMAGE_SIDE = 8


# ---------------------------------------------------------------- data sources

def source_type(path):
    """ImageData list (a text file) or LMDB (a directory with data.mdb)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "data.mdb").exists():
            raise UserError(f"{path} is a directory but not an LMDB (no data.mdb); pass a list file or an LMDB")
        return "lmdb"
    if not path.is_file():
        raise UserError(f"{path} not found; pass an ImageData list file (`<image> <label>` per line) or an LMDB")
    return "list"


def scan_list(path, check_images=True):
    """Labels of a list and the mean BGR colour of its images, after checking that every image
    exists and decodes at a usable size (mean None when the images are not checked)."""
    import cv2
    import numpy as np
    from tqdm import tqdm

    entries, labels = read_list(path, "ImageData list", label_required=True)
    if not check_images:
        return list(labels), None
    channel_means = []
    for entry in tqdm(entries, desc=f"checking {Path(path).name}", unit="img", leave=False,
                      disable=not sys.stderr.isatty()):
        image = str(resolve_listed_path(entry, path))
        if not Path(entry).is_absolute() and image != str(Path.cwd() / entry):
            raise UserError(f"{path}: {entry} lies beside the list, but Caffe reads relative paths from the "
                            f"working directory; run from {Path(path).resolve().parent} or write absolute paths")
        decoded = cv2.imread(image, cv2.IMREAD_COLOR)
        if decoded is None:
            reason = "not found" if not os.path.exists(image) else "not a readable image"
            raise UserError(f"{path}: {image} is {reason}; fix or remove that line")
        if min(decoded.shape[:2]) < MIN_IMAGE_SIDE:
            raise UserError(f"{path}: {image} is {decoded.shape[1]}x{decoded.shape[0]} pixels, "
                            f"smaller than {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}")
        channel_means.append(decoded.reshape(-1, 3).mean(axis=0))
    return list(labels), tuple(round(float(v), 3) for v in np.mean(channel_means, axis=0))


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
        if source_type(path) == "list":
            labels, means[name] = scan_list(path, check_images)
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
    if nets.get(net).preprocessing.mean_values:
        return {}
    if train_mean is not None:
        print(f"no --mean given and {net} used a mean file: subtracting the training images' "
              f"mean colour (B, G, R) = {train_mean}")
        return {"mean_values": train_mean}
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
        raise UserError("--train and --val must both be list files or both be LMDBs")
    options = replace(options, train_source=str(Path(train).resolve()), val_source=str(Path(val).resolve()),
                      source_type=kind)
    (out / "snapshots").mkdir(exist_ok=True)
    paths = nets.write_net(net, out, options, net_path=(out / "train_val.prototxt").resolve(),
                           snapshot_prefix=(out / "snapshots" / net).resolve(), solver_overrides=overrides)
    return paths["solver"], nets.solver(net, paths["train_val"], overrides=overrides), options


def newest_solverstate(out):
    states = sorted((out / "snapshots").glob("*.solverstate"),
                    key=lambda p: int(p.stem.rsplit("_iter_", 1)[-1]) if "_iter_" in p.stem else -1)
    return states[-1] if states else None


# ---------------------------------------------------------------- running caffe

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


def run_caffe(command, out, max_iter):
    """Runs caffe train, logging to DIR/train.log; returns (curves, status, diverged)."""
    from tqdm import tqdm

    curves = TrainingCurves()
    process = start_logged(command, log_level="0")  # the iteration lines are INFO

    def forward(signum, _frame):
        process.send_signal(signal.SIGINT)  # caffe snapshots on SIGINT, then stops

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    diverged = False
    bar = tqdm(total=max_iter, desc="caffe train", unit="it", disable=None)
    try:
        with open(out / "train.log", "a") as log:
            for line in process.stdout:
                log.write(line)
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
        if process.poll() is None:
            process.kill()
    write_curves(curves, out)
    return curves, status, diverged


@dataclass
class TrainResult:
    """What `train` left in its folder."""
    out: Path
    model: Path | None             # the last snapshot's .caffemodel
    best_val: tuple | None         # (iteration, accuracy) of the best validation score
    iterations: int
    files: dict = field(default_factory=dict)  # train_val, test, deploy, solver, log, curves


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
    decay (default Caffe's 0.999); gpu: a device id on a CUDA build; seed: Caffe's random_seed;
    check_images: decode every listed image before training.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    nets.get(net)  # an unknown name fails first, listing the valid ones
    fraction = bn_moving_average_fraction
    if fraction is not None and not 0 < fraction < 1:
        raise UserError(f"--bn-moving-average-fraction must be between 0 and 1 (exclusive), not {fraction}")
    train_mean = preflight(train, val, num_classes, check_images=check_images)
    options = NetOptions(train_batch=batch_size, test_batch=test_batch_size, num_classes=num_classes,
                         input_size=input_size, bn_moving_average_fraction=fraction,
                         **training_mean(net, train, out, mean, train_mean))
    overrides = {field: value for field, value in (
        ("max_iter", max_iter), ("base_lr", base_lr), ("test_interval", test_interval),
        ("snapshot", snapshot), ("test_iter", test_iter), ("display", display)) if value is not None}
    overrides.update(random_seed=seed, snapshot_after_train=True)
    if gpu is not None:
        overrides["solver_mode"] = 1  # SolverParameter.GPU
    solver_path, solver, options = write_training_files(net, train, val, out, options, overrides)
    state = None
    if resume:
        state = newest_solverstate(out)
        if state is None:
            raise UserError(f"--resume: no .solverstate in {out / 'snapshots'}; start without --resume")
        print(f"resuming from {state}")
    elif weights:
        if not Path(weights).is_file():
            raise UserError(f"--weights {weights} not found")
        check_weights(net, weights, options, show_report=True)
    command = caffe_command(solver_path, weights, state, gpu)
    print("running: " + " ".join(command))
    curves, status, diverged = run_caffe(command, out, solver.max_iter)
    last_model = sorted((out / "snapshots").glob("*.caffemodel"), key=os.path.getmtime)
    last = str(last_model[-1]) if last_model else "none"
    if diverged:
        raise UserError(f"the loss diverged (NaN/inf) at iteration {curves.iteration}; training stopped, "
                        f"last snapshot: {last}; lower --base-lr and start again")
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
                       iterations=curves.iteration, files=files)
