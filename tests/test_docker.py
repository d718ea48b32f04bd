"""docker/: the CPU and GPU images are built by the same `make install`; the CPU image builds and
runs doctor, preprocess and test (slow: `pytest -m slow tests/test_docker.py`, needs dockerd)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"


def instructions(dockerfile):
    """(instruction, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [tuple(line.split(None, 1)) for line in lines]


def base(steps):
    return next(args[len("BASE="):] for kind, args in steps if kind == "ARG" and args.startswith("BASE="))


def test_the_gpu_image_differs_from_the_cpu_image_only_in_its_base_and_caffe_gpu():
    cpu, gpu = instructions(DOCKER / "cpu" / "Dockerfile"), instructions(DOCKER / "gpu" / "Dockerfile")
    assert [step for step in cpu if step[0] != "ARG" or not step[1].startswith("BASE=")] == [
        (kind, args.replace("CAFFE_GPU=1 make install", "make install")) for kind, args in gpu
        if kind != "ARG" or not args.startswith("BASE=")]
    assert base(cpu) == "debian:12"
    assert re.fullmatch(r"nvidia/cuda:1[23]\.[\d.]+-devel-ubuntu[\d.]+", base(gpu))
    runs = [args for kind, args in gpu if kind == "RUN"]
    assert any(re.search(r"\bCAFFE_GPU=1 make install\b", args) for args in runs)
    assert dict(cpu)["ENTRYPOINT"] == '["/opt/emotiw/.venv/bin/emotiw"]'


def test_the_build_context_leaves_out_this_checkouts_builds():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".git", "demo", "*.caffemodel"} <= set(ignored)


def docker_daemon():
    return shutil.which("docker") is not None and subprocess.run(
        ["docker", "info"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not docker_daemon(), reason="no Docker daemon (dockerd --storage-driver=vfs runs as root)")
def test_the_cpu_image_builds_and_runs_doctor_preprocess_and_test():
    done = subprocess.run(["sh", str(DOCKER / "test.sh")], capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "passed doctor, preprocess and test" in done.stdout
