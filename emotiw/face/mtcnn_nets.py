"""MTCNN's three networks (P-Net, R-Net, O-Net) on Caffe, with the weights of the `mtcnn` wheel.

The nets are generated with NetSpec (Convolution, PReLU, Pooling, InnerProduct, Softmax) under the
layer names of the Keras models in `mtcnn` 1.0.0, whose weights ship as lz4-compressed joblib
lists of Keras arrays (`mtcnn/assets/weights/{pnet,rnet,onet}.lz4`). Converting them means:
  * Convolution kernels: Keras HWIO -> Caffe OIHW;
  * the first InnerProduct of R-Net and O-Net: Keras permutes its NHWC feature map to NWHC and then
    flattens it (the original MTCNN was trained on transposed images), Caffe flattens NCHW, so the
    rows of the dense kernel are reordered from (w, h, c) to (c, h, w);
  * Keras pooling with padding "same" pads at the end only for these sizes, which is Caffe's
    ceil-mode pooling, so the pooling layers need no padding.
The images themselves are not transposed: the Keras models take ordinary HxW images.

Converted caffemodels are cached in `models/mtcnn/` beside the generated prototxts; a sha256 of
the weight files, the prototxts and CONVERTER_VERSION, written next to them, decides when to redo it.
The `mtcnn` package is found without importing it (importing it imports TensorFlow).
"""

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np

from emotiw.caffe.env import import_caffe
from emotiw.caffe.runtime import check_backend, load_net
from emotiw.errors import UserError
from emotiw.formats.files import atomic_path, atomic_write_text, record_is_current
from emotiw.nets.backbones import layers_and_params, pool
from emotiw.paths import MODELS_DIR

CONVERTER_VERSION = 1
NET_NAMES = ("pnet", "rnet", "onet")
INPUT_SIDE = {"pnet": 12, "rnet": 24, "onet": 48}
# Output blobs in the order `forward` returns them: box regression, [landmarks,] face probability.
OUTPUTS = {"pnet": ("conv4-1", "prob1"), "rnet": ("fc5-1", "prob1"),
           "onet": ("fc6-1", "fc6-2", "prob1")}
DEFAULT_MODEL_DIR = MODELS_DIR / "mtcnn"
DIGEST_FILE = "conversion.json"
FIX_MTCNN = "install the weights with `pip install --no-deps mtcnn==1.0.0` (TensorFlow is not needed)"


# ---------------------------------------------------------------------------- network definitions

def conv_block(n, index, bottom, channels, kernel, pool_kernel=None):
    """convN + in-place preluN (one slope per channel, as Keras' PReLU(shared_axes=[1, 2])),
    then poolN (max, stride 2) when `pool_kernel` is given."""
    L, _ = layers_and_params()
    n[f"conv{index}"] = L.Convolution(bottom, num_output=channels, kernel_size=kernel)
    n[f"prelu{index}"] = L.PReLU(n[f"conv{index}"], in_place=True)
    if pool_kernel is None:
        return n[f"conv{index}"]
    n[f"pool{index}"] = pool(n[f"conv{index}"], "MAX", pool_kernel, 2)
    return n[f"pool{index}"]


def fc_prelu(n, index, bottom, outputs):
    L, _ = layers_and_params()
    n[f"fc{index}"] = L.InnerProduct(bottom, num_output=outputs)
    n[f"prelu{index}"] = L.PReLU(n[f"fc{index}"], in_place=True)
    return n[f"fc{index}"]


def heads(n, prefix, bottom, sizes):
    """The output layers `{prefix}-1`, `{prefix}-2`, ... (1x1 convolutions in the fully convolutional
    P-Net, InnerProducts elsewhere); the last one feeds the face/non-face softmax `prob1`."""
    L, _ = layers_and_params()
    for index, size in enumerate(sizes, start=1):
        if prefix.startswith("conv"):
            n[f"{prefix}-{index}"] = L.Convolution(bottom, num_output=size, kernel_size=1)
        else:
            n[f"{prefix}-{index}"] = L.InnerProduct(bottom, num_output=size)
    n.prob1 = L.Softmax(n[f"{prefix}-{len(sizes)}"])


def net_input(side):
    L, _ = layers_and_params()
    return L.Input(shape={"dim": [1, 3, side, side]})


def pnet(n):
    """Fully convolutional: 12x12 windows with stride 2 over any image size."""
    x = conv_block(n, 1, n.data, 10, 3, pool_kernel=2)
    x = conv_block(n, 2, x, 16, 3)
    x = conv_block(n, 3, x, 32, 3)
    heads(n, "conv4", x, (4, 2))


def rnet(n):
    x = conv_block(n, 1, n.data, 28, 3, pool_kernel=3)
    x = conv_block(n, 2, x, 48, 3, pool_kernel=3)
    x = conv_block(n, 3, x, 64, 2)
    heads(n, "fc5", fc_prelu(n, 4, x, 128), (4, 2))


def onet(n):
    x = conv_block(n, 1, n.data, 32, 3, pool_kernel=3)
    x = conv_block(n, 2, x, 64, 3, pool_kernel=3)
    x = conv_block(n, 3, x, 64, 3, pool_kernel=2)
    x = conv_block(n, 4, x, 128, 2)
    heads(n, "fc6", fc_prelu(n, 5, x, 256), (4, 10, 2))


ARCHITECTURES = {"pnet": pnet, "rnet": rnet, "onet": onet}


def prototxt_text(name):
    caffe = import_caffe()
    n = caffe.NetSpec()
    n.data = net_input(INPUT_SIDE[name])
    ARCHITECTURES[name](n)
    return f"name: \"mtcnn-{name}\"\n{n.to_proto()}"


# ---------------------------------------------------------------------------- weight conversion

def keras_weights_dir():
    """The wheel's weights folder, located without importing `mtcnn` (which imports TensorFlow)."""
    spec = importlib.util.find_spec("mtcnn")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        folder = Path(location) / "assets" / "weights"
        if all((folder / f"{name}.lz4").is_file() for name in NET_NAMES):
            return folder
    raise UserError(f"the MTCNN weights of the `mtcnn` package were not found; {FIX_MTCNN}")


def load_keras_weights(path):
    import joblib
    try:
        arrays = joblib.load(path)
    except Exception as error:  # a truncated or foreign file fails inside lz4/pickle
        raise UserError(f"cannot read MTCNN weights {path} ({error}); {FIX_MTCNN}")
    return [np.asarray(array, dtype=np.float32) for array in arrays]


def dense_rows_to_caffe(kernel, bottom_shape):
    """Keras Dense kernel (in, out) after Permute((2, 1, 3)) + Flatten of an NHWC map, i.e. rows
    indexed (w, h, c), to Caffe InnerProduct weights (out, in) over an NCHW map, columns (c, h, w)."""
    _, channels, height, width = bottom_shape
    per_position = kernel.reshape(width, height, channels, kernel.shape[1])
    return per_position.transpose(3, 2, 1, 0).reshape(kernel.shape[1], -1)


def caffe_blob(layer_type, index, keras_array, bottom_shape):
    """One Keras array in the layout of the Caffe parameter blob it becomes."""
    if index == 1 or layer_type == "PReLU":  # biases and PReLU slopes are plain vectors
        return keras_array.reshape(-1)
    if layer_type == "Convolution":
        return keras_array.transpose(3, 2, 0, 1)
    if len(bottom_shape) == 4:
        return dense_rows_to_caffe(keras_array, bottom_shape)
    return keras_array.T


def fill_params(net, keras_arrays, source):
    """Copies the Keras arrays, in layer order, into the Caffe net's parameter blobs."""
    layers = dict(zip(net._layer_names, net.layers))
    remaining = list(keras_arrays)
    for name, blobs in net.params.items():
        bottom_shape = net.blobs[net.bottom_names[name][0]].data.shape
        for index, blob in enumerate(blobs):
            if not remaining:
                raise UserError(f"{source} has too few arrays for layer {name}; {FIX_MTCNN}")
            array = caffe_blob(layers[name].type, index, remaining.pop(0), bottom_shape)
            if array.shape != blob.data.shape:
                raise UserError(f"{source}: layer {name} expects {blob.data.shape}, the file has "
                                f"{array.shape}; {FIX_MTCNN}")
            blob.data[...] = array
    if remaining:
        raise UserError(f"{source} has {len(remaining)} arrays more than the net; {FIX_MTCNN}")


def convert(weights_path, prototxt, caffemodel):
    caffe = import_caffe()
    net = caffe.Net(str(prototxt), caffe.TEST)
    fill_params(net, load_keras_weights(weights_path), weights_path)
    with atomic_path(caffemodel) as tmp:
        net.save(str(tmp))


def inputs_digest(weights_dir, prototxts):
    digest = hashlib.sha256(f"converter {CONVERTER_VERSION}\n".encode())
    for name in NET_NAMES:
        digest.update((weights_dir / f"{name}.lz4").read_bytes())
        digest.update(prototxts[name].encode())
    return digest.hexdigest()


def model_files(model_dir):
    return {name: (model_dir / f"{name}.prototxt", model_dir / f"{name}.caffemodel") for name in NET_NAMES}


def ensure_models(model_dir=DEFAULT_MODEL_DIR):
    """Generates the prototxts and converts the weights unless the cached ones are up to date.

    Returns {net name: (prototxt path, caffemodel path)}.
    """
    model_dir = Path(model_dir)
    weights_dir = keras_weights_dir()
    texts = {name: prototxt_text(name) for name in NET_NAMES}
    files = model_files(model_dir)
    digest = inputs_digest(weights_dir, texts)
    record = model_dir / DIGEST_FILE
    if record_is_current(record, digest, [path for pair in files.values() for path in pair]):
        return files
    for name, (prototxt, caffemodel) in files.items():
        if not prototxt.is_file() or prototxt.read_text() != texts[name]:
            atomic_write_text(prototxt, texts[name])
        convert(weights_dir / f"{name}.lz4", prototxt, caffemodel)
    atomic_write_text(record, json.dumps({"sha256": digest, "converter_version": CONVERTER_VERSION}) + "\n")
    return files


# ---------------------------------------------------------------------------- inference

# OpenCV's DNN module runs the whole detector about 2.5x faster than pycaffe on the same files
# (640x360 frame, one face, 2 shared CPU cores: median 67 vs 164 ms), hence auto's choice.
PREFERRED_BACKEND = "opencv"


class MtcnnNets:
    """The three nets on one backend of emotiw.caffe.runtime."""

    def __init__(self, files, backend="auto"):
        self.nets = {}
        for name, (prototxt, caffemodel) in files.items():
            self.nets[name], self.backend = load_net(prototxt, caffemodel, backend, PREFERRED_BACKEND)

    def forward(self, name, batch):
        """batch: float32 (N, 3, H, W), already normalised. Returns OUTPUTS[name] as arrays."""
        outputs = self.nets[name].forward(batch, OUTPUTS[name])
        return [outputs[blob] for blob in OUTPUTS[name]]


def load_nets(backend="auto", model_dir=DEFAULT_MODEL_DIR):
    """The three nets on the chosen backend ("auto", "pycaffe" or "opencv")."""
    check_backend(backend)
    return MtcnnNets(ensure_models(model_dir), backend)
