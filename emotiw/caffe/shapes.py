"""Blob and parameter shapes of a Caffe NetParameter, computed in Python with Caffe's own rules.

Caffe aborts the whole process (glog CHECK) when a layer gets a non-positive output size or a Crop
larger than its input, so nets are checked here first and the user gets an error naming the layer.
The builders size their layers from the same shapes (`top_shapes` on a NetSpec built so far), which
also give parameter counts (`emotiw nets --list`) and the expected blob shapes that `emotiw weights
report` compares a caffemodel with, without instantiating anything.
"""

import math
from dataclasses import dataclass, field

from emotiw.errors import UserError

# Layers whose single top has the shape of their first bottom and which have no parameters.
SAME_SHAPE = {"ReLU", "Dropout", "Power", "Sigmoid", "TanH", "Softmax", "LRN", "AbsVal", "ELU",
              "Exp", "Log", "BNLL", "Threshold", "Swish", "Clip", "MVN"}
SCALAR_OUTPUT = {"Accuracy", "SoftmaxWithLoss", "EuclideanLoss", "SigmoidCrossEntropyLoss",
                 "MultinomialLogisticLoss", "InfogainLoss", "HingeLoss", "ContrastiveLoss"}


@dataclass
class NetShapes:
    blobs: dict = field(default_factory=dict)    # blob name -> shape tuple (after the last writer)
    # layer name -> its parameter blob shapes ([] for none), for the first layer of each name:
    # the one Caffe copies weights into.
    params: dict = field(default_factory=dict)
    layer_types: dict = field(default_factory=dict)

    @property
    def param_count(self):
        return sum(math.prod(shape) for shapes in self.params.values() for shape in shapes)


def infer(net, data_shape=None):
    """Shapes of every blob and parameter of `net` (a caffe_pb2.NetParameter in `layer` format).

    data_shape: (C, H, W) per image, used for data layers whose images are not resized or cropped.
    Raises UserError naming the first layer that Caffe would refuse.
    """
    if len(net.layers):
        raise UserError(f"net '{net.name}' uses the legacy V1 `layers` format; convert it first with "
                        "`upgrade_net_proto_text OLD.prototxt NEW.prototxt`")
    shapes = NetShapes()
    for name, shape in _legacy_inputs(net):
        shapes.blobs[name] = shape
    for layer in net.layer:
        bottoms = [_bottom(shapes, layer, name) for name in layer.bottom]
        tops, params = _layer_shapes(layer, bottoms, data_shape)
        for name, shape in zip(layer.top, tops):
            if any(dim <= 0 for dim in shape):
                raise UserError(f"layer '{layer.name}' ({layer.type}) would output a blob of shape "
                                f"{list(shape)} from input {[list(b) for b in bottoms]}: the input size "
                                "is too small for this net; choose a larger --input-size")
            shapes.blobs[name] = shape
        shapes.params.setdefault(layer.name, params)
        shapes.layer_types.setdefault(layer.name, layer.type)
    return shapes


def top_shapes(spec, tops, data_shape=None):
    """Shapes of Tops of a caffe.NetSpec ({key: Top} -> {key: shape}), inferred on the net built in
    it so far: how the builders size layers from the maps they read."""
    blobs = infer(spec.to_proto(), data_shape).blobs
    names = {top: name for name, top in spec.tops.items()}  # as NetSpec.to_proto names the blobs
    return {key: blobs[names[_written(top)]] for key, top in tops.items()}


def _written(top):
    """The Top whose blob a Top writes: an in-place layer writes its bottom's."""
    while top.fn.in_place:
        top = top.fn.inputs[0]
    return top


def _legacy_inputs(net):
    """`input:` + `input_shape`/`input_dim`, as in the released DSN deploy files."""
    for index, name in enumerate(net.input):
        if len(net.input_shape):
            yield name, tuple(net.input_shape[index].dim)
        else:
            yield name, tuple(net.input_dim[4 * index:4 * index + 4])


def _bottom(shapes, layer, name):
    if name not in shapes.blobs:
        raise UserError(f"layer '{layer.name}' reads blob '{name}', which no earlier layer produces")
    return shapes.blobs[name]


def _layer_shapes(layer, bottoms, data_shape):
    kind = layer.type
    if kind in SAME_SHAPE:
        return [bottoms[0]], []
    if kind in SCALAR_OUTPUT:
        return [()] * len(layer.top), []
    handler = _HANDLERS.get(kind)
    if handler is None:
        raise UserError(f"layer '{layer.name}' has type {kind}, which the shape checker does not know")
    return handler(layer, bottoms, data_shape)


def _input(layer, bottoms, data_shape):
    return [tuple(shape.dim) for shape in layer.input_param.shape], []


def _image_data(layer, bottoms, data_shape):
    param = layer.image_data_param
    channels = 3 if param.is_color else 1
    return _data_tops(layer, param.batch_size, channels, (param.new_height, param.new_width), data_shape)


def _data(layer, bottoms, data_shape):
    channels = data_shape[0] if data_shape else 3
    return _data_tops(layer, layer.data_param.batch_size, channels, (0, 0), data_shape)


def _hdf5_data(layer, bottoms, data_shape):
    if not data_shape:
        raise UserError(f"HDF5Data layer '{layer.name}': give the feature dimension")
    tops = [(layer.hdf5_data_param.batch_size, *data_shape), (layer.hdf5_data_param.batch_size,)]
    return tops[:len(layer.top)], []


def _data_tops(layer, batch, channels, resize, data_shape):
    crop = layer.transform_param.crop_size
    if crop:
        height = width = crop
    elif all(resize):
        height, width = resize
    elif data_shape:
        height, width = data_shape[1:]
    else:
        raise UserError(f"data layer '{layer.name}' neither resizes nor crops; give the image size")
    tops = [(batch, channels, height, width), (batch,)]
    return tops[:len(layer.top)], []


def _pair(param, prefix):
    """The explicit `<prefix>_h`/`<prefix>_w` pair, which Caffe prefers when either is given."""
    height, width = f"{prefix}_h", f"{prefix}_w"
    if param.HasField(height) or param.HasField(width):
        return [getattr(param, height), getattr(param, width)]
    return None


def _spatial(values, default, count=2):
    values = list(values) or [default]
    return values * count if len(values) == 1 else values


def _conv_geometry(param):
    kernel = _pair(param, "kernel") or _spatial(param.kernel_size, 1)
    stride = _pair(param, "stride") or _spatial(param.stride, 1)
    pad = _pair(param, "pad") or _spatial(param.pad, 0)
    dilation = _spatial(param.dilation, 1)
    return kernel, stride, pad, dilation


def _convolution(layer, bottoms, data_shape):
    param = layer.convolution_param
    batch, channels, *spatial = bottoms[0]
    kernel, stride, pad, dilation = _conv_geometry(param)
    extent = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    if layer.type == "Deconvolution":
        out = [s * (size - 1) + e - 2 * p for size, s, e, p in zip(spatial, stride, extent, pad)]
        weight = (channels, param.num_output // param.group, *kernel)
    else:
        out = [(size + 2 * p - e) // s + 1 for size, s, e, p in zip(spatial, stride, extent, pad)]
        weight = (param.num_output, channels // param.group, *kernel)
    params = [weight] + ([(param.num_output,)] if param.bias_term else [])
    return [(batch, param.num_output, *out)], params


def _pooling(layer, bottoms, data_shape):
    param = layer.pooling_param
    batch, channels, height, width = bottoms[0]
    if param.global_pooling:
        return [(batch, channels, 1, 1)], []
    kernel = _pair(param, "kernel") or [param.kernel_size] * 2
    stride = _pair(param, "stride") or [param.stride] * 2
    pad = _pair(param, "pad") or [param.pad] * 2
    round_up = param.round_mode == 0  # CEIL, Caffe's default
    out = []
    for size, k, s, p in zip((height, width), kernel, stride, pad):
        steps = (size + 2 * p - k) / s
        pooled = int(math.ceil(steps) if round_up else math.floor(steps)) + 1
        if p and (pooled - 1) * s >= size + p:
            pooled -= 1  # Caffe: the last window must start inside the image
        out.append(pooled)
    return [(batch, channels, *out)], []


def _inner_product(layer, bottoms, data_shape):
    param = layer.inner_product_param
    shape = bottoms[0]
    fan_in = math.prod(shape[param.axis:])
    params = [(param.num_output, fan_in)] + ([(param.num_output,)] if param.bias_term else [])
    return [(*shape[:param.axis], param.num_output)], params


def _batch_norm(layer, bottoms, data_shape):
    channels = bottoms[0][1]
    return [bottoms[0]], [(channels,), (channels,), (1,)]


def _scale(layer, bottoms, data_shape):
    param = layer.scale_param
    shape = bottoms[0]
    end = len(shape) if param.num_axes == -1 else param.axis + param.num_axes
    scale_shape = tuple(shape[param.axis:end])
    params = [] if len(bottoms) > 1 else [scale_shape]
    return [shape], params + ([scale_shape] if param.bias_term else [])


def _concat(layer, bottoms, data_shape):
    axis = layer.concat_param.axis if layer.concat_param.HasField("axis") else layer.concat_param.concat_dim
    first = bottoms[0]
    for other in bottoms[1:]:
        if other[:axis] + other[axis + 1:] != first[:axis] + first[axis + 1:]:
            raise UserError(f"layer '{layer.name}' (Concat) joins blobs of shapes "
                            f"{[list(b) for b in bottoms]}, which differ outside axis {axis}: the input "
                            "size does not suit this net")
    return [(*first[:axis], sum(b[axis] for b in bottoms), *first[axis + 1:])], []


def _eltwise(layer, bottoms, data_shape):
    if len(set(bottoms)) != 1:
        raise UserError(f"layer '{layer.name}' (Eltwise) combines blobs of different shapes "
                        f"{[list(b) for b in bottoms]}")
    return [bottoms[0]], []


def _crop(layer, bottoms, data_shape):
    source, reference = bottoms
    axis = layer.crop_param.axis
    offsets = list(layer.crop_param.offset) or [0]
    out = list(source[:axis]) + list(reference[axis:])
    for index in range(axis, len(source)):
        offset = offsets[0] if len(offsets) == 1 else offsets[index - axis]
        if source[index] < offset + reference[index]:
            raise UserError(f"layer '{layer.name}' (Crop) cannot cut {list(reference)} out of "
                            f"{list(source)}: the input size does not suit this net")
    return [tuple(out)], []


def _flatten(layer, bottoms, data_shape):
    shape = bottoms[0]
    end = len(shape) if layer.flatten_param.end_axis == -1 else layer.flatten_param.end_axis + 1
    axis = layer.flatten_param.axis
    return [(*shape[:axis], math.prod(shape[axis:end]), *shape[end:])], []


def _split(layer, bottoms, data_shape):
    return [bottoms[0]] * len(layer.top), []


def _silence(layer, bottoms, data_shape):
    return [], []


_HANDLERS = {
    "Input": _input, "ImageData": _image_data, "Data": _data, "HDF5Data": _hdf5_data,
    "Convolution": _convolution, "Deconvolution": _convolution, "Pooling": _pooling,
    "InnerProduct": _inner_product, "BatchNorm": _batch_norm, "Scale": _scale,
    "Concat": _concat, "Eltwise": _eltwise, "Crop": _crop, "Flatten": _flatten,
    "Split": _split, "Silence": _silence,
}
