"""Caffe classifiers of per-clip descriptor vectors (`emotiw features`): SSE's audio model and the
hand-crafted (LBP-TOP) model that stands in for its unreleased "relationlet".

  * `audio_linear_svm`: one InnerProduct trained with HingeLoss (L2): a linear SVM in Caffe, one
    versus rest over the classes;
  * `audio_mlp`: one hidden InnerProduct of 256 with ReLU and dropout 0.5, then the classifier,
    trained with SoftmaxWithLoss.
Both read HDF5Data (`data`: N x D standardised features, `label`: N), the files `emotiw features`
writes (`emotiw train` standardises them with the training mean and std first); `input_size` is the
feature dimension D (88: openSMILE's eGeMAPSv02). Deploy and test nets end in `prob`, a softmax of
the scores (for the SVM its margins: the same argmax).
"""

from emotiw.caffe.env import import_caffe
from emotiw.nets.backbones import layers_and_params
from emotiw.nets.options import NetOptions

NAMES = ("audio_linear_svm", "audio_mlp")
DIMENSION = 88  # eGeMAPSv02's functionals
HIDDEN = 256
GAUSSIAN = {"type": "gaussian", "std": 0.01}
SOURCES = {"train": "features/audio/train.txt", "val": "features/audio/val.txt",
           "test": "features/audio/test.txt"}
BATCH = 32
SOLVERS = {
    "audio_linear_svm": {"test_iter": [10], "test_interval": 100, "base_lr": 0.01, "lr_policy": "step",
                         "gamma": 0.1, "stepsize": 2000, "display": 50, "max_iter": 5000, "momentum": 0.9,
                         "weight_decay": 0.001, "snapshot": 1000},
    "audio_mlp": {"test_iter": [10], "test_interval": 100, "base_lr": 0.01, "lr_policy": "step", "gamma": 0.1,
                  "stepsize": 2000, "display": 50, "max_iter": 5000, "momentum": 0.9, "weight_decay": 0.0005,
                  "snapshot": 1000},
}


def _hdf5(split, options, phase=None):
    L, _ = layers_and_params()
    source = {"train": options.train_source, "val": options.val_source, "test": options.val_source}[split]
    batch = options.train_batch if split == "train" else options.test_batch
    kwargs = {"include": {"phase": phase}} if phase is not None else {}
    return L.HDF5Data(hdf5_data_param={"source": source or SOURCES[split], "batch_size": batch or BATCH,
                                       "shuffle": split == "train"}, ntop=2, **kwargs)


def build(name, mode, options=NetOptions()):
    """The NetParameter of `name` (NAMES) in `mode` (train_val, test, deploy)."""
    caffe = import_caffe()
    L, P = layers_and_params()
    n = caffe.NetSpec()
    test_layer = None
    if mode == "deploy":
        n.data = L.Input(input_param={"shape": {"dim": [1, options.input_size or DIMENSION]}})
    elif mode == "test":
        n.data, n.label = _hdf5("test", options)
    else:
        n.data, n.label = _hdf5("train", options, caffe.TRAIN)
        spec = caffe.NetSpec()
        spec.data, spec.label = _hdf5("val", options, caffe.TEST)
        test_layer = spec.to_proto().layer[0]
    x = n.data
    if name == "audio_mlp":
        n.hidden = L.InnerProduct(x, num_output=HIDDEN, weight_filler=GAUSSIAN, bias_filler={"type": "constant"})
        n.hidden_relu = L.ReLU(n.hidden, in_place=True)
        n.hidden_dropout = L.Dropout(n.hidden, dropout_ratio=0.5, in_place=True)
        x = n.hidden
    n.scores = L.InnerProduct(x, num_output=options.num_classes, weight_filler=GAUSSIAN,
                              bias_filler={"type": "constant"})
    if mode == "train_val":
        n.accuracy = L.Accuracy(n.scores, n.label)
        if name == "audio_linear_svm":
            n.loss = L.HingeLoss(n.scores, n.label, hinge_loss_param={"norm": P.HingeLoss.L2})
        else:
            n.loss = L.SoftmaxWithLoss(n.scores, n.label)
    else:
        n.prob = L.Softmax(n.scores)
    net = n.to_proto()
    net.name = name
    if test_layer is not None:
        net.layer.insert(1, test_layer)
    return net
