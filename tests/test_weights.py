"""`emotiw weights report` on caffemodels saved from real pycaffe nets, checked against what Caffe's
own copy_from does with the same files."""

import subprocess
import sys

import numpy as np
import pytest

from emotiw import nets
from emotiw.caffe.weights import read_caffemodel, weights_report
from emotiw.cli import main
from emotiw.errors import UserError
from emotiw.nets.backbones import layers_and_params, resnet
from emotiw.nets.options import NetOptions
from emotiw.nets.reference import resolve_net

SMALL = NetOptions(input_size=64)


def report_for(net, weights, options=None):
    """weights_report for a registered name (built with `options`) or a prototxt path."""
    expected = nets.shapes(net, options).params if net in nets.NETS else resolve_net(str(net)).param_shapes()
    return weights_report(expected, weights, net)


@pytest.fixture(scope="module")
def caffe():
    from emotiw.caffe.env import import_caffe
    return import_caffe()


def save_net(caffe, net_param, path):
    """Instantiates a NetParameter in pycaffe, gives every parameter nonzero "trained" values
    (several backbones have no filler and start at zero) and saves it."""
    prototxt = path.with_suffix(".prototxt")
    prototxt.write_text(str(net_param))
    net = caffe.Net(str(prototxt), caffe.TEST)
    rng = np.random.default_rng(0)
    for blobs in net.params.values():
        for blob in blobs:
            blob.data[...] = rng.uniform(0.5, 1.5, blob.data.shape)
    net.save(str(path))
    return path


def resnet50_imagenet_names(caffe, path, conv1_bias):
    """The layers of KaimingHe's ResNet-50 (3-4-6-3 blocks; conv1 has a bias in the real file)."""
    L, _ = layers_and_params()
    n = caffe.NetSpec()
    n.data = L.Input(input_param={"shape": {"dim": [1, 3, 32, 32]}})
    resnet(n, n.data, blocks=(3, 4, 6, 3), conv1_bias=conv1_bias)
    return save_net(caffe, n.to_proto(), path)


@pytest.fixture(scope="module")
def resnet50_file(caffe, tmp_path_factory):
    return resnet50_imagenet_names(caffe, tmp_path_factory.mktemp("w") / "ResNet-50-model.caffemodel", True)


@pytest.fixture(scope="module")
def dsn_vgg_file(caffe, tmp_path_factory):
    return save_net(caffe, nets.build("dsn_vgg_face", "deploy", SMALL),
                    tmp_path_factory.mktemp("w") / "dsn_vgg.caffemodel")


def test_resnet50_weights_leave_25_of_33_blocks_of_the_released_dsn_resnet_untrained(resnet50_file):
    report = report_for("dsn_resnet", resnet50_file)
    assert len(report.blocks) == 33
    assert sorted(set(report.blocks) - set(report.untrained_blocks)) == [
        "res2a", "res2b", "res2c", "res3a", "res4a", "res5a", "res5b", "res5c"]
    assert len(report.untrained_blocks) == 25 and "res4b22" in report.untrained_blocks
    # ResNet-50's conv1 has a bias, the released net's none: Caffe's copy_from aborts on it
    assert [miss.layer for miss in report.mismatched] == ["conv1"]
    assert report.mismatched[0].expected == [[64, 3, 7, 7]]
    assert report.mismatched[0].found == [[64, 3, 7, 7], [64]]
    assert not report.loadable and report.verdict.startswith("REFUSED")
    assert "conv1-dsn6" in report.untrained and "fc" in report.untrained


def test_caffe_itself_refuses_what_the_report_refuses(resnet50_file, tmp_path):
    deploy = _deploy(tmp_path, "dsn_resnet")
    code = ("from emotiw.caffe.env import import_caffe; caffe = import_caffe(); "
            f"caffe.Net({str(deploy)!r}, caffe.TEST).copy_from({str(resnet50_file)!r})")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0 and "Incompatible number of blobs for layer conv1" in result.stderr


def test_without_the_conv1_bias_the_released_net_loads_8_blocks(caffe, tmp_path):
    path = resnet50_imagenet_names(caffe, tmp_path / "no_bias.caffemodel", conv1_bias=False)
    report = report_for("dsn_resnet", path)
    assert report.loadable and not report.mismatched
    assert report.verdict.startswith("PARTIAL") and "25 of 33 blocks untrained" in report.verdict
    net = caffe.Net(str(_deploy(tmp_path, "dsn_resnet")), caffe.TEST)
    net.copy_from(str(path))  # what the report promises: Caffe copies it without complaint
    assert net.params["res4a_branch2a"][0].data.min() >= 0.5  # copied from the file
    assert not net.params["res4b12_branch2a"][0].data.any()  # never touched: zero, a dead block


def _deploy(tmp_path, name, options=None):
    return nets.write_net(name, tmp_path / name, options)["deploy"]


def test_resnet50_weights_fill_every_block_of_dsn_resnet50(resnet50_file):
    report = report_for("dsn_resnet50", resnet50_file)
    assert report.loadable and len(report.blocks) == 16 and not report.untrained_blocks
    assert "conv1" in report.loaded and "bn5c_branch2c" in report.loaded
    assert all("dsn" in name or name in ("new-score-weighting", "fc") or name.startswith("upsample")
               for name in report.untrained)
    assert report.verdict.startswith("PARTIAL")


def test_a_net_s_own_weights_are_complete_by_name_and_by_prototxt(dsn_vgg_file, tmp_path):
    by_name = report_for("dsn_vgg_face", dsn_vgg_file, SMALL)
    assert by_name.verdict.startswith("COMPLETE") and not by_name.untrained and not by_name.ignored
    by_path = report_for(_deploy(tmp_path, "dsn_vgg_face", SMALL), dsn_vgg_file)
    assert by_path.loaded == by_name.loaded
    other_size = report_for("dsn_vgg_face", dsn_vgg_file)  # fc-dsnK fan-ins depend on the size
    assert {miss.layer for miss in other_size.mismatched} == {f"fc-dsn{k}" for k in range(1, 7)} | {"fc"}


def test_weights_of_another_net_load_nothing(dsn_vgg_file):
    report = report_for("densenet121", dsn_vgg_file)
    assert report.verdict.startswith("NOTHING LOADED") and report.loadable
    assert "conv1_1" in report.ignored


def to_v1(caffe_pb2, net):
    """The same weights in the legacy V1 `layers` format with 4-D blob dims (as VGG-Face ships)."""
    v1_types = {"Convolution": "CONVOLUTION", "InnerProduct": "INNER_PRODUCT"}
    legacy = caffe_pb2.NetParameter(name=net.name)
    for layer in net.layer:
        if layer.type not in v1_types:
            continue
        v1 = legacy.layers.add(name=layer.name, type=caffe_pb2.V1LayerParameter.LayerType.Value(
            v1_types[layer.type]), bottom=layer.bottom, top=layer.top)
        for blob in layer.blobs:
            dims = [1] * (4 - len(blob.shape.dim)) + list(blob.shape.dim)
            v1.blobs.add(num=dims[0], channels=dims[1], height=dims[2], width=dims[3], data=blob.data)
    return legacy


def test_legacy_v1_caffemodel(caffe, tmp_path):
    from caffe.proto import caffe_pb2
    modern = save_net(caffe, nets.build("vgg_face", "deploy", SMALL), tmp_path / "vgg.caffemodel")
    net = caffe_pb2.NetParameter()
    net.ParseFromString(modern.read_bytes())
    legacy = tmp_path / "vgg_v1.caffemodel"
    legacy.write_bytes(to_v1(caffe_pb2, net).SerializeToString())
    report = report_for("vgg_face", legacy, SMALL)
    assert report.verdict.startswith("COMPLETE") and len(report.loaded) == 16
    target = caffe.Net(str(_deploy(tmp_path, "vgg_face", SMALL)), caffe.TEST)
    target.copy_from(str(legacy))  # Caffe upgrades V1 files the same way
    np.testing.assert_array_equal(target.params["fc8_vgg"][0].data.ravel(),
                                  np.array(net.layer[-2].blobs[0].data))


@pytest.mark.parametrize("damage", ["truncated", "text", "empty", "missing", "no weights"])
def test_damaged_or_foreign_files_are_clear_errors(damage, dsn_vgg_file, tmp_path, caffe):
    path = tmp_path / "bad.caffemodel"
    if damage == "truncated":
        path.write_bytes(dsn_vgg_file.read_bytes()[:1_000_000])
    elif damage == "text":
        path.write_text(str(nets.build("vgg_face", "deploy")))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "no weights":
        from caffe.proto import caffe_pb2
        path.write_bytes(caffe_pb2.SolverState(iter=5, learned_net="x.caffemodel").SerializeToString())
    with pytest.raises(UserError, match="truncated|not a Caffe model|does not exist"):
        read_caffemodel(path)


def test_cli_report_and_exit_status(resnet50_file, capsys):
    assert main(["weights", "report", "dsn_resnet50", "--weights", str(resnet50_file)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("PARTIAL") and "left at filler init" in out
    assert main(["weights", "report", "dsn_resnet", "--weights", str(resnet50_file)]) == 1
    assert "shape mismatch: conv1" in capsys.readouterr().out


def test_cli_exit_status_1_when_nothing_loads(dsn_vgg_file, capsys):
    assert main(["weights", "report", "densenet121", "--weights", str(dsn_vgg_file)]) == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith("NOTHING LOADED")


def test_cli_bad_file_is_one_line_and_status_2(tmp_path):
    bad = tmp_path / "x.caffemodel"
    bad.write_bytes(b"\x08\x96")
    result = subprocess.run([sys.executable, "-m", "emotiw.cli", "weights", "report", "vgg_face",
                             "--weights", str(bad)], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("emotiw weights: error:") and len(result.stderr.splitlines()) == 1
