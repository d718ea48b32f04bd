"""`emotiw extract` and leveldb2mat: Caffe's extract_features on a tiny ImageData net, the .mat
against pycaffe's forward pass, per-video means, MATLAB v7.3, the SSE scripts and bad stores."""

import subprocess
import sys
from pathlib import Path

import cv2
import h5py
import numpy as np
import plyvel
import pytest
import scipy.io
from google.protobuf import text_format

from emotiw.caffe.env import import_caffe
from emotiw.cli import main
from emotiw.formats.scores import read_scores

caffe = import_caffe()
from caffe import layers as L  # noqa: E402
from caffe.proto import caffe_pb2  # noqa: E402
from helpers import CLIP_FRAMES, MEAN, SIDE, tiny_net  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def pycaffe_prob(deploy, weights, frames):
    """prob of each frame with pycaffe: the image minus the mean values, one frame at a time."""
    net = caffe.Net(str(deploy), caffe.TEST, weights=str(weights))
    rows = []
    for frame in frames:
        image = cv2.imread(str(frame)).astype(np.float32) - np.array(MEAN, np.float32)
        net.blobs["data"].data[...] = image.transpose(2, 0, 1)
        rows.append(net.forward()["prob"][0].copy())
    return np.array(rows)


def frames_of(root):
    return sorted((root / "faces").glob("clip*/*.png"))


def extract(setup, out, *extra):
    return main(["extract", "--net", str(setup["test"]), "--weights", str(setup["weights"]),
                 "--blob", "prob", "--out", str(out), *extra])


# ------------------------------------------------------------------------------------------
# extract_features + leveldb2mat against pycaffe

def test_extract_gives_pycaffe_prob_in_list_order(tmp_path, setup, capsys):
    frames = frames_of(setup["root"])[::-1]  # list order is not folder order
    frame_list = tmp_path / "frames.txt"
    frame_list.write_text("".join(f"{frame} 0\n" for frame in frames))
    out = tmp_path / "out"
    assert extract(setup, out, "--list", str(frame_list), "--videos", str(setup["videos"])) == 0

    expected = pycaffe_prob(setup["deploy"], setup["weights"], frames)
    assert np.ptp(expected, axis=0).max() > 1e-3  # rows differ, so the order is checked
    mat = scipy.io.loadmat(out / "features.mat")
    assert mat["feats"].shape == (10, 7)
    np.testing.assert_allclose(mat["feats"], expected, rtol=1e-5, atol=1e-7)

    owners = np.array([int(frame.parent.name[-1]) for frame in frames])
    video_means = np.array([expected[owners == clip].mean(axis=0) for clip in range(3)])
    np.testing.assert_allclose(mat["video_feats"], video_means, rtol=1e-5, atol=1e-7)
    names = [line.split()[0] for line in setup["videos"].read_text().splitlines()]
    assert [name.rstrip() for name in mat["video_names"]] == names
    assert mat["video_labels"].ravel().tolist() == [2, 3, 4]
    assert mat["video_n_frames"].ravel().tolist() == list(CLIP_FRAMES)

    store = out / "prob_leveldb"
    everything = tmp_path / "all.mat"
    subprocess.run([sys.executable, str(REPO / "leveldb2mat" / "leveldb2mat.py"), str(store), "3", "4", "7",
                    str(everything)], check=True, capture_output=True)
    wrapped = scipy.io.loadmat(everything)["feats"]
    assert wrapped.shape == (12, 7)  # ceil(10 / 4) mini-batches of 4
    np.testing.assert_allclose(wrapped[:10], expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(wrapped[10:], expected[:2], rtol=1e-5, atol=1e-7)  # ImageData wrapped around
    assert main(["leveldb2mat", str(store), "3", "4", "7", str(tmp_path / "ten.mat"), "--num-images", "10"]) == 0
    np.testing.assert_array_equal(scipy.io.loadmat(tmp_path / "ten.mat")["feats"], mat["feats"])

    capsys.readouterr()
    assert extract(setup, out, "--list", str(frame_list), "--videos", str(setup["videos"])) == 0
    assert "is up to date; not extracting again" in capsys.readouterr().err


def test_extract_lmdb_from_video_list_with_another_batch(tmp_path, setup):
    out = tmp_path / "out"
    assert extract(setup, out, "--videos", str(setup["videos"]), "--db", "lmdb", "--batch", "3") == 0
    frames = frames_of(setup["root"])
    expected = pycaffe_prob(setup["deploy"], setup["weights"], frames)
    mat = scipy.io.loadmat(out / "features.mat")
    np.testing.assert_allclose(mat["feats"], expected, rtol=1e-5, atol=1e-7)
    net = caffe_pb2.NetParameter()
    text_format.Parse((out / "test.prototxt").read_text(), net)
    assert net.layer[0].image_data_param.batch_size == 3
    assert (out / "frames.txt").read_text().splitlines()[0] == f"{frames[0]} 2"
    assert main(["leveldb2mat", str(out / "prob_lmdb"), "4", "3", "7", str(tmp_path / "x.mat"), "--lmdb"]) == 0
    assert scipy.io.loadmat(tmp_path / "x.mat")["feats"].shape == (12, 7)  # ceil(10 / 3) x 3


def test_extract_refuses_weights_of_another_net(tmp_path, setup, capsys):
    other = tmp_path / "other.prototxt"
    other.write_text(str(tiny_net(L.Input(shape=dict(dim=[1, 3, SIDE + 8, SIDE + 8])))))
    wrong = tmp_path / "wrong.caffemodel"
    caffe.Net(str(other), caffe.TEST).save(str(wrong))
    code = main(["extract", "--net", str(setup["test"]), "--weights", str(wrong), "--videos", str(setup["videos"]),
                 "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "shape mismatch: fc" in err and "does not fit" in err.splitlines()[-1]


def test_extract_reports_caffes_fatal_line(tmp_path, setup, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    frame_list = tmp_path / "frames.txt"
    frame_list.write_text(f"{frames_of(setup['root'])[0]} 0\n{broken} 0\n")
    out = tmp_path / "out"
    assert extract(setup, out, "--list", str(frame_list)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "extract_features failed" in err and f"Could not load {broken}" in err
    assert not (out / "prob_leveldb").exists() and not (out / "features.mat").exists()


# ------------------------------------------------------------------------------------------
# leveldb2mat on hand-made stores

def datum_bytes(values):
    return caffe_pb2.Datum(channels=len(values), height=1, width=1, float_data=list(values)).SerializeToString()


def write_leveldb(path, entries):
    db = plyvel.DB(str(path), create_if_missing=True)
    for key, value in entries:
        db.put(key, value)
    db.close()
    return path


def good_entries(count, dim=7, seed=1):
    rng = np.random.default_rng(seed)
    values = rng.random((count, dim)).astype(np.float32)
    return [(b"%010d" % index, datum_bytes(values[index])) for index in range(count)], values


def test_leveldb2mat_reads_old_unpadded_keys_in_index_order(tmp_path):
    entries, values = good_entries(12)
    old_style = [(str(int(key)).encode(), value) for key, value in entries]  # "10" sorts before "2"
    store = write_leveldb(tmp_path / "db", old_style)
    assert main(["leveldb2mat", str(store), "3", "4", "7", str(tmp_path / "f.mat")]) == 0
    np.testing.assert_array_equal(scipy.io.loadmat(tmp_path / "f.mat")["feats"], values.astype(np.float64))


@pytest.mark.parametrize("damage, args, message", [
    (lambda e: e[:2] + [(b"abc", e[2][1])] + e[3:], ("2", "2"), "key 'abc' is not an image index"),
    (lambda e: e[:1] + [(e[1][0], b"\x35\x00")] + e[2:], ("2", "2"), "key 0000000001: the value is not a Caffe Datum"),
    (lambda e: e[:3] + [(e[3][0], datum_bytes(np.zeros(512)))], ("2", "2"),
     "key 0000000003 holds 512 feature values, not DIM=7"),
    (lambda e: e[:2] + e[3:], ("2", "2"), "image 2 is missing (key 0000000003 comes after image 1)"),
    (lambda e: e, ("1", "3"), "holds 4 images (keys 0..3), but BATCH_NUM x BATCH_SIZE = 3"),
    (lambda e: e + [(b"1", e[1][1])], ("2", "2"), "keys 0000000001 and 1 are both image 1"),
    (lambda e: e, ("2", "2", "--num-images", "5"), "--num-images 5 must be between 1 and the 4 images"),
])
def test_leveldb2mat_refuses_bad_stores(tmp_path, capsys, damage, args, message):
    entries, _ = good_entries(4)
    store = write_leveldb(tmp_path / "db", damage(entries))
    batch_num, batch_size, *rest = args
    code = main(["leveldb2mat", str(store), batch_num, batch_size, "7", str(tmp_path / "f.mat"), *rest])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "f.mat").exists()


def test_leveldb2mat_names_a_missing_or_foreign_store(tmp_path, capsys):
    assert main(["leveldb2mat", str(tmp_path / "none"), "1", "1", "7", str(tmp_path / "f.mat")]) == 2
    assert "no such LevelDB folder" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "file.txt").write_text("x")
    assert main(["leveldb2mat", str(tmp_path / "plain"), "1", "1", "7", str(tmp_path / "f.mat")]) == 2
    err = capsys.readouterr().err
    assert "is not a LevelDB" in err and "--lmdb" not in err
    assert [path.name for path in (tmp_path / "plain").iterdir()] == ["file.txt"]  # no LOCK or LOG left


def test_leveldb2mat_says_a_store_is_locked_not_that_it_is_an_lmdb(tmp_path, capsys):
    entries, _ = good_entries(2)
    store = write_leveldb(tmp_path / "db", entries)
    holder = subprocess.Popen([sys.executable, "-c", "import plyvel, sys; db = plyvel.DB(sys.argv[1]); "
                               "print('open', flush=True); sys.stdin.read()", str(store)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "open\n"
        assert main(["leveldb2mat", str(store), "1", "2", "7", str(tmp_path / "f.mat")]) == 2
    finally:
        holder.communicate("")
    err = capsys.readouterr().err
    assert "is locked by another process" in err and "--lmdb" not in err
    assert main(["leveldb2mat", str(store), "1", "2", "7", str(tmp_path / "f.mat")]) == 0  # once it is free


def test_v73_mat_is_matlab_hdf5(tmp_path, setup):
    entries, values = good_entries(10)
    store = write_leveldb(tmp_path / "db", entries)
    out = tmp_path / "f73.mat"
    assert main(["leveldb2mat", str(store), "5", "2", "7", str(out), "--v73", "--videos", str(setup["videos"])]) == 0
    header = out.read_bytes()[:128]
    assert header.startswith(b"MATLAB 7.3 MAT-file") and header[124:128] == b"\x00\x02IM"
    with h5py.File(out, "r") as handle:
        assert handle.userblock_size == 512
        assert handle["feats"].shape == (7, 10)  # MATLAB is column-major
        assert handle["feats"].attrs["MATLAB_class"] == b"double"
        np.testing.assert_array_equal(handle["feats"][()].T, values.astype(np.float64))
        names = ["".join(map(chr, row)).rstrip() for row in handle["video_names"][()].T]
        assert handle["video_names"].attrs["MATLAB_class"] == b"char"
        video_feats = handle["video_feats"][()].T
    assert names == [line.split()[0] for line in setup["videos"].read_text().splitlines()]
    owners = np.repeat(np.arange(3), CLIP_FRAMES)  # rows follow each clip folder's sorted frames
    expected = np.array([values[owners == clip].astype(np.float64).mean(axis=0) for clip in range(3)])
    np.testing.assert_allclose(video_feats, expected, rtol=1e-12)
    np.testing.assert_array_equal(read_scores(out, variable="feats").scores, values.astype(np.float64))
    per_video = read_scores(out, variable="video_feats")
    assert [Path(c).name for c in per_video.clips] == [Path(n).name for n in names]
    np.testing.assert_allclose(per_video.scores, expected, rtol=1e-12)


def test_sse_scripts_need_their_weights(tmp_path):
    for kind in ("HoloNet", "DenseNet", "ResNet"):
        script = REPO / f"test_SSE_{kind}.sh"
        result = subprocess.run(["bash", str(script), str(tmp_path / "missing.caffemodel")],
                                capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 2
        assert f"weights file {tmp_path / 'missing.caffemodel'} not found" in result.stderr
        assert not (tmp_path / "examples").exists()
