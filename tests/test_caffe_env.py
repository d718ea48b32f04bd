"""The BLAS Caffe runs: OpenBLAS's kernel choice (what the CPU allows, what Caffe's OpenBLAS runs, the
user's say) and, in an MKL build, MKL's own choice of instruction set."""

import os
import subprocess
import sys

import pytest

from emotiw.caffe import env as caffe_env

AVX512 = "avx512f avx512cd avx512bw avx512dq avx512vl"
MKL_LINKED = caffe_env.caffe_mkl_path() is not None
openblas_build = pytest.mark.skipif(MKL_LINKED, reason="the linked Caffe build runs Intel MKL, which picks its "
                                                       "kernels itself; CAFFE_BLAS=open make install tests these")
mkl_build = pytest.mark.skipif(not MKL_LINKED, reason="the linked Caffe build runs OpenBLAS")


@pytest.mark.parametrize("flags, core", [
    (f"fpu sse3 avx avx2 fma {AVX512} avx512_bf16", "Cooperlake"),
    (f"fpu sse3 avx avx2 fma {AVX512}", "SkylakeX"),
    ("fpu sse3 avx avx2 fma", "Haswell"),
    ("fpu sse3 avx avx2", None),  # Haswell's kernels need FMA too
    ("fpu sse3 sse4_2", None),
])
def test_kernels_follow_the_cpu_flags(tmp_path, flags, core):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert caffe_env.core_for_flags(caffe_env.cpu_flags(cpuinfo)) == core


@openblas_build
def test_caffe_links_an_openblas_that_names_its_kernels():
    library = caffe_env.caffe_openblas_path()
    assert library is not None and os.path.basename(library).startswith("libopenblas")
    assert caffe_env.openblas_core(library)


RUNNING_CORE = """
import os
from emotiw.caffe.env import CaffeBLAS
blas = CaffeBLAS()  # loads Caffe through import_caffe, then asks its BLAS
print(blas.core.replace(" ", "_"), os.environ.get("OPENBLAS_CORETYPE", ""))
"""


def running_core(**env):
    clean = {key: value for key, value in os.environ.items()
             if key not in ("OPENBLAS_CORETYPE", caffe_env.CHECKED)}
    result = subprocess.run([sys.executable, "-c", RUNNING_CORE], capture_output=True, text=True,
                            env={**clean, **env})
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


@openblas_build
def test_caffe_never_runs_generic_kernels_on_a_cpu_that_has_better_ones():
    own = caffe_env.openblas_core(caffe_env.caffe_openblas_path())
    best = caffe_env.core_for_flags(caffe_env.cpu_flags())
    running, *chosen = running_core()
    if own == caffe_env.GENERIC_OPENBLAS_CORE and best:
        assert (running, chosen) == (best, [best])  # set for Caffe and for the tools it starts
    else:
        assert (running, chosen) == (own, [])  # OpenBLAS's own choice is left alone


@openblas_build
def test_the_users_choice_is_kept():
    assert running_core(OPENBLAS_CORETYPE="Haswell") == ["Haswell", "Haswell"]


@mkl_build
def test_mkl_runs_the_widest_vectors_the_cpu_has_and_no_openblas_setting_is_made():
    running, *chosen = running_core()
    flags = caffe_env.cpu_flags()
    widest = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE"
    assert widest in running and chosen == []


def test_shell_scripts_get_the_same_choice():
    result = subprocess.run([sys.executable, "-m", "emotiw.caffe.env", "openblas-coretype"],
                            capture_output=True, text=True, env={**os.environ, "OPENBLAS_CORETYPE": "SkylakeX"})
    assert result.returncode == 0 and result.stdout.strip() == "SkylakeX"


def test_libcaffe_is_the_one_pycaffe_loads(tmp_path):
    """A pycaffe put ahead on PYTHONPATH (the bench's baseline builds) brings its own libcaffe."""
    linked = caffe_env.libcaffe_path()
    assert linked is not None and linked.resolve().is_relative_to((caffe_env.Path(sys.prefix) / "emotiw-caffe").resolve())
    probe = "from emotiw.caffe.env import libcaffe_path; print(libcaffe_path())"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0 and result.stdout.strip() == str(linked)
    (tmp_path / "caffe").mkdir()  # a pycaffe without its extension module: no libcaffe to name
    (tmp_path / "caffe" / "__init__.py").write_text("")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0 and result.stdout.strip() == "None"
