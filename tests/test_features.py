"""`emotiw features`: openSMILE functionals of real speech (espeak-ng) in real clips, LBP-TOP
against a hand-computed volume, and the HDF5 files that Caffe's HDF5Data layer reads."""

import csv
import json
import shutil
import subprocess

import h5py
import media
import numpy as np
import pytest

from emotiw.cli import main
from emotiw.descriptors.audio import RATE, AudioDescriptor, decode_audio
from emotiw.descriptors.lbptop import bins, lbp_top
from emotiw.errors import UserError
from emotiw.face.video import write_video

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (make install adds it)")


def speech(path, text, pitch=50, speed=160):
    subprocess.run(["espeak-ng", "-w", str(path), "-p", str(pitch), "-s", str(speed), text], check=True)
    return path


def clip_with_sound(path, samples, frames=8):
    """A few video frames (the astronaut over coffee) with `samples` (16 kHz mono float) as AAC."""
    images, _ = media.moving_face_frames(frames)
    return write_video(path, images, audio=samples, audio_rate=RATE)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """AFEW-style: two spoken clips (Happy high and fast, Sad low and slow), one silent, one without audio."""
    root = tmp_path_factory.mktemp("audio") / "Val"
    work = tmp_path_factory.mktemp("speech")
    for emotion in ("Happy", "Sad", "Neutral"):
        (root / emotion).mkdir(parents=True)
    happy = decode_audio(speech(work / "happy.wav", "What a wonderful day, I love it!", pitch=80, speed=190))
    sad = decode_audio(speech(work / "sad.wav", "I lost everything, it is over.", pitch=20, speed=110))
    clip_with_sound(root / "Happy" / "001.mp4", happy)
    clip_with_sound(root / "Sad" / "002.mp4", sad)
    clip_with_sound(root / "Neutral" / "003.mp4", np.zeros(RATE, np.float32))
    clip_with_sound(root / "Neutral" / "004.mp4", None)
    return root, happy, sad


def test_espeak_speech_gives_the_88_egemaps_functionals_and_they_tell_the_voices_apart(clips):
    root, happy, sad = clips
    describe = AudioDescriptor()
    assert len(describe.names) == 88 and describe.names[0].startswith("F0semitone")
    high, low = describe(root / "Happy" / "001.mp4"), describe(root / "Sad" / "002.mp4")
    pitch = describe.names.index("F0semitoneFrom27.5Hz_sma3nz_amean")
    assert high[pitch] > low[pitch] + 3  # espeak's pitch 80 against 20: several semitones apart
    assert len(decode_audio(root / "Happy" / "001.mp4")) == pytest.approx(len(happy), abs=2048)


def test_the_audio_stage_writes_hdf5_rows_and_one_line_per_clip_without_sound(clips, tmp_path):
    root, _, _ = clips
    assert main(["features", "--kind", "audio", "--videos", str(root), "--out", str(tmp_path)]) == 0
    with h5py.File(tmp_path / "audio" / "val.h5") as handle:
        data, labels = handle["data"][()], handle["label"][()]
    assert data.shape == (2, 88) and data.dtype == np.float32 and labels.tolist() == [3.0, 5.0]
    rows = list(csv.DictReader(open(tmp_path / "audio" / "val_clips.csv")))
    assert [row["clip"] for row in rows] == ["001", "002"]
    errors = {row["clip"]: row["message"] for row in csv.DictReader(open(tmp_path / "audio" / "val_errors.csv"))}
    assert "silent" in errors["003"] and "no audio stream" in errors["004"]
    assert (tmp_path / "audio" / "val.txt").read_text().strip() == str((tmp_path / "audio" / "val.h5").resolve())
    assert json.loads((tmp_path / "audio" / "features.json").read_text())["dimension"] == 88


def test_caffe_hdf5data_reads_the_features(clips, tmp_path):
    from emotiw.caffe.env import import_caffe

    root, _, _ = clips
    main(["features", "--kind", "audio", "--videos", str(root), "--out", str(tmp_path)])
    caffe = import_caffe()
    net_file = tmp_path / "net.prototxt"
    net_file.write_text(f'layer {{ name: "d" type: "HDF5Data" top: "data" top: "label" '
                        f'hdf5_data_param {{ source: "{tmp_path / "audio" / "val.txt"}" batch_size: 2 }} }}\n')
    net = caffe.Net(str(net_file), caffe.TEST)
    net.forward()
    with h5py.File(tmp_path / "audio" / "val.h5") as handle:
        np.testing.assert_array_equal(net.blobs["data"].data, handle["data"][()])


def test_lbptop_of_a_hand_computed_volume():
    """A constant volume: every neighbour equals its centre, so every code is the all-ones one and
    each histogram has one full bin. A volume that brightens over time: XY planes are constant (the
    same bin), while on XT and YT planes the neighbours at the same or a later time (5 of 8) are >=
    the centre, a uniform code of 5 ones: one full bin, the same on XT and YT, another than XY's."""
    constant = lbp_top(np.full((5, 12, 12), 100, np.uint8), grid=(2, 2))
    per_histogram = constant.reshape(4, 3, bins())
    assert per_histogram.shape == (4, 3, 59) and np.all(per_histogram.max(axis=2) == 1)
    all_ones = per_histogram[0, 0].argmax()
    assert np.all(per_histogram.argmax(axis=2) == all_ones)
    ramp = lbp_top(np.repeat(np.arange(0, 50, 10, dtype=np.uint8), 144).reshape(5, 12, 12), grid=(2, 2))
    ramp = ramp.reshape(4, 3, bins())
    assert np.all(ramp.max(axis=2) == 1)
    xy, xt, yt = ramp[:, 0].argmax(axis=1), ramp[:, 1].argmax(axis=1), ramp[:, 2].argmax(axis=1)
    assert np.all(xy == all_ones) and np.all(xt == xt[0]) and np.all(yt == xt[0]) and xt[0] != all_ones


def test_a_sequence_too_short_for_lbptop_is_one_line():
    with pytest.raises(UserError, match="2 frames .* too short for LBP-TOP"):
        lbp_top(np.zeros((2, 64, 64), np.uint8))


def test_lbptop_stage_on_preprocessed_faces(tmp_path):
    root = tmp_path / "Train"
    (root / "Happy").mkdir(parents=True)
    media.moving_face_clip(root / "Happy" / "001.mp4", frames=6)
    media.moving_face_clip(root / "Happy" / "002.mp4", frames=2)  # 2 crops: too short
    assert main(["preprocess", "--videos", str(root), "--out", str(tmp_path / "faces"), "--recipe", "sse"]) == 0
    assert main(["features", "--kind", "lbptop", "--faces", str(tmp_path / "faces"), "--split", "train",
                 "--out", str(tmp_path / "features")]) == 0
    with h5py.File(tmp_path / "features" / "lbptop" / "train.h5") as handle:
        assert handle["data"].shape == (1, 16 * 3 * 59) and handle["label"][()].tolist() == [3.0]
    errors = list(csv.DictReader(open(tmp_path / "features" / "lbptop" / "train_errors.csv")))
    assert [row["clip"] for row in errors] == ["002"] and "too short" in errors[0]["message"]
