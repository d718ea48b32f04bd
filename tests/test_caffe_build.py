"""The installer's checks: checksums, offline sources, cache keys and the installed layout."""

import hashlib
import json
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
    gpu_flags = caffe_build.cmake_flags(info, gpu=True)
    assert "-DCPU_ONLY=OFF" in gpu_flags
    assert any("CUDA_ARCH_BIN" in f and "80" in f and "90" in f for f in gpu_flags)
    assert "-DCPU_ONLY=ON" in caffe_build.cmake_flags(info, gpu=False)


def test_cuda_toolkit_root_goes_to_gpu_builds_only(monkeypatch):
    info = {"include": "/inc", "libdir": "/lib", "ldlibrary": "libpython3.so"}
    monkeypatch.setenv("CUDA_TOOLKIT_ROOT_DIR", "/opt/cuda-13")
    assert "-DCUDA_TOOLKIT_ROOT_DIR=/opt/cuda-13" in caffe_build.cmake_flags(info, gpu=True)
    assert not any("CUDA_TOOLKIT_ROOT_DIR" in flag for flag in caffe_build.cmake_flags(info, gpu=False))
    monkeypatch.delenv("CUDA_TOOLKIT_ROOT_DIR")
    assert not any("CUDA_TOOLKIT_ROOT_DIR" in flag for flag in caffe_build.cmake_flags(info, gpu=True))


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
