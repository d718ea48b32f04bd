"""`emotiw train`: real `caffe train` runs of a registered net on tiny generated lists."""

import csv
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from emotiw.caffe.log import TrainingCurves
from emotiw.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
NET = "sse_holonet_3conv-s_concat"
SIZE = 48
EMOTIW = str(Path(sys.prefix) / "bin" / "emotiw")


def write_list(root, name, per_class, seed):
    """Images whose bright band's position encodes the class, so the task is learnable."""
    rng = np.random.default_rng(seed)
    folder = root / name
    folder.mkdir(parents=True)
    lines = []
    for label in range(7):
        for index in range(per_class):
            image = rng.integers(0, 50, size=(SIZE, SIZE, 3), dtype=np.uint8)
            band = slice(label * SIZE // 7, (label + 1) * SIZE // 7)
            image[band] += 180
            path = folder / f"{label}_{index}.png"
            cv2.imwrite(str(path), image)
            lines.append(f"{path} {label}")
    listing = root / f"{name}.txt"
    listing.write_text("\n".join(lines) + "\n")
    return listing


@pytest.fixture(scope="module")
def lists(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    return write_list(root, "train", 2, seed=0), write_list(root, "val", 1, seed=1)


def train_args(train, val, out, *extra):
    return ["train", NET, "--train", str(train), "--val", str(val), "--out", str(out),
            "--batch-size", "4", "--test-batch-size", "7", "--test-iter", "1", "--test-interval", "3",
            "--snapshot", "3", "--display", "1", "--input-size", str(SIZE), *extra]


@pytest.fixture(scope="module")
def trained(lists, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(train_args(*lists, out, "--max-iter", "6")) == 0
    return out


def test_training_writes_log_curves_and_snapshots(trained):
    assert (trained / "snapshots" / f"{NET}_iter_6.caffemodel").exists()
    assert (trained / "snapshots" / f"{NET}_iter_3.solverstate").exists()
    for name in ("train_val.prototxt", "solver.prototxt", "deploy.prototxt", "curves.png", "train.log"):
        assert (trained / name).stat().st_size > 0
    rows = list(csv.DictReader((trained / "curves.csv").open()))
    total = [r for r in rows if r["phase"] == "train" and r["name"] == "total_loss"]
    assert [int(r["iteration"]) for r in total] == list(range(6))
    assert all(np.isfinite(float(r["value"])) for r in total)
    tests = {int(r["iteration"]) for r in rows if r["phase"] == "test" and r["name"] == "accuracy"}
    assert {0, 3, 6} <= tests
    # every loss of the net appears as its own curve next to the total
    assert {r["name"] for r in rows if r["phase"] == "train"} >= {"total_loss", "loss", "lr"}


def test_curves_parse_the_real_log_the_same_way(trained):
    curves = TrainingCurves()
    for line in (trained / "train.log").read_text().splitlines():
        curves.feed(line)
    assert curves.iteration == 5
    assert curves.snapshots and curves.snapshots[-1].endswith(".solverstate")
    assert curves.best_test() is not None


def test_sources_go_into_the_run_directory_not_the_committed_prototxt(lists, trained):
    from emotiw import nets

    committed = Path(nets.__file__).resolve().parents[2] / "prototxt" / NET / "train_val.prototxt"
    train_list = str(lists[0].resolve())
    assert train_list in (trained / "train_val.prototxt").read_text()
    assert train_list not in committed.read_text()


def curve_rows(out):
    return list(csv.DictReader((out / "curves.csv").open()))


def test_resume_continues_from_the_newest_solverstate_and_appends_to_the_curves(lists, trained, tmp_path):
    out = tmp_path / "resumed"
    out.mkdir()
    (out / "snapshots").mkdir()
    for suffix in ("caffemodel", "solverstate"):
        source = trained / "snapshots" / f"{NET}_iter_6.{suffix}"
        (out / "snapshots" / source.name).write_bytes(source.read_bytes())
    before = curve_rows(trained)
    # a row after the resume point (from a longer run the resume abandons) must go
    with (out / "curves.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["iteration", "phase", "name", "value"])
        writer.writeheader()
        writer.writerows([*before, {"iteration": 7, "phase": "train", "name": "total_loss", "value": 123456}])
    assert main(train_args(*lists, out, "--max-iter", "8", "--resume")) == 0
    log = (out / "train.log").read_text()
    assert "Resuming from" in log
    assert (out / "snapshots" / f"{NET}_iter_8.caffemodel").exists()
    rows = curve_rows(out)
    total = [int(r["iteration"]) for r in rows if r["name"] == "total_loss"]
    assert total == list(range(8))  # 0..5 from the first run, 6 and 7 from the resumed one
    assert "123456" not in {r["value"] for r in rows}
    assert [r for r in rows if int(r["iteration"]) < 6] == [r for r in before if int(r["iteration"]) < 6]
    def tests(table):
        return [int(r["iteration"]) for r in table if r["phase"] == "test" and r["name"] == "accuracy"]

    assert set(tests(rows)) == {0, 3, 6}
    assert tests(rows) == tests(before)  # iteration 6's test is logged again on resume, and kept once
    assert (out / "curves.png").stat().st_size > 0


def test_skip_image_check_without_mean_trains_on_a_list(lists, trained, tmp_path, capsys):
    """The net used a mean file we do not have: the mean colour of the (sampled) training images
    stands in, not compute_image_mean, which reads LMDBs only."""
    out = tmp_path / "skipped"
    assert main(train_args(*lists, out, "--max-iter", "1", "--skip-image-check")) == 0
    assert "subtracting the mean colour of 14 training images" in capsys.readouterr().out

    def means(run):
        return [line for line in (run / "train_val.prototxt").read_text().splitlines() if "mean_value" in line]

    assert means(out) and means(out) == means(trained)  # all 14 images: the checked run's mean


def start_training(args, out, logged="Iteration 2 "):
    """`emotiw train` in its own process group, once caffe has logged `logged`."""
    process = subprocess.Popen([EMOTIW, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    log = out / "train.log"
    deadline = time.time() + 120
    try:
        while not (log.exists() and logged in log.read_text()):
            assert process.poll() is None, process.communicate()
            assert time.time() < deadline, f"no {logged!r} in {log} after 120 s"
            time.sleep(0.2)
    except AssertionError:
        os.killpg(process.pid, signal.SIGKILL)  # the test's own emotiw and caffe
        raise
    return process


def children(pid):
    """Process ids whose parent is `pid`, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def running(pid):
    """Alive and not a zombie (a container's init may never reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("how, code, what", [("SIGTERM", 143, "SIGTERM"), ("Ctrl-C", 130, "Ctrl-C")])
def test_a_signal_snapshots_stops_caffe_and_says_how_to_resume(lists, tmp_path, how, code, what):
    out = tmp_path / "stopped"
    args = train_args(*lists, out, "--max-iter", "100000", "--snapshot", "0")
    process = start_training(args, out)
    caffe = children(process.pid)
    assert len(caffe) == 1
    if how == "SIGTERM":  # what schedulers and `timeout` send
        process.send_signal(signal.SIGTERM)
    else:  # Ctrl-C in a terminal: SIGINT to the whole foreground process group
        os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"emotiw train: stopped by {what}: training stopped at iteration ")
    assert not running(caffe[0])
    assert "Optimization stopped early" in (out / "train.log").read_text()
    iteration = int(lines[0].split("iteration ", 1)[1].split()[0])
    assert iteration >= 2 and (out / "snapshots" / f"{NET}_iter_{iteration}.solverstate").exists()
    assert (out / "snapshots" / f"{NET}_iter_{iteration}.caffemodel").exists()
    # the resume command is this command plus --resume, word for word
    resume = shlex.split(lines[0].split("resume with: ", 1)[1])
    assert resume[:2] == ["emotiw", "train"]
    assert vars(build_parser().parse_args(resume[1:])) == {**vars(build_parser().parse_args(args)), "resume": True}


def test_sigkill_of_emotiw_takes_caffe_along(lists, tmp_path):
    # caffe trains silently after its first test (no display, no further test): a caffe that wrote
    # would die of SIGPIPE anyway; this one goes only because it gets a signal when emotiw dies
    out = tmp_path / "killed"
    args = train_args(*lists, out, "--max-iter", "100000", "--snapshot", "0", "--display", "0",
                      "--test-interval", "100000")
    process = start_training(args, out, logged="Test net output")
    caffe = children(process.pid)
    assert len(caffe) == 1
    process.kill()
    process.communicate(timeout=60)
    deadline = time.time() + 30
    while running(caffe[0]) and time.time() < deadline:
        time.sleep(0.1)
    assert not running(caffe[0])


@pytest.mark.parametrize("problem", ["missing", "empty", "unreadable", "label", "missing image"])
def test_bad_lists_fail_with_one_line(lists, tmp_path, problem):
    train, val = lists
    bad = tmp_path / "bad.txt"
    if problem == "missing image":  # OpenCV's own `[ WARN ] imread_(...)` line must not come first
        bad.write_text(f"{tmp_path / 'gone.png'} 0\n")
    elif problem == "empty":
        bad.write_text("")
    elif problem == "unreadable":
        broken = tmp_path / "broken.png"
        broken.write_bytes(b"not a png")
        bad.write_text(f"{broken} 0\n")
    elif problem == "label":
        bad.write_text(train.read_text().splitlines()[0].rsplit(" ", 1)[0] + " 9\n")
    result = subprocess.run([EMOTIW, *train_args(bad, val, tmp_path / "out", "--max-iter", "2")],
                            capture_output=True, text=True)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and "Traceback" not in result.stderr, result.stderr
    assert {"missing": "not found", "empty": "empty", "unreadable": "not a readable image",
            "label": "outside 0..6", "missing image": "gone.png is not found"}[problem] in message[0]


def test_weights_for_another_net_are_refused(lists, tmp_path):
    from caffe import layers as L

    from emotiw.caffe.env import import_caffe

    caffe = import_caffe()
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 8, 8]))
    n.other_conv = L.Convolution(n.data, num_output=2, kernel_size=3)
    prototxt = tmp_path / "other.prototxt"
    prototxt.write_text(str(n.to_proto()))
    weights = tmp_path / "other.caffemodel"
    caffe.Net(str(prototxt), caffe.TEST).save(str(weights))
    result = subprocess.run([EMOTIW, *train_args(*lists, tmp_path / "out", "--max-iter", "2",
                                                 "--weights", str(weights))], capture_output=True, text=True)
    assert result.returncode != 0
    assert "does not fit this net" in result.stderr and "Traceback" not in result.stderr
    assert "NOTHING LOADED" in result.stdout


def test_divergence_stops_and_keeps_the_last_good_snapshot(lists, tmp_path):
    out = tmp_path / "diverged"
    result = subprocess.run([EMOTIW, *train_args(*lists, out, "--max-iter", "200", "--base-lr", "1e12")],
                            capture_output=True, text=True, env=dict(os.environ))
    assert result.returncode != 0
    assert "diverged" in result.stderr and "Traceback" not in result.stderr


def batchnorm_factors(prototxt, caffemodel):
    """The third blob of every BatchNorm layer: Caffe's sum of moving_average_fraction powers."""
    from emotiw.caffe.env import import_caffe

    caffe = import_caffe()
    net = caffe.Net(str(prototxt), caffe.TEST, weights=str(caffemodel))
    return {name: float(blobs[2].data[0]) for name, blobs in net.params.items()
            if net.layer_dict[name].type == "BatchNorm"}


def test_bn_moving_average_fraction_reaches_caffe(lists, trained, tmp_path):
    out = tmp_path / "fraction"
    assert main(train_args(*lists, out, "--max-iter", "3", "--bn-moving-average-fraction", "0.5")) == 0
    layers = [block for block in (out / "train_val.prototxt").read_text().split("layer {")
              if 'type: "BatchNorm"' in block]
    assert layers and all("moving_average_fraction: 0.5" in block for block in layers)
    assert "moving_average_fraction" not in (REPO / "prototxt" / NET / "train_val.prototxt").read_text()
    # after n updates Caffe's factor is 1 + f + ... + f^(n-1); by the iteration-3 snapshot there were
    # 4: the validation pass at iteration 0 (the released nets' TEST phase uses batch statistics
    # and shares the blobs with the TRAIN net) and 3 training iterations
    def factor(fraction, updates=4):
        return sum(fraction ** k for k in range(updates))

    factors = batchnorm_factors(out / "deploy.prototxt", out / "snapshots" / f"{NET}_iter_3.caffemodel")
    assert factors and all(value == pytest.approx(factor(0.5)) for value in factors.values())
    default = batchnorm_factors(trained / "deploy.prototxt", trained / "snapshots" / f"{NET}_iter_3.caffemodel")
    assert all(value == pytest.approx(factor(0.999)) for value in default.values())


def test_bn_moving_average_fraction_out_of_range_is_refused(lists, tmp_path):
    result = subprocess.run([EMOTIW, *train_args(*lists, tmp_path / "out", "--max-iter", "2",
                                                 "--bn-moving-average-fraction", "1.5")],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--bn-moving-average-fraction must be between 0 and 1" in result.stderr


def test_gpu_on_a_cpu_only_build_is_refused_in_one_line(lists, tmp_path):
    from emotiw.caffe.env import caffe_build_info

    if caffe_build_info()["gpu"]:
        pytest.skip("the Caffe linked into this venv is a CUDA build")
    for gpu in ("0", "all", "0,1"):
        result = subprocess.run([EMOTIW, *train_args(*lists, tmp_path / "out", "--max-iter", "2", "--gpu", gpu)],
                                capture_output=True, text=True)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert f"--gpu {gpu}: the Caffe linked into this venv is a CPU-only build" in lines[0]
        assert "CAFFE_GPU=1 make install" in lines[0]
        assert not (tmp_path / "out").exists()  # refused before anything was written or run


def test_gpu_takes_caffes_device_lists(lists, tmp_path):
    from emotiw.stages.train import caffe_command, check_gpu

    result = subprocess.run([EMOTIW, *train_args(*lists, tmp_path / "out", "--max-iter", "2", "--gpu", "0;1")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--gpu 0;1: give `all`, one GPU id (0) or a comma-separated list" in result.stderr
    command = caffe_command(tmp_path / "solver.prototxt", gpu="0,1")
    assert command[1] == "train" and command[-1] == "--gpu=0,1"
    assert check_gpu(None) is None


def test_the_solver_count_is_shown(lists, tmp_path, capsys):
    from emotiw.stages.train import solver_line, train

    result = train(NET, *lists, tmp_path / "out", max_iter=1, batch_size=4, test_batch_size=7, test_iter=1,
                   test_interval=3, snapshot=3, display=1, input_size=SIZE)
    assert result.solvers == "1 solver on the CPU"
    assert "caffe train: 1 solver on the CPU" in capsys.readouterr().out
    assert "Use CPU." in (tmp_path / "out" / "train.log").read_text()  # what it was read from
    # caffe train's line on a CUDA build, as tools/caffe.cpp writes it
    assert solver_line("I1201 10:40:35.751032  1083 caffe.cpp:204] Using GPUs 0, 1\n") == "2 solvers on GPUs 0, 1"
    assert solver_line("I1201 10:40:35.751032  1083 caffe.cpp:204] Using GPUs 3") == "1 solver on GPU 3"
    assert solver_line("I1201 10:40:35.751032  1083 solver.cpp:57] Solver scaffolding done.") is None
