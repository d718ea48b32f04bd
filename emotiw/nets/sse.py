"""SSE (Hu et al., "Learning Supervised Scoring Ensemble for Emotion Recognition in the Wild", ICMI
2017): the 15 networks, 3 backbones x 5 variants, and their solvers.

A supervised scoring branch turns a backbone feature map into class scores with its own softmax
loss. "3conv"/"4conv" supervise 3 or 4 points: the backbone's own classifier on its last map, plus
2 or 3 intermediate taps. "-s" branches pool 2x2 and apply a single full-map conv (1024) + BN/Scale/
ReLU + a 1x1 score conv; "-c" branches apply a cascade of 7x7 stride-2 convs (+ BN/Scale/ReLU) down
to the last map's size, then average-pool and an InnerProduct. "_concat" fuses the branch scores
by Concat -> InnerProduct -> fused loss, "_eltwise" by an element-wise SUM -> fused loss, and
"original" is the backbone with its own classifier only. The released prototxts are
holonet/densenet121 3conv-s_concat and resnet50 4conv-c_concat; docs/nets-sse.md has the tables and
the list of fixes.
"""

import dataclasses
import functools
from typing import Optional

from emotiw.caffe.env import import_caffe
from emotiw.caffe.shapes import top_shapes
from emotiw.errors import UserError
from emotiw.nets import backbones, data
from emotiw.nets.backbones import BIAS_01, FROZEN_BN, XAVIER, param_specs
from emotiw.nets.entry import NetEntry
from emotiw.nets.options import MODES, NetOptions

BACKBONES = ("holonet", "densenet121", "resnet50")
VARIANTS = ("original", "3conv-s_eltwise", "3conv-s_concat", "4conv-c_eltwise", "4conv-c_concat")
DISPLAY_NAMES = {"holonet": "HoloNet", "densenet121": "DenseNet-121", "resnet50": "ResNet-50"}
TEST_LIST = "data/Emoti2017/EmotiW_3_norm/test_file_list.txt"  # the released test nets' list


@dataclasses.dataclass(frozen=True)
class Defaults:
    """What the released files of one backbone fix."""
    inputs: data.Inputs
    released_variant: str
    pretrained: Optional[str]      # the file under models/pretrained/ it fine-tunes from
    released_caffemodel: str
    solver: dict


def _sse_inputs(**fields):
    """The released SSE data layers: LMDBs as they are (no resize, no crop, `shuffle` unstated), and
    a test net on an image list."""
    return data.Inputs(source_type="lmdb", crop=False, states_shuffle=False, test_reads_list=True,
                       test_source=TEST_LIST, **fields)


# Per-backbone defaults, from the released prototxts and solvers (../shared/reference/sse-facts.md).
SSE_DEFAULTS = {
    "holonet": Defaults(
        inputs=_sse_inputs(input_size=128, resize=None, mirror=False,
                           mean_file="data/EmotiW_3_norm/EmotiW_3_norm_mean.binaryproto", mean_values=None,
                           train_batch=128, val_batch=128, test_batch=128,
                           train_source="examples/EmotiW_3_norm/EmotiW_3_norm_train_lmdb",
                           val_source="examples/EmotiW_3_norm/EmotiW_3_norm_val_lmdb"),
        released_variant="3conv-s_concat", pretrained=None,
        released_caffemodel="SSE_HoloNet_trval_iter_69500.caffemodel",
        solver={"test_iter": [200], "test_interval": 500, "base_lr": 0.01, "lr_policy": "step",
                "gamma": 0.3, "stepsize": 20000, "display": 500, "max_iter": 70000,
                "momentum": 0.9, "weight_decay": 0.0002, "snapshot": 500}),
    "densenet121": Defaults(
        inputs=_sse_inputs(input_size=128, resize=None, mirror=False,
                           mean_file=None, mean_values=(103.94, 116.78, 123.68),
                           train_batch=32, val_batch=32, test_batch=27,
                           train_source="data/Emoti2017/EmotiW_3_norm/EmotiW_3_norm_train_lmdb",
                           val_source="data/Emoti2017/EmotiW_3_norm/EmotiW_3_norm_val_lmdb"),
        released_variant="3conv-s_concat", pretrained="DenseNet_121.caffemodel",
        released_caffemodel="SSE_DenseNet_121_trval_iter_69500.caffemodel",
        # multistep without any stepvalue: the learning rate stays at base_lr (kept as released)
        solver={"test_iter": [200], "test_interval": 500, "base_lr": 0.01, "lr_policy": "multistep",
                "gamma": 0.1, "stepsize": 20000, "display": 500, "max_iter": 70000,
                "momentum": 0.9, "weight_decay": 0.0001, "snapshot": 500}),
    "resnet50": Defaults(
        # image lists are resized to the input size (the released test net was not)
        inputs=_sse_inputs(input_size=224, resize=224, mirror=True,
                           mean_file="models/EmotiW2017/ResNet_mean.binaryproto", mean_values=None,
                           train_batch=5, val_batch=29, test_batch=29,
                           train_source="examples/EmotiW2017/EmotiW2017_train_lmdb2_resize",
                           val_source="examples/EmotiW2017/EmotiW2017_lmdb_val4test"),
        released_variant="4conv-c_concat", pretrained="ResNet-50-model.caffemodel",
        released_caffemodel="SSE_ResNet_50_trval_iter_83000.caffemodel",
        solver={"test_iter": [200], "test_interval": 1000, "base_lr": 0.001, "lr_policy": "step",
                "gamma": 0.3, "stepsize": 5000, "display": 500, "max_iter": 100000,
                "momentum": 0.9, "weight_decay": 0.0002, "snapshot": 1000, "random_seed": 0}),
}

# Supervised taps: the intermediate ones of 3conv and 4conv, and the last map (the own classifier).
TAPS = {
    "holonet": {"3conv": ("conv3_1", "conv3_2"), "4conv": ("conv2_2", "conv3_1", "conv3_2"),
                "last": "conv4_1"},
    "densenet121": {"3conv": ("conv3_blk", "conv4_blk"), "4conv": ("conv2_blk", "conv3_blk", "conv4_blk"),
                    "last": "conv5_blk"},
    "resnet50": {"3conv": ("res3d", "res4f"), "4conv": ("res2c", "res3d", "res4f"), "last": "res5c"},
}
# The suffix of a branch's layer names (conv_fc3_1, flat_3, fc2, loss4 ...), per tap.
BRANCH_TAGS = {"conv2_2": "2_2", "conv3_1": "3_1", "conv3_2": "3_2", "conv4_1": "4_1",
               "conv2_blk": "2", "conv3_blk": "3", "conv4_blk": "4",
               "res2c": "2", "res3d": "3", "res4f": "4"}
# Where the released SSE-DenseNet places its -s branches: inside dense block 5, not after the tap.
DENSENET_S_PLACES = {"conv3_blk": "concat_5_13", "conv4_blk": "concat_5_15"}


def sse_net_name(backbone, variant):
    return f"sse_{backbone}_{variant}"


@dataclasses.dataclass(frozen=True)
class _Settings:
    """Everything a build needs, with the options resolved against the backbone's defaults."""
    backbone: str
    variant: str
    mode: str
    num_classes: int
    inputs: data.Inputs
    branch_outputs: int

    @property
    def use_global_stats(self):
        """BN flag of the layers the released files set explicitly: false to train, true to test."""
        return self.mode != "train_val"


def _check_names(backbone, variant, mode="train_val"):
    for kind, value, valid in (("backbone", backbone, BACKBONES), ("variant", variant, VARIANTS),
                               ("mode", mode, MODES)):
        if value not in valid:
            raise UserError(f"unknown SSE {kind} {value!r}; choose one of {', '.join(valid)}")


def _settings(backbone, variant, mode, options):
    _check_names(backbone, variant, mode)
    inputs = SSE_DEFAULTS[backbone].inputs.resolve(options, mode)
    branch_outputs = options.num_classes
    if backbone == "holonet" and variant.endswith("_concat"):
        branch_outputs = options.holonet_branch_outputs
        if branch_outputs < options.num_classes:
            raise UserError(f"HoloNet branch outputs ({branch_outputs}) must be at least the "
                            f"number of classes ({options.num_classes})")
    return _Settings(backbone=backbone, variant=variant, mode=mode, num_classes=options.num_classes,
                     inputs=inputs, branch_outputs=branch_outputs)


# --------------------------------------------------------------------------------------------
# Heads

class _Heads:
    """Adds scoring branches, the own classifier and the fusion to a NetSpec, in the released style
    of each backbone (names, parameter specs, pooling)."""

    def __init__(self, n, s, tap_shapes):
        self.n, self.s = n, s
        self.tap_shapes = tap_shapes  # tap name -> blob shape, from a dry build of the backbone
        self.taps = {}    # tap name -> Top, filled while the backbone is built
        self.scores = []  # the 2-D class-score Tops, in supervision order

    # ---- shared pieces
    def _specs(self, kind):
        """The released lr/decay specs of new layers: none in SSE-ResNet; in HoloNet/DenseNet lr 1/2,
        decay 1/0 for convs with a bias and one (1, 1) spec for score convs and InnerProducts."""
        if self.s.backbone == "resnet50":
            return None
        return param_specs((1, 1), (2, 0)) if kind == "conv" else param_specs((1, 1))

    def _conv(self, bottom, num_output, kernel, stride=1, pad=0, param=None, name=None):
        """A new conv with a bias, xavier + constant 0.1 (the SSE convention, also given to the
        released layers that had no filler and so started at zero)."""
        L, _ = backbones.layers_and_params()
        kwargs = {key: value for key, value in (("param", param), ("name", name)) if value}
        return L.Convolution(bottom, num_output=num_output, kernel_size=kernel, stride=stride, pad=pad,
                             bias_term=True, weight_filler=XAVIER, bias_filler=BIAS_01, **kwargs)

    def _inner_product(self, bottom, num_output):
        L, _ = backbones.layers_and_params()
        param = self._specs("fc")
        return L.InnerProduct(bottom, num_output=num_output, bias_term=True, weight_filler=XAVIER,
                              bias_filler=BIAS_01, **({"param": param} if param else {}))

    def _bn_scale_relu(self, top, bn, scale, relu):
        """Branch BN (flag false to train, true to test) -> Scale -> ReLU, all in place."""
        n, resnet = self.n, self.s.backbone == "resnet50"
        n[bn] = backbones.batch_norm(top, self.s.use_global_stats, param=None if resnet else FROZEN_BN)
        n[scale] = backbones.scale(n[bn], param=None if resnet else param_specs((1, 0), (1, 0)))
        n[relu] = backbones.relu(n[scale])
        return n[relu]

    def _side(self, top):
        """The side of a map, inferred on the net built so far."""
        return top_shapes(self.n, {"map": top}, self.s.inputs.data_shape)["map"][2]

    def _smaller_map_channels(self, tap):
        """The channels of each smaller map the backbone makes after `tap`, down to the last map
        (at each side, those of the last tap)."""
        channels_at = {shape[2]: shape[1] for shape in self.tap_shapes.values()}  # last tap wins
        side, last_side = self.tap_shapes[tap][2], self._last_side()
        return [channels_at[smaller] for smaller in sorted(channels_at, reverse=True)
                if last_side <= smaller < side]

    def _last_side(self):
        return self.tap_shapes[TAPS[self.s.backbone]["last"]][2]

    def _loss(self, name, score):
        if self.s.mode != "deploy":
            L, _ = backbones.layers_and_params()
            self.n[name] = L.SoftmaxWithLoss(score, self.n.label)

    # ---- branch bodies
    def s_branch(self, tap, num_output):
        """-s: pool 2x2 s2 -> conv_fc (1024, kernel = the pooled map) -> BN/Scale/ReLU -> 1x1 conv
        -> AVE 1x1 (a no-op kept from the released files) -> Flatten -> loss."""
        L, _ = backbones.layers_and_params()
        n, tag = self.n, BRANCH_TAGS[tap]
        holonet = self.s.backbone == "holonet"
        pooled = f"pool{tag}" if holonet else f"pool{tag}_fused"
        n[pooled] = backbones.pool(self.taps[tap], "MAX" if holonet else "AVE", 2, 2)
        n[f"conv_fc{tag}"] = self._conv(n[pooled], 1024, self._side(n[pooled]), param=self._specs("conv"))
        x = self._bn_scale_relu(n[f"conv_fc{tag}"], f"conv_fc{tag}/bn", f"conv_fc{tag}/bn_scale",
                                f"conv_fc{tag}/relu")
        n[f"conv_fc{tag}_1"] = self._conv(x, num_output, 1, param=self._specs("score"))
        n[f"pool_fc{tag}_1"] = backbones.pool(n[f"conv_fc{tag}_1"], "AVE", 1, separate_hw=True)
        n[f"flat_{tag}"] = L.Flatten(n[f"pool_fc{tag}_1"])
        self._loss(f"loss{tag}", n[f"flat_{tag}"])
        self.scores.append(n[f"flat_{tag}"])

    def c_branch(self, tap, num_output):
        """-c: a 7x7 s2 p3 conv (+ BN/Scale/ReLU) for each smaller map the backbone makes after the
        tap, giving the channels the backbone has there, down to the size of the last map -> AVE
        over it -> InnerProduct -> loss. Every backbone step after a tap halves the side rounding
        up, as these convs do. Names follow the released SSE-ResNet (res2c_conv_1, res2c_bn_1, ...,
        pool2, fc2, loss2); each conv has its own top (the released later convs ran in place while
        changing shape)."""
        n, tag = self.n, BRANCH_TAGS[tap]
        x = self.taps[tap]
        for step, channels in enumerate(self._smaller_map_channels(tap), start=1):
            top = f"{tap}_new" if step == 1 else f"{tap}_new_{step}"
            n[top] = self._conv(x, channels, 7, 2, 3, param=self._specs("conv"), name=f"{tap}_conv_{step}")
            x = self._bn_scale_relu(n[top], f"{tap}_bn_{step}", f"{tap}_scale_{step}", f"{tap}_relu_{step}")
        # "poolN" is a backbone layer in DenseNet, so the new variants name the pool after the tap
        pooled = f"pool{tag}" if self.s.backbone == "resnet50" else f"{tap}_pool"
        n[pooled] = backbones.pool(x, "AVE", self._last_side())
        n[f"fc{tag}"] = self._inner_product(n[pooled], num_output)
        self._loss(f"loss{tag}", n[f"fc{tag}"])
        self.scores.append(n[f"fc{tag}"])

    def own_classifier(self, num_output):
        """The backbone's classifier on its last map: HoloNet has none, so it gets an -s branch
        (as released); DenseNet pool5 -> emoti_fc6 (1x1 conv) -> Flatten; ResNet pool5 -> fc5."""
        L, _ = backbones.layers_and_params()
        n, backbone = self.n, self.s.backbone
        if backbone == "holonet":
            self.s_branch("conv4_1", num_output)
        elif backbone == "densenet121":
            n.emoti_fc6 = self._conv(self.taps["pool5"], num_output, 1)  # released with no specs
            self._loss("loss6", n.emoti_fc6)
            n.flat_6 = L.Flatten(n.emoti_fc6)
            self.scores.append(n.flat_6)
        else:
            n.pool5 = backbones.pool(self.taps["res5c"], "AVE", self._last_side())
            n.fc5 = self._inner_product(n.pool5, num_output)
            self._loss("loss", n.fc5)
            self.scores.append(n.fc5)

    # ---- fusion and outputs
    def fuse(self):
        """Adds the variant's fusion; returns the final class-score Top and whether it needs a loss."""
        L, P = backbones.layers_and_params()
        n, s = self.n, self.s
        if s.variant == "original":
            return self.scores[0], False
        if s.variant.endswith("_eltwise"):
            n.score_sum = L.Eltwise(*self.scores, operation=P.Eltwise.SUM)
            return n.score_sum, True
        if s.backbone == "resnet50":
            # released: Concat5 -> fc_concat in place (28 -> 7); the concat gets its own top here
            n.Concat5 = L.Concat(*self.scores, axis=1)
            n.fc_concat = self._inner_product(n.Concat5, s.num_classes)
            return n.fc_concat, True
        n.fc_cascade = L.Concat(*self.scores, axis=1)
        n.fc_fused = self._inner_product(n.fc_cascade, s.num_classes)
        return n.fc_fused, True

    def outputs(self, final, fused_loss):
        """In the released order: prob (test, deploy), the fused loss, accuracy (train_val, test;
        TEST phase only except in DenseNet)."""
        L, _ = backbones.layers_and_params()
        n, s = self.n, self.s
        if s.mode != "train_val":
            n.prob = L.Softmax(final)
        if fused_loss:
            self._loss("loss_all" if s.backbone == "resnet50" else "loss", final)
        if s.mode != "deploy":
            phase = {} if s.backbone == "densenet121" else {"include": {"phase": import_caffe().TEST}}
            n.accuracy = L.Accuracy(final, n.label, accuracy_param={"top_k": 1}, **phase)


def _head_hooks(heads, s):
    """Backbone hooks that record the taps and add every head of the variant where the released
    files put it: after its tap (the DenseNet -s branches inside dense block 5), and the own
    classifier after the last map."""
    branch_taps, body = (), None
    if s.variant != "original":
        count, body = s.variant.split("_")[0].split("-")
        branch_taps = TAPS[s.backbone][count]
    last = "pool5" if s.backbone == "densenet121" else TAPS[s.backbone]["last"]
    actions = {tap: [] for tap in branch_taps + (last,)}  # tap -> functions adding heads there
    for tap in branch_taps:
        place = DENSENET_S_PLACES.get(tap, tap) if s.backbone == "densenet121" and body == "s" else tap
        add = heads.s_branch if body == "s" else heads.c_branch
        actions.setdefault(place, []).append(functools.partial(add, tap, s.branch_outputs))
    outputs = s.branch_outputs if s.variant.endswith("_concat") else s.num_classes
    actions[last].append(functools.partial(heads.own_classifier, outputs))

    def run(tap, top):
        heads.taps[tap] = top
        for action in actions[tap]:
            action()

    return {tap: functools.partial(run, tap) for tap in actions}


# --------------------------------------------------------------------------------------------
# Nets and solvers

def _backbone(n, s, bottom, hooks=None):
    """Builds the backbone with the released BN settings of the mode."""
    if s.backbone == "holonet":
        return backbones.holonet(n, bottom, s.use_global_stats, hooks)
    if s.backbone == "densenet121":
        return backbones.densenet121(n, bottom, hooks=hooks)
    return backbones.resnet(n, bottom, use_global_stats=s.use_global_stats, hooks=hooks)


def _tap_shapes(s):
    """The blob shape of every tap, from a dry build: a head needs sizes of maps built after it."""
    n = import_caffe().NetSpec()
    n.data = data.input_layer(s.inputs)
    return top_shapes(n, _backbone(n, s, n.data))


def build_sse(backbone, variant, mode, options=NetOptions()):
    """The NetParameter of an SSE net.

    backbone: holonet, densenet121 or resnet50; variant: one of VARIANTS; mode: "train_val" (the
    released *_train prototxt: TRAIN and TEST data layers, LMDB Data or ImageData per
    options.source_type, losses, accuracy), "test" (the released *_test prototxt: ImageData on
    options.val_source or the released test list, BN on global statistics, losses and accuracy kept,
    plus prob; for Caffe's extract_features) or "deploy" (Input 1 x C x S x S, no loss, prob);
    options: NetOptions, None fields taking SSE_DEFAULTS[backbone].
    """
    s = _settings(backbone, variant, mode, options)
    n = import_caffe().NetSpec()
    test_data = data.add_data(n, s.inputs, mode)
    heads = _Heads(n, s, _tap_shapes(s))
    _backbone(n, s, n.data, _head_hooks(heads, s))
    heads.outputs(*heads.fuse())
    return data.to_proto(n, sse_net_name(backbone, variant), test_data)


def registry_entries():
    """The 15 SSE nets as `emotiw.nets` registry entries."""
    for backbone in BACKBONES:
        defaults = SSE_DEFAULTS[backbone]
        preprocessing = defaults.inputs.preprocessing()
        for variant in VARIANTS:
            name = sse_net_name(backbone, variant)
            yield NetEntry(name=name, caffe_name=name, recipe="sse", backbone=DISPLAY_NAMES[backbone],
                             variant=variant, released=variant == defaults.released_variant,
                             preprocessing=preprocessing, pretrained=defaults.pretrained,
                             builder=functools.partial(build_sse, backbone, variant),
                             solver_values=defaults.solver)
