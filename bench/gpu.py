"""GPU rows (issue 27), for scripts/gpu_check.sh on a machine with an NVIDIA GPU and a CUDA build of
Caffe linked into the venv: HoloNet, SSE-DenseNet-121, DSN-ResNet-50 and VGG-Face, inference at batch
1 and 64 and `caffe train` at batch 32 and 64 (images/s), each with cuDNN, without it (the same build,
every layer's `engine: CAFFE`) and, where the reference Python has PyTorch with CUDA, PyTorch eager
fp32 with cuDNN on the same net (bench/reference.py, TF32 off on both sides), with each run's peak
GPU memory (nvidia-smi, less what was in use before it).

    python -m bench.gpu OUT [--reference-python PY] [--repeats N]

Writes OUT/gpu.json and OUT/gpu.md.
"""

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from bench.bench import (REFERENCE_PYTHON, SOLVER, Reference, caffe_train_rates, dummy_train_net, write_deploy,
                         write_training)
from emotiw import nets

GPU_NETS = ("sse_holonet_3conv-s_concat", "sse_densenet121_3conv-s_concat", "dsn_resnet50", "vgg_face")
INFER_BATCHES = (1, 64)
TRAIN_BATCHES = (32, 64)
# the layers with a cuDNN engine, and the field that holds it (CAFFE is 1 in every engine enum)
ENGINE_FIELDS = {"Convolution": "convolution_param", "Deconvolution": "convolution_param",
                 "Pooling": "pooling_param", "ReLU": "relu_param", "Sigmoid": "sigmoid_param",
                 "TanH": "tanh_param", "Softmax": "softmax_param", "SoftmaxWithLoss": "softmax_param",
                 "LRN": "lrn_param"}
CAFFE_ENGINE = 1


def without_cudnn(net_param):
    """A copy of the net whose every layer runs Caffe's own kernels (`engine: CAFFE`)."""
    copy = type(net_param)()
    copy.CopyFrom(net_param)
    for layer in copy.layer:
        if layer.type in ENGINE_FIELDS:
            getattr(layer, ENGINE_FIELDS[layer.type]).engine = CAFFE_ENGINE
    return copy


class PeakMemory:
    """The most GPU memory in use (MiB, nvidia-smi every 20 ms) while the block runs, less the
    amount before it."""

    def __enter__(self):
        self.before, self.peak, self.running = self.used(), 0, True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *_):
        self.running = False
        self.thread.join()

    @property
    def mib(self):
        return max(0, self.peak - self.before)

    @staticmethod
    def used():
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, check=True).stdout
        return int(out.split()[0])

    def sample(self):
        while self.running:
            self.peak = max(self.peak, self.used())
            time.sleep(0.02)


def infer_once(job):
    """In a process of its own (so that its memory is its own): pycaffe forward on GPU 0."""
    from emotiw.caffe.env import import_caffe

    caffe = import_caffe()
    caffe.set_device(0)
    caffe.set_mode_gpu()
    net = caffe.Net(job["deploy"], job["weights"], caffe.TEST)
    net.blobs["data"].reshape(job["batch"], 3, job["size"], job["size"])
    net.reshape()
    net.blobs["data"].data[...] = 1.0
    output = net.outputs[0]
    rates = []
    for number in range(job["warmup"] + job["repeats"]):
        start = time.perf_counter()
        net.forward()
        net.blobs[output].data.sum()  # the copy back waits for the GPU
        if number >= job["warmup"]:
            rates.append(job["batch"] / (time.perf_counter() - start))
    return rates


def run_infer(job):
    with PeakMemory() as memory:
        done = subprocess.run([sys.executable, "-m", "bench.gpu", "--infer-job", json.dumps(job)],
                              capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"pycaffe on the GPU failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), memory.mib


def run_train(net_param, folder, batch, repeats, warmup):
    solver = write_training(folder, net_param, warmup + repeats + 1, mode="GPU")
    with PeakMemory() as memory:
        rates = caffe_train_rates(solver, batch, SimpleNamespace(warmup=warmup))
    return rates, memory.mib


def bench_gpu(out, reference_python, repeats, warmup):
    from google.protobuf import text_format

    reference = Reference(reference_python, out, SimpleNamespace(skipped=[]))
    rows = []

    def add(net, task, batch, impl, rates, mib):
        rows.append({"net": net, "task": task, "batch": batch, "impl": impl, "median": statistics.median(rates),
                     "rates": rates, "peak_mib": mib})
        print(f"{net:34} {task:9} batch {batch:3} {impl:26} {rows[-1]['median']:9.1f} images/s {mib:7} MiB",
              flush=True)

    for name in GPU_NETS:
        size = nets.get(name).preprocessing.input_size
        net_param, deploy, weights = write_deploy(name, out)
        plain = deploy.with_name("deploy-caffe-engine.prototxt")
        plain.write_text(text_format.MessageToString(without_cudnn(net_param)))
        for batch in INFER_BATCHES:
            for impl, path in (("caffe, cuDNN", deploy), ("caffe, no cuDNN", plain)):
                job = {"deploy": str(path), "weights": str(weights), "batch": batch, "size": size,
                       "repeats": repeats, "warmup": warmup}
                add(name, "inference", batch, impl, *run_infer(job))
            ref = reference.run("infer", label=f"{name} {batch}", net=str(deploy.with_suffix(".json")), batch=batch,
                                size=size, repeats=repeats, warmup=warmup, device="cuda")
            if ref:
                add(name, "inference", batch, "PyTorch eager fp32, cuDNN", ref["rates"], ref["peak_mib"])
        for batch in TRAIN_BATCHES:
            train = dummy_train_net(name, batch, size)
            for impl, param in (("caffe train, cuDNN", train), ("caffe train, no cuDNN", without_cudnn(train))):
                folder = out / name / f"train-{batch}-{'plain' if 'no' in impl else 'cudnn'}"
                add(name, "training", batch, impl, *run_train(param, folder, batch, repeats, warmup))
            ref = reference.run("train", label=f"{name} {batch}", batch=batch, size=size,
                                net=str(out / name / f"train-{batch}-cudnn" / "train.json"), solver=SOLVER,
                                repeats=repeats, warmup=warmup, device="cuda")
            if ref:
                add(name, "training", batch, "PyTorch eager fp32, cuDNN", ref["rates"], ref["peak_mib"])
    (out / "gpu.json").write_text(json.dumps({"rows": rows, "skipped": reference.results.skipped}, indent=1))
    (out / "gpu.md").write_text(markdown(rows, reference.results.skipped))


def markdown(rows, skipped):
    lines = ["| net | task | batch | implementation | images/s | vs PyTorch | peak GPU MiB |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        torch = next((other["median"] for other in rows if other["impl"].startswith("PyTorch") and
                      (other["net"], other["task"], other["batch"]) == (row["net"], row["task"], row["batch"])), None)
        ratio = f"{row['median'] / torch:.2f}x" if torch else ""
        lines.append(f"| {row['net']} | {row['task']} | {row['batch']} | {row['impl']} | {row['median']:.1f} | "
                     f"{ratio} | {row['peak_mib']} |")
    return "\n".join(lines + [""] + [f"- skipped: {line}" for line in skipped]) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path)
    parser.add_argument("--reference-python", default=str(REFERENCE_PYTHON),
                        help="a Python with PyTorch built for CUDA (default: the bench environment's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--infer-job", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.infer_job:
        print(json.dumps(infer_once(json.loads(args.infer_job))))
        return 0
    if args.out is None:
        parser.error("give the output folder")
    args.out.mkdir(parents=True, exist_ok=True)
    bench_gpu(args.out.resolve(), args.reference_python, args.repeats, args.warmup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
