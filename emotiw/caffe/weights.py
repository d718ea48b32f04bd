"""`emotiw weights report`: which layers of a net a .caffemodel initialises, as Caffe would see it.

Caffe's Net::CopyTrainedLayersFrom copies a file's layer into the net's first layer of the same
name; names the net lacks are ignored, and a different number of blobs or a different blob shape
aborts the whole process. This module reads the file as a NetParameter (current `layer` or legacy
V1 `layers` format) and compares it with the net's parameter shapes, computed without Caffe, so the
answer comes before anything is instantiated.
"""

import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from emotiw.caffe.env import import_caffe
from emotiw.errors import UserError

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# res4b12_branch2a, bn4b12_branch2a, scale4b12_branch2a -> block res4b12 (KaimingHe names)
RESNET_BLOCK = re.compile(r"^(?:res|bn|scale)(\d+[a-z]\d*)_branch")


@dataclass
class Mismatch:
    layer: str
    expected: list   # the net's blob shapes
    found: list      # the file's blob shapes


@dataclass
class WeightsReport:
    net: str
    weights: str
    loaded: list = field(default_factory=list)       # layers whose every blob comes from the file
    untrained: list = field(default_factory=list)    # layers with parameters the file lacks
    mismatched: list = field(default_factory=list)   # Mismatch: Caffe would abort on these
    ignored: list = field(default_factory=list)      # layers of the file with weights, not in the net
    blocks: dict = field(default_factory=dict)       # block -> True when every layer of it loaded

    @property
    def loadable(self):
        """Caffe can copy this file into the net (it may still initialise nothing)."""
        return not self.mismatched

    @property
    def untrained_blocks(self):
        return [block for block, loaded in self.blocks.items() if not loaded]

    @property
    def verdict(self):
        total = len(self.loaded) + len(self.untrained) + len(self.mismatched)
        if self.mismatched:
            first = self.mismatched[0]
            return (f"REFUSED: Caffe would abort: {len(self.mismatched)} layer(s) differ in shape, "
                    f"first '{first.layer}' (net {first.expected}, file {first.found}); "
                    "use weights made for this net or rename those layers")
        if not self.loaded:
            return f"NOTHING LOADED: no layer of the file matches one of the net's {total} layers with weights"
        if not self.untrained:
            return f"COMPLETE: all {total} layers with weights are initialised from the file"
        blocks = ""
        if self.untrained_blocks:
            blocks = f"; {len(self.untrained_blocks)} of {len(self.blocks)} blocks untrained"
        return (f"PARTIAL: {len(self.loaded)} of {total} layers with weights initialised from the file, "
                f"{len(self.untrained)} keep their filler init{blocks}")

    def lines(self):
        """The human-readable report."""
        out = [f"net {self.net}, weights {self.weights}"]
        out.append(f"loaded ({len(self.loaded)}): {', '.join(self.loaded) or '-'}")
        out.append(f"left at filler init ({len(self.untrained)}): {', '.join(self.untrained) or '-'}")
        for miss in self.mismatched:
            out.append(f"shape mismatch: {miss.layer}: net {miss.expected}, file {miss.found}")
        out.append(f"in the file but not in the net, ignored ({len(self.ignored)}): "
                   f"{', '.join(self.ignored) or '-'}")
        if self.untrained_blocks:
            out.append(f"untrained blocks ({len(self.untrained_blocks)} of {len(self.blocks)}): "
                       f"{', '.join(self.untrained_blocks)}")
        out.append(self.verdict)
        return out


def read_caffemodel_param(path):
    """The file as a caffe_pb2.NetParameter, refused with one line when it is not a binary caffemodel."""
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    data = path.read_bytes()
    if data.startswith(HDF5_SIGNATURE):
        raise UserError(f"{path} is an HDF5 snapshot; give a binary .caffemodel "
                        "(snapshot_format: BINARYPROTO)")
    net = import_caffe().proto.caffe_pb2.NetParameter()
    try:
        net.ParseFromString(data)
    except DecodeError as error:
        raise UserError(f"{path} is truncated or not a Caffe model ({error}); download it again") from None
    return net


def read_caffemodel(path):
    """The file's layers as {name: [blob shape, ...]}, in file order (first layer of each name)."""
    net = read_caffemodel_param(path)
    layers = list(net.layer) or list(net.layers)
    blobs = {}
    for layer in layers:
        blobs.setdefault(layer.name, [_blob_shape(path, layer.name, blob) for blob in layer.blobs])
    if not any(blobs.values()):
        raise UserError(f"{path} is not a Caffe model: it holds no layer weights")
    return blobs


def _blob_shape(path, layer, blob):
    """The blob's shape; the legacy 4-D num/channels/height/width when that is what it has."""
    if blob.HasField("num") or blob.HasField("channels") or blob.HasField("height") or blob.HasField("width"):
        shape = (blob.num, blob.channels, blob.height, blob.width)
    else:
        shape = tuple(blob.shape.dim)
    values = len(blob.data) or len(blob.double_data)
    if values != math.prod(shape):
        raise UserError(f"{path}: layer '{layer}' has a blob of shape {list(shape)} with {values} "
                        "values; the file is damaged")
    return shape


def blob_array(path, layer, blob):
    """A stored blob as a float32 array of its shape."""
    values = blob.data if len(blob.data) else blob.double_data
    return np.asarray(values, dtype=np.float32).reshape(_blob_shape(path, layer, blob))


def same_shape(net_shape, file_shape):
    """Blob::ShapeEquals: legacy 4-D file shapes compare with the net shape padded by leading 1s."""
    if len(file_shape) == 4 and len(net_shape) < 4:
        net_shape = (1,) * (4 - len(net_shape)) + tuple(net_shape)
    return tuple(net_shape) == tuple(file_shape)


def weights_report(expected, caffemodel, net):
    """Compares a caffemodel with a net's parameter shapes, `expected` ({layer: [shape, ...]}, as
    emotiw.caffe.shapes.infer gives them); `net` names the net in the report. Returns a WeightsReport."""
    found = read_caffemodel(caffemodel)
    report = WeightsReport(net=str(net), weights=str(caffemodel))
    for name, shapes in expected.items():
        if name not in found:
            if shapes:
                report.untrained.append(name)
        elif len(found[name]) == len(shapes) and all(map(same_shape, shapes, found[name])):
            if shapes:
                report.loaded.append(name)
        else:
            report.mismatched.append(Mismatch(name, [list(s) for s in shapes], [list(s) for s in found[name]]))
    report.ignored = [name for name, shapes in found.items() if shapes and name not in expected]
    report.blocks = _blocks(expected, set(report.loaded))
    return report


def _blocks(expected, loaded):
    """ResNet blocks (res4b12...) and slash-named units (conv2_1/x1/bn -> conv2_1): fully loaded?"""
    blocks = {}
    for name, shapes in expected.items():
        if not shapes:
            continue
        match = RESNET_BLOCK.match(name)
        block = f"res{match.group(1)}" if match else (name.split("/")[0] if "/" in name else None)
        if block is not None:
            blocks[block] = blocks.get(block, True) and name in loaded
    return blocks


def check_weights(expected, weights, net, show_report=False, allow_partial=True):
    """Refuses weights Caffe could not load into the net (its parameter shapes `expected`, named
    `net`) because it would abort, or that load nothing, and with `allow_partial` False (testing a
    trained model) weights that leave layers at their filler (a file cut at a layer boundary still
    parses); otherwise warns about those layers. `show_report` prints the whole report first."""
    if not Path(weights).is_file():
        raise UserError(f"weights file {weights} not found; pass the trained .caffemodel with --weights")
    report = weights_report(expected, weights, net)
    if show_report:
        print("\n".join(report.lines()))
    if not report.loadable or not report.loaded:
        if not show_report:
            print("\n".join(report.lines()), file=sys.stderr)
        raise UserError(f"{weights} does not fit this net ({net}): {report.verdict}")
    if report.untrained and not allow_partial:
        raise UserError(f"{weights} leaves layers of {net} at random filler weights, first "
                        f"'{report.untrained[0]}' ({report.verdict}); a truncated file? give the complete "
                        "caffemodel (`emotiw weights report` lists the layers), or --allow-partial to go on")
    if report.untrained and not show_report:
        print(f"warning: {report.verdict}", file=sys.stderr)
    return report
