"""OpenBLAS kernel choice for Caffe: what the CPU allows, what Caffe's OpenBLAS runs, the user's say."""

import os
import subprocess
import sys

import pytest

from emotiw.caffe import env as caffe_env

AVX512 = "avx512f avx512cd avx512bw avx512dq avx512vl"


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


def test_caffe_links_an_openblas_that_names_its_kernels():
    library = caffe_env.caffe_openblas_path()
    assert library is not None and os.path.basename(library).startswith("libopenblas")
    assert caffe_env.openblas_core(library)


RUNNING_CORE = """
import os
from emotiw.caffe.env import caffe_openblas
_, blas = caffe_openblas()  # loads Caffe through import_caffe, then asks its OpenBLAS
print(blas.openblas_get_corename().decode(), os.environ.get("OPENBLAS_CORETYPE", ""))
"""


def running_core(**env):
    clean = {key: value for key, value in os.environ.items()
             if key not in ("OPENBLAS_CORETYPE", caffe_env.CHECKED)}
    result = subprocess.run([sys.executable, "-c", RUNNING_CORE], capture_output=True, text=True,
                            env={**clean, **env})
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_caffe_never_runs_generic_kernels_on_a_cpu_that_has_better_ones():
    own = caffe_env.openblas_core(caffe_env.caffe_openblas_path())
    best = caffe_env.core_for_flags(caffe_env.cpu_flags())
    running, *chosen = running_core()
    if own == caffe_env.GENERIC_OPENBLAS_CORE and best:
        assert (running, chosen) == (best, [best])  # set for Caffe and for the tools it starts
    else:
        assert (running, chosen) == (own, [])  # OpenBLAS's own choice is left alone


def test_the_users_choice_is_kept():
    assert running_core(OPENBLAS_CORETYPE="Haswell") == ["Haswell", "Haswell"]


def test_shell_scripts_get_the_same_choice():
    result = subprocess.run([sys.executable, "-m", "emotiw.caffe.env", "openblas-coretype"],
                            capture_output=True, text=True, env={**os.environ, "OPENBLAS_CORETYPE": "SkylakeX"})
    assert result.returncode == 0 and result.stdout.strip() == "SkylakeX"
