"""`emotiw train`: write the net's prototxts with the user's data and overrides, check the data, then
run the real `caffe train` binary while showing its progress and plotting its curves."""

import collections
import csv
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

from emotiw.caffe_env import caffe_tool
from emotiw.caffe_log import TrainingCurves
from emotiw.errors import UserError
from emotiw.fileio import atomic_open, atomic_path

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


def read_list(path):
    """[(image path, label)] of an ImageData list; relative paths are taken as Caffe takes them."""
    entries = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        image, _, label = line.rstrip().rpartition(" ")
        try:
            entries.append((image, int(label)))
        except ValueError:
            raise UserError(f"{path}:{number}: expected `<image path> <integer label>`, got {line!r}")
    if not entries:
        raise UserError(f"{path} is empty: an ImageData list needs one `<image path> <label>` per line")
    return entries


def scan_list(path, check_images=True):
    """Labels of a list and the mean BGR colour of its images, after checking that every image
    exists and decodes at a usable size (mean None when the images are not checked)."""
    import cv2
    import numpy as np
    from tqdm import tqdm

    entries = read_list(path)
    if not check_images:
        return [label for _, label in entries], None
    channel_means = []
    for image, _ in tqdm(entries, desc=f"checking {Path(path).name}", unit="img", leave=False,
                         disable=not sys.stderr.isatty()):
        decoded = cv2.imread(image, cv2.IMREAD_COLOR)
        if decoded is None:
            reason = "not found" if not os.path.exists(image) else "not a readable image"
            raise UserError(f"{path}: {image} is {reason}; fix or remove that line")
        if min(decoded.shape[:2]) < MIN_IMAGE_SIDE:
            raise UserError(f"{path}: {image} is {decoded.shape[1]}x{decoded.shape[0]} pixels, "
                            f"smaller than {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}")
        channel_means.append(decoded.reshape(-1, 3).mean(axis=0))
    return [label for _, label in entries], tuple(round(float(v), 3) for v in np.mean(channel_means, axis=0))


def lmdb_labels(path):
    import lmdb
    from emotiw.datum import Datum

    with lmdb.open(str(path), readonly=True, lock=False) as env, env.begin() as txn:
        labels = [Datum.FromString(value).label for _, value in txn.cursor()]
    if not labels:
        raise UserError(f"LMDB {path} is empty")
    return labels


def check_labels(name, labels, num_classes):
    bad = sorted({label for label in labels if not 0 <= label < num_classes})
    if bad:
        raise UserError(f"{name}: labels {bad[:10]} are outside 0..{num_classes - 1}; "
                        f"the net has {num_classes} classes (AFEW order, see `emotiw nets --list`)")
    return collections.Counter(labels)


def print_histogram(name, counts, num_classes):
    from emotiw import EMOTIONS

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


def training_mean(args, train_mean):
    """--mean if given; else the net's released mean values; else (the released nets that used a
    mean file we do not have) the mean colour of the training images, or compute_image_mean's
    mean of a training LMDB."""
    from emotiw import nets

    if args.mean:
        if not Path(args.mean).is_file():
            raise UserError(f"--mean {args.mean} not found")
        return {"mean_file": str(Path(args.mean).resolve())}
    if nets.get(args.net).preprocessing.mean_values:
        return {}
    if train_mean is not None:
        print(f"no --mean given and {args.net} used a mean file: subtracting the training images' "
              f"mean colour (B, G, R) = {train_mean}")
        return {"mean_values": train_mean}
    mean_file = Path(args.out) / "mean.binaryproto"
    if not mean_file.exists():
        result = subprocess.run([caffe_tool("compute_image_mean"), str(args.train),
                                 str(mean_file)], capture_output=True, text=True)
        if result.returncode != 0:
            raise UserError(f"compute_image_mean failed on {args.train}: {first_fatal_line(result.stderr)}")
    print(f"no --mean given: using the mean image of {args.train} ({mean_file})")
    return {"mean_file": str(mean_file.resolve())}


def first_fatal_line(log_text):
    """Caffe's reason for stopping: its first glog FATAL or 'Check failed' line, else the last line."""
    lines = log_text.strip().splitlines()
    for line in lines:
        if (line.startswith("F") and "] " in line) or "Check failed" in line:
            return line.split("] ", 1)[-1]
    return lines[-1] if lines else "no output"


# ---------------------------------------------------------------- prototxts

def write_training_files(args, out, mean):
    """DIR/{train_val,test,deploy,solver}.prototxt with the user's sources and overrides."""
    from emotiw import nets
    from emotiw.nets.options import NetOptions

    kind = source_type(args.train)
    if source_type(args.val) != kind:
        raise UserError("--train and --val must both be list files or both be LMDBs")
    options = NetOptions(train_source=str(Path(args.train).resolve()), val_source=str(Path(args.val).resolve()),
                         source_type=kind, train_batch=args.batch_size, test_batch=args.test_batch_size,
                         num_classes=args.num_classes, input_size=args.input_size,
                         bn_moving_average_fraction=args.bn_moving_average_fraction, **mean)
    overrides = {field: value for field, value in (
        ("max_iter", args.max_iter), ("base_lr", args.base_lr), ("test_interval", args.test_interval),
        ("snapshot", args.snapshot), ("test_iter", args.test_iter), ("display", args.display))
        if value is not None}
    overrides.update(random_seed=args.seed, snapshot_after_train=True)
    if args.gpu is not None:
        overrides["solver_mode"] = 1  # SolverParameter.GPU
    (out / "snapshots").mkdir(exist_ok=True)
    paths = nets.write_net(args.net, out, options, net_path=(out / "train_val.prototxt").resolve(),
                           snapshot_prefix=(out / "snapshots" / args.net).resolve(), solver_overrides=overrides)
    return paths["solver"], nets.solver(args.net, paths["train_val"], overrides=overrides), options


def newest_solverstate(out):
    states = sorted((out / "snapshots").glob("*.solverstate"),
                    key=lambda p: int(p.stem.rsplit("_iter_", 1)[-1]) if "_iter_" in p.stem else -1)
    return states[-1] if states else None


def check_weights(net, weights, options):
    from emotiw.weights import weights_report

    report = weights_report(net, weights, options)
    print("\n".join(report.lines()))
    if not report.loadable or not report.loaded:
        raise UserError(f"{weights} does not fit this net ({report.verdict}); see the report above")


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
    env = dict(os.environ, GLOG_logtostderr="1", GLOG_minloglevel="0")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               bufsize=1)

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


def train(args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from emotiw import nets

    nets.get(args.net)  # an unknown name fails first, listing the valid ones
    fraction = args.bn_moving_average_fraction
    if fraction is not None and not 0 < fraction < 1:
        raise UserError(f"--bn-moving-average-fraction must be between 0 and 1 (exclusive), not {fraction}")
    train_mean = preflight(args.train, args.val, args.num_classes, check_images=not args.skip_image_check)
    solver_path, solver, options = write_training_files(args, out, training_mean(args, train_mean))
    snapshot = None
    if args.resume:
        snapshot = newest_solverstate(out)
        if snapshot is None:
            raise UserError(f"--resume: no .solverstate in {out / 'snapshots'}; start without --resume")
        print(f"resuming from {snapshot}")
    elif args.weights:
        if not Path(args.weights).is_file():
            raise UserError(f"--weights {args.weights} not found")
        check_weights(args.net, args.weights, options)
    command = caffe_command(solver_path, args.weights, snapshot, args.gpu)
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
    return 0


def register(subparsers):
    parser = subparsers.add_parser("train", help="train a registered net with the caffe train binary")
    parser.add_argument("net", help="registered net name (see `emotiw nets --list`)")
    parser.add_argument("--train", required=True, help="ImageData list or LMDB for training")
    parser.add_argument("--val", required=True, help="ImageData list or LMDB for validation")
    parser.add_argument("--out", required=True, help="output directory (prototxts, log, curves, snapshots)")
    parser.add_argument("--weights", help="caffemodel to fine-tune from (layers matched by name)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest .solverstate in --out")
    parser.add_argument("--max-iter", type=int)
    parser.add_argument("--base-lr", type=float)
    parser.add_argument("--batch-size", type=int, help="training batch size")
    parser.add_argument("--test-batch-size", type=int, help="validation batch size")
    parser.add_argument("--test-interval", type=int)
    parser.add_argument("--test-iter", type=int, help="validation batches per test")
    parser.add_argument("--snapshot", type=int, help="snapshot every N iterations")
    parser.add_argument("--display", type=int, help="log the losses every N iterations")
    parser.add_argument("--input-size", type=int, help="input side in pixels (default: the paper's)")
    parser.add_argument("--num-classes", type=int, default=7, help="number of classes (default 7, AFEW order)")
    parser.add_argument("--mean", help="mean.binaryproto (default: the net's mean values)")
    parser.add_argument("--bn-moving-average-fraction", type=float, metavar="X",
                        help="BatchNorm running-average decay (default: Caffe's 0.999, as released); about "
                             "0.9 for short trainings, whose test nets would otherwise use statistics of "
                             "the first iterations")
    parser.add_argument("--gpu", type=int, help="GPU id (needs a CUDA build of Caffe)")
    parser.add_argument("--seed", type=int, default=1, help="Caffe's random_seed (default 1)")
    parser.add_argument("--skip-image-check", action="store_true",
                        help="do not decode every listed image before training")
    parser.set_defaults(func=train)
