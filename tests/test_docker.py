"""docker/: one Dockerfile builds the CPU and GPU images with the same `make install`; the CPU image
builds and runs doctor, preprocess and test (slow: `pytest -m slow tests/test_docker.py`, needs dockerd)."""

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


def test_one_dockerfile_builds_both_images_with_make_install():
    """The CPU and GPU images differ only in build arguments: the base and CAFFE_GPU, which `make
    install` reads from the environment the ARG gives it."""
    steps = instructions(DOCKER / "Dockerfile")
    args = dict(arg.split("=", 1) for kind, arg in steps if kind == "ARG")
    assert args["BASE"] == "debian:12" and args["CAFFE_GPU"] == "0"
    assert [kind for kind, _ in steps].index("FROM") == 1  # BASE is declared before FROM reads it
    runs = [arg for kind, arg in steps if kind == "RUN"]
    assert any(re.match(r"make install\b", run) for run in runs)
    assert dict(steps)["ENTRYPOINT"] == '["/opt/emotiw/.venv/bin/emotiw"]'


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
