"""`emotiw test`: per-video scores against DSN's test_video.py loop and Caffe's own ImageData
transform, both backends, fallbacks, resume, outputs and bad input; on tiny NetSpec nets."""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import media
import numpy as np
import pytest

from emotiw import EMOTIONS
from emotiw.caffe.env import import_caffe
from emotiw.caffe.runtime import OpenCVNet, PycaffeNet, load_net, reusing_nets
from emotiw.caffe.transform import Transform
from emotiw.cli import main
from emotiw.formats.scores import read_scores
from emotiw.metrics import classification_metrics
from emotiw.nets.reference import resolve_net
from emotiw.formats.lists import read_clips
from emotiw.stages.test import score_frames

caffe = import_caffe()
from caffe import layers as L  # noqa: E402
from helpers import deploy_net, make_clips, read_csv, tiny_net, write_list  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DSN_MEAN = np.array([104.0, 117.0, 123.0])


def dsn_test_video_scores(deploy, weights, folders):
    """DSN's test_video.py: one frame at a time, resize 256, crop [16:240], minus the mean, summed prob."""
    net = caffe.Net(str(deploy), caffe.TEST, weights=str(weights))
    sums = []
    for folder in folders:
        total = np.zeros(len(EMOTIONS))
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".png"):
                continue
            image = cv2.resize(cv2.imread(str(Path(folder) / name)), (256, 256))
            image = image[16:240, 16:240].astype(np.float64) - DSN_MEAN
            net.blobs["data"].data[...] = image.transpose(2, 0, 1)
            total += net.forward()["prob"][0]
        sums.append(total)
    return np.array(sums)


# ------------------------------------------------------------------------------------------
# Scores

def test_dsn_sum_matches_test_video_loop(tmp_path, dsn_setup):
    deploy, weights, videos = dsn_setup
    out = tmp_path / "out"
    assert main(["test", "--net", str(deploy), "--weights", str(weights), "--videos", str(videos),
                 "--out", str(out), "--agg", "sum", "--batch", "3", "--blobs", "prob,fc"]) == 0

    folders = [line.split()[0] for line in videos.read_text().splitlines()]
    labels = np.array([int(line.split()[1]) for line in videos.read_text().splitlines()])
    expected = dsn_test_video_scores(deploy, weights, folders)
    assert np.ptp(expected / [[3], [2], [4], [1]], axis=0).max() > 1e-3
    scores = read_scores(out / "scores.txt").scores
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)

    predictions = read_csv(out / "predictions.csv")
    assert [row["clip"] for row in predictions] == folders
    assert [int(row["prediction"]) for row in predictions] == list(expected.argmax(axis=1))
    assert [int(row["n_frames"]) for row in predictions] == [3, 2, 4, 1]
    assert all(row["fallback"] == "0" for row in predictions)

    frames = read_csv(out / "frames.csv")
    assert len(frames) == 10 and all(row["readable"] == "1" for row in frames)
    assert frames[0]["frame"].endswith("clip00/frame-000.png")
    assert len(read_scores(out / "scores_fc.txt").scores) == 4

    metrics = json.loads((out / "metrics.json").read_text())
    expected_accuracy = float(np.mean(expected.argmax(axis=1) == labels))
    assert metrics["accuracy"] == pytest.approx(expected_accuracy)
    assert metrics["accuracy_with_faces"] == pytest.approx(expected_accuracy)
    assert np.array(metrics["confusion_matrix"]).sum() == 4
    assert metrics["config"]["recipe"] == "dsn"  # from the name: not an sse_ net
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / ".test-checkpoint.npz").exists()


def test_mean_aggregation_is_sum_over_frames(tmp_path, dsn_setup):
    deploy, weights, videos = dsn_setup
    for agg in ("mean", "sum"):
        assert main(["test", "--net", str(deploy), "--weights", str(weights), "--videos", str(videos),
                     "--out", str(tmp_path / agg), "--agg", agg]) == 0
    means = read_scores(tmp_path / "mean" / "scores.txt").scores
    sums = read_scores(tmp_path / "sum" / "scores.txt").scores
    np.testing.assert_allclose(means * np.array([3, 2, 4, 1])[:, None], sums, rtol=1e-5)


def test_sse_preprocessing_matches_caffe_imagedata(tmp_path):
    """SSE nets: the transform of test.prototxt's data layer (mean file, scale), as Caffe applies it."""
    net_dir = tmp_path / "sse_tiny"
    deploy, weights = deploy_net(net_dir, side=32, seed=3)
    lines = make_clips(tmp_path / "faces", [2, 3], size=(32, 32), seed=3)
    videos = write_list(tmp_path / "videos.txt", lines)
    mean = np.random.default_rng(4).uniform(60, 160, size=(1, 3, 32, 32))
    mean_file = tmp_path / "mean.binaryproto"
    mean_file.write_bytes(caffe.io.array_to_blobproto(mean).SerializeToString())
    frames = [str(frame) for clip in read_clips(videos) for frame in clip.frames]
    frame_list = write_list(tmp_path / "frames.txt", [f"{frame} 0" for frame in frames])
    transform = dict(mean_file=str(mean_file), scale=0.5)
    data, _ = L.ImageData(source=str(frame_list), batch_size=1, ntop=2, transform_param=transform)
    (net_dir / "test.prototxt").write_text(str(tiny_net(data)))

    imagedata_net = caffe.Net(str(net_dir / "test.prototxt"), caffe.TEST, weights=str(weights))
    per_frame = np.array([imagedata_net.forward()["prob"][0].copy() for _ in frames])
    expected = np.array([per_frame[:2].mean(axis=0), per_frame[2:].mean(axis=0)])
    assert np.ptp(per_frame, axis=0).max() > 1e-3  # frames score differently: order and mean matter

    out = tmp_path / "out"
    assert main(["test", "--net", str(deploy), "--weights", str(weights), "--videos", str(videos),
                 "--out", str(out)]) == 0
    np.testing.assert_allclose(read_scores(out / "scores.txt").scores, expected, rtol=1e-5, atol=1e-6)
    assert json.loads((out / "metrics.json").read_text())["config"]["recipe"] == "sse"


def test_opencv_backend_gives_the_same_prob(tmp_path):
    deploy, weights = deploy_net(tmp_path / "net", side=64, seed=5, batchnorm=True)
    batch = np.random.default_rng(6).uniform(-120, 120, size=(5, 3, 64, 64)).astype(np.float32)
    with_caffe = PycaffeNet(deploy, weights).forward(batch, ["prob", "fc"])
    with_opencv = OpenCVNet(deploy, weights).forward(batch, ["prob", "fc"])
    assert with_caffe["prob"].shape == with_opencv["prob"].shape == (5, len(EMOTIONS))
    np.testing.assert_allclose(with_opencv["prob"], with_caffe["prob"], atol=1e-4)
    np.testing.assert_allclose(with_opencv["fc"], with_caffe["fc"], atol=1e-3)
    assert np.ptp(with_caffe["prob"]) > 1e-3  # the comparison is not between constant outputs


def test_opencv_backend_end_to_end(tmp_path, dsn_setup):
    deploy, weights, videos = dsn_setup
    for backend in ("pycaffe", "opencv"):
        assert main(["test", "--net", str(deploy), "--weights", str(weights), "--videos", str(videos),
                     "--out", str(tmp_path / backend), "--backend", backend, "--batch", "4"]) == 0
    np.testing.assert_allclose(read_scores(tmp_path / "opencv" / "scores.txt").scores,
                               read_scores(tmp_path / "pycaffe" / "scores.txt").scores, atol=1e-4)


def auto_backend(net):
    return resolve_net(net).preferred_backend


def test_auto_backend_follows_the_backbone(tmp_path):
    from emotiw import nets

    for name in nets.names():
        entry = nets.get(name)
        expected = "opencv" if entry.backbone.startswith(("VGG-Face", "mini-Xception")) else "pycaffe"
        assert auto_backend(name) == expected
        assert auto_backend(REPO / "prototxt" / name / "deploy.prototxt") == expected  # a path names it too
    assert (auto_backend("vgg_face"), auto_backend("dsn_resnet50"), auto_backend("sse_holonet_original")) == (
        "opencv", "pycaffe", "pycaffe")
    deploy, _ = deploy_net(tmp_path / "my_own_net", side=32)
    assert auto_backend(deploy) == "pycaffe"


def test_auto_backend_loads_the_chosen_backend(tmp_path):
    registered = tmp_path / "VGG_FACE"  # a net named like a registered one, in a folder of any name
    deploy, weights = deploy_net(registered, side=32, seed=1)
    runner, kind = load_net(deploy, weights, "auto", resolve_net(deploy).preferred_backend)
    assert (type(runner), kind) == (OpenCVNet, "opencv")
    unregistered, _ = deploy_net(tmp_path / "unregistered", side=32, seed=1)
    runner, kind = load_net(unregistered, weights, "auto", resolve_net(unregistered).preferred_backend)
    assert (type(runner), kind) == (PycaffeNet, "pycaffe")
    assert load_net(deploy, weights, "pycaffe", "opencv")[1] == "pycaffe"  # an explicit choice is kept


def test_auto_backend_is_recorded_in_metrics(tmp_path, dsn_setup):
    deploy, weights, videos = dsn_setup
    assert main(["test", "--net", str(deploy), "--weights", str(weights), "--videos", str(videos),
                 "--out", str(tmp_path / "out"), "--batch", "4"]) == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["config"]["backend"] == "pycaffe"


# ------------------------------------------------------------------------------------------
# Clips without faces, resume, metrics

def test_missing_empty_and_unreadable_clips(tmp_path, capsys):
    deploy, weights = deploy_net(tmp_path / "net", side=32, seed=7)
    lines = make_clips(tmp_path / "faces", [2, 0, 3], size=(32, 32), seed=7)
    (tmp_path / "faces" / "clip02" / "frame-001.png").write_bytes(b"not an image")
    lines.insert(1, f"{tmp_path / 'faces' / 'gone'} 4")
    videos = write_list(tmp_path / "videos.txt", lines)
    train = write_list(tmp_path / "train.txt", ["a 3", "b 3", "c 0", "d 5"])
    out = tmp_path / "out"
    assert main(["test", "--net", str(deploy), "--weights", str(weights), "--videos", str(videos),
                 "--out", str(out), "--recipe", "none", "--prior-list", str(train)]) == 0
    err = capsys.readouterr().err
    assert "1 clip folder(s) missing" in err and "1 clip folder(s) without face frames" in err
    assert "1 frame image(s) could not be read" in err

    prior = np.bincount([3, 3, 0, 5], minlength=len(EMOTIONS)) / 4
    rows = read_csv(out / "predictions.csv")
    scores = read_scores(out / "scores.txt").scores
    assert [row["fallback"] for row in rows] == ["0", "1", "1", "0"]
    assert [int(row["n_frames"]) for row in rows] == [2, 0, 0, 2]
    np.testing.assert_allclose(scores[1], prior, atol=1e-6)
    np.testing.assert_allclose(scores[2], prior, atol=1e-6)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["missing_folders"] == [str(tmp_path / "faces" / "gone")]
    assert metrics["empty_folders"] == [str(tmp_path / "faces" / "clip01")]
    assert metrics["unreadable_frames"] == [str(tmp_path / "faces" / "clip02" / "frame-001.png")]
    labels = np.array([0, 4, 1, 2])
    predicted = scores.argmax(axis=1)
    assert metrics["accuracy"] == pytest.approx(np.mean(predicted == labels))
    assert metrics["accuracy_with_faces"] == pytest.approx(np.mean(predicted[[0, 3]] == labels[[0, 3]]))
    assert metrics["fallback_clips"] == 2


def test_unlabelled_list_has_scores_but_no_accuracy(tmp_path):
    deploy, weights = deploy_net(tmp_path / "net", side=32, seed=10)
    lines = make_clips(tmp_path / "faces", [2, 1], size=(32, 32), seed=10)
    videos = write_list(tmp_path / "test_videos.txt", [line.split()[0] for line in lines])
    out = tmp_path / "out"
    assert main(["test", "--net", str(deploy), "--weights", str(weights), "--videos", str(videos),
                 "--out", str(out), "--recipe", "none"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"] is None and metrics["clips"] == 2 and "confusion_matrix" not in metrics
    assert not (out / "confusion.png").exists()
    assert [row["label"] for row in read_csv(out / "predictions.csv")] == ["-1", "-1"]
    assert read_scores(out / "scores.txt").scores.shape == (2, len(EMOTIONS))


def test_unlabelled_clips_from_preprocess_are_not_scored_as_angry(tmp_path, capsys):
    """A flat folder of clips has no labels: the per-video list keeps -1 (the Caffe frame list has
    0, which ImageData needs), and `test` reports no accuracy instead of 0.0000 against Angry."""
    clips = tmp_path / "clips"
    clips.mkdir()
    media.moving_face_clip(clips / "001.mp4", frames=4)
    faces = tmp_path / "faces"
    assert main(["preprocess", "--videos", str(clips), "--out", str(faces), "--mode", "sse",
                 "--split", "test", "--max-frames", "2"]) == 0
    videos = faces / "lists" / "test_videos.txt"
    assert [line.rsplit(" ", 1)[1] for line in videos.read_text().splitlines()] == ["-1"]
    assert all(line.endswith(" 0") for line in (faces / "lists" / "test.txt").read_text().splitlines())
    deploy, weights = deploy_net(tmp_path / "net", side=32, seed=11)
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["test", "--net", str(deploy), "--weights", str(weights), "--videos", str(videos),
                 "--out", str(out), "--recipe", "none"]) == 0
    printed = capsys.readouterr().out
    assert "no labels: accuracy not computed" in printed and "accuracy 0" not in printed
    assert [row["label"] for row in read_csv(out / "predictions.csv")] == ["-1"]
    assert json.loads((out / "metrics.json").read_text())["accuracy"] is None


@pytest.mark.parametrize("problem", ["missing", "unreadable"])
def test_a_list_without_any_face_frame_is_an_error(tmp_path, capsys, problem):
    deploy, weights = deploy_net(tmp_path / "net", side=32, seed=12)
    if problem == "missing":  # e.g. relative folders, run from the wrong directory
        lines = [f"gone/clip{index} {index}" for index in range(3)]
        expected = "none of the 3 clips of"
    else:
        lines = make_clips(tmp_path / "faces", [2, 1], size=(32, 32), seed=12)
        for frame in (tmp_path / "faces").rglob("*.png"):
            frame.write_bytes(b"not an image")
        expected = "none of the 3 frame images"
    videos = write_list(tmp_path / "v.txt", lines)
    code = main(["test", "--net", str(deploy), "--weights", str(weights), "--videos", str(videos),
                 "--out", str(tmp_path / "out"), "--recipe", "none"])
    err = capsys.readouterr().err
    assert code == 2 and expected in err.strip().splitlines()[-1], err
    assert not (tmp_path / "out" / "scores.txt").exists() and not (tmp_path / "out" / "metrics.json").exists()


def test_weights_cut_at_a_layer_boundary_are_refused_unless_allowed(tmp_path, capsys):
    """A download cut between two layers still parses: it loads the first layers and leaves the
    others at random filler weights, which `test` must not score with silently."""
    deploy, weights = deploy_net(tmp_path / "net", side=32, seed=13)
    whole = caffe.proto.caffe_pb2.NetParameter.FromString(weights.read_bytes())
    names = [layer.name for layer in whole.layer]
    cut = caffe.proto.caffe_pb2.NetParameter(name=whole.name, layer=whole.layer[:names.index("conv") + 1])
    truncated = tmp_path / "truncated.caffemodel"
    truncated.write_bytes(cut.SerializeToString())
    assert weights.read_bytes().startswith(truncated.read_bytes())  # a prefix of the real file
    videos = write_list(tmp_path / "v.txt", make_clips(tmp_path / "faces", [1], size=(32, 32), seed=13))
    command = ["test", "--net", str(deploy), "--weights", str(truncated), "--videos", str(videos),
               "--recipe", "none"]
    assert main([*command, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "random filler weights, first 'fc'" in err[0] and "--allow-partial" in err[0]
    assert not (tmp_path / "refused").exists()
    assert main([*command, "--out", str(tmp_path / "allowed"), "--allow-partial"]) == 0
    assert "warning: PARTIAL: 1 of 2 layers" in capsys.readouterr().err


class InterruptAfter:
    """Counts a loaded net's forward passes and stops the run (as Ctrl-C would) after a number of them."""

    def __init__(self, runner, forwards):
        self.forward, self.left, self.calls = runner.forward, forwards, 0
        runner.forward = self  # the tasks get this very net back from reusing_nets

    def __call__(self, batch, blobs):
        self.calls += 1
        if self.left == 0:
            raise KeyboardInterrupt
        self.left -= 1
        return self.forward(batch, blobs)


def test_scoring_resumes_from_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr("emotiw.stages.test.CHECKPOINT_SECONDS", -1)  # save after every task
    deploy, weights = deploy_net(tmp_path / "net", side=32, seed=8)
    lines = make_clips(tmp_path / "faces", [4, 3], size=(32, 32), seed=8)
    frames = [frame for clip in read_clips(write_list(tmp_path / "v.txt", lines)) for frame in clip.frames]
    transform = Transform(channels=3, resize=(32, 32))
    spec = (deploy, weights, "pycaffe", "pycaffe", True, ("prob",))
    checkpoint = tmp_path / "checkpoint.npz"

    def score(forwards, checkpoint=None, signature=""):
        """score_frames on clips of 4 and 3 frames, 2 per forward pass (one task per clip)."""
        with reusing_nets():
            runner, _ = load_net(*spec)
            counted = InterruptAfter(runner, forwards)
            scores, readable = score_frames(runner, transform, frames, ["prob"], 2, spec, checkpoint, signature, [4, 3])
        return counted.calls, scores, readable

    _, complete, _ = score(99)
    with pytest.raises(KeyboardInterrupt):  # the probe pass, the first clip's two passes, then Ctrl-C
        score(3, checkpoint, "run-a")
    calls, scores, readable = score(99, checkpoint, "run-a")
    assert calls == 1 + 2  # the probe, then frames 5-6 and 7
    assert readable.all()
    np.testing.assert_allclose(scores["prob"], complete["prob"], rtol=1e-6)
    calls, _, _ = score(99, checkpoint, "run-b")
    assert calls == 1 + 4  # another run's checkpoint is not reused


def test_classification_metrics_by_counting():
    rng = np.random.default_rng(9)
    labels, predictions = rng.integers(0, 6, 50), rng.integers(0, 7, 50)  # class 6 never a label
    metrics = classification_metrics(labels, predictions)
    f1 = []
    for c in range(len(EMOTIONS)):
        tp = np.sum((labels == c) & (predictions == c))
        fp, fn = np.sum((labels != c) & (predictions == c)), np.sum((labels == c) & (predictions != c))
        if tp + fp + fn:
            f1.append(2 * tp / (2 * tp + fp + fn))
        recall = metrics["per_class_accuracy"][EMOTIONS[c]]
        assert recall == (pytest.approx(tp / np.sum(labels == c)) if np.any(labels == c) else None)
    assert metrics["macro_f1"] == pytest.approx(np.mean(f1))
    assert metrics["accuracy"] == pytest.approx(np.mean(labels == predictions))
    confusion = np.array(metrics["confusion_matrix"])
    assert confusion[labels[0], predictions[0]] >= 1 and confusion.sum() == 50


# ------------------------------------------------------------------------------------------
# Bad input

def test_weights_that_do_not_fit_exit_with_the_report(tmp_path):
    deploy, _ = deploy_net(tmp_path / "net", side=32)
    _, other_weights = deploy_net(tmp_path / "other", side=32, num_output=5)
    videos = write_list(tmp_path / "v.txt", make_clips(tmp_path / "faces", [1], size=(32, 32)))
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "test_video.py"), "--net", str(deploy),
                             "--weights", str(other_weights), "--videos", str(videos), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "shape mismatch: fc: net [[7, 196], [7]], file [[5, 196], [5]]" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("emotiw test: error: ")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o" / "scores.txt").exists()


@pytest.mark.parametrize("extra, message", [
    (["--blobs", "nope"], "no blob nope"),
    (["--blobs", "conv"], "must hold the 7 class scores"),
    (["--preprocess", "dsn"], "DSN preprocessing makes 3x224x224 inputs"),
    (["--preprocess", "sse"], "SSE preprocessing takes the mean from"),
    (["--prior-list", "/nonexistent/train.txt"], "not found"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, extra, message):
    deploy, weights = deploy_net(tmp_path / "net", side=32)
    videos = write_list(tmp_path / "v.txt", make_clips(tmp_path / "faces", [1], size=(32, 32)))
    code = main(["test", "--net", str(deploy), "--weights", str(weights), "--videos", str(videos),
                 "--out", str(tmp_path / "o"), "--recipe", "none", *extra])
    assert code == 2
    assert message in capsys.readouterr().err


def test_unregistered_net_name_says_where_it_looked(capsys, tmp_path):
    code = main(["test", "--net", "no_such_net", "--weights", "w", "--videos", "v", "--out", str(tmp_path)])
    assert code == 2
    assert "prototxt/no_such_net/deploy.prototxt" in capsys.readouterr().err
