"""Importing pycaffe and running Caffe's tools the same way everywhere: quiet glog by default, one
clear error if missing, and OpenBLAS's fast kernels on CPUs it does not recognise. Also what the
installed build is: its emotiw-build.json, its BLAS (Intel MKL or OpenBLAS), whether it has CUDA.

Debian 12's OpenBLAS (0.3.21, what libcaffe links) picks its kernels from the CPU model; on a CPU
newer than itself (e.g. Intel family 6 model 207) it falls back to its generic SSE3 "Prescott"
kernels, which ran Caffe's GEMM at 30 GFLOP/s where the AVX-512 ones reach 200 on the same two cores
(bench/NOTES.md). OPENBLAS_CORETYPE tells it which kernels to use; it is read when the library is
loaded, so it goes into os.environ before pycaffe is imported or a tool is started (the tools
inherit it). A value the user set is never changed. A build with MKL (the default on Intel CPUs)
needs none of this: MKL picks its kernels from the CPU's instruction set.

CPU builds run Caffe's layer loops and oneDNN on GNU OpenMP's threads (caffe_patches/0008), and link
OpenBLAS's OpenMP build, so that one pool of threads serves them all. MKL would bring Intel's OpenMP
runtime as a second pool spinning on the same cores: MKL_THREADING_LAYER=GNU (unless the user set it)
makes MKL use GNU OpenMP's.
"""

import ctypes
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from emotiw.errors import UserError

GENERIC_OPENBLAS_CORE = "Prescott"  # DYNAMIC_ARCH OpenBLAS on an x86-64 CPU it does not know
AVX512 = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}
CORE_FOR_FLAGS = (  # the best kernel set each instruction set allows, best first
    ("Cooperlake", AVX512 | {"avx512_bf16"}),
    ("SkylakeX", AVX512),
    ("Haswell", {"avx2", "fma"}),
)
# The tools `make install` links into the venv's bin.
CAFFE_TOOLS = ["caffe", "extract_features", "convert_imageset", "compute_image_mean",
               "upgrade_net_proto_text", "upgrade_net_proto_binary", "upgrade_solver_proto_text"]
# What each BLAS reads its thread count from, when it is loaded.
BLAS_THREADS_VARIABLES = {"openblas": "OPENBLAS_NUM_THREADS", "mkl": "MKL_NUM_THREADS"}
CHECKED = "EMOTIW_OPENBLAS_CHECKED"  # set once asked, so that child processes do not ask again
PROBE_CORE = ("import ctypes, sys; blas = ctypes.CDLL(sys.argv[1]); "
              "blas.openblas_get_corename.restype = ctypes.c_char_p; print(blas.openblas_get_corename().decode())")


def cpu_flags(cpuinfo=Path("/proc/cpuinfo")):
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    match = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    return set(match.group(1).split()) if match else set()


def core_for_flags(flags):
    """The OpenBLAS kernel set the CPU's instruction set allows, or None (nothing better than generic)."""
    return next((core for core, needed in CORE_FOR_FLAGS if needed <= flags), None)


def libcaffe_path():
    """The libcaffe that `import caffe` would load (the build `make install` linked into this venv, or
    one put ahead of it on PYTHONPATH), from what pycaffe's _caffe module links; None without pycaffe."""
    spec = importlib.util.find_spec("caffe")
    if spec is None or spec.origin is None:
        return None
    module = next(iter(sorted(Path(spec.origin).parent.glob("_caffe*.so"))), None)
    libraries = linked_libraries(module) if module else {}
    return next((Path(path) for soname, path in libraries.items() if soname.startswith("libcaffe")), None)


def caffe_build_info():
    """The emotiw-build.json of the Caffe build linked into this venv (flags, patches, gpu), or None."""
    path = Path(sys.prefix) / "emotiw-caffe" / "emotiw-build.json"
    return json.loads(path.read_text()) if path.exists() else None


def linked_libraries(path):
    """{soname: resolved path} of a shared library's dependencies, from ldd."""
    result = subprocess.run(["ldd", str(path)], capture_output=True, text=True)
    return dict(re.findall(r"^\s*(\S+) => (\S+)", result.stdout, re.MULTILINE))


def mkl_runtime(libraries):
    """The MKL runtime (libmkl_rt) among a library's {soname: path} dependencies, or None."""
    return next((os.path.realpath(path) for soname, path in libraries.items() if soname.startswith("libmkl_rt")),
                None)


def caffe_openblas_path():
    """The OpenBLAS file libcaffe links (Debian's libblas.so.3 alternative resolves to one), or None:
    also for an MKL build, whose BLAS calls go to MKL even where another library brings OpenBLAS."""
    libcaffe = libcaffe_path()
    libraries = linked_libraries(libcaffe) if libcaffe else {}
    if not libraries or mkl_runtime(libraries) is not None:
        return None
    resolved = [os.path.realpath(path) for path in libraries.values()]
    return next((path for path in resolved if Path(path).name.startswith("libopenblas")),
                next((path for path in resolved if "openblas" in path), None))


def caffe_mkl_path():
    """The MKL runtime (libmkl_rt) libcaffe links, or None (an OpenBLAS build)."""
    libcaffe = libcaffe_path()
    return mkl_runtime(linked_libraries(libcaffe)) if libcaffe else None


class MKLVersion(ctypes.Structure):
    """oneMKL's MKLVersion (mkl_types.h; PatchVersion since oneMKL 2024)."""
    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("update", ctypes.c_int),
                ("patch", ctypes.c_int), ("status", ctypes.c_char_p), ("build", ctypes.c_char_p),
                ("processor", ctypes.c_char_p), ("platform", ctypes.c_char_p)]


def mkl_version(library):
    """(version, the instruction set MKL runs here) as the MKL library says them."""
    version = MKLVersion()
    ctypes.CDLL(str(library)).mkl_get_version(ctypes.byref(version))
    return f"{version.major}.{version.update}.{version.patch}", version.processor.decode()  # 2026 Update 2: 2026.2.0


def openblas_core(library):
    """The kernel set OpenBLAS picks by itself here, asked in a child process: a loaded library keeps
    its choice. None when the library cannot be asked."""
    env = {key: value for key, value in os.environ.items() if key != "OPENBLAS_CORETYPE"}
    result = subprocess.run([sys.executable, "-c", PROBE_CORE, str(library)], capture_output=True,
                            text=True, env=env)
    return result.stdout.strip() or None if result.returncode == 0 else None


def share_openmp_threads():
    os.environ.setdefault("MKL_THREADING_LAYER", "GNU")


def tune_openblas():
    """Sets OPENBLAS_CORETYPE when Caffe's OpenBLAS would run its generic kernels on a CPU with
    AVX2 or AVX-512; returns the value in effect (None: OpenBLAS chooses). Asks once per process tree."""
    if "OPENBLAS_CORETYPE" in os.environ or os.environ.get(CHECKED):
        return os.environ.get("OPENBLAS_CORETYPE")
    os.environ[CHECKED] = "1"
    core = core_for_flags(cpu_flags())
    library = caffe_openblas_path() if core else None
    if library and openblas_core(library) == GENERIC_OPENBLAS_CORE:
        os.environ["OPENBLAS_CORETYPE"] = core
        return core
    return None


class CaffeBLAS:
    """The BLAS libcaffe runs (OpenBLAS or Intel MKL), loaded in this process with pycaffe, through
    ctypes: its cblas_sgemm, its thread count, what it says of itself."""

    def __init__(self):
        import_caffe()
        mkl = caffe_mkl_path()
        if mkl is not None:
            self.mkl, self.path, self.library = True, Path(mkl), ctypes.CDLL(mkl)
            version, self.core = mkl_version(mkl)
            self.config = f"Intel MKL {version}"
            return
        path = caffe_openblas_path()
        if path is None:
            raise UserError("libcaffe links neither OpenBLAS nor Intel MKL here; run `make install` in the "
                            "emotiw checkout")
        self.mkl, self.path, self.library = False, Path(path), ctypes.CDLL(path)
        for name in ("openblas_get_config", "openblas_get_corename"):
            getattr(self.library, name).restype = ctypes.c_char_p
        self.config = self.library.openblas_get_config().decode()
        self.core = self.library.openblas_get_corename().decode()

    @property
    def threads(self):
        return self.library.MKL_Get_Max_Threads() if self.mkl else self.library.openblas_get_num_threads()

    def set_threads(self, threads):
        if self.mkl:
            self.library.MKL_Set_Num_Threads(threads)
        else:
            self.library.openblas_set_num_threads(threads)


def import_caffe():
    # Caffe logs every layer at INFO through glog; users ask for it with GLOG_minloglevel=0.
    os.environ.setdefault("GLOG_minloglevel", "2")
    share_openmp_threads()
    tune_openblas()
    try:
        import caffe
    except ImportError as error:
        raise UserError(f"pycaffe is not importable ({error}); run `make install` in the emotiw checkout")
    return caffe


def find_tool(name):
    """Tools are linked into the venv's bin; fall back to PATH for other layouts."""
    candidate = Path(sys.prefix) / "bin" / name
    if candidate.exists():
        return str(candidate)
    return shutil.which(name)


def caffe_tool(name):
    """The path of one of Caffe's tools (caffe, extract_features, ...), ready to run: a process
    started from here inherits the OpenBLAS setting."""
    path = find_tool(name)
    if path is None:
        raise UserError(f"Caffe's `{name}` tool is not installed; run `make install` in the emotiw checkout")
    share_openmp_threads()
    tune_openblas()
    return path


if __name__ == "__main__":
    # `python -m emotiw.caffe.env openblas-coretype`: for shell scripts that run Caffe's tools
    if sys.argv[1:] != ["openblas-coretype"]:
        sys.exit("usage: python -m emotiw.caffe.env openblas-coretype")
    print(tune_openblas() or "")
