"""Every registered net in real pycaffe (TRAIN, TEST, test and deploy nets), the registry's
interface and errors, `emotiw nets`, and the committed prototxt/ against the generator."""

import filecmp
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from emotiw import nets
from emotiw.cli import main
from emotiw.errors import UserError
from emotiw.nets.options import NetOptions
from emotiw.recipes import RECIPES
from helpers import write_image_list

REPO = Path(__file__).resolve().parents[1]
NAMES = nets.names()
# Forward+backward needs every parameter's diff too; the SSE-ResNet branch nets hold 178-390 M
# parameters, too much for the 2-core CI machine, so they are only instantiated and forwarded.
TOO_BIG_TO_TRAIN = 100e6


@pytest.fixture(scope="module")
def caffe():
    from emotiw.caffe.env import import_caffe
    caffe = import_caffe()
    caffe.set_mode_cpu()
    caffe.set_random_seed(0)
    return caffe


@pytest.fixture(scope="module")
def image_list(tmp_path_factory):
    """128 px: SSE HoloNet and DenseNet read their 128 images without resizing."""
    return write_image_list(tmp_path_factory.mktemp("images"), 128)


@pytest.fixture(scope="module")
def feature_list(tmp_path_factory):
    """4 random 88-value feature vectors for the classifier nets, as `emotiw features` writes them."""
    from emotiw.stages.features import write_feature_file

    rng = np.random.default_rng(0)
    return str(write_feature_file(tmp_path_factory.mktemp("features"), "train", rng.normal(0, 1, (4, 88)),
                                  [0, 1, 2, 3]))


def small_options(name, image_list, feature_list=""):
    """Batch 2 on the tiny list (feature nets: the tiny HDF5 list), mean values instead of the
    released mean files (not bundled); the DSN nets at 64 px (their 224 only costs time)."""
    size = 64 if nets.get(name).recipe == "dsn" else None
    channels = nets.get(name).preprocessing.channels
    mean = (104, 117, 123) if channels == 3 else None  # gray nets: their own; feature nets: none
    source = feature_list if channels == 0 else image_list
    return NetOptions(input_size=size, train_batch=2, test_batch=2, source_type="list",
                      train_source=source, val_source=source, mean_values=mean)


@pytest.fixture(scope="module")
def written(tmp_path_factory, image_list, feature_list):
    out = tmp_path_factory.mktemp("nets")
    return {name: nets.write_net(name, out / name, small_options(name, image_list, feature_list)) for name in NAMES}


def test_registry_has_the_5_dsn_15_sse_nets_the_fer_model_and_the_feature_classifiers():
    assert NAMES[:5] == ["vgg_face", "dsn_vgg_face", "dsn_resnet", "dsn_resnet50", "densenet121"]
    sse = [f"sse_{backbone}_{variant}" for backbone in ("holonet", "densenet121", "resnet50")
           for variant in ("original", "3conv-s_eltwise", "3conv-s_concat", "4conv-c_eltwise",
                           "4conv-c_concat")]
    assert sorted(NAMES[5:20]) == sorted(sse)
    assert NAMES[20:] == ["fer2013_mini_xception", "audio_linear_svm", "audio_mlp"]
    released = sorted(name for name in NAMES if nets.get(name).released)
    assert released == ["densenet121", "dsn_resnet", "dsn_vgg_face", "fer2013_mini_xception",
                        "sse_densenet121_3conv-s_concat", "sse_holonet_3conv-s_concat",
                        "sse_resnet50_4conv-c_concat", "vgg_face"]
    for name in NAMES:
        entry = nets.get(name)
        assert entry.recipe in (*RECIPES, None) and entry.preprocessing.input_size in (64, 88, 128, 224)


@pytest.mark.parametrize("name", NAMES)
def test_caffe_name_is_the_prototxt_name_and_finds_the_entry(name):
    """Code holding only a prototxt finds its registry entry from the NetParameter's `name`."""
    entry = nets.get(name)
    assert nets.build(name, "deploy").name == entry.caffe_name
    assert nets.by_caffe_name(entry.caffe_name) is entry


def test_by_caffe_name_of_an_unknown_net_is_none():
    assert nets.by_caffe_name("ResNet-50") is None
    assert nets.get("dsn_resnet").caffe_name == "DSN_RES_101_TOPOLOGY"


def test_unknown_net_lists_the_valid_names(capsys):
    with pytest.raises(UserError, match="unknown net 'dsn_vgg'; valid names: vgg_face, dsn_vgg_face"):
        nets.get("dsn_vgg")
    assert main(["nets", "--net", "nope", "--out", "unused"]) == 2
    assert "sse_resnet50_4conv-c_concat" in capsys.readouterr().err


def test_invalid_option_is_an_error_naming_the_layer(capsys, tmp_path):
    assert main(["nets", "--net", "dsn_resnet50", "--input-size", "2", "--out", str(tmp_path)]) == 2
    assert "layer 'pool1'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("name", NAMES)
def test_net_instantiates_in_every_phase_and_deploy_gives_probabilities(name, written, caffe):
    paths = written[name]
    for path, phase in ((paths["train_val"], caffe.TRAIN), (paths["train_val"], caffe.TEST),
                        (paths["test"], caffe.TEST)):
        net = caffe.Net(str(path), phase)
        assert net.blobs["data"].data.shape[0] == 2
        del net
    deploy = caffe.Net(str(paths["deploy"]), caffe.TEST)
    neutral_batch_norm(deploy)
    shape = deploy.blobs["data"].data.shape
    deploy.blobs["data"].reshape(3, *shape[1:])
    deploy.blobs["data"].data[...] = np.random.default_rng(1).normal(0, 50, (3, *shape[1:]))
    prob = deploy.forward()["prob"]
    assert prob.shape == (3, 7)
    np.testing.assert_allclose(prob.sum(axis=1), 1, rtol=1e-5)
    allocated = sum(blob.data.size for blobs in deploy.params.values() for blob in blobs)
    assert allocated == nets.param_count(name, NetOptions(input_size=shape[-1]))


def neutral_batch_norm(net):
    """BatchNorm statistics mean 0, variance 1: an untrained net's zero statistics make global-stats
    BatchNorm divide by sqrt(eps), which overflows after a few layers."""
    for name, blobs in net.params.items():
        if net.layer_dict[name].type == "BatchNorm":
            blobs[0].data[...], blobs[1].data[...], blobs[2].data[...] = 0, 1, 1


def randomise(net, rng):
    """Conv/InnerProduct weights ~ N(0, 1/fan_in) (the DSN backbones have no filler and start at
    zero), neutral BatchNorm statistics, the frozen bilinear deconvolutions untouched."""
    neutral_batch_norm(net)
    for name, blobs in net.params.items():
        if net.layer_dict[name].type in ("Convolution", "InnerProduct"):
            weights = blobs[0].data
            weights[...] = rng.normal(0, 1 / np.sqrt(weights[0].size), weights.shape)


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_is_finite(name, written, caffe):
    if nets.param_count(name, small_options(name, "")) > TOO_BIG_TO_TRAIN:
        pytest.skip("too many parameters for a training step on the CI machine; instantiated above")
    net = caffe.Net(str(written[name]["train_val"]), caffe.TRAIN)
    randomise(net, np.random.default_rng(0))
    outputs = net.forward()
    losses = {top: float(value) for top, value in outputs.items() if "loss" in top}
    assert losses and all(np.isfinite(value) and value > 0 for value in losses.values()), losses
    net.backward()
    diffs = [blob.diff for blobs in net.params.values() for blob in blobs]
    assert all(np.isfinite(diff).all() for diff in diffs)
    assert sum(np.abs(diff).sum() for diff in diffs) > 0


def test_released_sse_param_counts_match_the_papers_nets():
    """sse-facts.md: about 29.5 M, 41.3 M and 390 M learnable parameters (BN statistics aside)."""
    def learnable(name):
        shapes = nets.shapes(name)
        return sum(np.prod(shape) for layer, blobs in shapes.params.items()
                   if shapes.layer_types[layer] != "BatchNorm" for shape in blobs)

    assert learnable("sse_holonet_3conv-s_concat") / 1e6 == pytest.approx(29.5, abs=0.1)
    assert learnable("sse_densenet121_3conv-s_concat") / 1e6 == pytest.approx(41.3, abs=0.1)
    assert learnable("sse_resnet50_4conv-c_concat") / 1e6 == pytest.approx(390, abs=1)


def test_solver_has_the_released_values_and_the_callers_paths():
    solver = nets.solver("dsn_resnet", "runs/a/train_val.prototxt", "runs/a/snap", {"max_iter": 2})
    assert solver.net == "runs/a/train_val.prototxt" and solver.snapshot_prefix == "runs/a/snap"
    assert (solver.base_lr, solver.gamma, list(solver.stepvalue)) == (pytest.approx(0.01), 0.5, [20000, 30000])
    assert solver.max_iter == 2 and solver.solver_mode == solver.CPU
    with pytest.raises(UserError, match="'max_iters' is not a Caffe solver field"):
        nets.solver("dsn_resnet", "x", overrides={"max_iters": 2})


def test_list_prints_one_line_per_net(capsys):
    assert main(["nets", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(NAMES)
    assert lines[2].split()[0] == "dsn_resnet" and "77.82 M params" in lines[2]


def test_committed_prototxt_is_what_the_generator_writes(tmp_path):
    """Regenerate with `make nets` (or `emotiw nets`) after changing a builder."""
    committed = REPO / "prototxt"
    # relative --out, as `make nets` runs it: the solvers' net paths are relative to the checkout
    result = subprocess.run([sys.executable, "-m", "emotiw.cli", "nets", "--out", "prototxt"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    generated = sorted(path.relative_to(tmp_path) for path in (tmp_path / "prototxt").rglob("*.prototxt"))
    assert generated == sorted(path.relative_to(REPO) for path in committed.rglob("*.prototxt"))
    stale = [str(path) for path in generated if not filecmp.cmp(tmp_path / path, REPO / path, shallow=False)]
    assert not stale, f"prototxt files differ from the generator; run `make nets`: {stale}"
