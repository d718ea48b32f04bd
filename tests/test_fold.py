"""BatchNorm and Scale folded into the convolution before them (emotiw.caffe.fold), on real Caffe.

Every registered deploy net with BatchNorm gives the same outputs folded as unfolded in pycaffe, with
seeded random weights and BatchNorm statistics far from the identity (random means, variances in
[0.5, 2], a moving-average factor other than 1, random gamma and beta); the caffemodel on disk is
left as it was. A one-convolution net checks the numbers against the formula by hand, small nets
the cases that must not fold, and the last tests `emotiw weights fold`, `emotiw extract` and MTCNN.
"""

import hashlib

import numpy as np
import pytest
from google.protobuf import text_format

from emotiw import nets
from emotiw.caffe.env import import_caffe
from emotiw.caffe.fold import FOLDABLE, find_chains, fold_files, fold_net
from emotiw.caffe.proto import caffe_pb2
from emotiw.caffe.runtime import PycaffeNet
from emotiw.caffe.weights import blob_array, read_caffemodel_param
from emotiw.cli import main
from helpers import random_weights

caffe = import_caffe()


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()




def batch_norm_after_fold(net):
    """(BatchNorm, Scale) layers of a NetParameter right after a Convolution or InnerProduct they read."""
    return [(layer.name, layer.type) for before, layer in zip(net.layer, net.layer[1:])
            if before.type in FOLDABLE and layer.type in ("BatchNorm", "Scale") and before.top[0] in layer.bottom]


def has_batch_norm(name):
    return any(layer.type == "BatchNorm" for layer in nets.build(name, "deploy").layer)


# 78 to 390 million parameters: 10 to 50 s each on 2 cores. DSN's ResNet-50, SSE's, the DenseNets
# up to 41 M parameters and every HoloNet stay in the default run.
SLOW = {"dsn_resnet", "sse_densenet121_4conv-c_eltwise", "sse_densenet121_4conv-c_concat",
        "sse_resnet50_3conv-s_eltwise", "sse_resnet50_3conv-s_concat",
        "sse_resnet50_4conv-c_eltwise", "sse_resnet50_4conv-c_concat"}
WITH_BATCH_NORM = [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name
                   for name in nets.names() if has_batch_norm(name)]


@pytest.mark.parametrize("name", WITH_BATCH_NORM)
def test_folded_net_gives_the_unfolded_outputs(name, tmp_path):
    param = nets.build(name, "deploy")
    deploy, weights = tmp_path / "deploy.prototxt", tmp_path / "weights.caffemodel"
    deploy.write_text(text_format.MessageToString(param))
    random_weights(deploy, weights, seed=11, far_from_identity=True)
    before = sha256(weights)
    scores = next(layer.bottom[0] for layer in param.layer if layer.type == "Softmax" and list(layer.top) == ["prob"])

    unfolded = PycaffeNet(deploy, weights, fold=False)
    batch = np.random.default_rng(12).normal(0, 50, size=(2, *unfolded.input_shape)).astype(np.float32)
    expected = {blob: values.reshape(2, -1) for blob, values in unfolded.forward(batch, ["prob", scores]).items()}
    del unfolded
    folded = PycaffeNet(deploy, weights)
    found = {blob: values.reshape(2, -1) for blob, values in folded.forward(batch, ["prob", scores]).items()}

    assert folded.chains and sha256(weights) == before
    layer_types = [layer.type for layer in folded.net.layers]
    assert layer_types.count("BatchNorm") == sum(layer.type == "BatchNorm" for layer in param.layer) - len(folded.chains)
    assert batch_norm_after_fold(param) and not batch_norm_after_fold(fold_net(param, folded.chains))
    assert np.abs(found["prob"] - expected["prob"]).max() <= 1e-5
    spread = np.ptp(expected[scores], axis=1).min()
    assert spread > 1e-3  # scores that differ between classes, not a constant both nets could share
    assert np.abs(found[scores] - expected[scores]).max() <= 1e-5 * max(spread, 1)


@pytest.mark.parametrize("name", [name for name in nets.names() if not has_batch_norm(name)])
def test_nets_without_batch_norm_have_nothing_to_fold(name):
    assert find_chains(nets.build(name, "deploy")) == []


# ------------------------------------------------------------------------------------------
# One convolution by hand

W, B = [2.0, -1.0], [1.0, 0.5]            # 1x1 convolution, 1 -> 2 channels
MEAN, VAR, FACTOR = [6.0, -2.0], [8.0, 18.0], 2.0  # stored; Caffe's mean [3, -1], variance [4, 9]
GAMMA, BETA = [0.5, 3.0], [1.0, -1.0]
EPS = 1e-5


def hand_net(path, in_place, bias=True, extra=""):
    """data (1, 1, 1, 3) -> conv -> BatchNorm -> Scale, in place or each into a blob of its own."""
    bn_top, scale_top = ("conv", "conv") if in_place else ("conv/bn", "conv/scale")
    path.write_text(f'''
name: "hand"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 1 dim: 1 dim: 1 dim: 3 }} }} }}
layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param {{ num_output: 2 kernel_size: 1 bias_term: {str(bias).lower()} }} }}
layer {{ name: "bn" type: "BatchNorm" bottom: "conv" top: "{bn_top}" batch_norm_param {{ use_global_stats: true }} }}
layer {{ name: "scale" type: "Scale" bottom: "{bn_top}" top: "{scale_top}" scale_param {{ bias_term: true }} }}
{extra}''')
    return path, scale_top


def hand_weights(deploy, path, bias=True):
    net = caffe.Net(str(deploy), caffe.TEST)
    net.params["conv"][0].data[...] = np.reshape(W, (2, 1, 1, 1))
    if bias:
        net.params["conv"][1].data[...] = B
    for blob, values in zip(net.params["bn"], (MEAN, VAR, [FACTOR])):
        blob.data[...] = values
    for blob, values in zip(net.params["scale"], (GAMMA, BETA)):
        blob.data[...] = values
    net.save(str(path))
    return path


# by hand: s = gamma / sqrt(var + eps) = [0.5 / 2, 3 / 3]; W' = W s; b' = (b - mean) s + beta
FOLDED_W = [2.0 * 0.5 / np.sqrt(4 + EPS), -1.0 * 3.0 / np.sqrt(9 + EPS)]   # ~ [0.5, -1]
FOLDED_B = {True: [(1.0 - 3.0) * 0.5 / np.sqrt(4 + EPS) + 1.0, (0.5 + 1.0) * 3.0 / np.sqrt(9 + EPS) - 1.0],  # ~ [0.5, 0.5]
            False: [-3.0 * 0.5 / np.sqrt(4 + EPS) + 1.0, 1.0 * 3.0 / np.sqrt(9 + EPS) - 1.0]}  # ~ [0.25, 0]


@pytest.mark.parametrize("in_place, bias", [(True, True), (False, True), (False, False)])
def test_one_convolution_folds_to_the_numbers_of_the_formula(tmp_path, in_place, bias):
    deploy, top = hand_net(tmp_path / "hand.prototxt", in_place, bias)
    weights = hand_weights(deploy, tmp_path / "hand.caffemodel", bias)
    np.testing.assert_allclose(FOLDED_W, [0.5, -1.0], rtol=1e-5)
    np.testing.assert_allclose(FOLDED_B[bias], [0.5, 0.5] if bias else [0.25, 0.0], atol=1e-5)

    folded = PycaffeNet(deploy, weights)
    assert [layer.type for layer in folded.net.layers] == ["Input", "Convolution"]
    assert folded.net.top_names["conv"] == [top]  # the layers after it would read the same blob
    np.testing.assert_allclose(folded.net.params["conv"][0].data.ravel(), FOLDED_W, rtol=1e-6)
    np.testing.assert_allclose(folded.net.params["conv"][1].data, FOLDED_B[bias], rtol=1e-6, atol=1e-7)

    x = np.array([1.0, 2.0, -3.0], dtype=np.float32).reshape(1, 1, 1, 3)
    by_hand = [[1.0, 1.5, -1.0], [-0.5, -1.5, 3.5]] if bias else [[0.75, 1.25, -1.25], [-1.0, -2.0, 3.0]]
    for net in (folded, PycaffeNet(deploy, weights, fold=False)):  # 0.5 x + b0 and -x + b1
        np.testing.assert_allclose(net.forward(x, [top])[top].reshape(2, 3), by_hand, atol=1e-5)

    out = tmp_path / "out"
    own_statistics = parse(deploy.read_text().replace("use_global_stats: true", "use_global_stats: false"))
    assert fold_files(own_statistics, weights, out / "a", out / "b") == [] and not out.exists()  # writes nothing
    assert len(fold_files(parse(deploy.read_text()), weights, out / "deploy.prototxt", out / "w.caffemodel")) == 1
    stored = {layer.name: layer for layer in read_caffemodel_param(out / "w.caffemodel").layer}
    assert "bn" not in stored and "scale" not in stored
    conv = [blob_array(out, "conv", blob) for blob in stored["conv"].blobs]
    np.testing.assert_allclose(conv[0].ravel(), FOLDED_W, rtol=1e-6)
    np.testing.assert_allclose(conv[1], FOLDED_B[bias], rtol=1e-6, atol=1e-7)


def parse(text):
    return text_format.Parse(text, caffe_pb2().NetParameter())


@pytest.mark.parametrize("case, extra, keep, folded", [
    ("plain", "", (), ("bn", "scale")),
    # the convolution's output is needed as it is: the BatchNorm goes into the Scale instead
    ("conv blob read twice", 'layer { name: "peek" type: "Power" bottom: "conv" top: "peek" }', (), ("bn",)),
    ("bn blob read twice", 'layer { name: "peek" type: "Power" bottom: "conv/bn" top: "peek" }', (), ("bn",)),
    ("conv blob kept", "", ("conv",), ("bn",)),
    ("bn blob kept", "", ("conv/bn",), ("bn",)),
    ("scale blob kept", "", ("conv/scale",), ("bn", "scale")),
])
def test_only_what_no_other_layer_sees_folds(tmp_path, case, extra, keep, folded):
    deploy, _ = hand_net(tmp_path / "hand.prototxt", in_place=False, extra=extra)
    chains = find_chains(parse(deploy.read_text()), keep)
    assert tuple(name for chain in chains for name in chain.removed) == folded, case


@pytest.mark.parametrize("bn_top", ["data", "bn"])
def test_a_batch_norm_with_no_convolution_before_it_folds_into_its_scale(tmp_path, bn_top):
    """As DenseNet's BatchNorm after a Concat: the Scale takes it in and reads the BatchNorm's bottom."""
    deploy = tmp_path / "bn.prototxt"
    deploy.write_text(f'''
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 1 dim: 2 dim: 1 dim: 3 }} }} }}
layer {{ name: "bn" type: "BatchNorm" bottom: "data" top: "{bn_top}" batch_norm_param {{ use_global_stats: true }} }}
layer {{ name: "scale" type: "Scale" bottom: "{bn_top}" top: "{bn_top}" scale_param {{ bias_term: true }} }}''')
    net = caffe.Net(str(deploy), caffe.TEST)
    for blob, values in [*zip(net.params["bn"], (MEAN, VAR, [FACTOR])), *zip(net.params["scale"], (GAMMA, BETA))]:
        blob.data[...] = values
    weights = tmp_path / "bn.caffemodel"
    net.save(str(weights))
    folded = PycaffeNet(deploy, weights)
    assert [layer.type for layer in folded.net.layers] == ["Input", "Scale"]
    assert folded.net.bottom_names["scale"] == ["data"] and folded.net.top_names["scale"] == [bn_top]
    # by hand: gamma / sqrt(var + eps) = [0.5 / 2, 3 / 3]; beta - gamma mean / sqrt(var + eps) = [1 - 0.75, -1 + 1]
    np.testing.assert_allclose(folded.net.params["scale"][0].data, [0.25, 1.0], rtol=1e-5)
    np.testing.assert_allclose(folded.net.params["scale"][1].data, [0.25, 0.0], atol=1e-5)
    x = np.array([1.0, 2.0, -3.0, 0.5, 0.0, 4.0], dtype=np.float32).reshape(1, 2, 1, 3)
    expected = [[0.5, 0.75, -0.5], [0.5, 0.0, 4.0]]  # 0.25 x + 0.25 and x
    for each in (folded, PycaffeNet(deploy, weights, fold=False)):
        np.testing.assert_allclose(each.forward(x, [bn_top])[bn_top].reshape(2, 3), expected, atol=1e-5)


def test_batch_norm_with_its_own_statistics_or_a_blob_scale_does_not_fold(tmp_path):
    deploy, _ = hand_net(tmp_path / "hand.prototxt", in_place=True)
    text = deploy.read_text()
    assert find_chains(parse(text.replace("use_global_stats: true", "use_global_stats: false"))) == []
    two_bottoms = text.replace('bottom: "conv" top: "conv" scale_param', 'bottom: "conv" bottom: "data" top: "conv" scale_param')
    assert [chain.scale for chain in find_chains(parse(two_bottoms))] == [None]  # the BatchNorm alone


def test_in_place_readers_after_the_batch_norm_see_the_folded_values(tmp_path):
    """As HoloNet's CReLU: after the in-place BatchNorm, a Power and a Concat read the normalised blob."""
    extra = ('layer { name: "neg" type: "Power" bottom: "conv" top: "neg" power_param { scale: -1 } }\n'
             'layer { name: "cat" type: "Concat" bottom: "conv" bottom: "neg" top: "cat" }')
    deploy, _ = hand_net(tmp_path / "hand.prototxt", in_place=True, extra=extra)
    weights = hand_weights(deploy, tmp_path / "hand.caffemodel")
    x = np.random.default_rng(0).normal(size=(1, 1, 1, 3)).astype(np.float32)
    folded = PycaffeNet(deploy, weights)
    assert len(folded.chains) == 1
    np.testing.assert_allclose(folded.forward(x, ["cat"])["cat"],
                               PycaffeNet(deploy, weights, fold=False).forward(x, ["cat"])["cat"], atol=1e-6)


# ------------------------------------------------------------------------------------------
# emotiw weights fold, emotiw extract, MTCNN

def test_weights_fold_writes_files_any_caffe_loads(tmp_path, capsys):
    name = "sse_holonet_original"
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(text_format.MessageToString(nets.build(name, "deploy")))
    weights = tmp_path / "trained.caffemodel"
    random_weights(deploy, weights, seed=5, far_from_identity=True)
    before = sha256(weights)
    out = tmp_path / "folded"
    assert main(["weights", "fold", name, "--weights", str(weights), "--out", str(out)]) == 0
    assert "folded 25 BatchNorm and 20 Scale" in capsys.readouterr().out
    assert sha256(weights) == before
    assert sorted(path.name for path in out.iterdir()) == ["deploy.prototxt", "trained.caffemodel"]
    assert not batch_norm_after_fold(parse((out / "deploy.prototxt").read_text()))

    reference = PycaffeNet(deploy, weights, fold=False)
    batch = np.random.default_rng(6).normal(0, 50, size=(2, *reference.input_shape)).astype(np.float32)
    scores = next(layer.bottom[0] for layer in nets.build(name, "deploy").layer if layer.type == "Softmax")
    expected = reference.forward(batch, [scores])[scores]
    plain_caffe = caffe.Net(str(out / "deploy.prototxt"), caffe.TEST, weights=str(out / "trained.caffemodel"))
    plain_caffe.blobs["data"].reshape(*batch.shape)
    plain_caffe.blobs["data"].data[...] = batch
    plain_caffe.forward()
    assert [layer.type for layer in plain_caffe.layers].count("BatchNorm") == 0
    np.testing.assert_allclose(plain_caffe.blobs[scores].data, expected, atol=1e-5 * np.ptp(expected))


def test_weights_fold_refuses_with_one_line(tmp_path, capsys):
    deploy, _ = hand_net(tmp_path / "hand.prototxt", in_place=True)
    weights = hand_weights(deploy, tmp_path / "hand.caffemodel")
    before, out = sha256(weights), tmp_path / "out"
    for net, weights_file, out_dir, message in (
            (deploy, tmp_path / "missing.caffemodel", out, f"weights file {tmp_path / 'missing.caffemodel'} does not exist"),
            ("sse_holonet_original", weights, out, "does not fit sse_holonet_original: NOTHING LOADED"),
            (deploy, weights, tmp_path, f"would replace the input {weights}"),
    ):
        assert main(["weights", "fold", str(net), "--weights", str(weights_file), "--out", str(out_dir)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not out.exists() and sha256(weights) == before


def tiny_bn_net(data):
    """conv -> BatchNorm -> Scale (not in place, as DenseNet's) -> ReLU -> fc -> prob."""
    from caffe import layers as L

    n = caffe.NetSpec()
    n.data = data
    n.conv = L.Convolution(n.data, num_output=4, kernel_size=5, stride=2, bias_term=False)
    n.bn = L.BatchNorm(n.conv)
    n.scale = L.Scale(n.bn, bias_term=True)
    n.relu = L.ReLU(n.scale, in_place=True)
    n.fc = L.InnerProduct(n.relu, num_output=7)
    n.prob = L.Softmax(n.fc)
    return n.to_proto()


def test_extract_runs_extract_features_on_folded_copies_inside_out(tmp_path, capsys):
    import cv2
    from caffe import layers as L

    from emotiw.stages.extract import extract

    net_dir = tmp_path / "net"
    net_dir.mkdir()
    frames = []
    rng = np.random.default_rng(2)
    for index in range(5):
        frames.append(tmp_path / f"{index}.png")
        cv2.imwrite(str(frames[-1]), rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    frame_list = tmp_path / "frames.txt"
    frame_list.write_text("".join(f"{frame} 0\n" for frame in frames))
    data, _ = L.ImageData(source=str(frame_list), batch_size=2, ntop=2, transform_param=dict(mean_value=[100] * 3))
    (net_dir / "test.prototxt").write_text(str(tiny_bn_net(data)))
    (net_dir / "deploy.prototxt").write_text(str(tiny_bn_net(L.Input(shape=dict(dim=[1, 3, 24, 24])))))
    weights = net_dir / "tiny.caffemodel"
    random_weights(net_dir / "deploy.prototxt", weights, seed=3, far_from_identity=True)
    before = sha256(weights)

    features = {}
    for fold in (True, False):
        out = tmp_path / f"out-{fold}"
        features[fold] = extract(net_dir / "test.prototxt", weights, out, blob="fc", fold=fold).variables["feats"]
        command = next(line for line in capsys.readouterr().err.splitlines() if "extract_features " in line)
        assert (f"{out}/.pieces/" in command) and ("/.fold-" in command) == fold  # the folded copies, inside out
        assert sorted(path.name for path in out.iterdir()) == [  # the temporary folder is gone
            "extract.json", "extract_features.log", "fc_leveldb", "features.mat", "frames.txt", "test.prototxt"]
    assert features[True].shape == (5, 7) and np.ptp(features[False]) > 1e-3
    np.testing.assert_allclose(features[True], features[False], atol=1e-5 * np.ptp(features[False]))
    assert sha256(weights) == before


def test_mtcnn_nets_have_nothing_to_fold_and_run_as_they_are():
    from emotiw.face.mtcnn_nets import MtcnnNets, ensure_models

    files = ensure_models()
    nets_ = MtcnnNets(files, "pycaffe")
    for name, (prototxt, _) in files.items():
        runner = nets_.nets[name]
        assert runner.chains == []
        built = [name for name, layer in zip(runner.net._layer_names, runner.net.layers) if layer.type != "Split"]
        assert built == [layer.name for layer in parse(prototxt.read_text()).layer]  # Caffe adds the Splits
