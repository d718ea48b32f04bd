"""Reading Caffe's own files: net prototxts, mean.binaryproto, and what a TEST-phase net contains."""

from pathlib import Path

import numpy as np

from emotiw.caffe.env import import_caffe
from emotiw.errors import UserError


def caffe_pb2():
    return import_caffe().proto.caffe_pb2


def read_net_param(path):
    """A prototxt as a caffe_pb2.NetParameter."""
    from google.protobuf import text_format

    path = Path(path)
    if not path.is_file():
        raise UserError(f"net file {path} not found")
    net = caffe_pb2().NetParameter()
    try:
        text_format.Parse(path.read_text(), net)
    except text_format.ParseError as error:
        raise UserError(f"{path} is not a valid net prototxt: {error}") from None
    return net


def _meets_test_phase(rule):
    return not rule.HasField("phase") or rule.phase == 1  # caffe.TEST


def runs_in_test(layer):
    """Caffe's include/exclude filter for a TEST-phase net (levels and stages are not used here)."""
    if layer.include:
        return any(_meets_test_phase(rule) for rule in layer.include)
    return not any(_meets_test_phase(rule) for rule in layer.exclude)


def data_layers_in_test(net):
    """The data layers (ImageData or Data) a TEST-phase net instantiates."""
    return [layer for layer in net.layer if layer.type in ("ImageData", "Data") and runs_in_test(layer)]


def deploy_input(net):
    """(input blob name, (C, H, W)) of a deploy NetParameter: `input:` fields or an Input layer."""
    if len(net.input):
        dims = net.input_shape[0].dim if len(net.input_shape) else net.input_dim[:4]
        return net.input[0], tuple(int(d) for d in dims[1:])
    for layer in net.layer:
        if layer.type == "Input":
            return layer.top[0], tuple(int(d) for d in layer.input_param.shape[0].dim[1:])
    raise UserError(f"net '{net.name}' has no input blob (no `input:` and no Input layer); give a deploy prototxt")


def read_mean_file(path):
    """A mean.binaryproto as a (C, H, W) array."""
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"mean file {path} not found; give one with --mean-file")
    blob = caffe_pb2().BlobProto()
    try:
        blob.ParseFromString(path.read_bytes())
    except DecodeError:
        raise UserError(f"{path} is not a Caffe mean.binaryproto") from None
    legacy = (blob.num, blob.channels, blob.height, blob.width)
    shape = tuple(blob.shape.dim) if len(blob.shape.dim) else legacy
    values = np.asarray(blob.data, dtype=np.float32)
    if values.size == 0 or values.size != np.prod(shape):
        raise UserError(f"{path}: {values.size} values for a blob of shape {list(shape)}; not a mean file")
    return values.reshape(shape[-3:])
