"""`emotiw predict` on a real clip with a real audio track: the embedded model, all four outputs,
the same probabilities as `emotiw preprocess` + `emotiw test` run by hand, resuming, bad videos."""

import csv
import json
from fractions import Fraction

import av
import numpy as np
import pytest

from emotiw import EMOTIONS
from emotiw.cli import main
from emotiw.errors import UserError
from emotiw.face.video import iter_frames
from emotiw.nets import fer


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def with_tone(source, path, seconds_of_tone=None):
    """The carphone frames in H.264 plus a 440 Hz AAC tone as long as the video: a clip with sound."""
    frames = [frame.image[:, :192] for frame in iter_frames(source)]  # even width for yuv420p
    rate = Fraction(30000, 1001)
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=rate)
        video.width, video.height, video.pix_fmt = 192, 144, "yuv420p"
        audio = container.add_stream("aac", rate=16000)
        audio.layout = "mono"
        samples = int(16000 * len(frames) / rate)
        tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(samples) / 16000)).astype(np.float32)
        for start in range(0, samples, 1024):
            chunk = av.AudioFrame.from_ndarray(tone[None, start:start + 1024], format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts = 16000, start
            container.mux(audio.encode(chunk))
        container.mux(audio.encode())
        for image in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")))
        container.mux(video.encode())
    return path, len(frames)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from testmedia import footage

    try:
        source = footage.footage_dir() / "carphone_pristine.mp4"
        fer.ensure_model()
    except UserError as error:
        pytest.skip(str(error))
    return with_tone(source, tmp_path_factory.mktemp("videos") / "carphone.mp4")


@pytest.fixture(scope="module")
def predicted(clip, tmp_path_factory):
    path, _ = clip
    out = tmp_path_factory.mktemp("predicted")
    assert main(["predict", str(path), "--out", str(out), "--every", "3"]) == 0
    return out / "carphone"


def test_all_four_outputs_with_the_embedded_model(clip, predicted):
    _, frames = clip
    rows = read_csv(predicted / "frames.csv")
    assert [int(row["frame"]) for row in rows] == list(range(0, frames, 3))
    for row in rows:
        probs = [float(row[emotion]) for emotion in EMOTIONS]
        assert row["detected"] == "1" and abs(sum(probs) - 1) < 1e-4 and row["prediction"] in EMOTIONS
        assert 0 <= float(row["x1"]) < float(row["x2"]) <= 192  # source pixels of the 192-wide clip
    summary = json.loads((predicted / "summary.json").read_text())
    mean = np.mean([[float(row[e]) for e in EMOTIONS] for row in rows], axis=0)
    np.testing.assert_allclose(summary["scores"], mean, atol=1e-5)
    assert summary["emotion"] == EMOTIONS[int(np.argmax(mean))] and summary["net"] == fer.NAME
    assert (predicted / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    annotated = list(iter_frames(predicted / "annotated.mp4"))
    assert len(annotated) == frames and annotated[0].image.shape == (144, 192, 3)
    with av.open(str(predicted / "annotated.mp4")) as copy, av.open(str(clip[0])) as source:
        assert copy.streams.audio[0].codec_context.name == "aac"
        copied = sum(1 for packet in copy.demux(copy.streams.audio[0]) if packet.size)
        original = sum(1 for packet in source.demux(source.streams.audio[0]) if packet.size)
        assert copied == original
    assert not any(path.name.startswith(".") for path in predicted.parent.iterdir())  # work folders gone


def test_probabilities_equal_preprocess_and_test_run_by_hand(clip, predicted, tmp_path):
    path, _ = clip
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / path.name).symlink_to(path)
    assert main(["preprocess", "--videos", str(tmp_path / "clips"), "--out", str(tmp_path / "faces"),
                 "--recipe", "sse", "--size", "64", "--gray", "--every", "3"]) == 0
    weights = fer.ensure_model()
    assert main(["test", "--net", fer.NAME, "--weights", str(weights), "--videos",
                 str(tmp_path / "faces" / "lists" / "clips_videos.txt"), "--out", str(tmp_path / "scores")]) == 0
    by_hand = [[float(row[e]) for e in EMOTIONS] for row in read_csv(tmp_path / "scores" / "frames.csv")]
    predicted_rows = [[float(row[e]) for e in EMOTIONS] for row in read_csv(predicted / "frames.csv")]
    np.testing.assert_allclose(predicted_rows, by_hand, atol=1e-6)


def test_a_finished_video_is_skipped_and_bad_videos_are_one_line_each(clip, predicted, tmp_path, capsys):
    import media

    stamp = (predicted / "frames.csv").stat().st_mtime_ns
    no_face = media.no_face_clip(tmp_path / "coffee.mp4")
    broken = media.corrupt_file(tmp_path / "broken.mp4")
    assert main(["predict", str(clip[0]), str(no_face), str(broken), "--out", str(predicted.parent),
                 "--every", "3"]) == 0
    assert (predicted / "frames.csv").stat().st_mtime_ns == stamp
    captured = capsys.readouterr()
    assert "carphone" in captured.out and "already done" in captured.out
    problems = [line for line in captured.err.splitlines() if line.startswith("emotiw predict: ")]
    assert len(problems) == 2 and "no face" in problems[0] and "broken.mp4" in problems[1]
    assert not (predicted.parent / "coffee").exists() and not (predicted.parent / "broken").exists()
    assert main(["predict", str(no_face), "--out", str(tmp_path / "none")]) == 2


def test_without_out_the_outputs_go_to_predictions_in_the_working_folder(clip, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["predict", str(clip[0]), "--every", "20", "--no-video"]) == 0
    assert sorted(path.name for path in (tmp_path / "predictions" / "carphone").iterdir()) == \
        ["frames.csv", "summary.json", "timeline.png"]


def test_weights_without_a_net_is_one_line(tmp_path, capsys):
    assert main(["predict", "x.mp4", "--out", str(tmp_path), "--weights", "w.caffemodel"]) == 2
    assert "give --net and --weights together" in capsys.readouterr().err


def test_the_api_returns_tables(clip, predicted):
    import emotiw

    result = emotiw.predict([clip[0]], predicted.parent, every=3)  # finished: read back, not redone
    video = result.videos[0]
    assert video.skipped and list(video.frames.columns) == ["frame", "time", "shot", "detected", "x1", "y1", "x2",
                                                            "y2", "prediction", *EMOTIONS]
    assert len(video.frames) == 40 and video.frames["detected"].all()
    summary = result.summary
    assert summary.loc[0, "emotion"] == video.emotion == summary.loc[0, list(EMOTIONS)].astype(float).idxmax()


def test_nets_load_once_inside_reusing_nets(tmp_path):
    from pathlib import Path

    from emotiw.caffe.runtime import load_net, reusing_nets

    deploy = Path(__file__).resolve().parents[1] / "prototxt" / fer.NAME / "deploy.prototxt"
    weights = fer.ensure_model()
    assert load_net(deploy, weights)[0] is not load_net(deploy, weights)[0]
    with reusing_nets():
        first, _ = load_net(deploy, weights)
        assert load_net(deploy, weights)[0] is first
        assert load_net(deploy, weights, "pycaffe")[0] is not first


def test_a_video_name_that_is_no_plain_file_name_works(clip, tmp_path):
    import emotiw

    odd = tmp_path / "my clip (1).mp4"
    odd.symlink_to(clip[0])
    result = emotiw.predict([odd], tmp_path / "out", every=10, annotate=False)
    assert result.videos[0].folder == tmp_path / "out" / "my clip (1)"
    assert len(result.videos[0].frames) == 12
