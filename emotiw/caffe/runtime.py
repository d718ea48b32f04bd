"""One inference runtime for every deploy net (MTCNN's, the registered nets, user prototxts).

Two backends run the same prototxt and caffemodel: `pycaffe` (Caffe itself: im2col + OpenBLAS GEMM)
and `opencv` (OpenCV's DNN module, which imports Caffe files and has its own convolution kernels).
Both give the same outputs (tests/test_opencv_registry.py). `auto` picks the faster one for a net,
as `make bench` measured it on the CPU (bench/NOTES.md).

pycaffe runs the net with BatchNorm and Scale folded into the convolution before them
(emotiw.caffe.fold), in memory: the files are left as they are. OpenCV fuses those layers itself.

Precision `bf16` (pycaffe on a CPU build, CPUs with AVX512-BF16 or AMX): the convolutions take their
inputs and weights in bf16 on oneDNN and accumulate in fp32 (caffe_patches/0007); the other layers
stay fp32.
"""

import contextlib
import os

import numpy as np

from emotiw.caffe.env import caffe_build_info, cpu_flags, import_caffe
from emotiw.caffe.fold import find_chains, fold_net, fold_params
from emotiw.caffe.proto import deploy_input, read_net_param
from emotiw.errors import UserError
from emotiw.formats.files import file_identity

BACKENDS = ("auto", "pycaffe", "opencv")
PRECISIONS = ("fp32", "bf16")
BF16_FLAGS = {"avx512_bf16", "amx_bf16"}  # /proc/cpuinfo's names of the instructions oneDNN's bf16 kernels use


def check_backend(backend):
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    return backend


def check_precision(precision, backend="auto"):
    """One line for a precision this machine, build or backend cannot run."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return precision
    if backend == "opencv":
        raise UserError("--precision bf16 runs on pycaffe's oneDNN engine; use --backend pycaffe or auto")
    if not BF16_FLAGS & cpu_flags():
        raise UserError("--precision bf16 needs a CPU with AVX512-BF16 or AMX (this one has neither); "
                        "use --precision fp32")
    build = caffe_build_info()
    if build is not None and "-DUSE_DNNL=ON" not in build["cmake_flags"]:
        raise UserError("--precision bf16 needs a CPU build of Caffe (its oneDNN engine); this one is a CUDA "
                        "build: use --precision fp32")
    if os.environ.get("CAFFE_DNNL") == "0":
        raise UserError("--precision bf16 needs the oneDNN engine, which CAFFE_DNNL=0 turns off; unset it")
    return precision


# CAFFE_DNNL_CONSTANT_WEIGHTS=1: we never write a TEST net's weights through an array kept from before
# a pass, so oneDNN may keep them reordered for one-image passes (caffe_patches/README.md, 0007)
INFERENCE_ENVIRONMENT = {"CAFFE_DNNL_CONSTANT_WEIGHTS": "1"}


@contextlib.contextmanager
def caffe_inference(precision):
    """Within this block Caffe creates inference layers (read when a layer is made): convolutions in
    `precision`, with their weights promised constant."""
    settings = {**INFERENCE_ENVIRONMENT, "CAFFE_DNNL_PRECISION": precision}
    previous = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


class PycaffeNet:
    """fold: BatchNorm and Scale folded into the layer before them (`chains` lists those folded);
    keep: blobs the folding must not take away (a blob between a convolution and its BatchNorm);
    precision: fp32 or bf16 (check_precision)."""

    def __init__(self, deploy, weights, fold=True, keep=(), precision="fp32"):
        caffe = import_caffe()
        caffe.set_mode_cpu()
        with caffe_inference(precision):
            self.net = caffe.Net(str(deploy), caffe.TEST, weights=str(weights))
            self.chains = []
            if fold:
                param = read_net_param(deploy)
                self.chains = find_chains(param, keep)
                if self.chains:
                    self.net = folded_twin(caffe, self.net, param, self.chains)
        self.input = self.net.inputs[0]
        self.input_shape = tuple(self.net.blobs[self.input].data.shape[1:])
        self.blob_names = list(self.net.blobs)

    def forward(self, batch, blobs):
        """{blob: array} for a float32 (N, C, H, W) batch; blobs keep their shapes."""
        data = self.net.blobs[self.input]
        data.reshape(*batch.shape)
        self.net.reshape()
        data.data[...] = batch
        self.net.forward()
        return {name: self.net.blobs[name].data.copy() for name in blobs}  # Caffe reuses its blobs


def folded_twin(caffe, net, param, chains):
    """A new pycaffe net of the folded prototxt, holding `net`'s weights with the chains folded."""
    from google.protobuf import text_format

    folded = fold_params(chains, {name: [blob.data for blob in net.params[name]]
                                  for chain in chains for name in chain.layers})
    # pycaffe reads nets from files only: an in-memory one, so nothing is written to /tmp or OUT
    fd = os.memfd_create("folded.prototxt")
    try:
        os.write(fd, text_format.MessageToString(fold_net(param, chains)).encode())
        twin = caffe.Net(f"/proc/self/fd/{fd}", caffe.TEST)
    finally:
        os.close(fd)
    for name, blobs in twin.params.items():
        for blob, values in zip(blobs, folded.get(name) or [blob.data for blob in net.params[name]]):
            blob.data[...] = values
    return twin


class OpenCVNet:
    """cv2.dnn, which asks for layer outputs: a blob is read from the last layer that writes it."""

    def __init__(self, deploy, weights):
        import cv2

        param = read_net_param(deploy)
        self.input, self.input_shape = deploy_input(param)
        self.producers = {top: layer.name for layer in param.layer for top in layer.top}
        self.blob_names = list(self.producers)
        try:
            self.net = cv2.dnn.readNetFromCaffe(str(deploy), str(weights))
        except cv2.error as error:
            reason = str(error).strip().splitlines()[-1]
            raise UserError(f"OpenCV DNN cannot load {deploy}: {reason}; use --backend pycaffe") from None
        self.net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        self.net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)

    def forward(self, batch, blobs):
        self.net.setInput(np.ascontiguousarray(batch, dtype=np.float32))
        outputs = self.net.forward([self.producers[name] for name in blobs])
        return {name: np.asarray(out).copy() for name, out in zip(blobs, outputs)}


_loaded = None  # within reusing_nets(): (files, backend, preferred, fold, keep, precision) -> (net, backend)


@contextlib.contextmanager
def reusing_nets():
    """Within this block load_net gives back the net it loaded before for the same, unchanged
    files: several videos through the same stages load each net once."""
    global _loaded
    outer, _loaded = _loaded, {} if _loaded is None else _loaded
    try:
        yield
    finally:
        _loaded = outer


def load_net(deploy, weights, backend="auto", preferred="pycaffe", fold=True, keep=(), precision="fp32"):
    """(net, backend name) for a deploy prototxt and its weights. `auto` takes `preferred`, the
    faster backend for this net, and falls back to pycaffe when OpenCV cannot load the net; with
    precision bf16 it takes pycaffe. fold, keep and precision: PycaffeNet's (OpenCV folds on its own)."""
    check_backend(backend)
    check_precision(precision, backend)
    if _loaded is None:
        return _load_net(deploy, weights, backend, preferred, fold, keep, precision)
    key = (tuple(file_identity(deploy)), tuple(file_identity(weights)), backend, preferred, fold, tuple(keep),
           precision)
    if key not in _loaded:
        _loaded[key] = _load_net(deploy, weights, backend, preferred, fold, keep, precision)
    return _loaded[key]


def _load_net(deploy, weights, backend, preferred, fold, keep, precision):
    if backend == "auto":
        if preferred == "opencv" and precision == "fp32":
            try:
                return OpenCVNet(deploy, weights), "opencv"
            except UserError:
                pass
        backend = "pycaffe"
    if backend == "opencv":
        return OpenCVNet(deploy, weights), backend
    return PycaffeNet(deploy, weights, fold, keep, precision), backend
