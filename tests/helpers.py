"""Helpers the test modules share: tiny Caffe nets with seeded weights, clip folders of frames, list
files, and readers of what the stages write. Fixtures live in conftest.py."""

import contextlib
import csv
import json
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from emotiw import EMOTIONS
from emotiw.caffe.env import import_caffe

caffe = import_caffe()
from caffe import layers as L  # noqa: E402
from caffe import params as P  # noqa: E402

FER_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "fer"
SIDE = 24  # the tiny ImageData net's input side (conftest's `setup`)
MEAN = (90.0, 110.0, 130.0)  # and its mean values
CLIP_FRAMES = (4, 3, 3)  # 10 frames: 3 mini-batches of 4, the last with 2 wrap-around rows


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def snapshot(out):
    """Every output file's bytes, OUT's own path replaced, except summary.json (timings)."""
    prefix = str(out.resolve()).encode()
    return {path.relative_to(out).as_posix(): path.read_bytes().replace(prefix, b"OUT")
            for path in sorted(out.rglob("*")) if path.is_file() and path.name != "summary.json"}


def tiny_net(data, stride=2, num_output=7, batchnorm=False):
    """conv [-> BatchNorm -> Scale] -> ReLU -> max pool -> InnerProduct(num_output) `fc` -> Softmax `prob`."""
    n = caffe.NetSpec()
    n.data = data
    # small weights keep the softmax away from saturation for 0-255 inputs
    n.conv = L.Convolution(n.data, num_output=4, kernel_size=5, stride=stride,
                           weight_filler=dict(type="gaussian", std=0.003), bias_filler=dict(type="constant", value=0.1))
    if batchnorm:
        n.bn = L.BatchNorm(n.conv, in_place=True)
        n.scale = L.Scale(n.conv, bias_term=True, in_place=True)
    n.relu = L.ReLU(n.conv, in_place=True)
    n.pool = L.Pooling(n.relu, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    n.fc = L.InnerProduct(n.pool, num_output=num_output, weight_filler=dict(type="xavier"))
    n.prob = L.Softmax(n.fc)
    return n.to_proto()


def deploy_net(folder, side, channels=3, seed=0, **options):
    """folder/deploy.prototxt and folder/tiny.caffemodel with seeded random weights (BN statistics too);
    the net is named after the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    deploy = folder / "deploy.prototxt"
    deploy.write_text(f'name: "{folder.name}"\n' + str(tiny_net(L.Input(shape=dict(dim=[1, channels, side, side])), **options)))
    caffe.set_random_seed(seed)
    net = caffe.Net(str(deploy), caffe.TEST)
    rng = np.random.default_rng(seed)
    if "bn" in net.params:
        mean, variance, factor = net.params["bn"]
        mean.data[...] = rng.normal(0, 20, mean.data.shape)
        variance.data[...] = rng.uniform(50, 500, variance.data.shape)
        factor.data[...] = 1
        for blob in net.params["scale"]:
            blob.data[...] = rng.uniform(0.5, 1.5, blob.data.shape)
    weights = folder / "tiny.caffemodel"
    net.save(str(weights))
    return deploy, weights


def make_clips(root, frames_per_clip, size, seed=0):
    """Clip folders of random frames (plus a non-image file, which is not a frame); returns the list
    lines `<folder> <label>`."""
    rng = np.random.default_rng(seed)
    lines = []
    for index, count in enumerate(frames_per_clip):
        folder = root / f"clip{index:02d}"
        folder.mkdir(parents=True)
        for frame in range(count):
            image = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
            cv2.imwrite(str(folder / f"frame-{frame:03d}.png"), image)
        (folder / "landmarks.txt").write_text("not a frame\n")
        lines.append(f"{folder} {index % len(EMOTIONS)}")
    return lines


def write_list(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def random_weights(deploy, weights, seed, far_from_identity=False):
    """Seeded He-scaled weights for a deploy net, saved to `weights`. BatchNorm statistics and Scales
    near the identity, or (far_from_identity, for folding) far from it, with a moving-average factor
    other than 1 (Caffe divides the stored mean and variance by it)."""
    caffe.set_random_seed(seed)
    net = caffe.Net(str(deploy), caffe.TEST)
    rng = np.random.default_rng(seed)
    for name, blobs in net.params.items():
        kind = net.layer_dict[name].type
        if kind == "BatchNorm":
            factor = rng.uniform(0.5, 2) if far_from_identity else 1.0
            spread, variance = (0.5, (0.5, 2)) if far_from_identity else (0.1, (0.5, 1.5))
            blobs[0].data[...] = rng.normal(0, spread, blobs[0].data.shape) * factor
            blobs[1].data[...] = rng.uniform(*variance, blobs[1].data.shape) * factor
            blobs[2].data[...] = factor
        elif kind == "Scale":
            blobs[0].data[...] = rng.uniform(*((0.5, 1.5) if far_from_identity else (0.8, 1.2)), blobs[0].data.shape)
            if len(blobs) > 1:
                blobs[1].data[...] = rng.normal(0, 0.2 if far_from_identity else 0.1, blobs[1].data.shape)
        elif kind == "PReLU":
            blobs[0].data[...] = 0.25
        elif kind != "Deconvolution":  # deconvolutions keep their bilinear upsampling filler
            fan_in = blobs[0].data[0].size
            blobs[0].data[...] = rng.normal(0, np.sqrt(2 / fan_in), blobs[0].data.shape)
            if len(blobs) > 1:
                blobs[1].data[...] = rng.normal(0, 0.01, blobs[1].data.shape)
    net.save(str(weights))


def write_image_list(folder, side, count=4):
    """`count` random colour side x side PNGs and their list, labels 0..count-1; returns the list."""
    import cv2
    rng = np.random.default_rng(0)
    lines = []
    for index in range(count):
        path = folder / f"{index}.png"
        cv2.imwrite(str(path), rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        lines.append(f"{path} {index}")
    listing = folder / "list.txt"
    listing.write_text("\n".join(lines) + "\n")
    return str(listing)


def fer_fixtures():
    faces = np.load(FER_FIXTURES / "inputs.npz")["faces"]
    keras = np.array(json.loads((FER_FIXTURES / "keras.json").read_text())["probabilities"])
    return faces, keras


@contextlib.contextmanager
def tmpfs(path, size):
    """A tmpfs of `size` bytes at `path`; skips the test where mounting is not allowed."""
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def remount(path, options):
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)
