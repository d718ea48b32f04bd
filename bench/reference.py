"""The reference side of `make bench`: what a user would pick instead of our Caffe pipeline.

Run by the bench environment's Python (bench/.venv-ref: PyTorch, TensorFlow + the `mtcnn`
package), never by emotiw's own venv:  python bench/reference.py JOB.json RESULT.json
JOB.json is written by emotiw/bench.py: {"task": ..., "repeats": R, "warmup": W, ...}; the result
is a JSON object with the same timing fields (`rates`: items/s per repeat) as our side.

Tasks:
  * detect: the `mtcnn` package's TensorFlow pipeline on the frames of an .npz, our thresholds
    (every face's box per frame, for the coverage of the real-footage rows);
  * infer: PyTorch CPU forward of a torchvision backbone, or of the Caffe net itself (its
    NetParameter as JSON, translated layer by layer below: same layers, same shapes);
  * train: PyTorch CPU training steps of a Caffe train net translated the same way (same losses).
infer and train take "device": "cuda" for the GPU rows (bench/gpu.py).
"""

import contextlib
import importlib.util
import json
import math
import os
import sys
import time


def timed_rates(step, items, repeats, warmup):
    """items/s of `step()` for each of `repeats` calls after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        rates.append(items / (time.perf_counter() - start))
    return rates


# ---------------------------------------------------------------------------------------------
# Face detection with the `mtcnn` package

def detect(job):
    """Per frame, every face's box and the best one's; `warmup_frames` (optional) warms
    TensorFlow up on the first N frames instead of whole untimed passes."""
    import numpy as np
    from mtcnn import MTCNN

    frames = list(np.load(job["frames"])["frames"])
    detector = MTCNN(device="CPU:0")
    options = dict(min_face_size=job["min_face_size"], threshold_pnet=job["thresholds"][0],
                   threshold_rnet=job["thresholds"][1], threshold_onet=job["thresholds"][2],
                   scale_factor=job["scale_factor"], box_format="xyxy", fit_to_image=False)
    found = []
    for frame in frames[:job.get("warmup_frames", 0)]:
        detector.detect_faces(frame, **options)

    def run_clip():
        found[:] = [detector.detect_faces(frame, **options) for frame in frames]

    rates = timed_rates(run_clip, len(frames), job["repeats"], job["warmup"])
    best = [max(faces, key=lambda face: face["confidence"])["box"] if faces else None for faces in found]
    return {"rates": rates, "boxes": [None if box is None else [float(v) for v in box] for box in best],
            "faces": [[[float(v) for v in face["box"]] for face in faces] for faces in found]}


def mesh(job):
    """MediaPipe's face_landmark.tflite on the TF Lite interpreter (XNNPACK), one face at a time."""
    import numpy as np
    import tensorflow as tf

    crops = np.load(job["crops"])["crops"].astype(np.float32)
    interpreter = tf.lite.Interpreter(job["model"], num_threads=int(os.environ.get("BENCH_THREADS", os.cpu_count())))
    interpreter.allocate_tensors()
    index = interpreter.get_input_details()[0]["index"]

    def run_all():
        for crop in crops:
            interpreter.set_tensor(index, crop[None])
            interpreter.invoke()

    return {"rates": timed_rates(run_all, len(crops), job["repeats"], job["warmup"])}


# ---------------------------------------------------------------------------------------------
# Caffe NetParameter (as JSON) -> PyTorch modules

def _pair(param, name, default):
    """Caffe's convolution and pooling sizes (`kernel_size` or `kernel_h`/`kernel_w`, also for pad
    and stride; repeated in convolutions) as (h, w)."""
    value = param.get(name, default)
    if isinstance(value, list):
        value = value or [default]
        value = (value[0], value[-1])
    else:
        value = (value, value)
    short = name.replace("_size", "")
    return (param.get(f"{short}_h", value[0]), param.get(f"{short}_w", value[1]))


class CaffeLayer:
    """One translated layer: `module` (an nn.Module or a function of the bottoms)."""

    def __init__(self, layer, module):
        self.name, self.type = layer["name"], layer["type"]
        self.bottoms, self.tops = layer.get("bottom", []), layer.get("top", [])
        self.module = module
        self.loss_weight = layer.get("loss_weight", [1.0])[0] if self.type == "SoftmaxWithLoss" else 0.0


def _conv(layer, channels, transposed=False):
    import torch.nn as nn

    p = layer.get("convolution_param", {})
    kernel, stride = _pair(p, "kernel_size", 1), _pair(p, "stride", 1)
    pad, dilation = _pair(p, "pad", 0), _pair(p, "dilation", 1)
    kind = nn.ConvTranspose2d if transposed else nn.Conv2d
    return kind(channels, p["num_output"], kernel, stride, pad, dilation=dilation,
                groups=p.get("group", 1), bias=p.get("bias_term", True))


def _pool(layer):
    import torch.nn.functional as F

    p = layer.get("pooling_param", {})
    method = p.get("pool", "MAX")
    if p.get("global_pooling"):
        return (lambda x: F.adaptive_max_pool2d(x, 1)) if method == "MAX" else (lambda x: F.adaptive_avg_pool2d(x, 1))
    kernel, stride, pad = _pair(p, "kernel_size", 1), _pair(p, "stride", 1), _pair(p, "pad", 0)
    if method == "MAX":  # Caffe rounds output sizes up, as ceil_mode does
        return lambda x: F.max_pool2d(x, kernel, stride, pad, ceil_mode=True)
    return lambda x: F.avg_pool2d(x, kernel, stride, pad, ceil_mode=True, count_include_pad=True)


def _eltwise(layer):
    p = layer.get("eltwise_param", {})
    operation, coeffs = p.get("operation", "SUM"), p.get("coeff")

    def combine(*xs):
        if operation == "PROD":
            return math.prod(xs)
        if operation == "MAX":
            return __import__("functools").reduce(lambda a, b: a.maximum(b), xs)
        return sum(x * c for x, c in zip(xs, coeffs)) if coeffs else sum(xs)
    return combine


def _crop(layer):
    p = layer.get("crop_param", {})
    axis, offsets = p.get("axis", 2), p.get("offset", [0])

    def crop(x, like):
        slices = [slice(None)] * x.dim()
        for index, dim in enumerate(range(axis, x.dim())):
            start = offsets[min(index, len(offsets) - 1)]
            slices[dim] = slice(start, start + like.shape[dim])
        return x[tuple(slices)]
    return crop


def translate_layer(layer, shapes):
    """A CaffeLayer for `layer`, given the shapes of its bottoms; None for layers without effect."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    kind, bottoms = layer["type"], [shapes[b] for b in layer.get("bottom", [])]
    if kind in ("Dropout", "Accuracy", "Silence"):
        return CaffeLayer(layer, None) if kind == "Dropout" else None
    if kind == "Convolution":
        module = _conv(layer, bottoms[0][1])
    elif kind == "Deconvolution":
        module = _conv(layer, bottoms[0][1], transposed=True)
    elif kind == "InnerProduct":
        module = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(bottoms[0][1:]),
                                                       layer["inner_product_param"]["num_output"],
                                                       bias=layer["inner_product_param"].get("bias_term", True)))
    elif kind == "BatchNorm":
        p = layer.get("batch_norm_param", {})
        module = nn.BatchNorm2d(bottoms[0][1], eps=p.get("eps", 1e-5), affine=False)
    elif kind == "Scale":
        module = _Scale(bottoms[0][1], layer.get("scale_param", {}).get("bias_term", False))
    elif kind == "ReLU":
        slope = layer.get("relu_param", {}).get("negative_slope", 0.0)
        module = nn.LeakyReLU(slope) if slope else nn.ReLU()
    elif kind == "PReLU":
        module = nn.PReLU(bottoms[0][1])
    elif kind == "Pooling":
        module = _pool(layer)
    elif kind == "Concat":
        axis = layer.get("concat_param", {}).get("axis", 1)
        module = lambda *xs: torch.cat(xs, axis)  # noqa: E731
    elif kind == "Eltwise":
        module = _eltwise(layer)
    elif kind == "Flatten":
        module = nn.Flatten()
    elif kind == "Power":
        p = layer.get("power_param", {})
        power, scale, shift = p.get("power", 1.0), p.get("scale", 1.0), p.get("shift", 0.0)
        module = lambda x: (x * scale + shift) ** power if power != 1 else x * scale + shift  # noqa: E731
    elif kind == "Softmax":
        module = lambda x: F.softmax(x, dim=1)  # noqa: E731
    elif kind == "SoftmaxWithLoss":
        module = lambda x, label: F.cross_entropy(x.flatten(1), label)  # noqa: E731
    elif kind == "Crop":
        module = _crop(layer)
    else:
        raise SystemExit(f"reference.py: no PyTorch translation for Caffe layer type {kind}")
    return CaffeLayer(layer, module)


def _Scale(channels, bias):
    import torch
    import torch.nn as nn

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))
            self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1)) if bias else None

        def forward(self, x):
            return x * self.weight + self.bias if self.bias is not None else x * self.weight
    return Scale()


def caffe_graph(net, input_shapes):
    """An nn.Module running the net's layers in order over named blobs (input blobs from
    `input_shapes`: {name: shape}); returns every blob, and the summed weighted losses."""
    import torch
    import torch.nn as nn

    shapes, layers = dict(input_shapes), []
    with torch.no_grad():
        blobs = {name: torch.zeros(shape) if name != "label" else torch.zeros(shape, dtype=torch.long)
                 for name, shape in input_shapes.items()}
        for layer in net["layer"]:
            if layer["type"] in ("Input", "Data", "ImageData", "DummyData"):
                continue
            translated = translate_layer(layer, shapes)
            if translated is None:
                continue
            layers.append(translated)
            if isinstance(translated.module, nn.Module):
                translated.module.eval()  # batch 1 shapes; the caller picks train or eval
            outputs = _apply(translated, blobs)
            for top, value in zip(translated.tops, outputs):
                blobs[top] = value
                shapes[top] = tuple(value.shape)

    class Graph(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = layers
            self.modules_ = nn.ModuleList([l.module for l in layers if isinstance(l.module, nn.Module)])

        def forward(self, inputs):
            blobs, loss = dict(inputs), 0.0
            for layer in self.layers:
                for top, value in zip(layer.tops, _apply(layer, blobs)):
                    blobs[top] = value
                if layer.loss_weight:
                    loss = loss + layer.loss_weight * blobs[layer.tops[0]]
            return blobs, loss
    return Graph(), shapes


def _apply(layer, blobs):
    if layer.module is None:  # Dropout at test time: the identity
        return [blobs[layer.bottoms[0]]]
    return [layer.module(*[blobs[b] for b in layer.bottoms])]


# ---------------------------------------------------------------------------------------------
# Inference and training

def torchvision_model(name, classes):
    import torchvision.models as models

    return {"vgg16": models.vgg16, "resnet50": models.resnet50,
            "densenet121": models.densenet121}[name](weights=None, num_classes=classes)


def on_device(job):
    """The job's torch device ("cpu" unless it says "cuda"), with cuDNN's autotuner on and TF32 off
    on a GPU: fp32 as Caffe computes it, at the speed PyTorch users get."""
    import torch

    device = torch.device(job.get("device", "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.cuda.reset_peak_memory_stats()
    return device


def synchronised(step, device):
    import torch

    if device.type != "cuda":
        return step
    return lambda: (step(), torch.cuda.synchronize())


def peak_mib(device):
    import torch

    return int(torch.cuda.max_memory_reserved() / 2 ** 20) if device.type == "cuda" else None


def infer(job):
    import torch

    torch.manual_seed(0)
    device = on_device(job)
    batch, size = job["batch"], job["size"]
    x = torch.randn(batch, 3, size, size, device=device)
    if job.get("torchvision"):
        model = torchvision_model(job["torchvision"], job.get("classes", 1000)).eval()
        step = lambda: model(x)  # noqa: E731
    else:
        net = json.load(open(job["net"]))
        model, _ = caffe_graph(net, {"data": (batch, 3, size, size)})
        model.eval()
        step = lambda: model({"data": x})  # noqa: E731
    model.to(device)
    # bf16: what PyTorch users run for it, autocast (bf16 convolutions and matmuls, the rest fp32)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if job.get("precision") == "bf16"
                else contextlib.nullcontext())
    with torch.inference_mode(), autocast:
        rates = timed_rates(synchronised(step, device), batch, job["repeats"], job["warmup"])
    return {"rates": rates, "parameters": sum(p.numel() for p in model.parameters()), "peak_mib": peak_mib(device)}


def train(job):
    import torch

    torch.manual_seed(0)
    device = on_device(job)
    batch, size = job["batch"], job["size"]
    net = json.load(open(job["net"]))
    model, _ = caffe_graph(net, {"data": (batch, 3, size, size), "label": (batch,)})
    model.to(device).train()
    solver = job["solver"]
    optimizer = torch.optim.SGD(model.parameters(), lr=solver["base_lr"], momentum=solver["momentum"],
                                weight_decay=solver["weight_decay"])
    inputs = {"data": torch.randn(batch, 3, size, size, device=device),
              "label": torch.randint(0, 7, (batch,), device=device)}

    def step():
        optimizer.zero_grad(set_to_none=True)
        _, loss = model(inputs)
        loss.backward()
        optimizer.step()

    return {"rates": timed_rates(synchronised(step, device), batch, job["repeats"], job["warmup"]),
            "peak_mib": peak_mib(device)}


def describe():
    """Library versions and thread counts of this environment."""
    info = {"python": sys.version.split()[0]}
    try:
        import torch
        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    torch_blas=torch.__config__.show().split("BLAS_INFO=")[-1].split(",")[0])
    except ImportError:
        pass
    try:
        import importlib.metadata as metadata
        info.update(tensorflow=metadata.version("tensorflow-cpu"), mtcnn=metadata.version("mtcnn"))
    except Exception:
        pass
    return info


def use_threads(threads, tensorflow):
    """The thread count emotiw bench gives both sides (PyTorch intra-op; TensorFlow both pools)."""
    if importlib.util.find_spec("torch"):
        import torch
        torch.set_num_threads(threads)
    if tensorflow:
        import tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


TASKS = {"detect": detect, "infer": infer, "train": train, "mesh": mesh, "describe": lambda job: describe()}


def main(job_path, result_path):
    job = json.load(open(job_path))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    use_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count())), tensorflow=job["task"] == "detect")
    result = TASKS[job["task"]](job)
    with open(result_path + ".tmp", "w") as handle:
        json.dump(result, handle)
    os.replace(result_path + ".tmp", result_path)


if __name__ == "__main__":
    main(*sys.argv[1:3])
