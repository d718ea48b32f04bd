"""The SSE nets (emotiw/nets/sse.py on emotiw/nets/backbones.py): the released three against their
layer summaries in ../shared/reference, and every one of the 15 nets in real pycaffe (CPU, batch 2):
instantiation in TRAIN and TEST, a forward+backward with finite losses, and a deploy forward."""

import json
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from google.protobuf import json_format

from emotiw import nets
from emotiw.caffe.env import import_caffe
from emotiw.caffe.shapes import top_shapes
from emotiw.errors import UserError
from emotiw.nets import backbones, sse
from emotiw.nets.options import NetOptions

caffe = import_caffe()
from caffe.proto import caffe_pb2  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
RELEASED_FILES = {"holonet": "SSE_holonet", "densenet121": "SSE-densenet-121", "resnet50": "SSE-resnet-50"}
NETS = [(backbone, variant) for backbone in sse.BACKBONES for variant in sse.VARIANTS]
BIN = Path(sys.prefix) / "bin"
MEAN = (104.0, 117.0, 123.0)
BATCH = 2

# ------------------------------------------------------------------------------------------------
# The documented fixes (docs/nets-sse.md): (layer, field) -> our value; nothing else may differ.

NEW_FILLERS = {"weight_filler": {"type": "xavier"}, "bias_filler": {"type": "constant", "value": 0.1}}


def filler_fixes(*layers):
    """New layers released without a filler (so starting at zero) get the SSE xavier/0.1 fillers."""
    return {(layer, field): value for layer in layers for field, value in NEW_FILLERS.items()}


def own_top_fixes(tap, steps, pool):
    """The released cascade convs after the first ran in place on `{tap}_new` while changing its
    shape; each gets its own top, which its BN/Scale/ReLU and the next layer follow."""
    fixes = {}
    for step in range(2, steps + 1):
        top = [f"{tap}_new_{step}"]
        fixes[(f"{tap}_conv_{step}", "tops")] = top
        if step > 2:
            fixes[(f"{tap}_conv_{step}", "bottoms")] = [f"{tap}_new_{step - 1}"]
        for layer in (f"{tap}_bn_{step}", f"{tap}_scale_{step}", f"{tap}_relu_{step}"):
            fixes[(layer, "bottoms")] = fixes[(layer, "tops")] = top
    fixes[(pool, "bottoms")] = [f"{tap}_new_{steps}"]
    return fixes


RESNET_FIXES = {
    **filler_fixes("res2c_conv_1", "res2c_conv_2", "res2c_conv_3", "res3d_conv_1", "res3d_conv_2",
                   "res4f_conv_1", "fc2", "fc3", "fc4", "fc5", "fc_concat"),
    **own_top_fixes("res2c", 3, "pool2"),
    **own_top_fixes("res3d", 2, "pool3"),
    # fc_concat ran in place while changing shape (28 -> 7): the concat gets its own top
    ("Concat5", "tops"): ["Concat5"],
    ("fc_concat", "bottoms"): ["Concat5"],
}
FIXES = {
    ("holonet", "train_val"): {},
    ("holonet", "test"): {},
    ("densenet121", "train_val"): filler_fixes("emoti_fc6"),
    ("densenet121", "test"): filler_fixes("emoti_fc6"),
    ("resnet50", "train_val"): RESNET_FIXES,
    ("resnet50", "test"): {
        **RESNET_FIXES,
        # the released test net read the 128x128 list unresized into a 224 net
        ("data", "image_data_param"): {"source": sse.TEST_LIST, "batch_size": 29,
                                       "new_height": 224, "new_width": 224},
    },
}


# ------------------------------------------------------------------------------------------------
# Our layers in the vocabulary of the reference summaries (sse-facts.md section 7)

def _geometry(param, field, default):
    """[h, w] where the prototxt writes field_h/field_w, else the single value or Caffe's default."""
    if param.HasField(f"{field}_h"):
        return [getattr(param, f"{field}_h"), getattr(param, f"{field}_w")]
    value = getattr(param, "kernel_size" if field == "kernel" else field)
    if isinstance(value, int):  # pooling: 0 means unset
        return value or default
    return value[0] if len(value) else default


def _filler(filler):
    record = {"type": filler.type}
    if filler.HasField("value"):
        record["value"] = filler.value
    return record


def _fillers(param):
    return {field: _filler(getattr(param, field))
            for field in ("weight_filler", "bias_filler") if param.HasField(field)}


def _record(layer):
    record = {"name": layer.name, "type": layer.type, "bottoms": list(layer.bottom),
              "tops": list(layer.top)}
    if layer.type == "Convolution":
        conv = layer.convolution_param
        record.update(num_output=conv.num_output, kernel_size=_geometry(conv, "kernel", None),
                      stride=_geometry(conv, "stride", 1), pad=_geometry(conv, "pad", 0),
                      group=conv.group, bias_term=conv.bias_term, **_fillers(conv))
        if len(conv.dilation):
            record["dilation"] = conv.dilation[0]
    elif layer.type == "InnerProduct":
        inner = layer.inner_product_param
        record.update(num_output=inner.num_output, bias_term=inner.bias_term, **_fillers(inner))
    elif layer.type == "Pooling":
        pooling = layer.pooling_param
        record.update(kernel_size=_geometry(pooling, "kernel", None), stride=pooling.stride,
                      pad=pooling.pad, global_pooling=pooling.global_pooling,
                      pool=caffe_pb2.PoolingParameter.PoolMethod.Name(pooling.pool))
    elif layer.type == "BatchNorm":
        bn = layer.batch_norm_param
        record["use_global_stats"] = (bn.use_global_stats if bn.HasField("use_global_stats")
                                      else "(default: phase==TEST)")
        if bn.HasField("eps"):
            record["bn_eps"] = bn.eps
    elif layer.type == "Scale":
        record["bias_term"] = layer.scale_param.bias_term
    elif layer.type == "Power":
        power = layer.power_param
        record["power_param"] = {"power": power.power, "scale": power.scale, "shift": power.shift}
    elif layer.type == "Concat":
        record["concat_axis"] = layer.concat_param.axis
    elif layer.type == "Eltwise":
        eltwise = layer.eltwise_param
        record["eltwise_operation"] = caffe_pb2.EltwiseParameter.EltwiseOp.Name(eltwise.operation)
        if len(eltwise.coeff):
            record["eltwise_coeff"] = list(eltwise.coeff)
    elif layer.type == "Accuracy":
        record["accuracy_param"] = {"top_k": layer.accuracy_param.top_k}
    if len(layer.param):
        record["lr_mult"] = [spec.lr_mult for spec in layer.param]
        record["decay_mult"] = [spec.decay_mult for spec in layer.param]
    if len(layer.include):
        record["phase"] = caffe_pb2.Phase.Name(layer.include[0].phase)
    for field in ("transform_param", "data_param", "image_data_param"):
        if layer.HasField(field):
            record[field] = json_format.MessageToDict(getattr(layer, field),
                                                      preserving_proto_field_name=True)
    return record


def _comparable(value):
    """Numbers as floats at 6 digits and enum names as the summaries write them."""
    if isinstance(value, bool) or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return round(float(value), 6)
    if isinstance(value, list):
        return [_comparable(item) for item in value]
    if isinstance(value, dict):
        return {key: _comparable(item) for key, item in value.items() if key != "backend"}
    return value


def differences(ours, reference):
    """{(layer, field): (reference value, our value)} for every field either side states."""
    diffs = {}
    ignored = {"out_shapes", "effective_loss_weight", "loss_weight"}
    for ref, mine in zip(reference, ours):
        for field in (set(ref) | set(mine)) - ignored:
            ref_value, our_value = _comparable(ref.get(field)), _comparable(mine.get(field))
            if ref_value != our_value:
                diffs[(ref["name"], field)] = (ref_value, our_value)
    return diffs


def reference_layers(backbone, mode):
    suffix = "train" if mode == "train_val" else "test"
    path = REFERENCE / f"sse-{RELEASED_FILES[backbone]}_{suffix}.layers.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return json.loads(path.read_text())


def released(backbone, mode, options=NetOptions()):
    return sse.build_sse(backbone, sse.SSE_DEFAULTS[backbone].released_variant, mode, options)


# ------------------------------------------------------------------------------------------------
# The released three, layer by layer

@pytest.mark.parametrize("backbone", sse.BACKBONES)
@pytest.mark.parametrize("mode", ["train_val", "test"])
def test_released_net_matches_reference_apart_from_documented_fixes(backbone, mode):
    reference = reference_layers(backbone, mode)
    ours = [_record(layer) for layer in released(backbone, mode).layer]
    assert [layer["name"] for layer in ours] == [layer["name"] for layer in reference]
    diffs = differences(ours, reference)
    fixes = FIXES[(backbone, mode)]
    assert sorted(diffs) == sorted(fixes)
    for key, expected in fixes.items():
        assert diffs[key][1] == _comparable(expected), key


def test_holonet_branch_outputs_option_fixes_only_the_three_heads():
    reference = reference_layers("holonet", "train_val")
    options = NetOptions(holonet_branch_outputs=7)
    diffs = differences([_record(layer) for layer in released("holonet", "train_val", options).layer],
                        reference)
    assert diffs == {(head, "num_output"): (14.0, 7.0)
                     for head in ("conv_fc3_1_1", "conv_fc3_2_1", "conv_fc4_1_1")}
    with pytest.raises(UserError, match="at least the number of classes"):
        released("holonet", "deploy", NetOptions(holonet_branch_outputs=5))


def _dsn_backbone(builder, count, **kwargs):
    """The first `count` layers of our backbone after an Input, as records."""
    n = caffe.NetSpec()
    n.data = caffe.layers.Input(shape={"dim": [1, 3, 224, 224]})
    builder(n, n.data, **kwargs)
    return [_record(layer) for layer in n.to_proto().layer[1:count + 1]]


@pytest.mark.parametrize("reference_file,builder,kwargs", [
    ("dsn-DenseNet.DenseNet_train_test", backbones.densenet121, {}),
    ("dsn-DSN-Res-50.train_res50", backbones.resnet,
     {"blocks": (3, 4, 23, 3), "conv1_bias": False, "frozen_bn": True, "conv_lr_mult": 1.0,
      "res5_dilation": 2}),
])
def test_shared_backbones_match_the_dsn_references(reference_file, builder, kwargs):
    """The DSN files summarise only what their prototxt states; each stated field must match."""
    path = REFERENCE / f"{reference_file}.layers.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    reference = [layer for layer in json.loads(path.read_text()) if layer["type"] != "ImageData"]
    last = next(i for i, layer in enumerate(reference) if layer["name"] in ("pool5", "res5c_relu"))
    reference = reference[:last + 1]
    ours = _dsn_backbone(builder, len(reference), **kwargs)
    for ref, mine in zip(reference, ours):
        for field in ("name", "type", "bottoms", "tops", "num_output", "kernel_size", "stride", "pad",
                      "dilation", "bias_term", "lr_mult", "use_global_stats"):
            if ref.get(field) is not None:
                expected = mine.get(field, 1 if field == "dilation" else None)
                assert _comparable(expected) == _comparable(ref[field]), (ref["name"], field)
    assert len(ours) == len(reference)


def test_resnet_block_names_follow_kaiminghe():
    n = caffe.NetSpec()
    n.data = caffe.layers.Input(shape={"dim": [1, 3, 224, 224]})
    taps = backbones.resnet(n, n.data, blocks=(3, 8, 36, 3))
    res3 = [name for name in taps if name.startswith("res3")]
    assert res3 == ["res3a"] + [f"res3b{i}" for i in range(1, 8)]
    assert list(taps)[-3:] == ["res5a", "res5b", "res5c"]
    shapes = top_shapes(n, taps)
    assert shapes["res5c"] == (1, 2048, 7, 7) and shapes["res2c"] == (1, 256, 56, 56)


def test_hooks_for_unknown_taps_are_refused():
    n = caffe.NetSpec()
    n.data = caffe.layers.Input(shape={"dim": [1, 3, 128, 128]})
    with pytest.raises(ValueError, match="conv9_9"):
        backbones.holonet(n, n.data, hooks={"conv9_9": print})


# ------------------------------------------------------------------------------------------------
# Every net in pycaffe

def _expected_branches(variant):
    return {"original": 1, "3conv": 3, "4conv": 4}[variant.split("-")[0].split("_")[0]]


@pytest.mark.parametrize("backbone,variant", NETS)
def test_structure_of_every_variant(backbone, variant):
    train_val = sse.build_sse(backbone, variant, "train_val", NetOptions())
    deploy = sse.build_sse(backbone, variant, "deploy", NetOptions())
    losses = [layer for layer in train_val.layer if layer.type == "SoftmaxWithLoss"]
    fused = variant != "original"
    assert len(losses) == _expected_branches(variant) + fused
    types = [layer.type for layer in deploy.layer]
    assert "SoftmaxWithLoss" not in types and "Accuracy" not in types and types[0] == "Input"
    assert deploy.layer[-1].name == "prob" and deploy.layer[-1].type == "Softmax"
    if variant.endswith("_eltwise"):
        fusion = next(layer for layer in deploy.layer if layer.name == "score_sum")
        assert fusion.type == "Eltwise" and len(fusion.bottom) == _expected_branches(variant)
        assert fusion.eltwise_param.operation == caffe_pb2.EltwiseParameter.SUM
    elif variant.endswith("_concat"):
        concat = [layer for layer in deploy.layer if layer.type == "Concat" and len(layer.bottom) > 2
                  and layer.bottom[0].startswith(("flat_", "fc"))]
        assert len(concat) == 1 and len(concat[0].bottom) == _expected_branches(variant)
    cascades = [layer for layer in deploy.layer if "_conv_" in layer.name]
    assert bool(cascades) == ("-c_" in variant)
    assert all(layer.convolution_param.kernel_size == [7] and layer.convolution_param.stride == [2]
               for layer in cascades)


@pytest.fixture(scope="module")
def image_lists(tmp_path_factory):
    """Two lists of 128x128 colour images with labels 0..6 (ResNet resizes them to 224)."""
    root = tmp_path_factory.mktemp("sse_images")
    rng = np.random.default_rng(0)
    lists = {}
    for split in ("train", "val"):
        lines = []
        for index in range(BATCH * 2):
            path = root / f"{split}{index}.png"
            cv2.imwrite(str(path), rng.integers(0, 256, size=(128, 128, 3), dtype=np.uint8))
            lines.append(f"{path} {(index * 3) % 7}")
        lists[split] = root / f"{split}.txt"
        lists[split].write_text("\n".join(lines) + "\n")
    return lists


def list_options(lists, **kwargs):
    return NetOptions(source_type="list", train_source=str(lists["train"]), val_source=str(lists["val"]),
                      train_batch=BATCH, test_batch=BATCH, mean_values=MEAN, **kwargs)


def load(net_param, phase, tmp_path, name):
    path = tmp_path / f"{name}.prototxt"
    path.write_text(str(net_param))
    return caffe.Net(str(path), phase)


def set_unit_bn_statistics(net):
    """Untrained global statistics are all zero (BN would divide by sqrt(eps)); use mean 0, var 1."""
    for layer_name, layer in zip(net._layer_names, net.layers):
        if layer.type == "BatchNorm":
            mean, variance, factor = net.params[layer_name]
            mean.data[...], variance.data[...], factor.data[...] = 0, 1, 1


def loss_names(net_param):
    return [layer.top[0] for layer in net_param.layer if layer.type == "SoftmaxWithLoss"]


def first_branch_convs(net_param):
    """The first new conv of every scoring branch: -s conv_fc* and -c *_conv_1 (each before a BN)."""
    names = {layer.name for layer in net_param.layer}
    return [layer.name for layer in net_param.layer if layer.type == "Convolution" and (
        layer.name.startswith("conv_fc") and f"{layer.name}/bn" in names or layer.name.endswith("_conv_1"))]


BACKBONE_BUILDERS = {"holonet": backbones.holonet, "densenet121": backbones.densenet121,
                     "resnet50": backbones.resnet}


def stand_in_for_pretrained_weights(net, backbone, seed=0):
    """Random He-scaled weights in the backbone's convs, which have no filler in DenseNet and
    ResNet: they are meant to come from the ImageNet caffemodels. Head layers keep their fillers."""
    n = caffe.NetSpec()
    n.data = caffe.layers.Input(shape={"dim": [1, 3, 224, 224]})
    BACKBONE_BUILDERS[backbone](n, n.data)
    pretrained = {layer.name for layer in n.to_proto().layer if layer.type == "Convolution"}
    rng = np.random.default_rng(seed)
    for name in pretrained & set(net.params):
        weights = net.params[name][0].data
        if not weights.any():
            weights[...] = rng.normal(0, math.sqrt(2 / np.prod(weights.shape[1:])), weights.shape)


@pytest.mark.parametrize("backbone,variant", NETS)
def test_train_net_forward_backward(backbone, variant, image_lists, tmp_path):
    """TRAIN phase of train_val, from stand-in pretrained weights: every loss finite and positive,
    and gradient reaches every branch (the released zero-initialised ResNet branches got none)."""
    caffe.set_mode_cpu()
    caffe.set_random_seed(0)
    net_param = sse.build_sse(backbone, variant, "train_val", list_options(image_lists))
    net = load(net_param, caffe.TRAIN, tmp_path, "train_val")
    stand_in_for_pretrained_weights(net, backbone)
    outputs = net.forward()
    losses = loss_names(net_param)
    assert set(losses) <= set(outputs) and all(np.isfinite(value).all() for value in outputs.values())
    assert all(outputs[name] > 0 for name in losses)
    net.backward()
    for name in first_branch_convs(net_param):
        gradient = net.params[name][0].diff
        assert np.isfinite(gradient).all() and np.abs(gradient).max() > 0, name


@pytest.mark.parametrize("backbone,variant", NETS)
def test_val_test_and_deploy_nets(backbone, variant, image_lists, tmp_path):
    """The TEST phase of train_val and the test net run on the val list; the deploy net gives prob
    N x 7, rows summing to 1, equal to the test net's prob for the same weights and images."""
    caffe.set_mode_cpu()
    options = list_options(image_lists)
    val = load(sse.build_sse(backbone, variant, "train_val", options), caffe.TEST, tmp_path, "val")
    assert 0 <= float(val.forward()["accuracy"]) <= 1
    del val
    test = load(sse.build_sse(backbone, variant, "test", options), caffe.TEST, tmp_path, "test")
    stand_in_for_pretrained_weights(test, backbone)
    set_unit_bn_statistics(test)
    test.forward()
    images, test_prob = test.blobs["data"].data.copy(), test.blobs["prob"].data.copy()
    deploy = load(sse.build_sse(backbone, variant, "deploy", options), caffe.TEST, tmp_path, "deploy")
    for name, blobs in deploy.params.items():
        for mine, theirs in zip(blobs, test.params[name]):
            mine.data[...] = theirs.data
    del test
    deploy.blobs["data"].reshape(*images.shape)
    deploy.blobs["data"].data[...] = images
    prob = deploy.forward()["prob"]
    assert prob.shape == (BATCH, 7)
    np.testing.assert_allclose(prob.sum(axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(prob, test_prob, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# The released three in pycaffe: shapes and parameter counts

FACT_PARAMS = {"holonet": 29.5e6, "densenet121": 41.3e6, "resnet50": 390e6}


@pytest.mark.parametrize("backbone", sse.BACKBONES)
def test_released_deploy_shapes_and_parameter_count(backbone, tmp_path):
    """Blob shapes equal the reference's inferred shapes; parameter counts match the facts."""
    reference = reference_layers(backbone, "test")
    net_param = released(backbone, "deploy")
    net = load(net_param, caffe.TEST, tmp_path, "deploy")
    tops = {layer.name: layer.top[0] for layer in net_param.layer}
    for layer in reference:
        if layer["type"] not in ("ImageData", "SoftmaxWithLoss", "Accuracy"):
            shape = net.blobs[tops[layer["name"]]].data.shape
            assert list(shape[1:]) == layer["out_shapes"][0], layer["name"]
    count = sum(blob.data.size for blobs in net.params.values() for blob in blobs)
    assert math.isclose(count, FACT_PARAMS[backbone], rel_tol=0.01)


# ------------------------------------------------------------------------------------------------
# Data from an LMDB with a mean file (the released data layers), options and bad input

def run_tool(*args):
    result = subprocess.run([str(arg) for arg in args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_lmdb_train_val_with_mean_file(image_lists, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    listing = [line.split() for line in image_lists["train"].read_text().splitlines()]
    (root / "list.txt").write_text("".join(f"{Path(path).name} {label}\n" for path, label in listing))
    for path, _ in listing:
        (root / Path(path).name).write_bytes(Path(path).read_bytes())
    run_tool(BIN / "convert_imageset", f"{root}/", root / "list.txt", tmp_path / "lmdb")
    run_tool(BIN / "compute_image_mean", tmp_path / "lmdb", tmp_path / "mean.binaryproto")
    options = NetOptions(train_source=str(tmp_path / "lmdb"), val_source=str(tmp_path / "lmdb"),
                         mean_file=str(tmp_path / "mean.binaryproto"), train_batch=BATCH, test_batch=BATCH)
    net_param = released("holonet", "train_val", options)
    assert [layer.type for layer in net_param.layer[:2]] == ["Data", "Data"]
    net = load(net_param, caffe.TRAIN, tmp_path, "lmdb")
    outputs = net.forward()
    assert all(np.isfinite(value).all() for value in outputs.values())
    assert net.blobs["data"].data.shape == (BATCH, 3, 128, 128)


def test_options_classes_size_gray_and_batches(tmp_path):
    options = NetOptions(num_classes=5, input_size=96, color=False, mean_values=(120,))
    net_param = sse.build_sse("densenet121", "4conv-c_concat", "deploy", options)
    net = load(net_param, caffe.TEST, tmp_path, "gray")
    assert net.blobs["data"].data.shape == (1, 1, 96, 96)
    assert net.blobs["prob"].data.shape == (1, 5)
    train = sse.build_sse("resnet50", "original", "train_val", NetOptions(train_batch=3, test_batch=4))
    assert [layer.data_param.batch_size for layer in train.layer[:2]] == [3, 4]
    assert train.layer[0].transform_param.mirror and not train.layer[1].transform_param.mirror


@pytest.mark.parametrize("kwargs,message", [
    ({"mean_values": MEAN, "mean_file": "m.binaryproto"}, "either mean values or a mean file"),
    ({"color": False, "mean_values": MEAN}, "one mean value"),
    ({"source_type": "list"}, "train list and a val list"),
    ({"source_type": "hdf5"}, "unknown source type"),
    ({"input_size": 100}, "conv4_1/incep"),
    ({"input_size": -8}, r"layer 'data' \(Input\) would output .*-8, -8\]"),
])
def test_bad_options_raise_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        sse.build_sse("holonet", "3conv-s_concat", "train_val", NetOptions(**kwargs))


@pytest.mark.parametrize("args", [("vgg", "original", "deploy"), ("holonet", "5conv", "deploy"),
                                  ("holonet", "original", "train")])
def test_unknown_names_list_the_valid_ones(args):
    with pytest.raises(UserError, match="choose one of"):
        sse.build_sse(*args, NetOptions())


# ------------------------------------------------------------------------------------------------
# Solvers and registry entries

@pytest.mark.parametrize("backbone", sse.BACKBONES)
def test_solver_has_the_released_values(backbone):
    path = REFERENCE / f"sse-{RELEASED_FILES[backbone]}_train_solver.solver.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    released_values = json.loads(path.read_text())
    name = f"sse_{backbone}_original"
    solver = nets.solver(name, f"prototxt/{name}/train_val.prototxt")
    for field in set(released_values) - {"net", "snapshot_prefix", "solver_mode"}:
        value = getattr(solver, field)
        value = value[0] if field == "test_iter" else value
        assert _comparable(value) == _comparable(released_values[field]), field
    assert solver.net == "prototxt/sse_resnet50_original/train_val.prototxt".replace("resnet50", backbone)
    assert solver.solver_mode == caffe_pb2.SolverParameter.CPU
    assert not solver.stepvalue  # DenseNet's multistep keeps the released (absent) step values


def test_registry_entries_cover_the_15_nets():
    entries = list(sse.registry_entries())
    assert [entry.name for entry in entries] == [f"sse_{b}_{v}" for b, v in NETS]
    assert [entry.name for entry in entries if entry.released] == [
        "sse_holonet_3conv-s_concat", "sse_densenet121_3conv-s_concat", "sse_resnet50_4conv-c_concat"]
    resnet = entries[-1]
    assert resnet.recipe == "sse" and resnet.preprocessing.input_size == 224
    assert resnet.pretrained == "ResNet-50-model.caffemodel"
    assert resnet.builder("deploy", NetOptions()).layer[-1].name == "prob"
