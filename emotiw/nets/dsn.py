"""The DSN nets (Fan, Lam and Li, ICMI 2018): deeply-supervised VGG-Face and ResNet, and the plain
VGG-Face and DenseNet-121 fine-tunes, with the layer names of the released prototxts.

Every builder takes a mode ("train_val", "test" or "deploy") and a NetOptions and returns a
caffe_pb2.NetParameter. A side branch `dsnK` (DSS-style, see docs/nets.md) is:
conv1-dsnK (+ReLU) -> conv3-dsnK (1x1 -> one map) [-> Concat with the upsampled maps of deeper
branches -> conv4-dsnK] -> fc-dsnK -> its own loss; its map is also upsampled to the input size and
the maps of all branches are fused by `new-score-weighting` (1x1 conv) -> fc -> the main loss.
"""

from dataclasses import dataclass, replace

from emotiw.caffe.env import import_caffe
from emotiw.nets import data
from emotiw.nets.backbones import densenet121 as densenet121_trunk
from emotiw.nets.backbones import layers_and_params, param_specs, pool, relu, resnet
from emotiw.nets.options import MODES

MEAN_BGR = (103.939, 116.779, 123.68)
RAF_VAL = "data/raf/val.txt"
# The data layers of the released DSN prototxts: image lists resized to 256x256 (aspect ratio
# ignored), a random (train) or centre (test) 224 crop, mirror in training, BGR mean values, no
# scaling; the train list and batch, and the val shuffle, differ between the nets (see the builders).
INPUTS = data.Inputs(input_size=224, resize=256, mean_values=MEAN_BGR, mean_file=None,
                     train_source="data/raf/train.txt", val_source=RAF_VAL, test_source=RAF_VAL,
                     train_batch=16, val_batch=8, test_batch=8)

LEARN = param_specs((1, 1), (2, 0))
LEARN_SLOW = param_specs((0.1, 1), (0.2, 0))   # DSS's 1x1 score convs
FROZEN = param_specs((0, 0), (0, 0))           # the bilinear upsampling deconvolutions
GAUSSIAN = {"type": "gaussian", "std": 0.01}
ZERO = {"type": "constant", "value": 0}


@dataclass(frozen=True)
class SideBranch:
    index: int               # K in dsnK
    tap: str                 # the backbone blob the branch reads
    kernel: int              # conv1-dsnK kernel (pad kernel // 2)
    num_output: int
    stride: int              # output stride its upsampling factors assume
    fused_from: tuple = ()   # deeper branches upsampled into this one, in layer order
    concat_order: tuple = () # ... and in Concat order


def _vgg_branches():
    return (SideBranch(6, "pool5a", 7, 256, 32),
            SideBranch(5, "conv5_3", 5, 256, 16),
            SideBranch(4, "conv4_3", 5, 128, 8, (6, 5), (6, 5)),
            SideBranch(3, "conv3_3", 5, 128, 4, (6, 5), (6, 5)),
            SideBranch(2, "conv2_2", 3, 64, 2, (6, 5, 4, 3), (5, 4, 6, 3)),
            SideBranch(1, "conv1_2", 3, 64, 1, (6, 5, 4, 3), (5, 4, 6, 3)))


def _resnet_branches(res3_last, res4_last, dsn6_stride):
    """dsn6_stride: 32 in the released net (copied from VGG although its res5c has stride 16)."""
    return (SideBranch(6, "res5c", 7, 256, dsn6_stride),
            SideBranch(5, res4_last, 5, 256, 16),
            SideBranch(4, res3_last, 5, 128, 8, (6, 5), (6, 5)),
            SideBranch(3, "res2c", 5, 128, 4, (6, 5), (6, 5)),
            SideBranch(2, "conv1", 3, 64, 2, (6, 5, 4, 3), (5, 4, 6, 3)))


# ------------------------------------------------------------------------------------------
# Inputs and outputs shared by the five nets

class Net:
    """A NetSpec with the data layer(s) of one mode, and the matching outputs for each classifier."""

    def __init__(self, key, mode, options, inputs, losses_in_train_only, deploy_keeps_lr=True):
        """key: the net's registry name; inputs: its data defaults, which options override."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.caffe = import_caffe()
        self.name, self.mode, self.num_classes = CAFFE_NAMES[key], mode, options.num_classes
        self.losses_in_train_only = losses_in_train_only
        self.deploy_keeps_lr = deploy_keeps_lr
        self.n = self.caffe.NetSpec()
        self.test_data = data.add_data(self.n, inputs.resolve(options, mode), mode)

    def outputs(self, logits, suffix="", loss_weight=None):
        """Accuracy and SoftmaxWithLoss in train_val, a Softmax `prob<suffix>` otherwise."""
        L, _ = layers_and_params()
        n = self.n
        if self.mode != "train_val":
            n["prob" + suffix] = L.Softmax(n[logits])
            return
        n["accuracy" + suffix] = L.Accuracy(n[logits], n.label)
        loss = {}
        if self.losses_in_train_only:
            loss["include"] = {"phase": self.caffe.TRAIN}
        if loss_weight is not None:
            loss["loss_weight"] = loss_weight
        n["softmax_loss" + suffix] = L.SoftmaxWithLoss(n[logits], n.label, **loss)

    def to_proto(self):
        net = data.to_proto(self.n, self.name, self.test_data)
        if self.mode == "deploy" and not self.deploy_keeps_lr:
            for layer in net.layer:  # the released plain nets' deploy files have no param specs
                del layer.param[:]
        return net


def classifier(bottom, num_classes, weight_filler=GAUSSIAN, bias_filler=ZERO):
    L, _ = layers_and_params()
    return L.InnerProduct(bottom, num_output=num_classes, param=LEARN, weight_filler=weight_filler,
                          bias_filler=bias_filler)


# ------------------------------------------------------------------------------------------
# Deep supervision (the DSS side branches, short connections and fused head)

def score_map(bottom):
    """1x1 conv to a single map (DSS's conv3-dsnK / conv4-dsnK)."""
    L, _ = layers_and_params()
    return L.Convolution(bottom, num_output=1, kernel_size=1, param=LEARN_SLOW,
                         weight_filler=GAUSSIAN, bias_filler=ZERO)


def upsample_and_crop(n, source, factor, name, top, reference, crop_top):
    """Frozen bilinear deconvolution (kernel 2f, stride f; Caffe's own `bilinear` filler) and a
    top-left Crop to `reference`, as released (factor 1: the Crop alone)."""
    L, _ = layers_and_params()
    if factor > 1:
        n[top] = L.Deconvolution(n[source], name=name, param=FROZEN, convolution_param={
            "num_output": 1, "kernel_size": 2 * factor, "stride": factor,
            "weight_filler": {"type": "bilinear"}})
        source = top
    n[crop_top] = L.Crop(n[source], reference, name="crop")


def _score_name(branch):
    return f"conv4-dsn{branch.index}" if branch.fused_from else f"conv3-dsn{branch.index}"


def side_branch(net, taps, branch, deeper):
    L, _ = layers_and_params()
    n, k = net.n, branch.index
    n[f"conv1-dsn{k}"] = L.Convolution(taps[branch.tap], num_output=branch.num_output,
                                       kernel_size=branch.kernel, pad=branch.kernel // 2, param=LEARN,
                                       weight_filler=GAUSSIAN, bias_filler=ZERO)
    n[f"relu1-dsn{k}"] = relu(n[f"conv1-dsn{k}"])
    own_map = f"conv3-dsn{k}"
    n[own_map] = score_map(n[f"relu1-dsn{k}"])
    if branch.fused_from:
        for j in branch.fused_from:
            factor = deeper[j].stride // branch.stride
            upsample_and_crop(n, _score_name(deeper[j]), factor, f"upsample{factor}_dsn{j}",
                              f"score-dsn{j}-up-{k}", n[own_map], f"upscore-dsn{j}-{k}")
        n[f"concat-dsn{k}"] = L.Concat(n[own_map], *[n[f"upscore-dsn{j}-{k}"] for j in branch.concat_order],
                                       axis=1)
        n[_score_name(branch)] = score_map(n[f"concat-dsn{k}"])
    upsample_and_crop(n, _score_name(branch), branch.stride, f"upsample{branch.stride}_in_dsn{k}",
                      f"score-dsn{k}-up", n.data, f"upscore-dsn{k}")
    n[f"fc-dsn{k}"] = classifier(n[_score_name(branch)], net.num_classes)
    net.outputs(f"fc-dsn{k}", f"-dsn{k}", loss_weight=1)


def deep_supervision(net, taps, branches, fusion_order, fusion_weight):
    """Side branches (deepest first, as released), then the fused head."""
    L, _ = layers_and_params()
    n = net.n
    by_index = {branch.index: branch for branch in branches}
    for branch in branches:
        side_branch(net, taps, branch, by_index)
    n["concat-upscore"] = L.Concat(*[n[f"upscore-dsn{k}"] for k in fusion_order], name="concat", axis=1)
    n["upscore-fuse"] = L.Convolution(n["concat-upscore"], name="new-score-weighting", num_output=1,
                                      kernel_size=1, param=LEARN_SLOW,
                                      weight_filler={"type": "constant", "value": fusion_weight})
    n.fc = classifier(n["upscore-fuse"], net.num_classes)
    net.outputs("fc")


# ------------------------------------------------------------------------------------------
# VGG-Face

VGG16_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


def vgg16_features(n, bottom, dsn):
    """conv1_1 ... pool5 with VGG-Face names; returns {blob name: Top} after each ReLU and pool.

    dsn=True gives the DSS variant of the released DSN-VGG-FACE: conv1_1 pad 5, MAX 3x3 s2 pad 1
    for pool4 and pool5, and `engine: CAFFE` on every conv.
    """
    L, P = layers_and_params()
    engine = {"engine": P.Convolution.CAFFE} if dsn else {}
    taps, top = {}, bottom
    for stage, (width, depth) in enumerate(VGG16_STAGES, start=1):
        for index in range(1, depth + 1):
            suffix = f"{stage}_{index}"
            pad = 5 if dsn and suffix == "1_1" else 1
            n[f"conv{suffix}"] = L.Convolution(top, num_output=width, kernel_size=3, pad=pad,
                                               param=LEARN, **engine)
            n[f"relu{suffix}"] = top = taps[f"conv{suffix}"] = relu(n[f"conv{suffix}"])
        if dsn and stage >= 4:
            n[f"pool{stage}"] = pool(top, "MAX", 3, 2, 1)
        else:
            n[f"pool{stage}"] = pool(top, "MAX", 2, 2)
        top = taps[f"pool{stage}"] = n[f"pool{stage}"]
    return taps


def vgg_face(mode, options):
    """The plain VGG-Face fine-tune (VGG-FACE/vggface_train_test.prototxt)."""
    L, _ = layers_and_params()
    inputs = replace(INPUTS, train_source="data/raf/train_gan_plus_raf.txt", val_shuffle=True)
    net = Net("vgg_face", mode, options, inputs, losses_in_train_only=False, deploy_keeps_lr=False)
    n = net.n
    top = vgg16_features(n, n.data, dsn=False)["pool5"]
    for index in (6, 7):
        n[f"fc{index}"] = L.InnerProduct(top, num_output=4096, param=LEARN,
                                         weight_filler={"type": "gaussian", "std": 0.005},
                                         bias_filler={"type": "constant", "value": 0.1})
        n[f"relu{index}"] = relu(n[f"fc{index}"])
        n[f"drop{index}"] = top = L.Dropout(n[f"relu{index}"], dropout_ratio=0.5, in_place=True)
    n.fc8_vgg = classifier(top, net.num_classes)
    net.outputs("fc8_vgg")
    return net.to_proto()


def dsn_vgg_face(mode, options):
    """The released DSN-VGG-FACE: 6 side branches, fusion weights 1/6 (written 0.1667), 7 losses."""
    net = Net("dsn_vgg_face", mode, options, INPUTS, losses_in_train_only=True)
    n = net.n
    taps = vgg16_features(n, n.data, dsn=True)
    n.pool5a = taps["pool5a"] = pool(taps["pool5"], "AVE", 3, 1, 1)
    deep_supervision(net, taps, _vgg_branches(), fusion_order=(1, 2, 3, 4, 5, 6), fusion_weight=0.1667)
    return net.to_proto()


# ------------------------------------------------------------------------------------------
# ResNet

def dsn_resnet(mode, options):
    """The released "DSN-Res-50": a ResNet-101 topology (3-4-23-3, no conv1 bias) with frozen BN and
    a dilated res5 (output stride 16), 5 side branches, fusion weights 0.2, 6 losses. Its dsn6
    upsampling factors assume stride 32 (kept, so that the released caffemodel loads)."""
    return _dsn_resnet_net("dsn_resnet", mode, options, blocks=(3, 4, 23, 3),
                           conv1_bias=False, taps=("res3b3", "res4b22"), dsn6_stride=32)


def dsn_resnet50(mode, options):
    """A true ResNet-50 (3-4-6-3, KaimingHe names and conv1 bias) in the DSN-Res design, so that
    ImageNet ResNet-50 weights initialise every block; dsn6 upsampling fixed for its stride 16."""
    return _dsn_resnet_net("dsn_resnet50", mode, options, blocks=(3, 4, 6, 3), conv1_bias=True,
                           taps=("res3d", "res4f"), dsn6_stride=16)


def _dsn_resnet_net(key, mode, options, blocks, conv1_bias, taps, dsn6_stride):
    net = Net(key, mode, options, INPUTS, losses_in_train_only=True)
    trunk = resnet(net.n, net.n.data, blocks=blocks, conv1_bias=conv1_bias, frozen_bn=True,
                   conv_lr_mult=1.0, res5_dilation=2)
    deep_supervision(net, trunk, _resnet_branches(*taps, dsn6_stride),
                     fusion_order=(6, 2, 3, 4, 5), fusion_weight=0.2)
    return net.to_proto()


# ------------------------------------------------------------------------------------------
# DenseNet-121

def densenet121(mode, options):
    """The plain DenseNet-121 fine-tune (DenseNet/DenseNet_train_test.prototxt), no deep supervision."""
    L, _ = layers_and_params()
    net = Net("densenet121", mode, options, replace(INPUTS, train_batch=8),
              losses_in_train_only=False, deploy_keeps_lr=False)
    n = net.n
    trunk = densenet121_trunk(n, n.data)
    n.fc6_exp = L.Convolution(trunk["pool5"], num_output=net.num_classes, kernel_size=1,
                              param=LEARN, weight_filler=GAUSSIAN, bias_filler=ZERO)
    top = n.fc6_exp
    if mode == "train_val":
        n.drop = top = L.Dropout(n.fc6_exp, dropout_ratio=0.5, in_place=True)
    n.fc6_final = classifier(top, net.num_classes, weight_filler={"type": "xavier"},
                             bias_filler={"type": "constant", "value": 0.1})
    net.outputs("fc6_final")
    return net.to_proto()


# The released solvers (dsn-facts.md section 3); dsn_resnet50 has none and uses DSN-Res-50's.
_DSN_RES_SOLVER = {"base_lr": 0.01, "lr_policy": "multistep", "gamma": 0.5, "stepvalue": [20000, 30000],
                   "max_iter": 30000, "momentum": 0.9, "weight_decay": 0.0001, "test_iter": [300],
                   "test_interval": 500, "display": 100, "snapshot": 5000}
SOLVERS = {
    "vgg_face": {"base_lr": 0.0005, "lr_policy": "multistep", "gamma": 0.5, "stepvalue": [30000, 50000],
                 "max_iter": 20000, "momentum": 0.9, "weight_decay": 0.0001, "test_iter": [500],
                 "test_interval": 500, "display": 100, "snapshot": 500},
    "dsn_vgg_face": {"base_lr": 5e-05, "lr_policy": "multistep", "gamma": 0.1, "stepvalue": [30000],
                     "max_iter": 30000, "momentum": 0.9, "weight_decay": 0.0005, "test_iter": [400],
                     "test_interval": 500, "display": 20, "average_loss": 20, "snapshot": 500},
    "dsn_resnet": _DSN_RES_SOLVER,
    "dsn_resnet50": _DSN_RES_SOLVER,
    "densenet121": {"base_lr": 0.01, "lr_policy": "multistep", "gamma": 0.1, "stepvalue": [20000],
                    "max_iter": 50000, "momentum": 0.9, "weight_decay": 0.0001, "test_iter": [500],
                    "test_interval": 500, "display": 100, "snapshot": 2000},
}

# The `name:` of each net's prototxts.
CAFFE_NAMES = {
    "vgg_face": "VGG_FACE",
    "dsn_vgg_face": "DSN_VGG_FACE",
    "dsn_resnet": "DSN_RES_101_TOPOLOGY",
    "dsn_resnet50": "DSN_RES_50",
    "densenet121": "DENSENET_121",
}
BUILDERS = {
    "vgg_face": vgg_face,
    "dsn_vgg_face": dsn_vgg_face,
    "dsn_resnet": dsn_resnet,
    "dsn_resnet50": dsn_resnet50,
    "densenet121": densenet121,
}
