"""The foundation: real pycaffe and the real Caffe tools, on small data the tests generate."""

import os
import subprocess
import sys
from pathlib import Path

import cv2
import lmdb
import numpy as np
import plyvel
import pytest

from emotiw.caffe.env import import_caffe

caffe = import_caffe()
from caffe import layers as L  # noqa: E402
from caffe import params as P
from caffe.proto import caffe_pb2  # noqa: E402

BIN = Path(sys.prefix) / "bin"
MEAN = (104.0, 117.0, 123.0)
SIZE = 16


def tool(name):
    path = BIN / name
    assert path.exists(), f"{name} is not linked into the venv"
    return str(path)


def run_tool(*args, cwd=None):
    env = dict(os.environ, GLOG_minloglevel="0", GLOG_logtostderr="1")
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def image_list(tmp_path_factory):
    """Twelve colour images in two classes (bright top half vs bright bottom half) and a list file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    lines = []
    for index in range(12):
        label = index % 2
        image = rng.integers(0, 60, size=(SIZE, SIZE, 3), dtype=np.uint8)
        rows = slice(0, SIZE // 2) if label == 0 else slice(SIZE // 2, SIZE)
        image[rows] += 150
        path = root / f"img{index:02d}.png"
        cv2.imwrite(str(path), image)
        lines.append(f"{path} {label}")
    listing = root / "list.txt"
    listing.write_text("\n".join(lines) + "\n")
    return listing


def tiny_net(data, label=None, with_loss=False):
    n = caffe.NetSpec()
    n.data = data
    if label is not None:
        n.label = label
    n.conv = L.Convolution(n.data, num_output=4, kernel_size=3, stride=2,
                           weight_filler=dict(type="xavier"), bias_filler=dict(type="constant", value=0.1))
    n.relu = L.ReLU(n.conv, in_place=True)
    n.pool = L.Pooling(n.relu, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.fc = L.InnerProduct(n.pool, num_output=2, weight_filler=dict(type="xavier"))
    if with_loss:
        n.loss = L.SoftmaxWithLoss(n.fc, n.label)
    else:
        n.prob = L.Softmax(n.fc)
    return n.to_proto()


def image_data(listing, batch):
    return L.ImageData(source=str(listing), batch_size=batch, shuffle=False, ntop=2,
                       transform_param=dict(mean_value=list(MEAN)))


def write(path, proto):
    path.write_text(str(proto))
    return path


def test_netspec_net_forwards(tmp_path):
    proto = tiny_net(L.Input(shape=dict(dim=[3, 3, SIZE, SIZE])))
    net = caffe.Net(str(write(tmp_path / "deploy.prototxt", proto)), caffe.TEST)
    net.blobs["data"].data[...] = np.random.default_rng(1).random((3, 3, SIZE, SIZE))
    prob = net.forward()["prob"]
    assert prob.shape == (3, 2)
    np.testing.assert_allclose(prob.sum(axis=1), 1.0, rtol=1e-6)


def test_caffe_train_binary_writes_snapshot(tmp_path, image_list):
    data, label = image_data(image_list, batch=4)
    net = write(tmp_path / "train.prototxt", tiny_net(data, label, with_loss=True))
    solver = caffe_pb2.SolverParameter(net=str(net), base_lr=0.01, lr_policy="fixed", momentum=0.9,
                                       max_iter=5, display=1, snapshot=5, random_seed=1,
                                       snapshot_prefix=str(tmp_path / "snap"),
                                       solver_mode=caffe_pb2.SolverParameter.CPU)
    solver_path = write(tmp_path / "solver.prototxt", solver)
    result = run_tool(tool("caffe"), "train", f"--solver={solver_path}")
    assert (tmp_path / "snap_iter_5.caffemodel").exists()
    assert (tmp_path / "snap_iter_5.solverstate").exists()
    losses = [float(line.rsplit("=", 1)[1].split()[0]) for line in result.stderr.splitlines()
              if "Train net output" in line and "loss =" in line]
    assert len(losses) == 5 and all(np.isfinite(losses))


def test_extract_features_leveldb_matches_pycaffe(tmp_path, image_list):
    batch, n_images = 4, 12
    data, label = image_data(image_list, batch=batch)
    feature_net = write(tmp_path / "features.prototxt", tiny_net(data, label))
    deploy = write(tmp_path / "deploy.prototxt", tiny_net(L.Input(shape=dict(dim=[n_images, 3, SIZE, SIZE]))))
    net = caffe.Net(str(deploy), caffe.TEST)
    weights = tmp_path / "tiny.caffemodel"
    net.save(str(weights))

    db_path = tmp_path / "prob_db"
    run_tool(tool("extract_features"), weights, feature_net, "prob", db_path, n_images // batch, "leveldb", "CPU")

    paths = [line.split()[0] for line in image_list.read_text().splitlines()]
    images = np.stack([cv2.imread(p).astype(np.float32) - np.array(MEAN, np.float32) for p in paths])
    net.blobs["data"].data[...] = images.transpose(0, 3, 1, 2)
    expected = net.forward()["prob"]

    db = plyvel.DB(str(db_path))
    rows = {}
    for key, value in db:
        datum = caffe_pb2.Datum.FromString(value)
        rows[int(key)] = np.array(datum.float_data, dtype=np.float32)
    db.close()
    assert sorted(rows) == list(range(n_images))
    np.testing.assert_allclose(np.stack([rows[i] for i in range(n_images)]), expected, rtol=1e-5, atol=1e-6)


def test_convert_imageset_lmdb_feeds_a_data_layer(tmp_path, image_list):
    db_path = tmp_path / "train_lmdb"
    run_tool(tool("convert_imageset"), "/", image_list, db_path)
    with lmdb.open(str(db_path), readonly=True, lock=False) as env:
        assert env.stat()["entries"] == 12

    mean_path = tmp_path / "mean.binaryproto"
    run_tool(tool("compute_image_mean"), db_path, mean_path)
    mean_blob = caffe_pb2.BlobProto.FromString(mean_path.read_bytes())
    assert (mean_blob.num, mean_blob.channels, mean_blob.height, mean_blob.width) == (1, 3, SIZE, SIZE)

    n = caffe.NetSpec()
    n.data, n.label = L.Data(source=str(db_path), backend=P.Data.LMDB, batch_size=12, ntop=2)
    net = caffe.Net(str(write(tmp_path / "lmdb.prototxt", n.to_proto())), caffe.TEST)
    net.forward()
    listed = [line.split() for line in image_list.read_text().splitlines()]
    expected = np.stack([cv2.imread(path) for path, _ in listed]).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(net.blobs["data"].data, expected)
    np.testing.assert_array_equal(net.blobs["label"].data, [int(label) for _, label in listed])
    # compute_image_mean's mean is the plain per-pixel average of the same images
    np.testing.assert_allclose(np.array(mean_blob.data).reshape(3, SIZE, SIZE), expected.mean(axis=0), atol=1e-3)


def test_doctor_reports_a_complete_install():
    result = subprocess.run([str(BIN / "emotiw"), "doctor"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "CPU only" in result.stdout or "GPU" in result.stdout
    for name in ("caffe", "extract_features", "convert_imageset", "compute_image_mean", "upgrade_net_proto_text"):
        assert f"tool {name}" in result.stdout
    assert "MISSING" not in result.stdout
