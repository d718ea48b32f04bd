"""What Caffe and libraries this installation uses, and what is missing (`emotiw doctor`)."""

import json
import os
import sys
from pathlib import Path

from emotiw.caffe.env import (CAFFE_TOOLS, caffe_openblas_path, find_tool, linked_libraries, mkl_runtime,
                              mkl_version, openblas_core, share_openmp_threads, tune_openblas)

FIX_INSTALL = "run `make install` in the emotiw checkout"


def library_version(libraries, stem):
    """The version in a linked library's soname or resolved file name, e.g. libprotobuf.so.32."""
    for soname, resolved in libraries.items():
        if soname.startswith(stem):
            real = os.path.realpath(resolved)
            return f"{Path(real).name} ({resolved})"
    return None


def collect():
    """Returns (facts, problems): facts as (label, value) rows, problems as one-line fixes."""
    facts, problems = [], []
    facts.append(("python", f"{sys.version.split()[0]} ({sys.executable})"))
    try:
        import numpy
        facts.append(("numpy", numpy.__version__))
    except ImportError:
        problems.append(f"numpy is not importable: {FIX_INSTALL}")
    share_openmp_threads()  # before Caffe loads its BLAS, as import_caffe does
    blas_kernels = tune_openblas()
    try:
        import caffe
    except Exception as error:  # a broken build raises ImportError or an ABI error
        problems.append(f"pycaffe does not import ({error}): {FIX_INSTALL}")
        caffe = None
    if caffe is not None:
        module = Path(caffe.__file__).resolve()
        prefix = next((p for p in module.parents if (p / "emotiw-build.json").exists()), module.parent)
        build = prefix / "emotiw-build.json"
        info = json.loads(build.read_text()) if build.exists() else {}
        if not info:
            problems.append(f"pycaffe at {module.parent} was not built by emotiw: {FIX_INSTALL}")
        facts.append(("caffe", f"{getattr(caffe, '__version__', '?')} from Debian source "
                               f"{info.get('caffe_version', '?')}, BVLC commit {info.get('upstream_commit', '?')}"))
        facts.append(("caffe build", f"{'GPU (CUDA)' if info.get('gpu') else 'CPU only'} at {prefix}"))
        facts.append(("caffe patches", ", ".join(info.get("patches", [])) or "?"))
        libcaffe = next(iter(sorted((prefix / "lib").glob("libcaffe.so*"))), None)
        libraries = linked_libraries(libcaffe) if libcaffe else {}
        if info.get("gpu"):
            cudnn = library_version(libraries, "libcudnn.")
            facts.append(("cudnn", f"cuDNN {info['cudnn']}, {cudnn or 'not linked'}" if info.get("cudnn")
                          else "off: Caffe's own CUDA kernels (CAFFE_GPU=1 CAFFE_CUDNN=1 make install for cuDNN)"))
            if info.get("cudnn") and not cudnn:
                problems.append(f"the build was configured with cuDNN {info['cudnn']} but libcaffe does not link it: "
                                f"{FIX_INSTALL}")
        mkl = mkl_runtime(libraries)
        if mkl:  # MKL's runtime first: other libraries may bring an OpenBLAS that Caffe does not call
            version, kernels = mkl_version(mkl)
            blas = f"Intel MKL {version} {library_version(libraries, 'libmkl_rt')}"
            facts.append(("blas", blas))
            facts.append(("blas kernels", kernels))
        else:
            blas = library_version(libraries, "libopenblas") or library_version(libraries, "libblas")
            facts.append(("blas", f"OpenBLAS {blas}" if blas else "not found"))
        library = caffe_openblas_path()
        if library:
            own = openblas_core(library) or "?"
            facts.append(("blas kernels", f"{blas_kernels} (OPENBLAS_CORETYPE; OpenBLAS alone picks {own})"
                                          if blas_kernels else own))
        facts.append(("opencv (C++)", library_version(libraries, "libopencv_core") or "not linked"))
        facts.append(("protobuf (C++)", library_version(libraries, "libprotobuf") or "not linked"))
        if blas is None:
            problems.append(f"libcaffe links no BLAS library: {FIX_INSTALL}")
    for module, label in (("cv2", "opencv (python)"), ("google.protobuf", "protobuf (python)")):
        try:
            imported = __import__(module, fromlist=["__version__"])
            facts.append((label, imported.__version__))
        except ImportError:
            problems.append(f"{module} is not importable: {FIX_INSTALL}")
    for tool in CAFFE_TOOLS:
        path = find_tool(tool)
        facts.append((f"tool {tool}", path or "MISSING"))
        if path is None:
            problems.append(f"Caffe tool `{tool}` not found on PATH or in the venv: {FIX_INSTALL}")
    return facts, problems
