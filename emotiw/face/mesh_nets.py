"""MediaPipe's face mesh network on Caffe: 468 3-D landmarks and a face-presence score.

The `mediapipe` 0.10.14 wheel (Apache-2.0) ships `face_landmark.tflite`: 192x192 RGB in [0, 1],
NHWC; outputs `conv2d_21` (1404 values: x, y, z of 468 points in input pixels) and `conv2d_31`
(one logit: a face is in the crop). `convert` reads the flatbuffer with the `tflite` schema package
(never importing mediapipe or TF Lite) and writes one Caffe layer per TF Lite operator, named after
the operator's output tensor:
  * CONV_2D and DEPTHWISE_CONV_2D (a grouped Convolution) with fp16 weights, dequantised, OHWI ->
    OIHW. TF Lite's SAME padding on a stride-2 convolution of an even size pads one row and column
    at the end only, which Caffe cannot say; the kernel grows to 4x4 with a zero first row and
    column, and Caffe's pad 1 then reads exactly the pixels TF Lite reads;
  * PRELU -> PReLU (one slope per channel), ADD -> Eltwise SUM, MAX_POOL_2D 2x2 stride 2 -> Pooling;
  * PAD, which only appends zero channels to a residual branch, -> Concat with the branch scaled by 0.
The wheel is fetched once into the cache (emotiw.formats.wheels); the converted net lives in
models/facemesh/, redone when the file or CONVERTER_VERSION change.
"""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from emotiw.errors import UserError
from emotiw.formats.files import atomic_path, atomic_write_text, cache_root, record_is_current
from emotiw.formats.wheels import Wheel, wheel_files
from emotiw.paths import MODELS_DIR

NAME = "face_mesh"
TFLITE_FILE = "face_landmark.tflite"
MESH_WHEEL = Wheel("mediapipe==0.10.14", "mediapipe-0.10.14-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
                   "a807328339e7356fda0bb14df12fedbf1d33bdf81649c5f8666b0026b1cc30b4",
                   {TFLITE_FILE: ("mediapipe/modules/face_landmark/face_landmark.tflite",
                                  "1055cb9d4a9ca8b8c688902a3a5194311138ba256bcc94e336d8373a5f30c814")},
                   pip_options=("--python-version", "3.11", "--platform", "manylinux_2_17_x86_64"))
CONVERTER_VERSION = 1
DEFAULT_MODEL_DIR = MODELS_DIR / "facemesh"
INPUT_SIZE = 192
LANDMARKS, PRESENCE = "conv2d_21", "conv2d_31"  # the model's two output tensors
SAME, VALID = 0, 1  # tflite.Padding


@dataclass
class Operator:
    """One TF Lite operator: its kind, input and output tensor names, options and constant arrays."""
    kind: str
    inputs: list
    output: str
    options: dict = field(default_factory=dict)
    arrays: list = field(default_factory=list)  # weights, bias, slopes, paddings (float32 / int32)


def tflite_file(cache=None):
    folder = wheel_files(MESH_WHEEL, Path(cache or cache_root()) / "wheels")
    return folder / TFLITE_FILE


def read_operators(path):
    """The graph of the .tflite file at `path` as Operators in execution order, DEQUANTIZE folded
    into the constants it feeds."""
    import tflite

    model = tflite.Model.GetRootAsModel(Path(path).read_bytes(), 0)
    graph = model.Subgraphs(0)
    names = {value: key for key, value in vars(tflite.BuiltinOperator).items() if not key.startswith("_")}

    def name(index):
        return graph.Tensors(index).Name().decode()

    def constant(index):
        tensor = graph.Tensors(index)
        data = model.Buffers(tensor.Buffer()).DataAsNumpy()
        if isinstance(data, int):  # no buffer: an activation
            return None
        dtype = {tflite.TensorType.FLOAT16: np.float16, tflite.TensorType.FLOAT32: np.float32,
                 tflite.TensorType.INT32: np.int32}[tensor.Type()]
        return data.view(dtype).reshape(tensor.ShapeAsNumpy()).astype(np.float32 if dtype != np.int32 else np.int32)

    dequantized, operators = {}, []
    for index in range(graph.OperatorsLength()):
        op = graph.Operators(index)
        code = model.OperatorCodes(op.OpcodeIndex())
        kind = names[max(code.BuiltinCode(), code.DeprecatedBuiltinCode())]
        inputs = [op.Inputs(j) for j in range(op.InputsLength()) if op.Inputs(j) >= 0]
        output = op.Outputs(0)
        if kind == "DEQUANTIZE":
            dequantized[output] = constant(inputs[0])
            continue
        arrays, activations = [], []
        for tensor in inputs:
            value = dequantized.get(tensor)
            value = constant(tensor) if value is None else value
            (activations if value is None else arrays).append(name(tensor) if value is None else value)
        operators.append(Operator(kind, activations, name(output), _options(op, kind), arrays))
    inputs = [name(graph.Inputs(i)) for i in range(graph.InputsLength())]
    return inputs, operators


def _options(op, kind):
    import tflite

    classes = {"CONV_2D": tflite.Conv2DOptions, "DEPTHWISE_CONV_2D": tflite.DepthwiseConv2DOptions,
               "MAX_POOL_2D": tflite.Pool2DOptions}
    if kind not in classes:
        return {}
    options = classes[kind]()
    table = op.BuiltinOptions()
    options.Init(table.Bytes, table.Pos)
    found = {"padding": options.Padding(), "stride": (options.StrideH(), options.StrideW()),
             "activation": options.FusedActivationFunction()}
    if kind == "MAX_POOL_2D":
        found["kernel"] = (options.FilterHeight(), options.FilterWidth())
    if found["activation"] != 0:
        raise UserError(f"{TFLITE_FILE}: a fused activation on {kind} is not converted")
    return found


def build(inputs, operators):
    """(deploy prototxt text, {layer: [blobs]}) of the operators (see the module's notes)."""
    from emotiw.caffe.env import import_caffe
    from emotiw.nets.backbones import layers_and_params

    L, _ = layers_and_params()
    n = import_caffe().NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, INPUT_SIZE, INPUT_SIZE]))
    tops, shapes, params = {inputs[0]: n.data}, {inputs[0]: (3, INPUT_SIZE, INPUT_SIZE)}, {}
    for op in operators:
        bottoms = [tops[name] for name in op.inputs]
        channels, height, width = shapes[op.inputs[0]]
        if op.kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            weights, bias = op.arrays
            weights = weights.transpose(0, 3, 1, 2)  # OHWI -> OIHW
            depthwise = op.kind == "DEPTHWISE_CONV_2D"
            if depthwise:  # TF Lite keeps depthwise kernels as 1 x H x W x C
                weights = weights.transpose(1, 0, 2, 3)
            kernel, stride = weights.shape[2], op.options["stride"][0]
            pad = 0
            if op.options["padding"] == SAME and kernel > 1:
                pad = (kernel - 1) // 2
                if stride == 2 and height % 2 == 0:  # TF pads at the end only: see the module's notes
                    weights = np.pad(weights, ((0, 0), (0, 0), (1, 0), (1, 0)))
                    kernel, pad = kernel + 1, 1
            outputs = weights.shape[0]
            top = L.Convolution(*bottoms, num_output=outputs, kernel_size=kernel, stride=stride, pad=pad,
                                **({"group": channels} if depthwise else {}))
            params[op.output] = [weights, bias]
            out_size = (height + 2 * pad - kernel) // stride + 1
            shape = (outputs, out_size, out_size)
        elif op.kind == "PRELU":
            top = L.PReLU(*bottoms)
            params[op.output] = [op.arrays[0].reshape(-1)]
            shape = (channels, height, width)
        elif op.kind == "ADD":
            top = L.Eltwise(*bottoms)
            shape = (channels, height, width)
        elif op.kind == "MAX_POOL_2D":
            if op.options["kernel"] != (2, 2) or op.options["stride"] != (2, 2) or height % 2:
                raise UserError(f"{TFLITE_FILE}: a max pooling other than 2x2 stride 2 on an even size")
            top = L.Pooling(*bottoms, pool=0, kernel_size=2, stride=2)
            shape = (channels, height // 2, width // 2)
        elif op.kind == "PAD":
            paddings = op.arrays[0]
            if paddings[:3].any() or paddings[3, 0]:
                raise UserError(f"{TFLITE_FILE}: a PAD other than appending channels")
            n[f"{op.output}_zeros"] = L.Power(*bottoms, scale=0.0)
            top = L.Concat(*bottoms, n[f"{op.output}_zeros"], axis=1)
            if paddings[3, 1] != channels:
                raise UserError(f"{TFLITE_FILE}: a PAD that does not double the channels")
            shape = (2 * channels, height, width)
        else:
            raise UserError(f"{TFLITE_FILE}: operator {op.kind} is not converted")
        n[op.output] = top
        tops[op.output], shapes[op.output] = top, shape
    return f'name: "{NAME}"\n{n.to_proto()}', params


def ensure_model(model_dir=DEFAULT_MODEL_DIR, cache=None):
    """(deploy.prototxt, caffemodel) of the face mesh in `model_dir`, converted again only when the
    .tflite file or CONVERTER_VERSION changed."""
    from emotiw.caffe.env import import_caffe

    model_dir = Path(model_dir)
    source = tflite_file(cache)
    deploy, caffemodel, record = (model_dir / "deploy.prototxt", model_dir / f"{NAME}.caffemodel",
                                  model_dir / "conversion.json")
    digest = hashlib.sha256(f"converter {CONVERTER_VERSION}\n".encode() + source.read_bytes()).hexdigest()
    if record_is_current(record, digest, (deploy, caffemodel)):
        return deploy, caffemodel
    text, params = build(*read_operators(source))
    atomic_write_text(deploy, text)
    caffe = import_caffe()
    net = caffe.Net(str(deploy), caffe.TEST)
    for name, arrays in params.items():
        for blob, array in zip(net.params[name], arrays):
            blob.data[...] = array.reshape(blob.data.shape)
    with atomic_path(caffemodel) as tmp:
        net.save(str(tmp))
    atomic_write_text(record, json.dumps({"sha256": digest, "converter_version": CONVERTER_VERSION}) + "\n")
    return deploy, caffemodel
