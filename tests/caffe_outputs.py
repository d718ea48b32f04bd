"""Forward and backward of registered deploy nets with whichever pycaffe comes first on sys.path, on
seeded weights and inputs, saved as OUT/NET.npz: tests/test_caffe_conv.py runs it once per Caffe build
(each in its own process: two libcaffe builds cannot share one) and compares the files; --gpu runs on
GPU 0 (scripts/gpu_check.sh compares that with the CPU).

    python tests/caffe_outputs.py OUT --batch 8 [--gpu] NET [NET ...]
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from google.protobuf import text_format

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from emotiw import nets  # noqa: E402
from emotiw.caffe.env import import_caffe  # noqa: E402


def seeded_weights(net, rng):
    """He-scaled weights and biases, Scale near 1; BatchNorm statistics come from the data
    (batchnorm_from_data)."""
    for name, blobs in net.params.items():
        kind = net.layer_dict[name].type
        if kind == "BatchNorm":
            continue
        if kind == "Scale":
            blobs[0].data[...] = 1 + 0.1 * rng.standard_normal(blobs[0].data.shape)
            for blob in blobs[1:]:
                blob.data[...] = 0.1 * rng.standard_normal(blob.data.shape)
        else:
            weights = blobs[0].data
            fan_in = weights[0].size if kind != "Deconvolution" else weights.size // weights.shape[1]
            weights[...] = rng.standard_normal(weights.shape) * np.sqrt(2.0 / max(fan_in, 1))
            for blob in blobs[1:]:
                blob.data[...] = 0.1 * rng.standard_normal(blob.data.shape)


def batchnorm_from_data(net):
    """Runs the net layer by layer, giving each BatchNorm layer the mean and variance of its input, as a
    trained net's statistics are: activations then keep their size through the deep nets, so that the
    scores do not saturate and the gradients are not zero."""
    for index, (name, layer) in enumerate(zip(net._layer_names, net.layers)):
        if layer.type == "BatchNorm":
            values = net.blobs[net.bottom_names[name][0]].data
            axes = (0, *range(2, values.ndim))
            for blob, statistic in zip(layer.blobs, (values.mean(axis=axes), values.var(axis=axes) + 0.01, 1.0)):
                blob.data[...] = statistic
        net._forward(index, index)


def run(name, batch, caffe):
    """{key: array}: the net's outputs, then every parameter gradient and the input gradient after a
    backward pass from seeded output gradients."""
    param = nets.build(name, "deploy")
    param.force_backward = True
    with tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False) as handle:
        handle.write(text_format.MessageToString(param))
    try:
        net = caffe.Net(handle.name, caffe.TEST)
    finally:
        os.unlink(handle.name)
    rng = np.random.default_rng(0)
    seeded_weights(net, rng)
    data = net.inputs[0]
    shape = (batch, *net.blobs[data].data.shape[1:])
    net.blobs[data].reshape(*shape)
    net.reshape()
    net.blobs[data].data[...] = rng.standard_normal(shape)
    batchnorm_from_data(net)
    results = {"caffe": np.array(caffe.__file__)}
    results.update({f"forward/{out}": net.forward()[out].copy() for out in net.outputs})
    for out in net.outputs:
        net.blobs[out].diff[...] = rng.standard_normal(net.blobs[out].diff.shape)
    for blobs in net.params.values():
        for blob in blobs:
            blob.diff[...] = 0
    net.backward()
    results[f"backward/{data}"] = net.blobs[data].diff.copy()
    for layer, blobs in net.params.items():
        for index, blob in enumerate(blobs):
            results[f"backward/{layer}/{index}"] = blob.diff.copy()
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("nets", nargs="+")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--gpu", action="store_true", help="run on GPU 0 (a CUDA build)")
    args = parser.parse_args()
    caffe = import_caffe()
    if args.gpu:
        caffe.set_device(0)
        caffe.set_mode_gpu()
    else:
        caffe.set_mode_cpu()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for name in args.nets:  # one net at a time: the largest holds 1.5 GB of gradients
        np.savez(Path(args.out) / f"{name}.npz", **run(name, args.batch, caffe))


if __name__ == "__main__":
    main()
