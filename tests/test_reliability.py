"""Reliability, round 3: every stage's output folder under the same rules (emotiw.output), bounded
pixels, a private Ray cluster, honest train options, predict's identity and its messages. Each test
is a repro from the bad-input probe; real stages, real Caffe, real FFmpeg throughout.
"""

import contextlib
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import media
import numpy as np
import pytest
from helpers import make_clips, remount, tmpfs, write_list

from emotiw.cli import main
from emotiw.formats.features import write_feature_file
from emotiw.formats.files import exclusive_lock, replace_dir

STAGES = ["preprocess", "predict", "test", "extract", "train", "features", "fuse", "export"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def material(setup, tmp_path_factory):
    """Small real inputs for every stage: a talking-head clip, the tiny nets of conftest's `setup`,
    HDF5 feature lists, a preprocess-like faces folder and two score files."""
    root = tmp_path_factory.mktemp("material")
    (root / "videos").mkdir()
    media.moving_face_clip(root / "videos" / "talk.mp4", frames=8)
    rng = np.random.default_rng(0)
    features = root / "features"
    train = write_feature_file(features, "train", rng.normal(0, 1, (14, 88)), np.arange(14) % 7)
    val = write_feature_file(features, "val", rng.normal(0, 1, (7, 88)), np.arange(7))
    faces = root / "faces"
    (faces / "lists").mkdir(parents=True)
    write_list(faces / "lists" / "train_videos.txt", make_clips(faces / "clips", [3, 3], size=(40, 40)))
    scores = [root / f"model{index}.txt" for index in range(2)]
    for index, path in enumerate(scores):
        np.savetxt(path, rng.dirichlet(np.ones(7), size=3))
    names = root / "names.txt"
    names.write_text("a.avi 0\nb.avi 1\nc.avi 2\n")
    return {**setup, "videos_list": setup["videos"], "videos": root / "videos", "video": root / "videos" / "talk.mp4",
            "train": train, "val": val, "faces": faces, "scores": scores, "names": names}


def stage_command(stage, m, out):
    """The stage's command line writing into `out` (export: the file out/net.onnx)."""
    return [str(part) for part in {
        "preprocess": ["preprocess", "--videos", m["videos"], "--out", out, "--recipe", "sse"],
        "predict": ["predict", m["video"], "--out", out, "--no-video"],
        "test": ["test", "--net", m["deploy"], "--weights", m["weights"], "--videos", m["videos_list"],
                 "--out", out, "--recipe", "none"],
        "extract": ["extract", "--net", m["test"], "--weights", m["weights"], "--videos", m["videos_list"],
                    "--out", out],
        "train": ["train", "audio_linear_svm", "--train", m["train"], "--val", m["val"], "--out", out,
                  "--max-iter", 4, "--test-interval", 4, "--test-iter", 1, "--batch-size", 7],
        "features": ["features", "--kind", "lbptop", "--faces", m["faces"], "--split", "train", "--out", out],
        "fuse": ["fuse", *m["scores"], "--videos", m["names"], "--out", out],
        "export": ["export", m["deploy"], "--weights", m["weights"], "--onnx", out / "net.onnx"],
    }[stage]]


def run(stage, m, out, capsys):
    code = main(stage_command(stage, m, out))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.strip()]


def tree(folder):
    return sorted(str(path.relative_to(folder)) for path in Path(folder).rglob("*"))


# ------------------------------------------------------------------------- one OUT rule for every stage

# Where each stage would write through a planted link: a work folder, a folder it fills, a file
LINKED = {"preprocess": "faces", "predict": ".work", "test": "frames.csv", "extract": "prob_leveldb",
          "train": "snapshots", "features": "lbptop", "fuse": "submission", "export": "net.onnx"}


@pytest.mark.parametrize("stage", STAGES)
def test_a_link_planted_in_out_never_takes_a_write_outside(stage, material, tmp_path, capsys):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / LINKED[stage]).symlink_to(elsewhere, target_is_directory=True)
    code, lines = run(stage, material, out, capsys)
    assert tree(elsewhere) == []
    if code != 0:
        assert code == 2 and "symbolic link" in lines[-1], lines


@pytest.mark.parametrize("stage", STAGES)
def test_an_out_that_is_a_file_is_one_line(stage, material, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "net.onnx" if stage == "export" else out).parent.mkdir(exist_ok=True)
    if stage == "export":
        (out / "net.onnx").mkdir(parents=True)  # a folder where its one file goes
    else:
        out.write_text("keep me")
    code, lines = run(stage, material, out, capsys)
    assert code == 2 and ("is a file" in lines[-1] or "is a folder" in lines[-1]), lines
    assert stage == "export" or out.read_text() == "keep me"


@pytest.mark.parametrize("stage", STAGES)
def test_an_out_inside_an_input_is_refused_and_the_input_is_untouched(stage, material, capsys):
    """OUT equal to an input, or inside an input folder: a rerun read its own outputs as clips."""
    given = {"preprocess": material["videos"], "predict": material["video"], "test": material["videos_list"],
             "extract": material["videos_list"], "train": material["train"], "features": material["faces"],
             "fuse": material["scores"][0], "export": material["weights"]}[stage]
    before = tree(given.parent)
    out = given / "out" if given.is_dir() else given
    command = stage_command(stage, material, out)
    if stage == "export":
        command[command.index("--onnx") + 1] = str(given)
    code = main(command)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and any(words in lines[-1] for words in ("is a file", "is also an input", "inside the input")), lines
    assert tree(given.parent) == before


@pytest.mark.parametrize("stage", STAGES)
def test_a_second_run_into_one_out_is_refused(stage, material, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    lock = out / (".net.onnx.lock" if stage == "export" else ".lock")
    with exclusive_lock(lock, "held by the test"):  # another run holding it
        code, lines = run(stage, material, out, capsys)
    assert code == 2 and f"another emotiw {stage} is writing" in lines[-1], lines


@pytest.mark.parametrize("stage", STAGES)
def test_a_read_only_out_is_one_line(stage, material, tmp_path, capsys):
    with tmpfs(tmp_path / "disk", 1 << 20) as disk:
        (disk / "out").mkdir()
        remount(disk, "ro")
        code, lines = run(stage, material, disk / "out", capsys)
    assert code == 2 and "Read-only file system" in lines[-1], lines


# ------------------------------------------------------------------------- files replaced in one step

@pytest.mark.parametrize("old", ["folder", "file", "link"])
def test_a_replaced_output_leaves_nothing_of_the_old_one_behind(old, tmp_path):
    finished, target, elsewhere = tmp_path / ".new", tmp_path / "target", tmp_path / "elsewhere"
    finished.mkdir()
    (finished / "new.txt").write_text("new")
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    {"folder": lambda: (target.mkdir(), (target / "old.txt").write_text("old")),
     "file": lambda: target.write_text("old"),
     "link": lambda: target.symlink_to(elsewhere)}[old]()
    replace_dir(finished, target)
    assert sorted(os.listdir(tmp_path)) == ["elsewhere", "target"]  # no .old-PID, no .new
    assert not target.is_symlink() and os.listdir(target) == ["new.txt"]
    assert os.listdir(elsewhere) == ["keep.txt"]


# ------------------------------------------------------------------------- predict: names, identity, causes

def predict_here(capsys, *argv):
    code = main(["predict", *map(str, argv), "--no-video"])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, [line for line in captured.err.splitlines() if line.strip()]


@pytest.mark.parametrize("name", ["..mp4", ".talk.mp4", "two\nlines.mp4", "x" * 244 + ".mp4"])
def test_a_video_name_becomes_a_safe_folder_inside_out(name, material, tmp_path, capsys, monkeypatch):
    """`./..mp4` made the work folder `.o.work` beside OUT and removed it; a leading dot gave "no
    face found", a newline an internal list error, a long name the wrong final line."""
    monkeypatch.chdir(tmp_path)
    os.link(material["video"], tmp_path / name)
    code, printed, lines = predict_here(capsys, f"./{name}", "--out", "o")
    assert code == 0, lines
    assert sorted(os.listdir(tmp_path)) == sorted([name, "o"])
    (folder,) = [path for path in (tmp_path / "o").iterdir() if not path.name.startswith(".")]
    assert not folder.name.startswith(".") and "\n" not in folder.name and len(folder.name) <= 100
    assert json.loads((folder / "summary.json").read_text())["emotion"] in printed


def test_a_rerun_skips_only_a_video_made_the_same_way(material, tmp_path, capsys):
    """`predict a/clip.mp4` then `predict b/clip.mp4` said "already done" and showed a's result."""
    first, second = tmp_path / "a" / "clip.mp4", tmp_path / "b" / "clip.mp4"
    first.parent.mkdir()
    second.parent.mkdir()
    os.link(material["video"], first)
    media.moving_face_clip(second, frames=6)
    out = tmp_path / "out"
    assert predict_here(capsys, first, "--out", out)[0] == 0
    code, printed, _ = predict_here(capsys, first, "--out", out)
    assert code == 0 and "already done" in printed
    code, printed, lines = predict_here(capsys, second, "--out", out)
    assert code == 0 and "already done" not in printed
    assert "was made from another video" in lines[0]
    summary = json.loads((out / "clip" / "summary.json").read_text())
    assert summary["video"] == str(second) and summary["frames"] == 6
    code, printed, lines = predict_here(capsys, second, "--out", out, "--every", 2)
    assert "already done" not in printed and "another options" in lines[0]
    (out / "clip" / "summary.json").write_text("{ damaged")
    code, printed, lines = predict_here(capsys, second, "--out", out, "--every", 2)
    assert code == 0 and "is damaged; doing that step again" in lines[0]
    assert json.loads((out / "clip" / "summary.json").read_text())["frames"] == 3


@pytest.mark.parametrize("case, cause", [("missing", "no such file"), ("empty", "the file is empty"),
                                         ("folder", "not a video file"), ("damaged", "not a video FFmpeg can read")])
def test_the_final_line_names_the_real_cause(case, cause, tmp_path, capsys):
    """It said "no video gave a face" whatever happened."""
    video = tmp_path / "clip.mp4"
    if case == "empty":
        video.write_bytes(b"")
    elif case == "folder":
        video.mkdir()
    elif case == "damaged":
        media.corrupt_file(video)
    code, _, lines = predict_here(capsys, video, "--out", tmp_path / "out")
    assert code == 2 and cause in lines[-1] and str(video) in lines[-1], lines


def test_a_full_disk_during_predict_is_said_as_such(material, tmp_path, capsys):
    """A full disk was reported as "no face found"."""
    with tmpfs(tmp_path / "disk", 64 << 10) as disk:
        code, _, lines = predict_here(capsys, material["video"], "--out", disk / "out")
    assert code == 2 and "No space left on device" in lines[-1], lines


# ------------------------------------------------------------------------- bounded pixels

def huge_png(path, side=16384):
    """A valid black side x side RGB PNG of about 0.8 MB, written a row at a time."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, row, parts = zlib.compressobj(9), b"\0" * (1 + 3 * side), []
    for _ in range(side):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))
    return path


def huge_video(path, side=12000):
    """A YUV4MPEG2 stream that declares side x side frames (and holds a few bytes of one)."""
    path.write_bytes(f"YUV4MPEG2 W{side} H{side} F25:1 Ip A1:1 C420jpeg\nFRAME\n".encode() + b"\x80" * 4096)
    return path


def peak_rss_mb(command):
    """(exit status, stderr, the command's peak resident memory in MB), measured in a fresh process."""
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "print(r.returncode); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
             "sys.stdout.write(r.stderr)")
    result = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True, cwd=REPO)
    code, peak, err = result.stdout.split("\n", 2)
    return int(code), err, int(peak) / 1024


@pytest.fixture(scope="module")
def huge(tmp_path_factory):
    folder = tmp_path_factory.mktemp("huge")
    return {"image": huge_png(folder / "huge.png"), "video": huge_video(folder / "huge.y4m")}


@pytest.mark.parametrize("stage, kind", [("detect", "image"), ("predict", "video"), ("predict", "image")])
def test_a_huge_picture_is_refused_from_its_header_in_little_memory(stage, kind, huge, tmp_path):
    """A 0.8 MB PNG of 16384x16384 took 18 GB in `detect`; an oversized image was a "damaged video"."""
    side = 16384 if kind == "image" else 12000
    out = ["--out", str(tmp_path / "out")] if stage == "predict" else []
    code, err, peak = peak_rss_mb([sys.executable, "-m", "emotiw.cli", stage, str(huge[kind]), *out])
    assert code == 2 and "Traceback" not in err
    assert f"{side}x{side} is larger than the limit of 40 megapixels; --max-pixels raises it" in err.splitlines()[-1]
    assert peak < 1024


def test_max_pixels_raises_the_limit(huge, tmp_path, capsys):
    assert main(["predict", str(huge["video"]), "--out", str(tmp_path / "out"), "--max-pixels", "100"]) == 2
    assert "larger than the limit of 100 megapixels" in capsys.readouterr().err
    assert main(["predict", str(huge["video"]), "--out", str(tmp_path / "out"), "--max-pixels", "0"]) == 2
    assert "--max-pixels must be above 0" in capsys.readouterr().err
    assert "EMOTIW_MAX_MEGAPIXELS" not in os.environ  # set for the command only


# ------------------------------------------------------------------------- train: options, snapshots, messages

@pytest.mark.parametrize("option, value, message", [
    ("--base-lr", "nan", "--base-lr must be a finite number above 0, not nan"),
    ("--base-lr", "inf", "--base-lr must be a finite number above 0, not inf"),
    ("--base-lr", "0", "--base-lr must be a finite number above 0"),
    ("--batch-size", "0", "--batch-size must be at least 1, not 0"),
    ("--batch-size", "-4", "--batch-size must be at least 1, not -4"),
    ("--max-iter", "0", "--max-iter must be at least 1, not 0"),
    ("--max-iter", "-5", "--max-iter must be at least 1, not -5"),
    ("--test-iter", "0", "--test-iter must be at least 1, not 0"),
    ("--snapshot", "-1", "--snapshot must be at least 0, not -1"),
])
def test_train_refuses_options_caffe_would_take_silently(option, value, message, material, tmp_path, capsys):
    """--base-lr nan trained a NaN model with "best val accuracy 1.0000"; --batch-size 0 trained with
    128; --max-iter 0 exited 0 with "final model: none"; --batch-size -4 gave a traceback."""
    command = stage_command("train", material, tmp_path / "out")
    if option in command:
        command[command.index(option) + 1] = value
    else:
        command += [option, value]
    assert main(command) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [f"emotiw train: error: {message}"] or message in lines[-1]
    assert not (tmp_path / "out").exists()


def test_a_truncated_snapshot_is_never_picked(material, tmp_path, capsys):
    """A full disk left a truncated iter_N.caffemodel that --resume and test took for a snapshot."""
    out = tmp_path / "out"
    command = stage_command("train", material, out) + ["--snapshot", "2"]
    assert main(command) == 0
    snapshots = out / "snapshots"
    newest_state = max(snapshots.glob("*.solverstate"), key=lambda path: int(path.stem.rpartition("_")[2]))
    newest_state.write_bytes(newest_state.read_bytes()[:7])
    capsys.readouterr()
    assert main(command + ["--resume"]) == 0
    captured = capsys.readouterr()
    assert f"{newest_state} is truncated (was the disk full?); removing it" in captured.err
    assert f"resuming from {snapshots / 'audio_linear_svm_iter_2.solverstate'}" in captured.out
    assert newest_state.stat().st_size > 7  # written again by the resumed run


def test_train_messages_name_the_option_and_plain_labels(material, tmp_path, capsys):
    garbage = tmp_path / "mean.binaryproto"
    garbage.write_bytes(b"\xff" * 64)
    image_list = tmp_path / "train.txt"
    write_list(image_list, make_clips(tmp_path / "clips", [2], size=(40, 40)))
    frames = sorted((tmp_path / "clips").rglob("*.png"))
    image_list.write_text("".join(f"{frame} 9\n" for frame in frames))
    assert main(["train", "sse_holonet_3conv-s_concat", "--train", str(image_list), "--val", str(image_list),
                 "--out", str(tmp_path / "a")]) == 2
    line = capsys.readouterr().err.splitlines()[-1]
    assert "labels [9] are outside 0..6" in line and "int64" not in line
    image_list.write_text("".join(f"{frame} 1\n" for frame in frames))
    assert main(["train", "sse_holonet_3conv-s_concat", "--train", str(image_list), "--val", str(image_list),
                 "--out", str(tmp_path / "b"), "--mean", str(garbage)]) == 2
    assert "--mean: " in capsys.readouterr().err.splitlines()[-1]


# ------------------------------------------------------------------------- messages

def test_an_unknown_net_is_named_with_close_names(material, tmp_path, capsys):
    """`--net nosuch` suggested `emotiw nets`, which cannot make an unregistered net."""
    assert main(["test", "--net", "sse_holonet_3conv-s_concatt", "--weights", str(material["weights"]),
                 "--videos", str(material["videos_list"]), "--out", str(tmp_path / "out")]) == 2
    line = capsys.readouterr().err.splitlines()[-1]
    assert "neither a registered name nor a prototxt file" in line
    assert "did you mean sse_holonet_3conv-s_concat" in line


def test_features_names_its_errors_file(tmp_path, capsys):
    """It ended with "see None"."""
    faces = tmp_path / "faces"
    (faces / "clips" / "empty").mkdir(parents=True)
    (faces / "lists").mkdir()
    write_list(faces / "lists" / "train_videos.txt", [f"{faces / 'clips' / 'empty'} 0"])
    assert main(["features", "--kind", "lbptop", "--faces", str(faces), "--split", "train",
                 "--out", str(tmp_path / "out")]) == 2
    line = capsys.readouterr().err.splitlines()[-1]
    errors = tmp_path / "out" / "lbptop" / "train_errors.csv"
    assert f"see {errors}" in line and errors.is_file()


def test_extract_takes_a_mean_file_and_says_when_the_nets_is_missing(material, tmp_path, capsys):
    """A registered net naming the authors' mean file died inside extract_features, with no option
    to give it."""
    from google.protobuf import text_format

    from emotiw.caffe.proto import caffe_pb2, read_net_param

    param = read_net_param(material["test"])
    layer = next(layer for layer in param.layer if layer.type == "ImageData")
    del layer.transform_param.mean_value[:]
    layer.transform_param.mean_file = "data/EmotiW_3_norm/EmotiW_3_norm_mean.binaryproto"
    net = tmp_path / "test.prototxt"
    net.write_text(text_format.MessageToString(param))
    command = ["extract", "--net", str(net), "--weights", str(material["weights"]),
               "--videos", str(material["videos_list"]), "--out", str(tmp_path / "out")]
    assert main(command) == 2
    line = capsys.readouterr().err.splitlines()[-1]
    assert "mean file data/EmotiW_3_norm/EmotiW_3_norm_mean.binaryproto" in line and "--mean-file" in line
    mean = tmp_path / "mean.binaryproto"
    blob = caffe_pb2().BlobProto()
    blob.shape.dim.extend([1, 3, 24, 24])
    blob.data.extend([100.0] * 3 * 24 * 24)
    mean.write_bytes(blob.SerializeToString())
    assert main(command + ["--mean-file", str(mean)]) == 0


def test_caffe_tools_leave_nothing_in_tmp(material, tmp_path, monkeypatch):
    """convert_imageset and compute_image_mean left glog files and links in /tmp (with Caffe's log
    asked for, GLOG_minloglevel=0, as docs/testing.md says)."""
    monkeypatch.setenv("GLOG_minloglevel", "0")
    before = set(os.listdir("/tmp"))
    out = tmp_path / "out"
    assert main(stage_command("preprocess", material, out) + ["--lmdb"]) == 0
    assert {name for name in set(os.listdir("/tmp")) - before
            if name.startswith(("convert_imageset", "compute_image_mean"))} == set()


# ------------------------------------------------------------------------- Ray, private by default

def listening():
    """The listening TCP sockets of this machine, as `ss` prints their local addresses."""
    result = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True)
    return {line.split()[3] for line in result.stdout.splitlines()}


LOOPBACK = ("127.0.0.1", "[::1]", "[::ffff:127.0.0.1]")


def test_a_ray_cluster_started_here_listens_on_loopback_only(monkeypatch):
    """A local cluster's GCS, raylet and worker ports listened on all interfaces; its files went to /tmp/ray."""
    import ray

    from emotiw.execution.cluster import Cluster
    from emotiw.formats.files import cache_root

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    before = listening()
    sessions = set((cache_root() / "ray").glob("session_2*"))
    with Cluster(True) as cluster:
        assert cluster.size >= 1
        opened = listening() - before
    assert opened and all(address.rpartition(":")[0] in LOOPBACK for address in opened), opened
    assert set((cache_root() / "ray").glob("session_2*")) - sessions  # its session lives in the cache


def ray_workers():
    """Pids of the processes of emotiw's Ray actors (named ray::Worker by Ray)."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(b"ray::Worker"):
                found.append(int(entry.name))
    return found


def test_sigterm_under_ray_is_one_line_and_143(material, tmp_path):
    import signal
    import time

    command = [sys.executable, "-m", "emotiw.cli", *stage_command("test", material, tmp_path / "out"), "--ray"]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=env)
    deadline = time.monotonic() + 120
    while not ray_workers() and process.poll() is None:  # connected, its actors started
        assert time.monotonic() < deadline, "Ray did not start"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip() and "WARNING" not in line and "INFO" not in line]
    assert process.returncode == 143, err
    assert lines[-1] == "emotiw test: stopped by SIGTERM" and "Traceback" not in err


def test_a_batch_that_cannot_fit_in_memory_is_refused_before_caffe(material, tmp_path, capsys):
    """`--size 100000` and huge batches reached Caffe as allocations of tens of GB."""
    command = stage_command("test", material, tmp_path / "out") + ["--batch", "100000000"]
    assert main(command) == 2
    line = capsys.readouterr().err.splitlines()[-1]
    assert "--batch 100000000 makes blobs of" in line and "lower --batch" in line
    assert main(stage_command("preprocess", material, tmp_path / "p") + ["--size", "100000"]) == 2
    assert "--size 100000 makes crops that take" in capsys.readouterr().err


def test_a_damaged_test_checkpoint_is_scored_again_with_one_line(material, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(stage_command("test", material, out)) == 0
    expected = (out / "scores.txt").read_text()
    (out / ".test-checkpoint.npz").write_bytes(b"PK\x03\x04 damaged")
    capsys.readouterr()
    assert main(stage_command("test", material, out)) == 0
    assert ".test-checkpoint.npz is damaged; scoring every frame again" in capsys.readouterr().err
    assert (out / "scores.txt").read_text() == expected
