"""`emotiw preprocess` end to end: real PyAV decoding, the real MTCNN detector, real Caffe tools.

One reference run over an AFEW-style folder (a moving face, a two-face clip, a clip with no face,
broken files, an unknown label folder) is compared with a killed-and-resumed run and a 2-worker
run; a RAF-DB-style image folder goes through to an LMDB read back by a Caffe Data layer.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import media
import numpy as np
import pytest

from emotiw import EMOTIONS
from emotiw.caffe.env import BLAS_THREADS_VARIABLES, caffe_mkl_path
from emotiw.cli import main
from emotiw.face.align import crop_dsn, to_gray
from emotiw.face.video import iter_frames
from helpers import read_csv, snapshot

REPO = Path(__file__).resolve().parents[1]
MOVING_FRAMES, TWO_FACE_FRAMES, SUBJECT_MISSING = 8, 10, 5


def centre_inside(row, patch, scale=1.0):
    x = (float(row["x1"]) + float(row["x2"])) / 2 * scale
    y = (float(row["y1"]) + float(row["y2"])) / 2 * scale
    return patch[0] <= x <= patch[2] and patch[1] <= y <= patch[3]


def preprocess(videos, out, *options):
    return main(["preprocess", "--videos", str(videos), "--out", str(out), "--recipe", "sse", *options])


@pytest.fixture(scope="module")
def afew(tmp_path_factory):
    """AFEW-style folder `Val/<Emotion>/<clip>`, and the ground-truth head boxes of the face clips."""
    root = tmp_path_factory.mktemp("afew") / "Val"
    for emotion in ("Happy", "Sad", "Neutral", "Fear", "Angry", "Bored"):
        (root / emotion).mkdir(parents=True)
    truth = {"001": media.moving_face_clip(root / "Happy" / "001.mp4", MOVING_FRAMES)}
    truth["002"] = media.two_face_clip(root / "Sad" / "002.avi", TWO_FACE_FRAMES, SUBJECT_MISSING)
    media.no_face_clip(root / "Neutral" / "003.mp4")
    media.corrupt_file(root / "Fear" / "004.mp4")
    (root / "Fear" / "005.avi").touch()
    media.truncated_copy(root / "Sad" / "002.avi", root / "Angry" / "006.avi", keep=0.4)
    (root / "Bored" / "007.mp4").write_bytes((root / "Happy" / "001.mp4").read_bytes())
    return root, truth


@pytest.fixture(scope="module")
def reference(afew, tmp_path_factory):
    """One uninterrupted run with one worker."""
    root, _ = afew
    out = tmp_path_factory.mktemp("reference")
    assert preprocess(root, out) == 0
    return out


def test_faces_manifest_lists_and_summary(afew, reference):
    root, truth = afew
    rows = read_csv(reference / "manifest.csv")
    moving = [r for r in rows if r["clip"] == "001"]
    assert [int(r["frame"]) for r in moving] == list(range(MOVING_FRAMES))
    assert [float(r["time"]) for r in moving] == pytest.approx([i / media.FPS for i in range(MOVING_FRAMES)])
    assert {r["split"] for r in rows} == {"val"}
    assert all(r["label"] == str(EMOTIONS.index("Happy")) and r["detected"] == "1" for r in moving)
    for row, patch in zip(moving, truth["001"]):
        assert centre_inside(row, patch)
        crop = cv2.imread(str(reference / row["crop"]))
        assert crop.shape == (128, 128, 3)
    assert {r["clip"] for r in rows} == {"001", "002", "003"}
    assert {r["detected"] for r in rows if r["clip"] == "003"} == {"0"}

    faces = [r for r in rows if r["detected"] == "1"]
    list_lines = (reference / "lists" / "val.txt").read_text().splitlines()
    assert list_lines == [f"{reference.resolve() / r['crop']} {r['label']}" for r in faces]
    assert (reference / "lists" / "val_videos.txt").read_text().splitlines() == [
        f"{reference.resolve() / 'faces' / 'val' / '001'} 3", f"{reference.resolve() / 'faces' / 'val' / '002'} 5"]

    summary = json.loads((reference / "summary.json").read_text())
    assert summary["clips"] == 6  # 001..006; the unknown label folder never becomes a clip
    assert (summary["clips_failed"], summary["clips_without_face"], summary["errors"]) == (3, 1, 5)
    assert (summary["frames"], summary["faces"]) == (len(rows), len(faces))


def test_bad_inputs_each_get_one_error_line(afew, reference):
    errors = read_csv(reference / "errors.csv")
    messages = {r["clip"]: r["message"] for r in errors}
    assert len(errors) == len(messages) == 5
    assert "no face" in messages["003"]
    assert "not a video" in messages["004"]
    assert "empty file" in messages["005"]
    assert "truncated" in messages["006"]
    assert "unknown label 'Bored'" in messages["007"]


def test_two_faces_keep_the_main_subject(afew, reference):
    _, truth = afew
    subject_boxes, _ = truth["002"]
    rows = [r for r in read_csv(reference / "manifest.csv") if r["clip"] == "002"]
    assert len(rows) == TWO_FACE_FRAMES
    for row, patch in zip(rows, subject_boxes):
        if patch is None:  # the subject left the frame: recorded missing, the other face not taken
            assert row["detected"] == "0" and row["crop"] == ""
        else:
            assert row["detected"] == "1" and centre_inside(row, patch)
    assert len({r["track"] for r in rows if r["detected"] == "1"}) == 1


def test_a_killed_run_resumes_to_the_same_outputs(afew, reference, tmp_path):
    root, _ = afew
    out = tmp_path / "out"
    command = [sys.executable, "-m", "emotiw.cli", "preprocess", "--videos", str(root), "--out", str(out), "--recipe", "sse"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not list((out / "clips").glob("*/*.csv")) and process.poll() is None:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "manifest.csv").exists()
    assert preprocess(root, out) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["clips_processed_now"] < summary["clips"]  # the finished clip was skipped
    assert snapshot(out) == snapshot(reference)
    assert not [p for p in out.rglob(".*")], "temporary files left behind"


def test_two_workers_give_the_same_outputs_as_one(afew, reference, tmp_path):
    root, _ = afew
    assert preprocess(root, tmp_path, "--workers", "2") == 0
    assert snapshot(tmp_path) == snapshot(reference)


WORKER_THREADS = """
import os, queue, sys
import cv2
from emotiw.caffe.env import CaffeBLAS
from emotiw.execution.workers import init_worker
init_worker(queue.Queue(), int(sys.argv[1]))
blas = CaffeBLAS()  # Caffe, and with it its BLAS, loads after the worker's setup, as in detector()
import ctypes
print(cv2.getNumThreads(), blas.threads, ctypes.CDLL("libgomp.so.1").omp_get_max_threads())
"""


@pytest.mark.parametrize("user_setting, expected", [(None, "1 1 1"), ("2", "1 2 2")])
def test_a_worker_takes_its_share_of_the_cores(user_setting, expected):
    """Workers do not oversubscribe the machine: OpenCV, Caffe's BLAS (MKL or OpenBLAS) and OpenMP
    (Caffe's layer loops and oneDNN) use the threads given; a thread count the user set for that BLAS
    is kept, and is OpenMP's too: the BLAS runs on OpenMP's threads (caffe_patches/0008)."""
    variable = BLAS_THREADS_VARIABLES["mkl" if caffe_mkl_path() else "openblas"]
    env = {key: value for key, value in os.environ.items()
           if key not in (*BLAS_THREADS_VARIABLES.values(), "OMP_NUM_THREADS")}
    if user_setting:
        env[variable] = user_setting
    result = subprocess.run([sys.executable, "-c", WORKER_THREADS, "1"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[-2] == expected


def test_dsn_mode_crops_400_pixel_faces_from_1024_wide_frames(afew, tmp_path):
    root, truth = afew
    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / "001.mp4").write_bytes((root / "Happy" / "001.mp4").read_bytes())
    assert main(["preprocess", "--videos", str(clips), "--out", str(tmp_path / "out"), "--recipe", "dsn",
                 "--every", "2", "--max-frames", "3", "--gray"]) == 0
    rows = read_csv(tmp_path / "out" / "manifest.csv")
    assert [(r["split"], r["label"], r["frame"]) for r in rows] == [("clips", "-1", "0"), ("clips", "-1", "2"),
                                                                      ("clips", "-1", "4")]
    frames = {frame.index: frame.image for frame in iter_frames(clips / "001.mp4", width=1024)}
    for row in rows:
        # boxes are in the clip's own 320x240 pixels; the crops come from its frames 1024 wide
        assert centre_inside(row, truth["001"][int(row["frame"])])
        crop = cv2.imread(str(tmp_path / "out" / row["crop"]), cv2.IMREAD_UNCHANGED)
        box = [float(row[name]) * 1024 / 320 for name in ("x1", "y1", "x2", "y2")]
        assert np.array_equal(crop, to_gray(crop_dsn(frames[int(row["frame"])], box)))
    sizes = json.loads((tmp_path / "out" / "preprocess.json").read_text())["clips"]["clips/001"]
    assert (sizes["source_size"], sizes["detect_size"], sizes["crop_size"]) == ([320, 240], [320, 240], [1024, 768])
    # unlabelled clips get label 0 in Caffe lists
    assert all(line.endswith(" 0") for line in (tmp_path / "out" / "lists" / "clips.txt").read_text().splitlines())


def test_dsn_frames_writes_every_frame_and_reports_broken_clips(afew, tmp_path):
    root, _ = afew
    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / "003.mp4").write_bytes((root / "Neutral" / "003.mp4").read_bytes())
    (clips / "004.mp4").write_bytes((root / "Fear" / "004.mp4").read_bytes())
    out = tmp_path / "out"
    assert main(["preprocess", "--videos", str(clips), "--out", str(out), "--dsn-frames"]) == 0
    frames = sorted((out / "frames" / "clips" / "003").iterdir())
    assert [p.name for p in frames] == [f"003-{i:03d}.png" for i in range(1, 7)]
    assert cv2.imread(str(frames[0])).shape == (768, 1024, 3)
    assert [r["clip"] for r in read_csv(out / "errors.csv")] == ["004"]


@pytest.fixture(scope="module")
def rafdb(tmp_path_factory):
    """RAF-DB basic's layout: images named by split, list_patition_label.txt with classes 1..7."""
    root = tmp_path_factory.mktemp("rafdb")
    labels = {"train_00001": 1, "train_00002": 4, "train_00003": 6, "test_0001": 7}  # Surprise, Happiness, Anger, Neutral
    for index, name in enumerate(labels):
        image, _ = media.face_image(flip=index % 2 == 1, height=130 + 10 * index)
        cv2.imwrite(str(root / f"{name}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    lines = [f"{name}.jpg {label}" for name, label in labels.items()] + ["train_00009.jpg 2", "train_00004.jpg 9"]
    cv2.imwrite(str(root / "train_00004.jpg"), cv2.imread(str(root / "train_00001.jpg")))
    (root / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    return root


def test_rafdb_images_become_an_lmdb_in_afew_order(rafdb, tmp_path):
    from emotiw.caffe.env import import_caffe

    caffe = import_caffe()
    out = tmp_path / "out"
    assert main(["preprocess", "--images", str(rafdb), "--labels", str(rafdb / "list_patition_label.txt"),
                 "--label-map", "rafdb", "--out", str(out), "--recipe", "sse", "--lmdb"]) == 0
    rows = read_csv(out / "manifest.csv")
    expected = {"train_00001": "Surprise", "train_00002": "Happy", "train_00003": "Angry", "test_0001": "Neutral"}
    assert {r["clip"]: (r["split"], int(r["label"])) for r in rows} == {
        name: (name.split("_")[0], EMOTIONS.index(emotion)) for name, emotion in expected.items()}
    errors = {r["clip"]: r["message"] for r in read_csv(out / "errors.csv")}
    assert set(errors) == {"train_00009", "train_00004"}
    assert "no such file" in errors["train_00009"] and "not in 1..7" in errors["train_00004"]

    # A Caffe Data layer reads the LMDB: every datum is one crop (BGR, CHW) with its label.
    crops = {str(out.resolve() / r["crop"]): int(r["label"]) for r in rows if r["split"] == "train"}
    net_file = tmp_path / "data.prototxt"
    spec = caffe.NetSpec()
    spec.data, spec.label = caffe.layers.Data(source=str(out / "lmdb" / "train_lmdb"), backend=caffe.params.Data.LMDB,
                                              batch_size=len(crops), ntop=2)
    net_file.write_text(str(spec.to_proto()))
    net = caffe.Net(str(net_file), caffe.TEST)
    net.forward()
    batch, labels = net.blobs["data"].data, net.blobs["label"].data
    found = set()
    for path, label in crops.items():
        image = cv2.imread(path).transpose(2, 0, 1).astype(np.float32)
        matches = [k for k in range(len(crops)) if np.array_equal(batch[k], image)]
        assert len(matches) == 1 and labels[matches[0]] == label
        found.add(matches[0])
    assert len(found) == len(crops)

    mean_blob = caffe.proto.caffe_pb2.BlobProto()
    mean_blob.ParseFromString((out / "lmdb" / "train_mean.binaryproto").read_bytes())
    mean = np.array(mean_blob.data).reshape(3, 128, 128)
    assert mean == pytest.approx(np.mean([cv2.imread(p).transpose(2, 0, 1) for p in crops], axis=0), abs=1e-3)


def test_aligned_images_with_a_csv_of_names_are_only_resized(rafdb, tmp_path):
    import lmdb

    from emotiw.caffe.env import import_caffe

    caffe = import_caffe()
    labels = tmp_path / "labels.csv"
    labels.write_text("clip,label\ntrain_00001,happy\ntrain_00002.jpg,Sad\ntrain_00003,0\ntest_0001,6\ntrain_00004,Fear\n")
    out = tmp_path / "out"
    assert main(["preprocess", "--images", str(rafdb), "--labels", str(labels), "--aligned", "--size", "64",
                 "--gray", "--split", "train", "--out", str(out), "--lmdb"]) == 0
    rows = read_csv(out / "manifest.csv")
    assert [(r["clip"], r["label"]) for r in rows] == [("test_0001", "6"), ("train_00001", "3"), ("train_00002", "5"),
                                                      ("train_00003", "0"), ("train_00004", "2")]
    for row in rows:
        assert cv2.imread(str(out / row["crop"]), cv2.IMREAD_UNCHANGED).shape == (64, 64)
    # the `lmdb` package and Caffe's Datum see single-channel 64x64 images
    with lmdb.open(str(out / "lmdb" / "train_lmdb"), readonly=True, lock=False) as env, env.begin() as txn:
        datums = [caffe.proto.caffe_pb2.Datum.FromString(value) for _, value in txn.cursor()]
    assert len(datums) == len(rows)
    assert {(d.channels, d.height, d.width) for d in datums} == {(1, 64, 64)}
    assert sorted(d.label for d in datums) == sorted(int(r["label"]) for r in rows)


@pytest.mark.parametrize("options, message", [
    (["--every", "0"], "--every >= 1"),
    (["--aligned"], "--aligned applies to --images"),
    (["--workers", "0"], "must be positive"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, options, message):
    assert preprocess(tmp_path, tmp_path / "out", *options) == 2
    assert message in capsys.readouterr().err


def test_other_settings_cannot_mix_into_an_existing_output(afew, reference, capsys):
    root, _ = afew
    before = snapshot(reference)
    assert main(["preprocess", "--videos", str(root), "--out", str(reference), "--recipe", "dsn"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert snapshot(reference) == before
