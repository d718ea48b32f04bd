"""The `train` stage: write the net's prototxts with the user's data and overrides, check the data, then
run the real `caffe train` binary while showing its progress and plotting its curves."""

import csv
import math
import re
import shlex
import signal
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from emotiw import nets
from emotiw.caffe.env import caffe_build_info, caffe_tool
from emotiw.caffe.log import TrainingCurves
from emotiw.caffe.proto import caffe_pb2
from emotiw.caffe.tools import first_fatal_line, start_logged
from emotiw.caffe.weights import check_weights
from emotiw.errors import UserError
from emotiw.formats.files import atomic_open, atomic_path, inside
from emotiw.formats.lists import source_type
from emotiw.nets.options import NetOptions
from emotiw.output import output_folder
from emotiw.processes import Terminated
from emotiw.stages.train.inputs import preflight, standardise, training_mean

GPU_LIST = re.compile(r"all|\d+(,\d+)*")
SOLVERS = re.compile(r"\] (?:Use CPU\.|Using GPUs (.+))$")  # caffe train's device line


# ---------------------------------------------------------------- prototxts

def write_training_files(net, train, val, out, options, overrides):
    """DIR/{train_val,test,deploy,solver}.prototxt with the user's sources and overrides."""
    kind = source_type(train)
    if source_type(val) != kind:
        raise UserError("--train and --val must both be list files, both LMDBs or both HDF5 feature lists")
    options = replace(options, train_source=str(Path(train).resolve()), val_source=str(Path(val).resolve()),
                      source_type=kind)
    inside(out, "snapshots").mkdir(exist_ok=True)
    paths = nets.write_net(net, out, options, net_path=(out / "train_val.prototxt").resolve(),
                           snapshot_prefix=(out / "snapshots" / net).resolve(), solver_overrides=overrides)
    return paths["solver"], nets.solver(net, paths["train_val"], overrides=overrides), options


def snapshot_iteration(path):
    """N of Caffe's `<prefix>_iter_N.solverstate` (-1 for another name)."""
    _, separator, number = Path(path).stem.rpartition("_iter_")
    return int(number) if separator and number.isdigit() else -1


def newest_snapshot(out, suffix):
    """The newest snapshot (.caffemodel or .solverstate) that reads back whole, or None. A full disk
    can leave a truncated one behind; it is removed with one line, so neither --resume nor test
    picks it up."""
    from google.protobuf.message import DecodeError

    message = caffe_pb2().NetParameter if suffix == ".caffemodel" else caffe_pb2().SolverState
    for path in sorted(inside(out, "snapshots").glob(f"*{suffix}"), key=snapshot_iteration, reverse=True):
        try:
            message().ParseFromString(path.read_bytes())
            return path
        except DecodeError:
            print(f"emotiw train: {path} is truncated (was the disk full?); removing it", file=sys.stderr)
            path.unlink()
    return None


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
    nets.get(net)  # an unknown name fails first, listing the valid ones
    check_solver_options(max_iter=max_iter, batch_size=batch_size, test_batch_size=test_batch_size,
                         test_interval=test_interval, test_iter=test_iter, snapshot=snapshot, display=display,
                         base_lr=base_lr)
    with output_folder(out, "train", inputs=[train, val], rerun="run it again with --resume"):
        return _train(net, train, val, out, weights, resume, max_iter, base_lr, batch_size, test_batch_size,
                      test_interval, test_iter, snapshot, display, input_size, num_classes, mean,
                      bn_moving_average_fraction, gpu, seed, check_images, settings)


def check_solver_options(base_lr, **counts):
    """One line for a solver option that Caffe would take silently or die on (0 turns snapshots
    and the display off)."""
    for name, value in counts.items():
        least = 0 if name in ("snapshot", "display") else 1
        if value is not None and value < least:
            raise UserError(f"--{name.replace('_', '-')} must be at least {least}, not {value}")
    if base_lr is not None and not (math.isfinite(base_lr) and base_lr > 0):
        raise UserError(f"--base-lr must be a finite number above 0, not {base_lr}")


def _train(net, train, val, out, weights, resume, max_iter, base_lr, batch_size, test_batch_size, test_interval,
           test_iter, snapshot, display, input_size, num_classes, mean, bn_moving_average_fraction, gpu, seed,
           check_images, settings):
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
        state = newest_snapshot(out, ".solverstate")
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
    last_model = newest_snapshot(out, ".caffemodel")
    last = str(last_model) if last_model else "none"
    if diverged:
        raise UserError(f"the loss diverged (NaN/inf) at iteration {curves.iteration}; training stopped, "
                        f"last snapshot: {last}; lower --base-lr and start again")
    if stopped_by is not None:
        raise TrainingStopped(stopped_by, stopped_message(stopped_by, curves, resume_command(
            net, train, val, out, settings)))
    if status != 0:
        reason = first_fatal_line((out / "train.log").read_text(errors="replace"))
        hint = f"; if {state} is damaged, delete it to resume from the snapshot before" if state else ""
        raise UserError(f"caffe train stopped with status {status} at iteration {curves.iteration} "
                        f"({reason}); full log: {out / 'train.log'}; last snapshot: {last}{hint}")
    best = curves.best_test()
    print(f"final model: {last}")
    if best:
        print(f"best val accuracy {best[1]:.4f} at iteration {best[0]}")
    print(f"log {out / 'train.log'}, curves {out / 'curves.png'}")
    files = {kind: out / f"{kind}.prototxt" for kind in ("train_val", "test", "deploy", "solver")}
    files.update(log=out / "train.log", curves=out / "curves.csv", plot=out / "curves.png")
    return TrainResult(out=out, model=last_model, best_val=best,
                       iterations=curves.iteration, files=files, solvers=solvers)
