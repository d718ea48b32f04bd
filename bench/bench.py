"""`make bench`: our speed next to what a user would pick instead, as ratios from one run.

Rows (bench/results.md explains each): the machine's single-precision GEMM ceiling through the
BLAS that libcaffe links (MKL or OpenBLAS); MTCNN face detection against the `mtcnn` package (TensorFlow);
preprocessing end to end; inference per deploy net with pycaffe and OpenCV DNN against PyTorch;
SSE-HoloNet training with `caffe train` against PyTorch; feature export and fusion search.
Every figure is the median of `repeats` timed runs after `warmup` untimed ones, with min and max.
The reference side runs in its own environment (bench/.venv-ref, see bench/reference.py); without
it those rows are skipped and reported as such.
"""

import csv
import ctypes
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from emotiw import nets
from emotiw.caffe.env import CHECKED as OPENBLAS_CHECKED, CaffeBLAS, caffe_tool, import_caffe
from emotiw.caffe.runtime import check_precision, load_net
from testmedia.scene import astronaut_head, coffee_background, paste
from emotiw.errors import UserError
from emotiw.execution import limit_threads
from emotiw.face.mtcnn import FaceDetector, overlaps
from emotiw.face.video import iter_frames, write_video
from emotiw.formats.files import atomic_write_text
from emotiw.stages import extract as features
from emotiw.stages import fuse
from bench.hd import bench_hd
from bench.mesh import bench_mesh
from tools.caffe_build import PYCAFFE_DIR, SPEED_PATCHES

REPO = Path(__file__).resolve().parents[1]
REFERENCE_SCRIPT = REPO / "bench" / "reference.py"
REFERENCE_PYTHON = REPO / "bench" / ".venv-ref" / "bin" / "python"
ROWS = ("gemm", "detect", "preprocess", "footage", "hd", "mesh", "inference", "training", "features")
# the real-footage rows: each recipe with each --detect (and sse's frontal crops), on a clip the size
# of issue 12's trailer
FOOTAGE_RUNS = (("dsn", "tracked", None), ("dsn", "every-frame", None), ("sse", "tracked", None),
                ("sse", "every-frame", None), ("sse", "tracked", "frontal"))
# (net, input size, the torchvision backbone a user would take instead, or None)
INFERENCE_NETS = (
    ("sse_holonet_3conv-s_concat", 128, None),
    ("sse_densenet121_3conv-s_concat", 128, "densenet121"),
    ("sse_resnet50_4conv-c_concat", 224, "resnet50"),
    ("dsn_vgg_face", 224, "vgg16"),
    ("dsn_resnet50", 224, "resnet50"),
    ("vgg_face", 224, "vgg16"),
)
# `caffe train` against PyTorch on the same net and losses (issue 26: HoloNet and DenseNet at batch 32)
TRAIN_NETS = ("sse_holonet_3conv-s_concat", "sse_densenet121_3conv-s_concat")
FEATURE_NET = "sse_holonet_3conv-s_concat"  # the feature export rows' net
DETECTOR = {"min_face_size": 20, "thresholds": [0.6, 0.7, 0.7], "scale_factor": 0.709}


@dataclass
class Plan:
    """Sizes of one run: --quick keeps every row but makes each small."""
    repeats: int = 5
    warmup: int = 1
    gemm_size: int = 2048
    detect_frames: int = 8
    detect_sizes: tuple = ((640, 360), (1280, 720))
    preprocess_clips: int = 4
    preprocess_frames: int = 10
    footage_size: tuple = (720, 528)
    batches: tuple = (1, 32)
    nets: tuple = tuple(name for name, _, _ in INFERENCE_NETS)
    train_batch: int = 32
    train_nets: tuple = TRAIN_NETS
    feature_images: int = 256
    fusion: tuple = (5, 383, 0.05)  # models, clips, step
    rows: tuple = ROWS
    threads: int = os.cpu_count() or 1  # for every library on both sides
    quick: bool = False
    baselines: tuple = ()  # other Caffe builds' prefixes, measured beside ours (before a change)
    precisions: tuple = ("fp32",)  # the inference rows' (bf16: pycaffe against PyTorch's bf16 autocast)


QUICK = dict(quick=True, gemm_size=1024, detect_frames=3, preprocess_clips=2, preprocess_frames=6,
             footage_size=(480, 352), batches=(1,), train_nets=TRAIN_NETS[:1],
             feature_images=64)


# ---------------------------------------------------------------------------------------------
# Timing and results

def measure(step, items, plan):
    """Items/s of `step()` per timed repeat, after plan.warmup untimed calls."""
    for _ in range(plan.warmup):
        step()
    rates = []
    for _ in range(plan.repeats):
        start = time.perf_counter()
        step()
        rates.append(items / (time.perf_counter() - start))
    return rates


@dataclass
class Results:
    rows: list = field(default_factory=list)
    ratios: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    def add(self, section, name, impl, rates, unit, **extra):
        row = {"section": section, "name": name, "impl": impl, "unit": unit,
               "median": statistics.median(rates), "min": min(rates), "max": max(rates),
               "repeats": len(rates), **extra}
        self.rows.append(row)
        print(f"  {section:10s} {name:42s} {impl:24s} {row['median']:10.3f} {unit}", file=sys.stderr, flush=True)
        return row

    def ratio(self, section, name, ours, reference, note=""):
        """ours / reference of the medians (> 1: ours is faster)."""
        if ours and reference:
            self.ratios.append({"section": section, "name": name, "ours": ours["impl"],
                                "reference": reference["impl"], "ratio": ours["median"] / reference["median"],
                                "note": note})


class Reference:
    """Runs bench/reference.py in the bench environment; None when that environment is missing."""

    def __init__(self, python, work, results):
        self.python, self.work, self.results = Path(python), Path(work), results
        self.count = 0

    @property
    def available(self):
        return self.python.is_file()

    def run(self, task, **job):
        if not self.available:
            self.results.skipped.append(f"{task} {job.get('label', '')}: no bench environment at {self.python}")
            return None
        self.count += 1
        job_path, result_path = self.work / f"job{self.count}.json", self.work / f"result{self.count}.json"
        job_path.write_text(json.dumps({"task": task, **job}))
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONWARNINGS="ignore")
        done = subprocess.run([str(self.python), str(REFERENCE_SCRIPT), str(job_path), str(result_path)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
            self.results.skipped.append(f"{task} {job.get('label', '')}: reference failed: {reason}")
            return None
        return json.loads(result_path.read_text())


# ---------------------------------------------------------------------------------------------
# 1. The machine: CPU, BLAS, GEMM ceiling

def machine_description():
    import cv2

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    blas = CaffeBLAS()
    return {"cpu": model, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "load_average_at_start": list(os.getloadavg()), "blas_library": str(blas.path),
            "blas": blas.config, "blas_core": blas.core,
            "blas_threads": blas.threads, "opencv": cv2.__version__,
            "opencv_threads": cv2.getNumThreads(), "caffe": getattr(import_caffe(), "__version__", "1.0"),
            "python": platform.python_version(), "numpy": np.__version__,
            "date": datetime.now().isoformat(timespec="seconds")}


def use_threads(threads):
    """Sets the thread count of libcaffe's BLAS (in this process and, by environment, in the Caffe tools
    and the reference side) and OpenCV; returns the machine description."""
    limit_threads(threads, keep_set=False)  # the BLAS's variables and OpenCV, as a stage's workers set them
    for name in ("OMP_NUM_THREADS", "BENCH_THREADS"):  # PyTorch's and TensorFlow's, on the reference side
        os.environ[name] = str(threads)
    CaffeBLAS().set_threads(threads)
    return machine_description()


def sgemm(blas, a, b, c):
    """c = a @ b through cblas_sgemm (row-major float32)."""
    m, k = a.shape
    n = b.shape[1]
    pointer = ctypes.POINTER(ctypes.c_float)
    blas.cblas_sgemm(101, 111, 111, m, n, k, ctypes.c_float(1.0), a.ctypes.data_as(pointer), k,
                     b.ctypes.data_as(pointer), n, ctypes.c_float(0.0), c.ctypes.data_as(pointer), n)


FMA_UNITS = 2  # 512-bit FMA units per core of the Xeons with AVX-512 we run on (Gold and Platinum)


def run_c(work, name, flags, *args):
    """The numbers bench/NAME.c prints, one per line (compiled here with cc and flags), or None
    without a C compiler."""
    compiler = shutil.which("cc")
    if compiler is None:
        return None
    binary = Path(work) / name
    subprocess.run([compiler, *flags, "-o", str(binary), str(REPO / "bench" / f"{name}.c")], check=True)
    return [float(line) for line in subprocess.run([str(binary), *args], check=True, capture_output=True,
                                                   text=True).stdout.split()]


def clock_hz(work):
    """One core's clock, measured 5 times (bench/clock.c), or None without a C compiler."""
    return run_c(work, "clock", ["-O1"])


def flops_per_cycle():
    """fp32 FLOP per cycle per core: FMA_UNITS x vector lanes x 2 (multiply and add)."""
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    return FMA_UNITS * lanes * 2


def gemm_peak(plan, results, work):
    """The computed fp32 peak of the usable cores: clock x FLOP per cycle x cores, in GFLOP/s."""
    clocks = clock_hz(work)
    if clocks is None:
        results.skipped.append("gemm peak: no C compiler (cc) to measure the clock")
        return None
    cores = min(len(os.sched_getaffinity(0)), plan.threads)
    per_cycle = flops_per_cycle()
    row = results.add("gemm", "computed peak", f"{statistics.median(clocks) / 1e9:.2f} GHz x {per_cycle} FLOP/cycle "
                      f"x {cores} cores", [hz * per_cycle * cores / 1e9 for hz in clocks], "GFLOP/s")
    return row["median"]


def fma_peak(plan, results, work):
    """The fp32 FMA throughput the cores reach under vector load (bench/fma.c: 12 independent FMA
    chains per thread), in GFLOP/s: the computed peak's check, at the clock vector code really gets."""
    cores = min(len(os.sched_getaffinity(0)), plan.threads)
    try:
        measured = run_c(work, "fma", ["-O2", "-march=native", "-pthread"], str(cores))
    except subprocess.CalledProcessError:  # a CPU without FMA: fma.c does not compile
        measured = None
    if measured is None:
        results.skipped.append("gemm: measured FMA peak (needs cc and a CPU with FMA)")
        return None
    bits, *rates = measured
    row = results.add("gemm", "measured FMA peak", f"{cores} threads x 12 chains of {bits:.0f}-bit FMAs",
                      [rate / 1e9 for rate in rates], "GFLOP/s")
    return row["median"]


def bench_gemm(plan, results, work):
    """GFLOP/s of one square SGEMM through libcaffe's BLAS, and of a Caffe InnerProduct
    forward of the same size (the same sgemm behind a Caffe layer), against the computed and the
    measured peak."""
    size = plan.gemm_size
    blas = CaffeBLAS().library
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    c = np.empty((size, size), np.float32)
    flops = 2 * size ** 3 / 1e9
    peaks = {"fraction_of_peak": gemm_peak(plan, results, work),
             "fraction_of_measured_peak": fma_peak(plan, results, work)}

    def fractions(rates):
        return {key: statistics.median(rates) / peak for key, peak in peaks.items() if peak}

    rates = measure(lambda: sgemm(blas, a, b, c), flops, plan)
    ceiling = results.add("gemm", f"sgemm {size}x{size}x{size}", "libcaffe's BLAS (ctypes)", rates, "GFLOP/s",
                          **fractions(rates))
    net = inner_product_net(size)
    net.blobs["data"].data[...] = a
    rates = measure(net.forward, flops, plan)
    results.add("gemm", f"InnerProduct {size}->{size}, batch {size}", "pycaffe", rates, "GFLOP/s", **fractions(rates))
    return ceiling["median"]


def inner_product_net(size):
    caffe = import_caffe()
    n = caffe.NetSpec()
    n.data = caffe.layers.Input(shape={"dim": [size, size]})
    n.ip = caffe.layers.InnerProduct(n.data, num_output=size, bias_term=False,
                                     weight_filler={"type": "gaussian", "std": 0.01})
    with tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False) as handle:
        handle.write(str(n.to_proto()))
    try:
        return caffe.Net(handle.name, caffe.TEST)
    finally:
        os.unlink(handle.name)


# ---------------------------------------------------------------------------------------------
# 2. Face detection

def face_scene_frames(width, height, count):
    """scikit-image's coffee photograph with the astronaut's head (a third of the height)
    moving left to right: `count` RGB frames."""
    face_height = height // 3
    face_width = round(astronaut_head().shape[1] * face_height / astronaut_head().shape[0])
    frames = []
    for x in np.linspace(width * 0.1, width * 0.9 - face_width, count).astype(int):
        frame = coffee_background(width, height)
        paste(frame, astronaut_head(), x, height // 4, face_height)
        frames.append(frame)
    return frames


def clip_frames(path, width, height, count):
    """The scene encoded as an H.264 clip and decoded back (the frames a pipeline really sees)."""
    write_video(path, face_scene_frames(width, height, count))
    return [frame.image for frame in iter_frames(path)]


def iou(box_a, box_b):
    if box_a is None or box_b is None:
        return 0.0

    return float(overlaps(np.array([box_a], float), np.array([box_b], float), "union")[0, 0])


def best_box(found):
    return found.boxes[0].tolist() if len(found) else None


def bench_detect(plan, results, reference, work):
    for width, height in plan.detect_sizes:
        name = f"{width}x{height}, {plan.detect_frames} frames"
        frames = clip_frames(work / f"detect_{width}x{height}.mp4", width, height, plan.detect_frames)
        np.savez(work / f"frames_{width}.npz", frames=np.stack(frames))
        ours, boxes = {}, {}
        for backend in ("pycaffe", "opencv"):
            detector = FaceDetector(backend=backend, **DETECTOR)
            found = []
            rates = measure(lambda: found.__setitem__(slice(None), [detector.detect(f) for f in frames]),
                            len(frames), plan)
            boxes[backend] = [best_box(f) for f in found]
            ours[backend] = results.add("detect", name, f"ours MTCNN, {backend}", rates, "frames/s",
                                        faces=[len(f) for f in found])
            batched = measure(lambda: detector.detect_batch(frames), len(frames), plan)
            ours[f"{backend} batch"] = results.add("detect", name, f"ours MTCNN, {backend}, 1 batch", batched,
                                                   "frames/s")
        ref = reference.run("detect", label=name, frames=str(work / f"frames_{width}.npz"),
                            repeats=plan.repeats, warmup=plan.warmup, **DETECTOR)
        agreement = {"pycaffe_vs_opencv": [iou(a, b) for a, b in zip(boxes["pycaffe"], boxes["opencv"])]}
        if ref:
            agreement["ours_vs_mtcnn"] = [iou(a, b) for a, b in zip(boxes["opencv"], ref["boxes"])]
            ref_row = results.add("detect", name, "mtcnn 1.0.0 (TensorFlow)", ref["rates"], "frames/s",
                                  iou_with_ours=agreement["ours_vs_mtcnn"])
            for key, row in ours.items():
                results.ratio("detect", name, row, ref_row,
                              f"box IoU with mtcnn: min {min(agreement['ours_vs_mtcnn']):.3f}")
        ours["opencv"]["iou"] = agreement


# ---------------------------------------------------------------------------------------------
# 3. Preprocessing end to end

def bench_preprocess(plan, results, work):
    """`emotiw preprocess --mode sse` as a user runs it (a fresh process, fresh output folder):
    decode, detect, track, align, write PNGs, lists."""
    videos = work / "videos" / "Happy"
    videos.mkdir(parents=True)
    for index in range(plan.preprocess_clips):
        frames = face_scene_frames(640, 360, plan.preprocess_frames + index)
        write_video(videos / f"clip{index}.mp4", frames)
    total = sum(plan.preprocess_frames + index for index in range(plan.preprocess_clips))
    for workers in (1, 2):
        outs = iter(range(10 ** 6))

        def run_once():
            out = work / f"preprocessed_{workers}_{next(outs)}"
            command = [sys.executable, "-m", "emotiw.cli", "preprocess", "--videos", str(videos.parent),
                       "--out", str(out), "--recipe", "sse", "--workers", str(workers)]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        results.add("preprocess", f"{plan.preprocess_clips} clips 640x360, {total} frames", f"{workers} worker(s)",
                    measure(run_once, total, plan), "frames/s")


def footage_coverage(manifest, reference_faces):
    """(coverage, close): of the frames where the reference finds a face, the share where the
    subject was kept, and the share where its box has IoU >= 0.9 with one of the reference's."""
    kept = {}
    with open(manifest, newline="") as handle:
        for row in csv.DictReader(handle):
            if row["detected"] == "1":
                kept[int(row["frame"])] = [float(row[name]) for name in ("x1", "y1", "x2", "y2")]
    with_face = [index for index, faces in enumerate(reference_faces) if faces]
    close = sum(max(iou(kept[index], face) for face in reference_faces[index]) >= 0.9
                for index in with_face if index in kept)
    return sum(index in kept for index in with_face) / len(with_face), close / len(with_face)


def bench_footage(plan, results, reference, work):
    """`emotiw preprocess` end to end on real footage, per --mode and --detect, in a fresh process:
    testmedia.footage.carphone_with_cuts (the carphone talking head, 4 shots, hard cuts to 4
    face-free shots of real footage). Beside it the `mtcnn` package on the same decoded frames,
    detection only, whose faces give the coverage (without the bench environment: our every-frame
    detections, which equal the package's)."""
    from testmedia import footage

    width, height = plan.footage_size
    frames, _ = footage.carphone_with_cuts(width, height)
    videos = work / "footage" / "clips"
    path = write_video(videos / "carphone_with_cuts.mp4", frames, fps=footage.FPS)
    decoded = np.stack([frame.image for frame in iter_frames(path)])
    name = f"real footage with cuts {width}x{height}, {len(decoded)} frames"
    np.savez(work / "footage.npz", frames=decoded)
    # one pass: TensorFlow runs about 3 frames/s here, and the faces of one pass are all we need
    ref = reference.run("detect", label=name, frames=str(work / "footage.npz"), repeats=1, warmup=0,
                        warmup_frames=2, **DETECTOR)
    del decoded
    ref_row = ref and results.add("footage", name, "mtcnn 1.0.0 (TensorFlow), detection only", ref["rates"],
                                  "frames/s")
    reference_faces = ref["faces"] if ref else None
    for mode, detect, align in sorted(FOOTAGE_RUNS, key=lambda run: run[1] == "tracked"):  # every-frame first
        runs = iter(range(10 ** 6))
        last = {}
        options = ["--align", align] if align else []

        def run_once():
            out = work / f"footage_{mode}_{detect}_{align}_{next(runs)}"
            command = [sys.executable, "-m", "emotiw.cli", "preprocess", "--videos", str(videos),
                       "--out", str(out), "--recipe", mode, "--detect", detect, *options]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if "out" in last:
                shutil.rmtree(last["out"])
            last["out"] = out
        rates = measure(run_once, len(frames), plan)
        if reference_faces is None and detect == "every-frame":
            reference_faces = our_faces(last["out"] / "detections.csv", len(frames))
        coverage, close = footage_coverage(last["out"] / "manifest.csv", reference_faces)
        row = results.add("footage", name, f"emotiw preprocess --recipe {mode} --detect {detect} {' '.join(options)}".strip(), rates,
                          "frames/s", coverage=coverage, close_boxes=close,
                          reference="mtcnn" if ref else "our every-frame MTCNN")
        results.ratio("footage", name, row, ref_row,
                      f"coverage {100 * coverage:.1f} %, box IoU >= 0.9 in {100 * close:.1f} %")


def our_faces(detections, frames):
    faces = [[] for _ in range(frames)]
    with open(detections, newline="") as handle:
        for row in csv.DictReader(handle):
            faces[int(row["frame"])].append([float(row[name]) for name in ("x1", "y1", "x2", "y2")])
    return faces


# ---------------------------------------------------------------------------------------------
# 4. Inference

def forward_flops(net_param, shapes):
    """Multiply-adds x 2 of the Convolution, Deconvolution and InnerProduct layers for one image."""
    macs = 0
    for layer in net_param.layer:
        params = shapes.params.get(layer.name) or []
        if not params:
            continue
        if layer.type in ("Convolution", "InnerProduct"):
            output = shapes.blobs[layer.top[0]]
            macs += math.prod(output[1:]) * math.prod(params[0][1:])
        elif layer.type == "Deconvolution":
            bottom = shapes.blobs[layer.bottom[0]]
            macs += math.prod(bottom[1:]) * math.prod(params[0][1:])
    return 2 * macs


def write_deploy(name, work):
    """The registry's deploy net, its JSON for the reference side, and seeded filler weights in a
    caffemodel (BatchNorm statistics set to mean 0, variance 1, as trained nets have)."""
    from google.protobuf import json_format, text_format

    caffe = import_caffe()
    net_param = nets.build(name, "deploy")
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    deploy, weights = folder / "deploy.prototxt", folder / "weights.caffemodel"
    deploy.write_text(text_format.MessageToString(net_param))
    (folder / "deploy.json").write_text(json.dumps(json_format.MessageToDict(net_param, preserving_proto_field_name=True)))
    caffe.set_random_seed(0)
    net = caffe.Net(str(deploy), caffe.TEST)
    for layer_name, layer in zip(net._layer_names, net.layers):
        if layer.type == "BatchNorm":
            for blob, value in zip(layer.blobs, (0.0, 1.0, 1.0)):
                blob.data[...] = value
    net.save(str(weights))
    return net_param, deploy, weights


def baseline_name(prefix):
    """What a baseline build is, from its emotiw-build.json: which of our speed patches it has, its BLAS."""
    build = json.loads((Path(prefix) / "emotiw-build.json").read_text())
    speed = [patch[:4] for patch in SPEED_PATCHES if patch in build["patches"]]
    blas = "MKL" if "-DBLAS=MKL" in build["cmake_flags"] else "OpenBLAS"
    return f"{'with ' + ' + '.join(speed) if speed else 'BVLC CPU layers'}, {blas} ({Path(prefix).name})"


def baseline_env(prefix):
    """The environment that runs the build at prefix: its pycaffe first on PYTHONPATH, and the OpenBLAS
    kernels its own library needs (asked under that pycaffe: ours may be MKL and have chosen none)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(prefix) / PYCAFFE_DIR), str(REPO)]))
    env.pop(OPENBLAS_CHECKED, None)
    done = subprocess.run([sys.executable, "-m", "emotiw.caffe.env", "openblas-coretype"], env=env, cwd=REPO,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"the baseline Caffe at {prefix} does not load: {done.stderr.strip().splitlines()[-1:]}")
    if done.stdout.strip():
        env["OPENBLAS_CORETYPE"] = done.stdout.strip()
    return env


def run_apart(env, plan, deploy, weights, batch, size):
    """bench/baseline.py's answer for the net, run by pycaffe in a process of its own with env:
    {"caffe": pycaffe's path, "blas", "rates": images/s, "peak_rss_mb"}."""
    job = {"deploy": str(deploy), "weights": str(weights), "batch": batch, "size": size, "fold": True,
           "repeats": plan.repeats, "warmup": plan.warmup}
    done = subprocess.run([sys.executable, "-m", "bench.baseline", json.dumps(job)], env=env,
                          cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"pycaffe failed in a process of its own: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def baseline_rates(prefix, plan, deploy, weights, batch, size):
    """(pycaffe images/s, its BLAS) of a baseline build."""
    answer = run_apart(baseline_env(prefix), plan, deploy, weights, batch, size)
    if not Path(answer["caffe"]).resolve().is_relative_to(Path(prefix).resolve()):
        raise UserError(f"--baseline-caffe {prefix}: the baseline ran {answer['caffe']} instead")
    return answer["rates"], answer["blas"]


def runtime_forward(backend, deploy, weights, batch, size, fold=True, precision="fp32"):
    """One forward of the net through emotiw's inference runtime, as `emotiw test` runs it."""
    net, _ = load_net(deploy, weights, backend, fold=fold, precision=precision)
    images = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    return lambda: net.forward(images, ["prob"])


def bench_memory(plan, results, label, deploy, weights, batch, size):
    """Peak resident memory of a process that loads the net and runs it (one timed pass), with
    oneDNN's convolutions (the default) and with Caffe's own (CAFFE_DNNL=0): issue 26 asks for no more
    than the latter."""
    once = Plan(repeats=1, warmup=1)
    for impl, switch in (("pycaffe, oneDNN convolutions", "1"), ("pycaffe, CAFFE_DNNL=0", "0")):
        answer = run_apart(dict(os.environ, CAFFE_DNNL=switch), once, deploy, weights, batch, size)
        results.add("memory", label, impl, [answer["peak_rss_mb"]], "MB")


def bench_inference(plan, results, reference, work, ceiling):
    for name, size, backbone in INFERENCE_NETS:
        if name not in plan.nets:
            continue
        net_param, deploy, weights = write_deploy(name, work)
        flops = forward_flops(net_param, nets.shapes(name))
        for batch, precision in ((batch, precision) for precision in plan.precisions for batch in plan.batches):
            label = f"{name} {size}px, batch {batch}" + ("" if precision == "fp32" else f", {precision}")
            extra = {"gflop_per_image": flops / 1e9}
            rows = {}
            # BatchNorm and Scale folded into the convolutions (the default) and, before that change, not
            runners = [("pycaffe", "pycaffe", True), ("OpenCV DNN", "opencv", True)]
            if any(layer.type == "BatchNorm" for layer in net_param.layer):
                runners.insert(1, ("pycaffe, BatchNorm not folded", "pycaffe", False))
            if precision != "fp32":
                runners = runners[:1]  # pycaffe's oneDNN engine only
            for impl, backend, fold in runners:
                rates = measure(runtime_forward(backend, deploy, weights, batch, size, fold, precision), batch, plan)
                fraction = statistics.median(rates) * flops / 1e9 / ceiling if ceiling else None
                row = results.add("inference", label, impl, rates, "images/s", **extra,
                                  fraction_of_gemm_ceiling=fraction)
                if fold:  # the ratios compare what emotiw runs
                    rows[impl] = row
            if batch == max(plan.batches) and precision == "fp32":
                bench_memory(plan, results, label, deploy, weights, batch, size)
            for prefix in plan.baselines if precision == "fp32" else ():
                rates, blas = baseline_rates(prefix, plan, deploy, weights, batch, size)
                results.add("inference", label, f"pycaffe, {baseline_name(prefix)}", rates, "images/s",
                            **extra, blas=blas)
            references = [("PyTorch, same net", {"net": str(deploy.with_suffix(".json"))})]
            if backbone:
                references.append((f"PyTorch torchvision {backbone}", {"torchvision": backbone, "classes": 7}))
            for impl, job in references:
                ref = reference.run("infer", label=label, batch=batch, size=size, repeats=plan.repeats,
                                    warmup=plan.warmup, precision=precision, **job)
                if ref:
                    ref_row = results.add("inference", label, impl, ref["rates"], "images/s")
                    results.ratio("inference", label, max(rows.values(), key=lambda r: r["median"]), ref_row)


# ---------------------------------------------------------------------------------------------
# 5. Training

def dummy_train_net(name, batch, size):
    """The net's TRAIN phase with its Data layer replaced by DummyData (random images, labels 0..6
    drawn once), so both sides train on the same shapes without a dataset."""

    caffe_pb2 = import_caffe().proto.caffe_pb2
    source = nets.build(name, "train_val")
    net = caffe_pb2.NetParameter(name=source.name)
    for layer in source.layer:
        if any(rule.phase == caffe_pb2.TEST for rule in layer.include) or layer.type == "Accuracy":
            continue
        if layer.type in ("Data", "ImageData"):
            dummy = net.layer.add(name=layer.name, type="DummyData", top=list(layer.top))
            dummy.dummy_data_param.shape.add(dim=[batch, 3, size, size])
            dummy.dummy_data_param.shape.add(dim=[batch])
            dummy.dummy_data_param.data_filler.add(type="gaussian", std=50)
            dummy.dummy_data_param.data_filler.add(type="constant", value=3)
            continue
        copy = net.layer.add()
        copy.CopyFrom(layer)
        del copy.include[:]
    return net


SOLVER = {"base_lr": 0.001, "momentum": 0.9, "weight_decay": 0.0002}
# "I20261123 02:05:44.973817 ... Iteration 1 (1.2 iter/s, 0.84s/1 iters), loss = 9.9": the line after
# each training step (the final "Iteration N, loss" follows a forward pass only, so it is not matched)
ITERATION_LINE = re.compile(r"^I\d+ (\d\d):(\d\d):(\d\d\.\d+) .*Iteration (\d+) \(.*\), loss = ")


def caffe_train_rates(solver_path, batch, plan, binary=None, env=None):
    """images/s of each `caffe train` iteration, from glog's timestamps of the per-iteration
    display lines (display: 1), the first `warmup` iterations left out; `binary` and `env`: another
    build's caffe and the environment it runs in (default ours)."""

    env = dict(env or os.environ, GLOG_logtostderr="1", GLOG_minloglevel="0")
    done = subprocess.run([binary or caffe_tool("caffe"), "train", "--solver", str(solver_path)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise UserError(f"caffe train failed in the bench: {done.stderr.strip().splitlines()[-1:]}")
    stamps = [int(h) * 3600 + int(m) * 60 + float(s) for line in done.stderr.splitlines()
              for h, m, s, _ in ITERATION_LINE.findall(line)]
    steps = np.diff(stamps) % 86400  # a run across midnight
    return [batch / step for step in steps[plan.warmup:]]


def write_training(folder, net, iterations, mode="CPU"):
    """train.prototxt, train.json (for the reference side) and a SOLVER solver.prototxt of `iterations`
    displayed iterations in `mode` (CPU, or GPU on device 0) in `folder`; returns the solver's path."""
    from google.protobuf import json_format, text_format

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.prototxt").write_text(text_format.MessageToString(net))
    (folder / "train.json").write_text(json.dumps(json_format.MessageToDict(net, preserving_proto_field_name=True)))
    lines = [*(f"{key}: {value}" for key, value in SOLVER.items()), f'net: "{folder / "train.prototxt"}"',
             'lr_policy: "fixed"', "display: 1", f"max_iter: {iterations}", "snapshot_after_train: false",
             f"solver_mode: {mode}", *(["device_id: 0"] if mode == "GPU" else []), "random_seed: 0"]
    solver = folder / "solver.prototxt"
    solver.write_text("\n".join(lines) + "\n")
    return solver


def bench_training(plan, results, reference, work):
    for name in plan.train_nets:
        bench_training_net(name, plan, results, reference, work)


def bench_training_net(name, plan, results, reference, work):
    size, batch = nets.get(name).preprocessing.input_size, plan.train_batch
    folder = work / "train" / name
    solver = write_training(folder, dummy_train_net(name, batch, size), plan.warmup + plan.repeats + 1)
    label = f"{name} {size}px, batch {batch}"
    ours = results.add("training", label, "caffe train", caffe_train_rates(solver, batch, plan), "images/s")
    for prefix in plan.baselines:
        results.add("training", label, f"caffe train, {baseline_name(prefix)}",
                    caffe_train_rates(solver, batch, plan, str(Path(prefix) / "bin" / "caffe"), baseline_env(prefix)),
                    "images/s")
    ref = reference.run("train", label=label, net=str(folder / "train.json"), batch=batch, size=size,
                        solver=SOLVER, repeats=plan.repeats, warmup=plan.warmup)
    if ref:
        results.ratio("training", label, ours, results.add("training", label, "PyTorch, same net and losses",
                                                           ref["rates"], "images/s"))


# ---------------------------------------------------------------------------------------------
# 6. Feature export and fusion

def feature_setup(plan, work):
    """HoloNet's test net reading a list of face crops (mean values instead of the absent mean
    file), seeded weights and the list."""
    import cv2
    from google.protobuf import text_format

    _, _, weights = write_deploy(FEATURE_NET, work)
    folder = work / FEATURE_NET
    test = nets.build(FEATURE_NET, "test")
    for layer in test.layer:
        if layer.type == "ImageData":
            layer.transform_param.ClearField("mean_file")
            layer.transform_param.mean_value.extend([104.0, 117.0, 123.0])
    test_file = folder / "test.prototxt"
    test_file.write_text(text_format.MessageToString(test))
    faces = work / "faces"
    faces.mkdir()
    frames = face_scene_frames(640, 360, plan.feature_images)
    lines = []
    for index, frame in enumerate(frames):
        path = faces / f"{index:05d}.png"
        cv2.imwrite(str(path), cv2.resize(frame[90:210, 60 + index % 200:180 + index % 200], (128, 128)))
        lines.append(f"{path} {index % 7}\n")
    frame_list = work / "frames.txt"
    frame_list.write_text("".join(lines))
    return test_file, weights, frame_list


def bench_features(plan, results, work):
    test_file, weights, frame_list = feature_setup(plan, work)
    runs = iter(range(10 ** 6))
    out = {}

    def extract_once():
        out["dir"] = work / f"extract_{next(runs)}"
        features.extract(str(test_file), str(weights), out["dir"], blob="prob", frame_list=frame_list, batch=64)
    label = f"{FEATURE_NET}, {plan.feature_images} images, blob prob"
    results.add("features", label, "extract_features + leveldb2mat", measure(extract_once, plan.feature_images, plan),
                "images/s")
    store, batches = out["dir"] / "prob_leveldb", math.ceil(plan.feature_images / 64)
    results.add("features", label, "leveldb2mat alone", measure(
        lambda: features.leveldb2mat(store, batches, 64, None, work / "alone.mat", num_images=plan.feature_images),
        plan.feature_images, plan), "images/s")
    models, clips, step = plan.fusion
    rng = np.random.default_rng(0)
    stack = rng.dirichlet(np.ones(7), size=(models, clips))
    labels = rng.integers(0, 7, clips)
    searches = measure(lambda: fuse.search_weights(stack, labels, step), 1, plan)
    results.add("features", f"fusion weight search, {models} models x {clips} clips, step {step}",
                "emotiw.stages.fuse.search_weights", [1 / rate for rate in searches], "s (lower is better)")
    bench_descriptors(plan, results, work)


def bench_descriptors(plan, results, work):
    """openSMILE functionals of a spoken clip (espeak-ng, decoded by PyAV) and LBP-TOP of a face
    volume: the audio and hand-crafted models' inputs."""
    import shutil

    from emotiw.descriptors.audio import AudioDescriptor
    from emotiw.descriptors.lbptop import lbp_top

    if shutil.which("espeak-ng") is None:
        results.skipped.append("features audio: espeak-ng is not installed (make install adds it)")
    else:
        speech = work / "speech.wav"
        subprocess.run(["espeak-ng", "-w", str(speech), "I did not expect to see you here, what a surprise."],
                       check=True)
        for feature_set in ("eGeMAPSv02", "ComParE_2016"):
            describe = AudioDescriptor(feature_set)
            results.add("features", f"audio functionals, 1 spoken clip ({feature_set}, {len(describe.names)} values)",
                        "PyAV + opensmile", measure(lambda: describe(speech), 1, plan), "clips/s")
    frames = 16 if plan.quick else 64
    volume = np.random.default_rng(0).integers(0, 256, (frames, 64, 64), dtype=np.uint8)
    results.add("features", f"LBP-TOP, {frames} frames of 64x64, 4x4 blocks", "skimage local_binary_pattern",
                measure(lambda: lbp_top(volume), frames, plan), "frames/s")


# ---------------------------------------------------------------------------------------------
# Report

def fmt(value):
    return "-" if value is None else f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def markdown(report):
    machine = report["machine"]
    lines = ["# emotiw bench results", "",
             f"Written by `emotiw bench{' --quick' if report['quick'] else ''}` on {machine['date']} "
             f"in {report['elapsed_s']:.0f} s. Every figure: median of {report['plan']['repeats']} timed runs "
             f"after {report['plan']['warmup']} warm-up run(s), with min and max. Ratios: ours / reference "
             "medians from this run (> 1: ours is faster).", "",
             "## Machine", "",
             f"- CPU: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable)",
             f"- BLAS (libcaffe's): {machine['blas_library']}: {machine['blas']} core {machine['blas_core']}, "
             f"{machine['blas_threads']} threads; OpenCV {machine['opencv']} with {machine['opencv_threads']} threads",
             f"- load average at start {machine['load_average_at_start']}, at end {machine['load_average_at_end']}"
             + (" - **taken under load**: other jobs shared the cores" if report["under_load"] else ""),
             f"- reference environment: {json.dumps(report.get('reference_env') or 'absent')}", ""]
    if report["ratios"]:
        lines += ["## Headline ratios (ours / reference)", "", "| row | case | ours | reference | ratio | note |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['section']} | {r['name']} | {r['ours']} | {r['reference']} | **{r['ratio']:.2f}** | {r['note']} |"
                  for r in report["ratios"]]
        lines.append("")
    lines += ["## All rows", "", "| row | case | implementation | median | min | max | unit | notes |",
              "|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        notes = []
        if row.get("gflop_per_image") is not None:
            notes.append(f"{row['gflop_per_image']:.2f} GFLOP/image")
        if row.get("fraction_of_peak") is not None:
            notes.append(f"{100 * row['fraction_of_peak']:.0f}% of the computed peak")
        if row.get("fraction_of_measured_peak") is not None:
            notes.append(f"{100 * row['fraction_of_measured_peak']:.0f}% of the measured FMA peak")
        if row.get("fraction_of_gemm_ceiling") is not None:
            notes.append(f"{100 * row['fraction_of_gemm_ceiling']:.0f}% of GEMM ceiling")
        if row.get("coverage") is not None:
            notes.append(f"coverage {100 * row['coverage']:.1f} %, box IoU >= 0.9 in {100 * row['close_boxes']:.1f} % "
                         f"(of the frames where {row['reference']} finds a face)")
        if row.get("iou_with_ours"):
            notes.append(f"box IoU with ours: mean {np.mean(row['iou_with_ours']):.3f}, min {min(row['iou_with_ours']):.3f}")
        lines.append(f"| {row['section']} | {row['name']} | {row['impl']} | {fmt(row['median'])} | {fmt(row['min'])} "
                     f"| {fmt(row['max'])} | {row['unit']} | {'; '.join(notes)} |")
    if report["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {reason}" for reason in report["skipped"]]
    return "\n".join(lines) + "\n"


def run_bench(plan, out, reference_python=REFERENCE_PYTHON):
    started = time.monotonic()
    results = Results()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".bench-work-", dir=out) as tmp:  # nothing written outside out
        work = Path(tmp)
        reference = Reference(reference_python, work, results)
        machine = use_threads(plan.threads)
        print(f"emotiw bench: {machine['cpu']}, {machine['cores']} cores; reference environment "
              f"{'found' if reference.available else 'absent'}", file=sys.stderr)
        reference_env = reference.run("describe") if reference.available else None
        ceiling = bench_gemm(plan, results, work) if "gemm" in plan.rows else None
        if "detect" in plan.rows:
            bench_detect(plan, results, reference, work)
        if "preprocess" in plan.rows:
            bench_preprocess(plan, results, work)
        if "footage" in plan.rows:
            bench_footage(plan, results, reference, work)
        if "hd" in plan.rows:
            bench_hd(plan, results, reference, work, measure, footage_coverage, our_faces, DETECTOR)
        if "mesh" in plan.rows:
            bench_mesh(plan, results, reference, work, measure)
        if "inference" in plan.rows:
            bench_inference(plan, results, reference, work, ceiling)
        if "training" in plan.rows:
            bench_training(plan, results, reference, work)
        if "features" in plan.rows:
            bench_features(plan, results, work)
    machine["load_average_at_end"] = list(os.getloadavg())
    busiest = max(machine["load_average_at_start"][0], machine["load_average_at_end"][0])
    report = {"machine": machine, "quick": plan.quick, "plan": plan.__dict__, "gemm_ceiling_gflops": ceiling,
              "reference_env": reference_env, "elapsed_s": time.monotonic() - started,
              "under_load": busiest > machine["usable_cores"] * 0.75 + 1, "rows": results.rows,
              "ratios": results.ratios, "skipped": results.skipped}
    atomic_write_text(out / "results.json", json.dumps(report, indent=1, default=list) + "\n")
    atomic_write_text(out / "results.md", markdown(report))
    return report


# ---------------------------------------------------------------------------------------------
# CLI

def register(subparsers):
    parser = subparsers.add_parser("bench", help="measure our speed against the reference implementations",
                                   description="Benchmarks every stage against PyTorch / the mtcnn package "
                                               "(bench/.venv-ref) and writes results.md and results.json.")
    parser.add_argument("--quick", action="store_true", help="small sizes: batch 1 only, fewer frames and images")
    parser.add_argument("--out", default=str(REPO / "bench"), help="folder for results.md/json (default: bench/)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--nets", help="comma-separated inference nets (default: all six)")
    parser.add_argument("--train-nets", help="comma-separated training nets (default: "
                                             f"{','.join(TRAIN_NETS)}; --quick: the first)")
    parser.add_argument("--batches", help="comma-separated inference batch sizes (default 1,32; --quick: 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure (at least 5)")
    parser.add_argument("--reference-python", default=str(REFERENCE_PYTHON),
                        help="Python of the bench environment (default: bench/.venv-ref/bin/python)")
    parser.add_argument("--baseline-caffe", metavar="PREFIX", action="append", default=[],
                        help="another Caffe build (a ~/.cache/emotiw/caffe-<key> folder, e.g. without our "
                             "convolution patch, or with the other BLAS), measured beside ours in the inference "
                             "and training rows; give it again for more builds")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="threads for BLAS, OpenCV, PyTorch and TensorFlow (default: all cores)")
    parser.add_argument("--precision", default="fp32",
                        help="comma-separated inference precisions, fp32 (default) and bf16 (pycaffe's oneDNN "
                             "convolutions against PyTorch's bf16 autocast; CPUs with AVX512-BF16 or AMX)")
    parser.set_defaults(func=run)


def plan_from(args):
    plan = Plan(**QUICK) if args.quick else Plan()
    rows = tuple(row.strip() for row in args.rows.split(",") if row.strip())
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise UserError(f"unknown --rows {', '.join(unknown)}; choose from {','.join(ROWS)}")
    plan.rows = rows
    if args.nets:
        plan.nets = tuple(args.nets.split(","))
        known = {name for name, _, _ in INFERENCE_NETS}
        if not set(plan.nets) <= known:
            raise UserError(f"--nets: unknown {', '.join(sorted(set(plan.nets) - known))}; choose from {', '.join(sorted(known))}")
    if args.train_nets:
        plan.train_nets = tuple(args.train_nets.split(","))
        if not set(plan.train_nets) <= set(nets.names()):
            raise UserError(f"--train-nets: unknown {', '.join(sorted(set(plan.train_nets) - set(nets.names())))}; "
                            f"choose from {', '.join(nets.names())}")
    if args.batches:
        try:
            plan.batches = tuple(int(b) for b in args.batches.split(","))
        except ValueError:
            raise UserError(f"--batches {args.batches}: give whole numbers like 1,32") from None
    if args.repeats < 5:
        raise UserError(f"--repeats {args.repeats}: every figure needs at least 5 repeats")
    plan.repeats = args.repeats
    if args.threads < 1:
        raise UserError(f"--threads {args.threads}: must be at least 1")
    plan.threads = args.threads
    plan.precisions = tuple(dict.fromkeys(part.strip() for part in args.precision.split(",") if part.strip()))
    for precision in plan.precisions:
        check_precision(precision)
    for prefix in args.baseline_caffe:
        if not (Path(prefix) / "emotiw-build.json").is_file():
            raise UserError(f"--baseline-caffe {prefix}: not a Caffe build of tools/caffe_build.py "
                            "(no emotiw-build.json); give a ~/.cache/emotiw/caffe-<key> folder")
    plan.baselines = tuple(str(Path(prefix).resolve()) for prefix in args.baseline_caffe)
    return plan


def run(args):
    report = run_bench(plan_from(args), args.out, args.reference_python)
    print(f"emotiw bench: wrote {Path(args.out) / 'results.md'} ({len(report['rows'])} rows, "
          f"{len(report['skipped'])} skipped) in {report['elapsed_s']:.0f} s", file=sys.stderr)
    return 0


def main(argv=None):
    """`make bench ARGS=...`: python -m bench.bench [--quick] [--rows ...] ..."""
    import argparse

    parser = argparse.ArgumentParser(prog="make bench ARGS=", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command")
    register(subparsers)
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except UserError as error:
        print(f"emotiw bench: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
