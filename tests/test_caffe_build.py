"""The installer's checks: checksums, offline sources, cache keys and the installed layout."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools import caffe_build
from tools.caffe_build import InstallError

REPO = Path(__file__).resolve().parent.parent


def test_checksum_mismatch_names_both_hashes(tmp_path):
    bogus = tmp_path / caffe_build.ORIG_TARBALL
    bogus.write_bytes(b"not the caffe source")
    expected = caffe_build.SOURCE_SHA256[caffe_build.ORIG_TARBALL]
    with pytest.raises(InstallError) as error:
        caffe_build.verify(bogus, expected)
    message = str(error.value)
    assert expected in message and hashlib.sha256(b"not the caffe source").hexdigest() in message


def test_caffe_src_without_the_debian_tarball_says_what_is_missing(tmp_path, monkeypatch):
    orig = tmp_path / caffe_build.ORIG_TARBALL
    orig.write_bytes(b"x")
    monkeypatch.setenv("CAFFE_SRC", str(orig))
    with pytest.raises(InstallError, match=caffe_build.DEBIAN_TARBALL.replace("+", r"\+")):
        caffe_build.source_tarballs()


def test_caffe_src_with_wrong_contents_stops_on_checksum(tmp_path, monkeypatch):
    for name in (caffe_build.ORIG_TARBALL, caffe_build.DEBIAN_TARBALL):
        (tmp_path / name).write_bytes(b"tampered")
    monkeypatch.setenv("CAFFE_SRC", str(tmp_path / caffe_build.ORIG_TARBALL))
    with pytest.raises(InstallError, match="checksum mismatch"):
        caffe_build.source_tarballs()


def test_cache_key_depends_on_patches_flags_and_numpy(tmp_path, monkeypatch):
    orig, debian = tmp_path / "orig", tmp_path / "debian"
    orig.write_bytes(b"a")
    debian.write_bytes(b"b")
    info = {"python": "3.11.7", "numpy": "2.4.6"}
    base = caffe_build.build_key(orig, debian, info, ["-DCPU_ONLY=ON"])
    assert base == caffe_build.build_key(orig, debian, info, ["-DCPU_ONLY=ON"])
    assert base != caffe_build.build_key(orig, debian, info, ["-DCPU_ONLY=OFF"])
    assert base != caffe_build.build_key(orig, debian, dict(info, numpy="2.4.7"), ["-DCPU_ONLY=ON"])
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "series").write_text("0001.patch\n")
    (patches / "0001.patch").write_text("--- a/x\n+++ b/x\n")
    monkeypatch.setattr(caffe_build, "PATCH_DIR", patches)
    assert base != caffe_build.build_key(orig, debian, info, ["-DCPU_ONLY=ON"])


def test_our_patches_apply_cleanly_and_are_explained():
    readme = (REPO / "caffe_patches" / "README.md").read_text()
    for patch in caffe_build.our_patches():
        assert patch.exists()
        assert patch.name in readme
        assert patch.read_text().startswith("diff --git") or patch.read_text().startswith("---")


def test_gpu_build_is_explicit_or_needs_a_driver(monkeypatch):
    monkeypatch.setenv("CAFFE_GPU", "1")
    assert caffe_build.use_gpu()
    monkeypatch.setenv("CAFFE_GPU", "0")
    assert not caffe_build.use_gpu()
    info = {"include": "/inc", "libdir": "/lib", "ldlibrary": "libpython3.so"}
    cuda = ["-DCUDA_TOOLKIT_ROOT_DIR=/opt/cuda-13", "-DCUDA_cublas_LIBRARY=/w/libcublas.so.13"]
    gpu_flags = caffe_build.cmake_flags(info, gpu=True, cuda=cuda)
    assert "-DCPU_ONLY=OFF" in gpu_flags and "-DUSE_NCCL=ON" in gpu_flags  # multi-GPU `caffe train --gpu`
    assert set(cuda) <= set(gpu_flags)
    assert any("CUDA_ARCH_BIN" in f and "80" in f and "90" in f for f in gpu_flags)
    cpu_flags = caffe_build.cmake_flags(info, gpu=False)
    assert "-DCPU_ONLY=ON" in cpu_flags and "-DUSE_NCCL=OFF" in cpu_flags
    assert not any("CUDA" in flag for flag in cpu_flags) and "-DUSE_DNNL=ON" in cpu_flags
    assert not any("DNNL" in flag for flag in gpu_flags)


def test_gpu_builds_take_the_same_make_install():
    assert "\t$(PYTHON) tools/caffe_build.py install\n" in (REPO / "Makefile").read_text()
    # the CUDA build of this cache (if one was made) has NCCL and the flags above
    for build in caffe_build.cache_root().glob("caffe-*/emotiw-build.json"):
        info = json.loads(build.read_text())
        if info["gpu"]:
            assert {"-DCPU_ONLY=OFF", "-DUSE_NCCL=ON"} <= set(info["cmake_flags"])
            assert ("-DUSE_CUDNN=ON" in info["cmake_flags"]) == bool(info.get("cudnn"))
            assert (build.parent / "lib" / "libcaffe.so").exists()


def test_cuda_builds_use_cudnn_where_its_flags_are_given(monkeypatch):
    info = {"include": "/inc", "libdir": "/lib", "ldlibrary": "libpython3.so"}
    cudnn = ["-DCUDNN_INCLUDE=/w/cudnn/include", "-DCUDNN_LIBRARY=/w/cudnn/lib/libcudnn.so.9"]
    with_cudnn = caffe_build.cmake_flags(info, gpu=True, cuda=["-DCUDA_TOOLKIT_ROOT_DIR=/opt/cuda", *cudnn])
    assert "-DUSE_CUDNN=ON" in with_cudnn and set(cudnn) <= set(with_cudnn)
    assert "-DUSE_CUDNN=OFF" in caffe_build.cmake_flags(info, gpu=True, cuda=["-DCUDA_TOOLKIT_ROOT_DIR=/opt/cuda"])
    assert "-DUSE_CUDNN=OFF" in caffe_build.cmake_flags(info, gpu=False)
    monkeypatch.setenv("CAFFE_CUDA_ARCH", "90")  # scripts/gpu_check.sh: the GPU at hand only
    flags = caffe_build.cmake_flags(info, gpu=True, cuda=cudnn)
    assert "-DCUDA_ARCH_BIN=90" in flags and "-DCUDA_ARCH_PTX=" in flags
    monkeypatch.setenv("CAFFE_CUDNN", "0")
    assert not caffe_build.use_cudnn()
    monkeypatch.setenv("CAFFE_CUDNN", "1")
    assert caffe_build.use_cudnn()


def test_cudnn_version_is_read_from_cudnn_version_h(tmp_path):
    (tmp_path / "cudnn_version.h").write_text("#define CUDNN_MAJOR 9\n#define CUDNN_MINOR 28\n"
                                              "#define CUDNN_PATCHLEVEL 1\n#define CUDNN_VERSION (CUDNN_MAJOR * 10000)\n")
    assert caffe_build.cudnn_version(tmp_path) == "9.28.1"


def test_cudnn_for_another_cuda_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(caffe_build, "system_library", lambda name: None)
    if Path("/usr/include/cudnn_version.h").exists():
        pytest.skip("this system has its own cuDNN")
    with pytest.raises(InstallError) as error:
        caffe_build.cudnn_flags(fake_toolkit(tmp_path / "cuda-12", "12.4"))
    message = str(error.value)
    assert "\n" not in message and "CUDA 12" in message and "CAFFE_CUDNN=0" in message


@pytest.mark.slow  # the first run downloads the 520 MB cuDNN wheel
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA toolkit (nvcc) on this machine")
def test_cudnn_comes_from_its_pinned_wheel_and_loads_its_parts():
    """The wheel's pin and hash hold, its libcudnn.so.9 finds the sub-libraries beside it (creating a
    convolution descriptor loads libcudnn_cnn), and cuDNN rounds pooling outputs down where Caffe
    rounds up: the case 0006 hands back to Caffe's own pooling kernels."""
    import ctypes

    toolkit = caffe_build.cuda_toolkit_root()
    flags = dict(flag[2:].split("=", 1) for flag in caffe_build.cudnn_flags(toolkit))
    library, version = Path(flags["CUDNN_LIBRARY"]), caffe_build.cudnn_version(Path(flags["CUDNN_INCLUDE"]))
    if not library.is_relative_to(caffe_build.cache_root()):
        pytest.skip(f"this machine has its own cuDNN ({library})")
    assert version == caffe_build.CUDNN_WHEEL[0].split("==")[1].rsplit(".", 1)[0]
    cudnn = ctypes.CDLL(str(library))
    cudnn.cudnnGetVersion.restype = ctypes.c_size_t
    assert cudnn.cudnnGetVersion() == int("".join(f"{int(part):02d}" for part in version.split(".")))
    convolution, pooling, tensor = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
    assert cudnn.cudnnCreateConvolutionDescriptor(ctypes.byref(convolution)) == 0
    assert cudnn.cudnnCreatePoolingDescriptor(ctypes.byref(pooling)) == 0
    assert cudnn.cudnnCreateTensorDescriptor(ctypes.byref(tensor)) == 0
    dims = [ctypes.c_int() for _ in range(4)]
    for height, caffe_rows in ((7, 3), (8, 4)):  # 3x3 windows, stride 2: Caffe ceil((h - 3) / 2) + 1
        assert cudnn.cudnnSetPooling2dDescriptor(pooling, 2, 1, 3, 3, 0, 0, 2, 2) == 0  # average, padding counted
        assert cudnn.cudnnSetTensor4dDescriptor(tensor, 0, 0, 1, 4, height, height) == 0  # NCHW float
        assert cudnn.cudnnGetPooling2dForwardOutputDim(pooling, tensor, *map(ctypes.byref, dims)) == 0
        assert (dims[2].value == caffe_rows) == (height == 7)


def fake_toolkit(root, release):
    """A CUDA toolkit folder with an nvcc that reports `release` and no libraries."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(0o755)
    return root


def test_cuda_toolkit_root_is_the_one_given(tmp_path, monkeypatch):
    toolkit = fake_toolkit(tmp_path / "cuda-13", "13.0")
    monkeypatch.setenv("CUDA_TOOLKIT_ROOT_DIR", str(toolkit))
    assert caffe_build.cuda_toolkit_root() == toolkit
    monkeypatch.setenv("CUDA_TOOLKIT_ROOT_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(InstallError, match="no bin/nvcc"):
        caffe_build.cuda_flags()


def test_missing_cuda_libraries_of_another_cuda_say_what_to_install(tmp_path):
    toolkit = fake_toolkit(tmp_path / "cuda-12", "12.4")
    with pytest.raises(InstallError) as error:
        caffe_build.cuda_library_flags(toolkit)
    message = str(error.value)
    assert "\n" not in message and "CUDA 12" in message and "cublas, curand" in message
    assert "nvidia-*-cu12" in message


@pytest.mark.slow  # the first run downloads about 700 MB of wheels
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA toolkit (nvcc) on this machine")
def test_cuda_libraries_come_from_the_pinned_wheels_where_the_toolkit_lacks_them():
    toolkit = caffe_build.cuda_toolkit_root()
    if (toolkit / "include" / "cublas_v2.h").exists() and Path("/usr/include/nccl.h").exists():
        pytest.skip(f"the toolkit {toolkit} has its own cuBLAS and the system NCCL")
    flags = dict(flag[2:].split("=", 1) for flag in caffe_build.cuda_library_flags(toolkit))
    for name in ("CUDA_cublas_LIBRARY", "CUDA_curand_LIBRARY", "NCCL_LIBRARIES"):
        if name in flags:
            library = Path(flags[name])
            assert library.is_file() and library.is_relative_to(caffe_build.cache_root())
    if "NCCL_INCLUDE_DIR" in flags:
        assert (Path(flags["NCCL_INCLUDE_DIR"]) / "nccl.h").is_file()
    if "CUDA_TOOLKIT_INCLUDE" in flags:
        includes = [Path(p) for p in flags["CUDA_TOOLKIT_INCLUDE"].split(";")]
        assert includes[0] == toolkit / "include"
        assert any((p / "cublas_v2.h").is_file() for p in includes) or "CUDA_cublas_LIBRARY" not in flags


def test_mkl_builds_link_mkl_rt_from_the_pinned_wheels(monkeypatch):
    info = {"include": "/inc", "libdir": "/lib", "ldlibrary": "libpython3.so"}
    flags = caffe_build.cmake_flags(info, gpu=False, mkl_root=Path("/c/mkl"))
    assert "-DBLAS=MKL" in flags and "-DBLAS=Open" not in flags
    assert f"-DMKL_RT_LIBRARY=/c/mkl/lib/{caffe_build.MKL_RT}" in flags
    assert "-DBLAS=Open" in caffe_build.cmake_flags(info, gpu=False)
    assert all("==" in wheel for wheel in caffe_build.MKL_WHEELS)  # pinned
    monkeypatch.setenv("CAFFE_BLAS", "atlas")
    with pytest.raises(InstallError, match="CAFFE_BLAS=atlas: choose mkl"):
        caffe_build.blas_choice()
    monkeypatch.setenv("CAFFE_BLAS", "open")
    assert caffe_build.blas_choice() == "open"


@pytest.mark.parametrize("vendor, gpu, default", [("GenuineIntel", False, "mkl"), ("AuthenticAMD", False, "open"),
                                                  ("GenuineIntel", True, "open"), (None, False, "open")])
def test_mkl_is_the_default_for_cpu_builds_on_intel_and_openblas_elsewhere(monkeypatch, tmp_path, vendor, gpu,
                                                                           default):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: fpu avx2\n" if vendor else "processor\t: 0\n")
    monkeypatch.setattr(caffe_build.platform, "machine", lambda: "x86_64")
    monkeypatch.delenv("CAFFE_BLAS", raising=False)
    assert caffe_build.blas_choice(gpu, cpuinfo) == default
    monkeypatch.setenv("CAFFE_BLAS", "")  # a Dockerfile's ARG left empty
    assert caffe_build.blas_choice(gpu, cpuinfo) == default
    for asked in ("MKL", "open"):
        monkeypatch.setenv("CAFFE_BLAS", asked)
        assert caffe_build.blas_choice(gpu, cpuinfo) == asked.lower()


def test_caffe_unit_tests_of_the_patched_layers_pass():
    """Caffe's own gtest suites of the layers our patches change (convolution, im2col, pooling and the
    layers 0008 threads, with their gradient checks; every threaded loop on two threads) against the
    linked build: compiled once per build (about a minute), then only run (about 15 s)."""
    result = subprocess.run([sys.executable, str(REPO / "tools" / "caffe_build.py"), "unit-tests"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[  PASSED  ]" in result.stdout and "FAILED" not in result.stdout
    for suite in ("ConvolutionLayerTest/0.TestGradient", "ConvolutionLayerTest/1.TestNDAgainst2D",
                  "Im2colLayerTest/0.TestDilatedGradient", "PoolingLayerTest/0.TestForwardMaxTopMask",
                  "PoolingLayerTest/1.TestGradientMax", "PoolingLayerTest/0.TestGradientMaxTopMask",
                  "PoolingLayerTest/0.TestGradientAve", "NeuronLayerTest/0.TestReLUGradient",
                  "PowerLayerTest/1.TestPowerGradient", "ScaleLayerTest/0.TestForwardEltwise",
                  "ConcatLayerTest/0.TestGradientChannels", "EltwiseLayerTest/0.TestMaxGradient",
                  "CPUMathFunctionsTest/0.TestCopy", "BatchNormLayerTest/1.TestGradient"):
        assert f"[       OK ] {suite} " in result.stdout
    if "0004-batched-cpu-convolution.patch" in caffe_build.linked_prefix().joinpath("emotiw-build.json").read_text():
        assert "[       OK ] ConvolutionLayerTest/1.TestChunksMatchSingleImages" in result.stdout


def test_unit_tests_refuse_a_build_that_is_not_from_these_patches(tmp_path):
    fake = tmp_path / "caffe-0000000000000000"
    fake.mkdir()
    (fake / "emotiw-build.json").write_text(json.dumps({"cmake_flags": ["-DCPU_ONLY=ON"], "gpu": False}))
    result = subprocess.run([sys.executable, str(REPO / "tools" / "caffe_build.py"), "unit-tests", "--prefix",
                             str(fake)], capture_output=True, text=True)
    assert result.returncode == 1 and "was not built from the sources and caffe_patches/ here now" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_doctor_names_the_blas_the_build_was_configured_with():
    build = json.loads((Path(sys.prefix) / "emotiw-caffe" / "emotiw-build.json").read_text())
    result = subprocess.run([str(Path(sys.prefix) / "bin" / "emotiw"), "doctor"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    blas = next(line for line in result.stdout.splitlines() if line.split()[:1] == ["blas"])
    if "-DBLAS=MKL" in build["cmake_flags"]:
        assert f"Intel MKL {caffe_build.MKL_VERSION} {caffe_build.MKL_RT}" in blas
        kernels = next(line for line in result.stdout.splitlines() if line.startswith("blas kernels"))
        assert "Intel(R)" in kernels
    else:
        assert "OpenBLAS libopenblas" in blas


def test_installed_caffe_is_linked_into_the_venv():
    prefix = Path(sys.prefix) / "emotiw-caffe"
    build = json.loads((prefix / "emotiw-build.json").read_text())
    assert build["caffe_version"] == caffe_build.CAFFE_VERSION
    assert build["numpy"] == __import__("numpy").__version__
    import caffe
    assert Path(caffe.__file__).resolve().is_relative_to(prefix.resolve())
    # the tools run from the venv's bin through their relative rpath
    result = subprocess.run([str(Path(sys.prefix) / "bin" / "caffe"), "--version"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "1.0.0" in result.stdout + result.stderr


def test_not_root_prints_the_apt_command(monkeypatch):
    monkeypatch.setattr(caffe_build, "missing_apt_packages", lambda packages=None: ["libfoo-dev"])
    monkeypatch.setattr(caffe_build.os, "geteuid", lambda: 1000)
    with pytest.raises(InstallError, match="apt-get install -y --no-install-recommends libfoo-dev"):
        caffe_build.ensure_apt_packages()


def test_scenedetect_is_installed_beside_the_one_headless_opencv():
    from importlib import metadata

    import cv2
    import scenedetect

    assert scenedetect.__version__ == "0.7.2"
    installed = {dist.metadata["Name"].lower() for dist in metadata.distributions()}
    assert [name for name in installed if name.startswith("opencv")] == ["opencv-python-headless"]
    assert Path(cv2.__file__).resolve().is_relative_to(Path(sys.prefix).resolve())


def test_doctor_names_the_cudnn_of_a_cuda_build():
    builds = [path.parent for path in sorted(caffe_build.cache_root().glob("caffe-*/emotiw-build.json"))
              if json.loads(path.read_text()).get("cudnn")]
    if not builds:
        pytest.skip("no CUDA build with cuDNN in the cache: CAFFE_GPU=1 python3 tools/caffe_build.py build")
    env = dict(os.environ, PYTHONPATH=str(builds[0] / caffe_build.PYCAFFE_DIR), GLOG_minloglevel="3")
    result = subprocess.run([str(Path(sys.prefix) / "bin" / "emotiw"), "doctor"], capture_output=True, text=True,
                            env=env)
    facts = dict(line.split(None, 1) for line in result.stdout.splitlines() if line.startswith("cudnn "))
    version = json.loads((builds[0] / "emotiw-build.json").read_text())["cudnn"]
    assert facts["cudnn"].startswith(f"cuDNN {version}, libcudnn.so.9 (") and str(builds[0]) in result.stdout
