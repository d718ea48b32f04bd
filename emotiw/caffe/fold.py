"""BatchNorm and Scale folded into the Convolution or InnerProduct before them, for inference.

In a TEST-phase net a BatchNorm with global statistics, and the per-channel Scale after it, are an
affine map of each output channel of the layer before them:

    y = gamma * (W x + b - mean) / sqrt(var + eps) + beta

so that layer alone gives the same y with, per output channel, s = gamma / sqrt(var + eps):

    W' = W * s        b' = (b - mean) * s + beta

BatchNorm stores mean and var multiplied by a moving-average factor (its third blob); Caffe divides
them by it (0 stays 0), and so does this module. Without a Scale, gamma = 1 and beta = 0. The net then
makes two passes less over every such activation.

Where no such layer comes before (DenseNet's BatchNorm after a Concat), the BatchNorm goes into the
Scale after it instead, which then reads the BatchNorm's bottom: with t = 1 / sqrt(var + eps),
gamma' = gamma * t and beta' = beta - gamma * mean * t. Caffe's BatchNorm makes several passes (the mean and
the variance are broadcast through GEMMs), so this takes out most of its time.

A run folds only when the result cannot differ for any other layer: the BatchNorm (then the Scale)
is the next layer of the net and the only one to read the blob before it (or reads it in place), the
BatchNorm uses global statistics, the Scale has one bottom and one value per channel, and no layer
shares parameters by name. The folded layer gets a bias and writes the run's last top, so the layers
after it read the same blob names; a blob asked for in `keep` is never folded away.

find_chains() reads the topology of a NetParameter, fold_params() computes W' and b' from plain
numpy arrays, fold_net() gives the NetParameter without the folded layers; fold_files() applies the
three to a NetParameter and a .caffemodel and writes new files, fold_weights() is
`emotiw weights fold`. The inputs are never changed.
"""

import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from emotiw.caffe.proto import read_net_param, runs_in_test
from emotiw.caffe.weights import blob_array, read_caffemodel_param, weights_report
from emotiw.errors import UserError
from emotiw.formats.files import atomic_open, atomic_write_text

FOLDABLE = ("Convolution", "InnerProduct")


@dataclass(frozen=True)
class Chain:
    layer: str             # the Convolution or InnerProduct that takes the others in, or the Scale after the BatchNorm
    batch_norm: str
    scale: Optional[str]   # None: the BatchNorm alone (or the Scale is `layer`)
    eps: float
    top: str               # the blob the folded layer writes: the last top of the run
    bottom: Optional[str] = None  # for a Scale as `layer`: the BatchNorm's bottom, which it reads instead

    @property
    def removed(self):
        return [name for name in (self.batch_norm, self.scale) if name is not None]

    @property
    def layers(self):
        return [self.layer, *self.removed]


def _per_output_channel(layer):
    """The layer's weights have one row per channel of its top's axis 1, which BatchNorm normalises."""
    if layer.type == "Convolution":
        return layer.convolution_param.axis == 1
    return layer.inner_product_param.axis == 1 and not layer.inner_product_param.transpose


def _reads_last(layer, blob, reads):
    """`layer` reads `blob` alone, and no other layer sees the value it had: in place, or no other reader."""
    return list(layer.bottom) == [blob] and len(layer.top) == 1 and (layer.top[0] == blob or reads[blob] == 1)


def _global_batch_norm(layer):
    param = layer.batch_norm_param
    return layer.type == "BatchNorm" and (not param.HasField("use_global_stats") or param.use_global_stats)


def _channel_scale(layer):
    param = layer.scale_param
    return layer.type == "Scale" and param.axis == 1 and param.num_axes == 1


def _shares_params(run, names):
    """A layer of the run has weights by name, or a name another layer has: ambiguous or shared weights."""
    return any(names[layer.name] > 1 or any(p.name for p in layer.param) for layer in run)


def find_chains(net, keep=()):
    """The foldable runs of a NetParameter (its TEST-phase layers), in net order."""
    layers = [layer for layer in net.layer if runs_in_test(layer)]
    reads = Counter(bottom for layer in layers for bottom in layer.bottom)
    names = Counter(layer.name for layer in layers)
    chains = []
    for first, second, third in zip(layers, layers[1:], [*layers[2:], None]):
        if first.type not in FOLDABLE or len(first.top) != 1 or not _per_output_channel(first):
            continue
        blob = first.top[0]
        if not (_global_batch_norm(second) and _reads_last(second, blob, reads)):
            continue
        if second.top[0] != blob and blob in keep:
            continue
        run, top = [first, second], second.top[0]
        if (third is not None and _channel_scale(third) and _reads_last(third, top, reads)
                and (third.top[0] == top or top not in keep)):
            run, top = [*run, third], third.top[0]
        if top in first.bottom or _shares_params(run, names):
            continue  # it would read what it writes
        chains.append(Chain(layer=first.name, batch_norm=second.name, scale=third.name if len(run) == 3 else None,
                            eps=second.batch_norm_param.eps, top=top))
    taken = {chain.batch_norm for chain in chains}
    for first, second in zip(layers, layers[1:]):  # a BatchNorm into the Scale after it
        if first.name in taken or not _global_batch_norm(first) or len(first.bottom) != 1 or len(first.top) != 1:
            continue
        blob = first.top[0]
        if not (_channel_scale(second) and _reads_last(second, blob, reads)) or _shares_params([first, second], names):
            continue
        if second.top[0] != blob and blob in keep:
            continue
        chains.append(Chain(layer=second.name, batch_norm=first.name, scale=None, eps=first.batch_norm_param.eps,
                            top=second.top[0], bottom=first.bottom[0]))
    order = {layer.name: index for index, layer in enumerate(layers)}
    return sorted(chains, key=lambda chain: order[chain.batch_norm])


def fold_params(chains, params):
    """{layer: [W', b']} for each chain; `params` maps layer names to their blobs as arrays."""
    folded = {}
    for chain in chains:
        weights = np.asarray(params[chain.layer][0], dtype=np.float32)  # float64 copies of 25M weights take seconds
        mean, var, factor = (np.asarray(blob, dtype=np.float64).ravel() for blob in params[chain.batch_norm])
        factor = 0.0 if factor[0] == 0 else 1.0 / factor[0]
        scale = 1.0 / np.sqrt(var * factor + chain.eps)
        shift = -mean * factor * scale
        if chain.bottom is not None:  # the Scale after the BatchNorm: gamma' = gamma s, beta' = gamma shift + beta
            gamma, *beta = (np.asarray(blob, dtype=np.float64).ravel() for blob in params[chain.layer])
            folded[chain.layer] = [(gamma * scale).astype(np.float32).reshape(np.shape(params[chain.layer][0])),
                                   (gamma * shift + (beta[0] if beta else 0.0)).astype(np.float32)]
            continue
        if chain.scale is not None:
            gamma, *beta = (np.asarray(blob, dtype=np.float64).ravel() for blob in params[chain.scale])
            scale, shift = scale * gamma, shift * gamma + (beta[0] if beta else 0.0)
        bias = np.asarray(params[chain.layer][1], dtype=np.float64).ravel() if len(params[chain.layer]) > 1 else 0.0
        # reshaped by output channel: legacy 4-D InnerProduct weights (1, 1, N, K) fold the same way
        rows = weights.reshape(len(scale), -1) * scale.astype(np.float32)[:, None]
        folded[chain.layer] = [rows.reshape(weights.shape), (bias * scale + shift).astype(np.float32)]
    return folded


def fold_net(net, chains):
    """A copy of the NetParameter without the chains' BatchNorm and Scale layers."""
    folded = type(net)()
    folded.CopyFrom(net)
    by_layer = {chain.layer: chain for chain in chains}
    removed = {name for chain in chains for name in chain.removed}
    for index in reversed(range(len(folded.layer))):
        layer = folded.layer[index]
        if layer.name in removed:
            del folded.layer[index]
        elif layer.name in by_layer and layer.type == "Scale":
            layer.bottom[0] = by_layer[layer.name].bottom
            layer.scale_param.bias_term = True
        elif layer.name in by_layer:
            layer.top[0] = by_layer[layer.name].top
            param = layer.convolution_param if layer.type == "Convolution" else layer.inner_product_param
            param.bias_term = True
    return folded


def fold_files(net, weights, out_net, out_weights, keep=(), header=""):
    """Folds a NetParameter and its .caffemodel `weights` into new files (each written atomically):
    out_net (the prototxt, after `header`) and out_weights. Runs whose layers the file lacks stay as
    they are (Caffe gives those layers their filler). Returns the chains folded; writes nothing when
    there are none."""
    from google.protobuf import text_format

    model = read_caffemodel_param(weights)
    layers = model.layer if len(model.layer) else model.layers  # current or legacy V1 format
    stored = {}
    for layer in layers:
        stored.setdefault(layer.name, layer)  # Caffe copies the first layer of each name
    chains = [chain for chain in find_chains(net, keep)
              if all(name in stored and len(stored[name].blobs) for name in chain.layers)]
    if not chains:
        return chains
    params = {name: [blob_array(weights, name, blob) for blob in stored[name].blobs]
              for chain in chains for name in chain.layers}
    for name, (weight, bias) in fold_params(chains, params).items():
        blobs = stored[name].blobs
        if len(blobs) == 1:
            blobs.add().shape.dim.append(bias.size)
        for blob, values in zip(blobs, (weight, bias)):  # the shapes stay as stored
            blob.ClearField("double_data")
            blob.ClearField("data")
            blob.data.extend(values.ravel().tolist())
    removed = {name for chain in chains for name in chain.removed}
    for index in reversed(range(len(layers))):
        if layers[index].name in removed:
            del layers[index]
    atomic_write_text(out_net, header + text_format.MessageToString(fold_net(net, chains)))
    with atomic_open(out_weights, "wb") as handle:
        handle.write(model.SerializeToString())
    return chains


def fold_weights(net_file, weights, out, net, expected):
    """`emotiw weights fold`: the deploy prototxt `net_file` (of the net named `net`, whose parameter
    shapes are `expected`) and its .caffemodel folded into OUT/deploy.prototxt and OUT/<weights file
    name>. Weights Caffe could not load into the net are refused on one line, with the report's
    verdict. Returns (chains, prototxt, caffemodel); nothing is written when nothing folds."""
    report = weights_report(expected, weights, net)
    if not report.loadable or not report.loaded:
        raise UserError(f"{weights} does not fit {net}: {report.verdict}")
    if report.untrained:
        print(f"warning: {report.verdict}", file=sys.stderr)
    param = read_net_param(net_file)
    out = Path(out)
    out_net, out_weights = out / "deploy.prototxt", out / Path(weights).name
    inputs = {Path(weights).resolve(), Path(net_file).resolve()}
    for path in (out_net, out_weights):
        if path.resolve() in inputs:
            raise UserError(f"--out {out} would replace the input {path}; give another folder")
    header = f"# {net} with BatchNorm and Scale folded by `emotiw weights fold`: for inference only.\n"
    return fold_files(param, weights, out_net, out_weights, header=header), out_net, out_weights
