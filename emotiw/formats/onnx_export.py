"""Caffe deploy nets and their caffemodels as ONNX models, built with the `onnx` package's helpers.

The weights come from pycaffe (the net instantiated from the prototxt, then the caffemodel copied
into it), so every parameter and blob shape is Caffe's own. Layers become ONNX nodes one by one, in
the prototxt's order. Caffe reuses a blob name for in-place layers (ReLU on its bottom); ONNX
tensors are written once, so each write of a blob is a new tensor version: its last version keeps
the Caffe name (the graph outputs `prob`, `prob1`, ... are found by the names pycaffe uses),
earlier ones get a suffix. The batch dimension is symbolic (N); the others are Caffe's.

Every tensor gets Caffe's shape as value_info, and onnx.checker.check_model with full_check runs
ONNX's shape inference in strict mode, which fails where an ONNX node would give another shape
than the Caffe layer (pooling rounding, deconvolution sizes): the model is checked against Caffe
before it is written.
"""

from collections import Counter

import numpy as np

from emotiw.caffe.env import import_caffe
from emotiw.caffe.proto import read_net_param, runs_in_test
from emotiw.caffe.weights import same_shape, read_caffemodel
from emotiw.errors import UserError

MIN_OPSET = 13  # Softmax over one axis (Caffe's), Split and Slice sizes as inputs
MAX_PROTO_BYTES = 2**31 - 1  # protobuf's limit for one message: a larger model needs external data
# The tops of these share their bottom's memory in Caffe: an in-place layer on one changes the others.
SHARES_MEMORY = ("Split", "Flatten", "Reshape")


# ------------------------------------------------------------------------------------------
# Loading the Caffe side

def load_caffe_net(deploy, weights):
    """pycaffe's TEST net of `deploy` with `weights` copied in, after a check that the file fits:
    Caffe aborts the process on a blob count or shape it cannot copy, and silently keeps filler
    values for layers the file lacks, which an exported model must not carry."""
    caffe = import_caffe()
    caffe.set_mode_cpu()
    stored = read_caffemodel(weights)
    net = caffe.Net(str(deploy), caffe.TEST)
    missing = []
    for name, layer in zip(net._layer_names, net.layers):
        expected = [tuple(blob.data.shape) for blob in layer.blobs]
        found = stored.get(name)
        if found is None:
            if expected:
                missing.append(name)
        elif len(found) != len(expected) or not all(map(same_shape, expected, found)):
            raise UserError(f"{weights} does not fit {deploy}: layer '{name}' has blobs {[list(s) for s in found]} "
                            f"in the file but {[list(s) for s in expected]} in the net; weights for another net?")
    if missing:
        raise UserError(f"{weights} has no weights for {len(missing)} layer(s) of {deploy}, first '{missing[0]}'; "
                        "weights for another net, or a truncated file? (`emotiw weights report` lists them)")
    net.copy_from(str(weights))
    return net


# ------------------------------------------------------------------------------------------
# The graph

class Graph:
    """ONNX nodes, initializers and tensor names for a Caffe net under conversion."""

    def __init__(self, layers, caffe_net):
        from onnx import TensorProto, helper, numpy_helper

        self.helper, self.numpy_helper, self.float = helper, numpy_helper, TensorProto.FLOAT
        self.caffe = caffe_net
        self.inputs = list(caffe_net.inputs)
        self.writes_left = Counter(top for layer in layers for top in layer.top)
        self.taken = set(caffe_net.blobs) | {top for layer in layers for top in layer.top}
        self.current = {blob: blob for blob in self.inputs}  # blob -> its tensor version now
        self.memory = {}  # tensor -> the tensors sharing its memory in Caffe (SHARES_MEMORY)
        self.overwritten = {}  # tensor -> the in-place layer that changed its memory after it was written
        self.nodes, self.initializers, self.value_info = [], [], []
        self.layer = None
        self.weight_bytes = 0

    def fresh(self, base):
        name, count = base, 0
        while name in self.taken:
            count += 1
            name = f"{base}_{count}"
        self.taken.add(name)
        return name

    def shape(self, blob):
        return tuple(self.caffe.blobs[blob].data.shape)

    def dims(self, blob):
        """Caffe's shape with a symbolic batch: the exported model takes any N."""
        return ["N", *self.shape(blob)[1:]]

    def params(self, layer):
        return [blob.data for blob in self.caffe.params[layer.name]] if layer.name in self.caffe.params else []

    def read(self, blob):
        name = self.current[blob]
        if name in self.overwritten:
            raise UserError(f"layer '{self.layer.name}' reads '{blob}', which shares its memory in Caffe with a blob "
                            f"that layer '{self.overwritten[name]}' changed in place, so Caffe's result depends on "
                            "that; ONNX tensors cannot share memory: give that layer its own top")
        return name

    def track_memory(self, layer, x):
        """Records which tensors share memory after `layer` read tensors `x`, and which of them an
        in-place layer changed (Dropout does nothing in a TEST net)."""
        if layer.type in SHARES_MEMORY:
            group = self.memory.get(x[0], {x[0]}) | {self.current[top] for top in layer.top}
            self.memory.update(dict.fromkeys(group, group))
            return
        for blob, old in zip(layer.bottom, x):
            group = self.memory.get(old)
            if blob in layer.top and group and layer.type != "Dropout":
                for other in group - {old}:
                    self.overwritten.setdefault(other, layer.name)
                group.add(self.current[blob])
                self.memory[self.current[blob]] = group

    def write(self, blob):
        """The tensor name for the next write of `blob`: the Caffe name for its last write, unless
        the blob is a graph input, whose name its first version keeps."""
        self.writes_left[blob] -= 1
        name = blob if self.writes_left[blob] == 0 and blob not in self.inputs else self.fresh(blob)
        self.current[blob] = name
        self.value_info.append(self.helper.make_tensor_value_info(name, self.float, self.dims(blob)))
        return name

    def const(self, array, hint, dtype=np.float32):
        name, array = self.fresh(f"{self.layer.name}.{hint}"), np.ascontiguousarray(array, dtype=dtype)
        self.weight_bytes += array.nbytes
        self.initializers.append(self.numpy_helper.from_array(array, name))
        return name

    def op(self, op_type, inputs, out=None, **attrs):
        """Appends one node; returns its output, `out` or a new intermediate tensor."""
        out = out or self.fresh(f"{self.layer.name}.{op_type}")
        name = self.fresh(f"{self.layer.name}:{op_type}")
        self.nodes.append(self.helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out

    def chain(self, x, y, steps):
        """(op, constant operand) steps applied to x in order, the last one writing y; none: Identity."""
        steps = steps or [("Identity", None)]
        for number, (op_type, operand) in enumerate(steps):
            inputs = [x] if operand is None else [x, self.const(operand, op_type.lower())]
            x = self.op(op_type, inputs, y if number == len(steps) - 1 else None)


def _refuse(layer, why):
    raise UserError(f"layer '{layer.name}' ({layer.type}): {why}; emotiw export cannot convert it to ONNX")


def _per_axis(param, field, count, default, pair=None):
    """Caffe's `field` (unset, one value for every spatial axis, or one per axis) or its `pair`_h/_w
    fields (`field`_h/_w by default)."""
    pair = pair or field
    fields = param.DESCRIPTOR.fields_by_name
    if f"{pair}_h" in fields and (param.HasField(f"{pair}_h") or param.HasField(f"{pair}_w")):
        return [getattr(param, f"{pair}_h"), getattr(param, f"{pair}_w")]
    value = getattr(param, field)
    if isinstance(value, int):  # PoolingParameter's fields are scalars, ConvolutionParameter's repeated
        value = [value] if param.HasField(field) else []
    values = list(value) or [default]
    return values * count if len(values) == 1 else values


def _axis(axis, rank):
    return axis + rank if axis < 0 else axis


def _broadcast(array, axis, rank):
    """A parameter blob covering axes axis.. of a rank-`rank` tensor, shaped to broadcast over it."""
    return array.reshape(array.shape + (1,) * (rank - axis - array.ndim))


# ------------------------------------------------------------------------------------------
# One converter per Caffe layer type: (graph, layer, bottom tensors, top tensors)

def _convolution(g, layer, x, y):
    param = layer.convolution_param
    if param.axis != 1:
        _refuse(layer, f"axis {param.axis} (only 1, the channel axis, converts)")
    blobs = g.params(layer)
    spatial = blobs[0].ndim - 2
    pads = _per_axis(param, "pad", spatial, 0)
    inputs = [x[0], g.const(blobs[0], "weight")] + ([g.const(blobs[1], "bias")] if len(blobs) > 1 else [])
    # Caffe's Deconvolution weights are (C_in, C_out / group, k...), as ConvTranspose wants them, and
    # both give stride * (in - 1) + dilation * (k - 1) + 1 - 2 * pad.
    g.op("ConvTranspose" if layer.type == "Deconvolution" else "Conv", inputs, y[0],
         kernel_shape=list(blobs[0].shape[2:]), strides=_per_axis(param, "stride", spatial, 1),
         pads=pads + pads, dilations=_per_axis(param, "dilation", spatial, 1), group=param.group)


def _batch_norm(g, layer, x, y, scale=None):
    """Caffe's BatchNorm stores mean and variance times a scale factor (blob 2); with the Scale layer
    that follows it folded in (`scale`), one BatchNormalization."""
    if layer.batch_norm_param.HasField("use_global_stats") and not layer.batch_norm_param.use_global_stats:
        _refuse(layer, "use_global_stats: false normalises with each batch's own statistics")
    mean, var, factor = g.params(layer)
    factor = 0 if factor[0] == 0 else 1 / factor[0]  # as Caffe does
    channels = mean.shape[0]
    gamma, beta = np.ones(channels), np.zeros(channels)
    if scale is not None:
        scale_blobs = g.params(scale)
        gamma = scale_blobs[0]
        if len(scale_blobs) > 1:
            beta = scale_blobs[1]
    g.op("BatchNormalization", [x[0], g.const(gamma, "scale"), g.const(beta, "bias"), g.const(mean * factor, "mean"),
                                g.const(var * factor, "var")], y[0], epsilon=layer.batch_norm_param.eps)


def _folds_into_batch_norm(bn, scale, later):
    """Whether `scale` (the next layer) is a per-channel Scale of the BatchNorm's output that only it reads."""
    return (scale is not None and scale.type == "Scale" and list(scale.bottom) == [bn.top[0]]
            and scale.scale_param.axis == 1 and scale.scale_param.num_axes == 1
            and (scale.top[0] == bn.top[0] or not any(bn.top[0] in layer.bottom for layer in later)))


def _scale(g, layer, x, y):
    if len(layer.bottom) > 1:
        _refuse(layer, "a second bottom as the scale (only learned scales convert)")
    rank = len(g.shape(layer.bottom[0]))
    axis = _axis(layer.scale_param.axis, rank)
    g.chain(x[0], y[0], [(op, _broadcast(blob, axis, rank)) for op, blob in zip(("Mul", "Add"), g.params(layer))])


def _relu(g, layer, x, y):
    slope = layer.relu_param.negative_slope
    if slope:
        g.op("LeakyRelu", x, y[0], alpha=slope)
    else:
        g.op("Relu", x, y[0])


def _prelu(g, layer, x, y):
    rank = len(g.shape(layer.bottom[0]))
    g.op("PRelu", [x[0], g.const(_broadcast(g.params(layer)[0], 1, rank), "slope")], y[0])


def _power(g, layer, x, y):
    """(shift + scale * x) ^ power, each step only when it changes something."""
    param = layer.power_param
    steps = [("Mul", param.scale) if param.scale != 1 else None, ("Add", param.shift) if param.shift != 0 else None,
             ("Pow", param.power) if param.power != 1 else None]
    g.chain(x[0], y[0], [step for step in steps if step is not None])


def _pooling(g, layer, x, y):
    """Caffe rounds pooled sizes up, but drops a last window that would start in the right padding.
    ONNX's ceil_mode does not settle that (onnx's shape inference keeps such a window at opset 17
    and drops it at 22; onnxruntime drops it), so the end padding is chosen to give Caffe's size
    with floor rounding. Caffe's average divides by the window clipped to the
    input plus `pad` (not the extra end padding): where that is not the whole window, ONNX
    averages over the real pixels and a constant map rescales to Caffe's divisor."""
    param = layer.pooling_param
    method = param.PoolMethod.Name(param.pool)
    if method not in ("MAX", "AVE"):
        _refuse(layer, f"pool: {method}")
    if param.global_pooling:
        g.op("GlobalMaxPool" if method == "MAX" else "GlobalAveragePool", x, y[0])
        return
    sizes, out = g.shape(layer.bottom[0])[2:], g.shape(layer.top[0])[2:]
    kernel, stride = _per_axis(param, "kernel_size", 2, 0, pair="kernel"), _per_axis(param, "stride", 2, 1)
    pad = _per_axis(param, "pad", 2, 0)
    end = [max((n - 1) * s + k - size - p, 0) for size, n, k, s, p in zip(sizes, out, kernel, stride, pad)]
    attrs = {"kernel_shape": kernel, "strides": stride, "pads": pad + end}
    if method == "MAX":
        g.op("MaxPool", x, y[0], **attrs)
        return
    ratios, whole = [], True
    for size, n, k, s, p in zip(sizes, out, kernel, stride, pad):
        start = np.arange(n) * s - p
        caffe_count = np.minimum(start + k, size + p) - start
        whole &= bool((caffe_count == k).all())
        ratios.append((np.minimum(start + k, size) - np.maximum(start, 0)) / caffe_count)
    ratio = np.outer(*ratios)
    if whole:  # every window lies inside input + pad: ONNX's count_include_pad is Caffe's divisor
        g.op("AveragePool", x, y[0], count_include_pad=1, **attrs)
    elif np.allclose(ratio, 1):  # no pad: windows clipped to the input only
        g.op("AveragePool", x, y[0], **attrs)
    else:
        g.op("Mul", [g.op("AveragePool", x, **attrs), g.const(ratio[None, None], "divisor_ratio")], y[0])


def _inner_product(g, layer, x, y):
    param = layer.inner_product_param
    if param.axis != 1:
        _refuse(layer, f"axis {param.axis} (only 1 converts)")
    blobs = g.params(layer)
    flat = g.op("Flatten", x, axis=1) if len(g.shape(layer.bottom[0])) > 2 else x[0]
    inputs = [flat, g.const(blobs[0], "weight")] + ([g.const(blobs[1], "bias")] if len(blobs) > 1 else [])
    g.op("Gemm", inputs, y[0], transB=0 if param.transpose else 1)


def _concat(g, layer, x, y):
    param = layer.concat_param
    g.op("Concat", x, y[0], axis=param.concat_dim if param.HasField("concat_dim") else param.axis)


def _eltwise(g, layer, x, y):
    param = layer.eltwise_param
    operation = param.EltwiseOp.Name(param.operation)
    if operation == "MAX":
        g.op("Max", x, y[0])
    elif operation == "PROD":
        product = x[0]
        for number, other in enumerate(x[1:], start=2):
            product = g.op("Mul", [product, other], y[0] if number == len(x) else None)
    else:
        coeffs = list(param.coeff) or [1] * len(x)
        terms = [t if c == 1 else g.op("Mul", [t, g.const(c, "coeff")]) for t, c in zip(x, coeffs)]
        g.op("Sum", terms, y[0])


def _softmax(g, layer, x, y):
    g.op("Softmax", x, y[0], axis=layer.softmax_param.axis)


def _identity(g, layer, x, y):
    """Dropout (a no-op at test time) and Split (copies of its bottom)."""
    for top in y:
        g.op("Identity", x[:1], top)


def _reshape_to(g, x, y, target):
    g.op("Reshape", [x, g.const(target, "shape", np.int64)], y)


def _flatten(g, layer, x, y):
    # 0 copies the input's dimension (the batch, whatever it is); -1 takes the flattened axes.
    axis = _axis(layer.flatten_param.axis, len(g.shape(layer.bottom[0])))
    _reshape_to(g, x[0], y[0], [0] * axis + [-1] + list(g.shape(layer.top[0])[axis + 1:]))


def _reshape(g, layer, x, y):
    # Caffe's 0 (copy) and -1 (infer) in `shape` mean what ONNX's do at the same output index.
    param = layer.reshape_param
    rank = len(g.shape(layer.bottom[0]))
    start = param.axis if param.axis >= 0 else rank + param.axis + 1
    end = rank if param.num_axes == -1 else start + param.num_axes
    _reshape_to(g, x[0], y[0], [0] * start + list(param.shape.dim) + list(g.shape(layer.bottom[0])[end:]))


def _slice(g, layer, x, y):
    param = layer.slice_param
    axis = _axis(param.slice_dim if param.HasField("slice_dim") else param.axis, len(g.shape(layer.bottom[0])))
    sizes = [g.shape(top)[axis] for top in layer.top]
    g.nodes.append(g.helper.make_node("Split", [x[0], g.const(sizes, "split", np.int64)], y,
                                      name=g.fresh(f"{layer.name}:Split"), axis=axis))


def _crop(g, layer, x, y):
    """bottom 0 cut to bottom 1's shape from `axis` on, at the offsets; bottom 1 gives only its shape."""
    rank = len(g.shape(layer.bottom[0]))
    axis = _axis(layer.crop_param.axis, rank)
    offsets = list(layer.crop_param.offset) or [0]
    offsets = offsets * (rank - axis) if len(offsets) == 1 else offsets
    ends = [offset + size for offset, size in zip(offsets, g.shape(layer.bottom[1])[axis:])]
    g.op("Slice", [x[0], g.const(offsets, "starts", np.int64), g.const(ends, "ends", np.int64),
                   g.const(list(range(axis, rank)), "axes", np.int64)], y[0])


CONVERTERS = {
    "Convolution": _convolution, "Deconvolution": _convolution, "BatchNorm": _batch_norm, "Scale": _scale,
    "ReLU": _relu, "PReLU": _prelu, "Power": _power, "Pooling": _pooling, "InnerProduct": _inner_product,
    "Concat": _concat, "Eltwise": _eltwise, "Softmax": _softmax, "Dropout": _identity, "Split": _identity,
    "Flatten": _flatten, "Reshape": _reshape, "Slice": _slice, "Crop": _crop,
}
SUPPORTED_TYPES = ("Input", *CONVERTERS)


def convertible_layers(net_param, path):
    """The layers of a TEST-phase net, refused before Caffe runs when one has no ONNX conversion."""
    if len(net_param.layers):
        raise UserError(f"{path} uses the legacy V1 `layers` format; convert it first with "
                        "`upgrade_net_proto_text OLD.prototxt NEW.prototxt`")
    layers = [layer for layer in net_param.layer if runs_in_test(layer)]
    for layer in layers:
        if layer.type not in SUPPORTED_TYPES:
            raise UserError(f"layer '{layer.name}' of {path} has type {layer.type}, which emotiw export cannot "
                            f"convert to ONNX (it converts {', '.join(SUPPORTED_TYPES)}); give a deploy net")
    return layers


def caffe_to_onnx(deploy, weights, opset=17):
    """The ONNX ModelProto of a deploy prototxt with its caffemodel (unchecked: see checked_bytes)."""
    import onnx
    from onnx import helper

    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise UserError(f"opset {opset} is not available; choose one from {MIN_OPSET} to "
                        f"{onnx.defs.onnx_opset_version()} (the installed onnx {onnx.__version__})")
    net_param = read_net_param(deploy)
    layers = convertible_layers(net_param, deploy)  # before Caffe, which aborts on a type it lacks
    caffe_net = load_caffe_net(deploy, weights)
    g = Graph(layers, caffe_net)
    skip = False
    for index, layer in enumerate(layers):
        if skip:  # a Scale folded into the BatchNorm before it
            skip = False
            continue
        g.layer = layer
        following = layers[index + 1] if index + 1 < len(layers) else None
        x = [g.read(blob) for blob in layer.bottom]
        if layer.type == "Input":
            g.writes_left.subtract(layer.top)
        elif layer.type == "BatchNorm" and _folds_into_batch_norm(layer, following, layers[index + 2:]):
            g.writes_left.subtract(layer.top)  # its output is only the Scale's input
            _batch_norm(g, layer, x, [g.write(following.top[0])], following)
            skip = True
        else:
            CONVERTERS[layer.type](g, layer, x, [g.write(top) for top in layer.top])
        g.track_memory(layer, x)
    if g.weight_bytes > MAX_PROTO_BYTES:
        raise UserError(f"the ONNX model of {deploy} would hold {g.weight_bytes / 2**30:.1f} GiB of weights; "
                        "a single .onnx file holds at most 2 GiB")
    outputs = [g.read(blob) for blob in caffe_net.outputs]
    graph = helper.make_graph(
        g.nodes, net_param.name or "caffe",
        [helper.make_tensor_value_info(blob, g.float, g.dims(blob)) for blob in g.inputs],
        [helper.make_tensor_value_info(name, g.float, g.dims(blob)) for name, blob in zip(outputs, caffe_net.outputs)],
        initializer=g.initializers, value_info=[info for info in g.value_info if info.name not in outputs])
    opsets = [helper.make_opsetid("", opset)]
    # The lowest IR version for the opset, so that older runtimes load the file too.
    return helper.make_model(graph, opset_imports=opsets, producer_name="emotiw",
                             ir_version=helper.find_min_ir_version_for(opsets))


def checked_bytes(model):
    """The serialized model, after onnx's full check: its shape inference, in strict mode, refuses
    a node whose output shape differs from the Caffe shape given as value_info."""
    import onnx

    data = model.SerializeToString()
    try:
        onnx.checker.check_model(data, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise UserError(f"the ONNX model of {model.graph.name} fails onnx's checker: "
                        f"{' '.join(str(error).split())}") from None
    return data
