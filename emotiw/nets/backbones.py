"""Backbones written into a `caffe.NetSpec` under the layer names of the released Caffe models.

In the style of torchvision's resnet.py/densenet.py: small block builders, composed by one function
per architecture. Each architecture function takes the NetSpec `n` and the input Top, adds its
layers and returns a `Taps` dict (tap name -> Top, in build order). Heads attach to the taps.

`hooks` maps a tap name to a function called with that tap's Top right after the tap is built, so
the layers a head adds there appear at that point of the prototxt (the released SSE nets interleave
their scoring branches with the backbone). Sizes are not tracked here: `shapes.top_shapes` infers
them from the net built so far.
"""

import functools

from emotiw.caffe.env import import_caffe

XAVIER = {"type": "xavier"}
BIAS_01 = {"type": "constant", "value": 0.1}
FROZEN_BN = [{"lr_mult": 0, "decay_mult": 0}] * 3  # BatchNorm statistics are not learned by SGD


@functools.cache
def layers_and_params():
    """pycaffe's `caffe.layers` and `caffe.params`, imported on first use."""
    caffe = import_caffe()
    return caffe.layers, caffe.params


class Taps(dict):
    """Tap name -> Top, in build order; runs the hook registered for a tap when it is added."""

    def __init__(self, hooks=None):
        super().__init__()
        self._hooks = dict(hooks or {})

    def add(self, name, top):
        self[name] = top
        hook = self._hooks.pop(name, None)
        if hook is not None:
            hook(top)

    def check_hooks_used(self):
        if self._hooks:
            raise ValueError(f"hooks for unknown taps: {sorted(self._hooks)}")


def conv_geometry(kernel, stride=1, pad=0, separate_hw=False, explicit=False):
    """Convolution geometry kwargs. `separate_hw` writes kernel_h/kernel_w, stride_h/... (PVANet
    style); otherwise stride 1 and pad 0 are written only when `explicit` (KaimingHe style)."""
    if separate_hw:
        return {"kernel_h": kernel, "kernel_w": kernel, "stride_h": stride, "stride_w": stride,
                "pad_h": pad, "pad_w": pad}
    geometry = {"kernel_size": kernel}
    if stride != 1 or explicit:
        geometry["stride"] = stride
    if pad != 0 or explicit:
        geometry["pad"] = pad
    return geometry


def param_specs(*lr_decay):
    """`param` entries from (lr_mult, decay_mult) pairs."""
    return [{"lr_mult": lr, "decay_mult": decay} for lr, decay in lr_decay]


def batch_norm(bottom, use_global_stats=None, eps=None, param=None, in_place=True):
    """A BatchNorm layer; None leaves a field at Caffe's default (global stats in TEST only)."""
    L, _ = layers_and_params()
    bn_param = {}
    if use_global_stats is not None:
        bn_param["use_global_stats"] = use_global_stats
    if eps is not None:
        bn_param["eps"] = eps
    kwargs = {"batch_norm_param": bn_param} if bn_param else {}
    if param is not None:
        kwargs["param"] = param
    return L.BatchNorm(bottom, in_place=in_place, **kwargs)


def scale(bottom, param=None):
    """An in-place Scale with a bias: BatchNorm's learned affine part."""
    L, _ = layers_and_params()
    kwargs = {"param": param} if param is not None else {}
    return L.Scale(bottom, in_place=True, scale_param={"bias_term": True}, **kwargs)


def relu(bottom):
    L, _ = layers_and_params()
    return L.ReLU(bottom, in_place=True)


def pool(bottom, method, kernel, stride=1, pad=0, separate_hw=False):
    """A Pooling layer; `method` is "MAX" or "AVE"; `separate_hw` writes kernel_h/kernel_w."""
    L, P = layers_and_params()
    geometry = {"kernel_h": kernel, "kernel_w": kernel} if separate_hw else {"kernel_size": kernel}
    if stride != 1 or separate_hw:
        geometry["stride"] = stride
    if pad:
        geometry["pad"] = pad
    return L.Pooling(bottom, pool=getattr(P.Pooling, method), **geometry)


def global_ave_pool(bottom):
    L, P = layers_and_params()
    return L.Pooling(bottom, pool=P.Pooling.AVE, global_pooling=True)


# --------------------------------------------------------------------------------------------
# DenseNet-121 (shicai/DenseNet-Caffe names)

def _densenet_bn_relu(n, bottom, bn_name, scale_name, relu_name, use_global_stats):
    """BN (eps 1e-5, its own top) -> Scale -> ReLU, the pre-activation of every DenseNet conv."""
    n[bn_name] = batch_norm(bottom, use_global_stats, eps=1e-5, in_place=False)
    n[scale_name] = scale(n[bn_name])
    n[relu_name] = relu(n[scale_name])
    return n[relu_name]


def _dense_layer(n, bottom, block, index, use_global_stats):
    """BN-ReLU-conv1x1(128) -> BN-ReLU-conv3x3(32), concatenated onto the input."""
    L, _ = layers_and_params()
    prefix, relu_prefix = f"conv{block}_{index}", f"relu{block}_{index}"
    x = _densenet_bn_relu(n, bottom, f"{prefix}/x1/bn", f"{prefix}/x1/scale", f"{relu_prefix}/x1",
                          use_global_stats)
    n[f"{prefix}/x1"] = L.Convolution(x, num_output=128, bias_term=False, **conv_geometry(1))
    x = _densenet_bn_relu(n, n[f"{prefix}/x1"], f"{prefix}/x2/bn", f"{prefix}/x2/scale",
                          f"{relu_prefix}/x2", use_global_stats)
    n[f"{prefix}/x2"] = L.Convolution(x, num_output=32, bias_term=False, **conv_geometry(3, 1, 1))
    n[f"concat_{block}_{index}"] = L.Concat(bottom, n[f"{prefix}/x2"], axis=1)
    return n[f"concat_{block}_{index}"]


def _transition_conv(n, bottom, block, num_output, use_global_stats):
    """BN-ReLU-conv1x1 (`convN_blk`), halving the channels before the 2x2 average pool."""
    L, _ = layers_and_params()
    name = f"conv{block}_blk"
    x = _densenet_bn_relu(n, bottom, f"{name}/bn", f"{name}/scale", f"relu{block}_blk", use_global_stats)
    n[name] = L.Convolution(x, num_output=num_output, bias_term=False, **conv_geometry(1))
    return n[name]


def densenet121(n, bottom, use_global_stats=None, hooks=None):
    """DenseNet-121 as in shicai/DenseNet-Caffe (conv1 ... conv5_blk/bn, relu5_blk, pool5).

    n: the caffe.NetSpec to add to; bottom: the image Top; use_global_stats: BatchNorm's flag for
    every BN (None: Caffe's default, as in the released files); hooks: {tap: fn(top)}.
    Taps: conv1 (after relu1), pool1, concat_B_I for every dense layer, convB_blk and poolB for the
    transitions B = 2..4, conv5_blk (after relu5_blk; blob conv5_blk/bn) and pool5 (global AVE).
    """
    L, _ = layers_and_params()
    taps = Taps(hooks)
    n.conv1 = L.Convolution(bottom, num_output=64, bias_term=False, **conv_geometry(7, 2, 3))
    taps.add("conv1", _densenet_bn_relu(n, n.conv1, "conv1/bn", "conv1/scale", "relu1", use_global_stats))
    n.pool1 = pool(taps["conv1"], "MAX", 3, 2, 1)
    taps.add("pool1", n.pool1)
    x, channels = n.pool1, 64
    for block, num_layers in zip((2, 3, 4, 5), (6, 12, 24, 16)):
        for index in range(1, num_layers + 1):
            x, channels = _dense_layer(n, x, block, index, use_global_stats), channels + 32
            taps.add(f"concat_{block}_{index}", x)
        if block == 5:
            break
        channels //= 2  # the transitions' compression 0.5
        taps.add(f"conv{block}_blk", _transition_conv(n, x, block, channels, use_global_stats))
        n[f"pool{block}"] = x = pool(taps[f"conv{block}_blk"], "AVE", 2, 2)
        taps.add(f"pool{block}", x)
    taps.add("conv5_blk", _densenet_bn_relu(n, x, "conv5_blk/bn", "conv5_blk/scale", "relu5_blk",
                                            use_global_stats))
    n.pool5 = global_ave_pool(taps["conv5_blk"])
    taps.add("pool5", n.pool5)
    taps.check_hooks_used()
    return taps


# --------------------------------------------------------------------------------------------
# ResNet (KaimingHe names)

class _ResNetStyle:
    """The parameter specs shared by every conv, BatchNorm and Scale of one ResNet."""

    def __init__(self, use_global_stats, frozen_bn, conv_lr_mult):
        if frozen_bn and use_global_stats is False:
            raise ValueError("frozen BatchNorm needs use_global_stats true")
        self.use_global_stats = True if frozen_bn else use_global_stats
        self.bn_param = [{"lr_mult": 0}] * 3 if frozen_bn else None
        self.scale_param = [{"lr_mult": 0}] * 2 if frozen_bn else None
        self.conv_param = [{"lr_mult": conv_lr_mult}] if conv_lr_mult is not None else None

    def conv_bn(self, n, conv_name, bn_name, scale_name, bottom, num_output, kernel, stride=1, pad=0,
                dilation=1, bias_term=False):
        """conv -> BN -> Scale under KaimingHe's names; returns the Scale's Top."""
        L, _ = layers_and_params()
        kwargs = {"param": self.conv_param} if self.conv_param is not None else {}
        if dilation != 1:
            kwargs["dilation"] = dilation
        n[conv_name] = L.Convolution(bottom, num_output=num_output, bias_term=bias_term,
                                     **conv_geometry(kernel, stride, pad, explicit=True), **kwargs)
        n[bn_name] = batch_norm(n[conv_name], self.use_global_stats, param=self.bn_param)
        n[scale_name] = scale(n[bn_name], param=self.scale_param)
        return n[scale_name]


def _resnet_unit(n, style, bottom, block, branch, num_output, kernel, stride=1, dilation=1,
                 with_relu=True):
    """One conv of a bottleneck: res{block}_branch{branch}, bn..., scale..., ..._relu."""
    conv_name = f"res{block}_branch{branch}"
    pad = dilation * (kernel // 2)
    top = style.conv_bn(n, conv_name, f"bn{block}_branch{branch}", f"scale{block}_branch{branch}",
                        bottom, num_output, kernel, stride, pad, dilation)
    if not with_relu:
        return top
    n[f"{conv_name}_relu"] = relu(top)
    return n[f"{conv_name}_relu"]


def _bottleneck(n, style, bottom, block, width, stride=1, dilation=1, project=False):
    """1x1 (stride) -> 3x3 (dilation) -> 1x1 (4 width), plus a projection or identity; SUM; ReLU."""
    L, _ = layers_and_params()
    shortcut = bottom
    if project:
        shortcut = _resnet_unit(n, style, bottom, block, "1", 4 * width, 1, stride, with_relu=False)
    x = _resnet_unit(n, style, bottom, block, "2a", width, 1, stride)
    x = _resnet_unit(n, style, x, block, "2b", width, 3, 1, dilation)
    x = _resnet_unit(n, style, x, block, "2c", 4 * width, 1, with_relu=False)
    n[f"res{block}"] = L.Eltwise(shortcut, x)
    n[f"res{block}_relu"] = relu(n[f"res{block}"])
    return n[f"res{block}_relu"]


def _resnet_block_name(stage, index, numbered):
    """2a, 2b, 2c ...; numbered (ResNet-101/152 res3, res4): 3a, 3b1, 3b2 ..."""
    if index == 0:
        return f"{stage}a"
    return f"{stage}b{index}" if numbered else f"{stage}{chr(ord('a') + index)}"


def resnet(n, bottom, blocks=(3, 4, 6, 3), conv1_bias=True, use_global_stats=None, frozen_bn=False,
           conv_lr_mult=None, res5_dilation=1, hooks=None):
    """A bottleneck ResNet with KaimingHe's layer names (conv1, bn_conv1, scale_conv1, conv1_relu,
    pool1, res2a_branch1, bn2a_branch1, scale2a_branch1, res2a_branch2a ..., res2a, res2a_relu ...).

    n: the caffe.NetSpec; bottom: the image Top; blocks: blocks per stage res2..res5 ((3, 4, 6, 3)
    ResNet-50, (3, 4, 23, 3) ResNet-101; when a stage has more than 6 blocks, the res3 and res4
    blocks are named a, b1, b2 ... as in ResNet-101/152); conv1_bias: conv1 has a bias (KaimingHe
    ResNet-50 true, ResNet-101 false); use_global_stats: every BN's flag (None: Caffe's default);
    frozen_bn: BN use_global_stats true with `param { lr_mult: 0 }` on BN (x3) and Scale (x2);
    conv_lr_mult: a `param { lr_mult }` on every conv (None: none); res5_dilation: 2 gives res5a
    stride 1 and dilation 2, pad 2 on the res5 3x3 convs (output stride 16); hooks: {tap: fn(top)}.
    Taps: conv1 (after conv1_relu), pool1 and every block output after its ReLU (res2a ... res5c).
    """
    style = _ResNetStyle(use_global_stats, frozen_bn, conv_lr_mult)
    taps = Taps(hooks)
    x = style.conv_bn(n, "conv1", "bn_conv1", "scale_conv1", bottom, 64, 7, 2, 3, bias_term=conv1_bias)
    n.conv1_relu = relu(x)
    taps.add("conv1", n.conv1_relu)
    n.pool1 = pool(n.conv1_relu, "MAX", 3, 2)
    taps.add("pool1", n.pool1)
    x = n.pool1
    numbered = max(blocks) > 6
    for stage, num_blocks, width in zip((2, 3, 4, 5), blocks, (64, 128, 256, 512)):
        dilation = res5_dilation if stage == 5 else 1
        stride = 1 if stage == 2 or dilation > 1 else 2
        for index in range(num_blocks):
            block = _resnet_block_name(stage, index, numbered and stage in (3, 4))
            x = _bottleneck(n, style, x, block, width, stride if index == 0 else 1, dilation,
                            project=index == 0)
            taps.add(f"res{block}", x)
    taps.check_hooks_used()
    return taps


# --------------------------------------------------------------------------------------------
# HoloNet (the SSE-HoloNet trunk: PVANet-style CReLU and inception-residual blocks)

class _HoloNetStyle:
    """HoloNet's conventions: kernel_h/kernel_w geometry, xavier convs with no bias, frozen BN
    statistics, and Scale layers learning at lr 1 (after a BN) or 1/2 (after a CReLU) with no decay."""

    def __init__(self, use_global_stats):
        self.use_global_stats = use_global_stats

    def conv(self, bottom, num_output, kernel, stride=1, pad=0, name=None):
        L, _ = layers_and_params()
        kwargs = {"name": name} if name else {}
        return L.Convolution(bottom, num_output=num_output, bias_term=False, weight_filler=XAVIER,
                             param=param_specs((1, 1)), **conv_geometry(kernel, stride, pad, True),
                             **kwargs)

    def bn(self, bottom):
        return batch_norm(bottom, self.use_global_stats, param=FROZEN_BN)

    def bn_scale(self, bottom):
        return scale(bottom, param=param_specs((1, 0), (1, 0)))


def _holonet_plain(n, style, bottom, prefix, num_output, kernel=1, stride=1, pad=0, with_relu=True):
    """conv -> BN -> Scale (-> ReLU): layers prefix/conv (top prefix), prefix/bn, prefix/bn_scale,
    prefix/relu."""
    n[prefix] = style.conv(bottom, num_output, kernel, stride, pad, name=f"{prefix}/conv")
    n[f"{prefix}/bn"] = style.bn(n[prefix])
    n[f"{prefix}/bn_scale"] = style.bn_scale(n[f"{prefix}/bn"])
    if not with_relu:
        return n[f"{prefix}/bn_scale"]
    n[f"{prefix}/relu"] = relu(n[f"{prefix}/bn_scale"])
    return n[f"{prefix}/relu"]


def _holonet_crelu(n, style, bottom, prefix, num_output, kernel, stride=1, pad=0):
    """HoloNet's CReLU: conv -> BN -> Concat(x, 1 - x) -> Scale -> ReLU (2 num_output channels)."""
    L, _ = layers_and_params()
    n[f"{prefix}/conv"] = style.conv(bottom, num_output, kernel, stride, pad)
    n[f"{prefix}/bn"] = style.bn(n[f"{prefix}/conv"])
    n[f"{prefix}/neg"] = L.Power(n[f"{prefix}/bn"], power=1, scale=-1, shift=1)  # 1 - x, not -x
    n[prefix] = L.Concat(n[f"{prefix}/bn"], n[f"{prefix}/neg"], axis=1, name=f"{prefix}/concat")
    n[f"{prefix}/scale"] = scale(n[prefix], param=param_specs((1, 0), (2, 0)))
    n[f"{prefix}/relu"] = relu(n[f"{prefix}/scale"])
    return n[f"{prefix}/relu"]


def _holonet_projection(n, style, bottom, prefix, num_output, stride):
    """The shortcut's 1x1 projection (with a bias, lr 1/2) -> BN -> Scale."""
    L, _ = layers_and_params()
    name = f"{prefix}/proj"
    n[name] = L.Convolution(bottom, num_output=num_output, bias_term=True, weight_filler=XAVIER,
                            bias_filler=BIAS_01, param=param_specs((1, 1), (2, 0)),
                            **conv_geometry(1, stride, 0, True))
    n[f"{name}_bn"] = style.bn(n[name])
    n[f"{name}_bn_scale"] = style.bn_scale(n[f"{name}_bn"])
    return n[f"{name}_bn_scale"]


def _holonet_join(n, prefix, residual, shortcut):
    """Eltwise SUM with coeff 1, 1 and no ReLU after it."""
    L, P = layers_and_params()
    n[prefix] = L.Eltwise(residual, shortcut, operation=P.Eltwise.SUM, coeff=[1, 1])
    return n[prefix]


def _holonet_res_crelu(n, style, bottom, prefix, reduce, out, stride=1, project=False):
    """Residual-CReLU bottleneck: 1x1 (reduce, stride) -> 3x3 CReLU -> 1x1 (out), plus a projection
    or HoloNet's identity shortcut, which is really x + 1 (Power shift 1)."""
    L, _ = layers_and_params()
    x = _holonet_plain(n, style, bottom, f"{prefix}/1", reduce, 1, stride)
    x = _holonet_crelu(n, style, x, f"{prefix}/2", reduce, 3, 1, 1)
    residual = _holonet_plain(n, style, x, f"{prefix}/3", out, with_relu=False)
    if project:
        shortcut = _holonet_projection(n, style, bottom, prefix, out, stride)
    else:
        n[f"{prefix}/input"] = L.Power(bottom, power=1, scale=1, shift=1)
        shortcut = n[f"{prefix}/input"]
    return _holonet_join(n, prefix, residual, shortcut)


def _holonet_inception_res(n, style, bottom, prefix, out, stride):
    """Inception-residual block: four stride-2 paths concatenated -> 1x1 (out), plus a projection."""
    L, _ = layers_and_params()
    incep = f"{prefix}/incep"
    path0 = _holonet_plain(n, style, bottom, f"{incep}/0", 24, 1, stride)
    path1 = _holonet_plain(n, style, bottom, f"{incep}/1_reduce", 16, 1, stride)
    path1 = _holonet_plain(n, style, path1, f"{incep}/1_0", 32, 3, 1, 1)
    path2 = _holonet_plain(n, style, bottom, f"{incep}/2_reduce", 12, 1, stride)
    path2 = _holonet_plain(n, style, path2, f"{incep}/2_0", 16, 3, 1, 1)
    path2 = _holonet_plain(n, style, path2, f"{incep}/2_1", 16, 3, 1, 1)
    n[f"{incep}/pool"] = pool(bottom, "MAX", 3, stride)
    path3 = _holonet_plain(n, style, n[f"{incep}/pool"], f"{incep}/poolproj", 32)
    n[incep] = L.Concat(path0, path1, path2, path3, axis=1)
    residual = _holonet_plain(n, style, n[incep], f"{prefix}/out", out, with_relu=False)
    shortcut = _holonet_projection(n, style, bottom, prefix, out, stride)
    return _holonet_join(n, prefix, residual, shortcut)


def holonet(n, bottom, use_global_stats=False, hooks=None):
    """The SSE-HoloNet trunk with the released layer names: conv1_1 (CReLU), pool1, conv2_1 ...
    conv3_2 (residual-CReLU), conv4_1 (inception-residual). There is no classifier.

    n: the caffe.NetSpec; bottom: the image Top; use_global_stats: every BN's flag (released train
    net false, test net true); hooks: {tap: fn(top)}. Taps: conv1_1, pool1, conv2_1, conv2_2,
    conv3_1, conv3_2, conv4_1. The conv4_1 paths (floor-rounded 1x1 convs, a ceil-rounded pool)
    agree at some input sizes only, any multiple of 8 among them; shapes.infer refuses the others.
    """
    style = _HoloNetStyle(use_global_stats)
    taps = Taps(hooks)
    taps.add("conv1_1", _holonet_crelu(n, style, bottom, "conv1_1", 8, 7, 1, 3))
    n.pool1 = pool(taps["conv1_1"], "MAX", 3, 2)
    taps.add("pool1", n.pool1)
    x = n.pool1
    for prefix, reduce, out, stride, project in (("conv2_1", 12, 32, 1, True),
                                                 ("conv2_2", 12, 32, 1, False),
                                                 ("conv3_1", 16, 48, 2, True),
                                                 ("conv3_2", 16, 48, 1, False)):
        x = _holonet_res_crelu(n, style, x, prefix, reduce, out, stride, project)
        taps.add(prefix, x)
    taps.add("conv4_1", _holonet_inception_res(n, style, x, "conv4_1", 64, 2))
    taps.check_hooks_used()
    return taps
