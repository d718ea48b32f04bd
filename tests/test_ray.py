"""`--ray`: preprocess, test and extract on a real two-node Ray cluster give a local run's outputs.

The cluster is two `ray start --block` processes on 127.0.0.1 (a head and a worker node, one CPU
each), shared by the module, its files under the test's temporary folder, and stopped at the end by
ending those two processes. A worker killed mid-clip has its clip run again.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import media
import pytest
import scipy.io
from helpers import snapshot

import emotiw
from emotiw.cli import main
from emotiw.formats.db import read_store

RAY = Path(sys.executable).with_name("ray")
LONG_FRAMES = 40  # the clip a worker is killed in: long enough to be caught mid-way


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition, what, seconds=90):
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {seconds} s")
        time.sleep(0.02)
    return value


def children(pid):
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def title(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode().strip()
    except OSError:
        return ""


class RayCluster:
    """A head node and a worker node, each started by `ray start --block`, which ends the processes it
    started when it gets SIGTERM."""

    def __init__(self, root):
        self.root = root
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        self.address = f"127.0.0.1:{free_port()}"
        common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", f"--temp-dir={root / 'tmp'}",
                  "--object-store-memory=100000000", "--disable-usage-stats", "--block"]
        self.nodes = [self.start("head", "--head", f"--port={self.address.split(':')[1]}", "--include-dashboard=false",
                                 *common)]
        wait_for(lambda: "Ray runtime started" in (root / "head.log").read_text(), "head node")
        self.nodes.append(self.start("node", f"--address={self.address}", *common))
        wait_for(lambda: "Ray runtime started" in (root / "node.log").read_text(), "worker node")

    def start(self, name, *options):
        with open(self.root / f"{name}.log", "w") as log:
            return subprocess.Popen([str(RAY), "start", *options], stdout=log, stderr=subprocess.STDOUT, env=self.env)

    def raylets(self):
        return [pid for node in self.nodes for pid in children(node.pid) if "raylet" in title(pid)]

    def workers(self):
        """(pid, title) of the Python worker processes of this cluster's two raylets."""
        return [(pid, title(pid)) for raylet in self.raylets() for pid in children(raylet)]

    def stop(self):
        for node in reversed(self.nodes):
            node.send_signal(signal.SIGTERM)
            node.wait(60)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    patch = pytest.MonkeyPatch()
    running = RayCluster(tmp_path_factory.mktemp("ray"))
    for name in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED"):  # for the drivers these tests run in-process
        patch.setenv(name, running.env[name])
    yield running
    patch.undo()
    running.stop()


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """AFEW-style `Val/<Emotion>/<clip>`: a moving face, two faces, a long clip, no face, a broken file."""
    root = tmp_path_factory.mktemp("afew") / "Val"
    for emotion in ("Happy", "Sad", "Angry", "Neutral", "Fear"):
        (root / emotion).mkdir(parents=True)
    media.moving_face_clip(root / "Happy" / "001.mp4", 8)
    media.two_face_clip(root / "Sad" / "002.avi", 10)
    media.moving_face_clip(root / "Angry" / "003.mp4", LONG_FRAMES)
    media.no_face_clip(root / "Neutral" / "004.mp4")
    media.corrupt_file(root / "Fear" / "005.mp4")
    return root


def preprocess(videos, out, *options):
    return main(["preprocess", "--videos", str(videos), "--out", str(out), "--recipe", "sse", *options])


@pytest.fixture(scope="module")
def reference(videos, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    assert preprocess(videos, out) == 0
    return out


def leftovers(out):
    """Temporary files and folders of the atomic writes, of extract_features and of Ray's pieces."""
    return [path for path in out.rglob(".*")] + list(Path(tempfile.gettempdir()).glob("emotiw-extract-*"))


def test_preprocess_on_ray_equals_a_local_run(cluster, videos, reference, tmp_path):
    assert preprocess(videos, tmp_path, "--ray", cluster.address) == 0
    assert snapshot(tmp_path) == snapshot(reference)  # manifest, detections, lists, crops, errors.csv
    assert {path.name for path in (tmp_path / "faces" / "val").iterdir()} == {"001", "002", "003"}
    assert not leftovers(tmp_path)


def test_a_worker_killed_mid_clip_has_its_clip_run_again(cluster, videos, reference, tmp_path):
    long_clip = str((videos / "Angry" / "003.mp4").resolve())
    crops, part = tmp_path / "faces" / "val" / "003", tmp_path / "clips" / "val" / "003.csv"
    run = subprocess.Popen([sys.executable, "-m", "emotiw.cli", "preprocess", "--videos", str(videos), "--out",
                            str(tmp_path), "--recipe", "sse", "--ray", cluster.address],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cluster.env)

    def cropping_long_clip():
        """The worker that has the long clip open while some of its crops are written (pass 2)."""
        assert run.poll() is None, "the run ended before a worker could be killed mid-clip"
        for pid, name in cluster.workers():
            if name == "ray::Worker.run" and long_clip in _open_files(pid):
                if crops.is_dir() and any(crops.glob("*.png")) and not part.exists():
                    return pid
        return None

    try:
        victim = wait_for(cropping_long_clip, "worker cropping the long clip", seconds=120)
        os.kill(victim, signal.SIGKILL)
        _, err = run.communicate(timeout=180)
    finally:
        run.kill()
    assert run.returncode == 0, err
    assert not Path(f"/proc/{victim}").exists()
    assert snapshot(tmp_path) == snapshot(reference)
    assert not leftovers(tmp_path)


def _open_files(pid):
    try:
        return [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
    except OSError:
        return []


def test_test_on_ray_equals_a_local_run(cluster, dsn_setup, tmp_path, monkeypatch):
    deploy, weights, video_list = dsn_setup  # clips of 3, 2, 4 and 1 frames: batches of 3 cross clips
    options = ["--net", str(deploy), "--weights", str(weights), "--videos", str(video_list), "--batch", "3",
               "--blobs", "prob,fc"]
    assert main(["test", *options, "--out", str(tmp_path / "local")]) == 0
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)  # ray=True: ray.init() finds the cluster there
    result = emotiw.test(deploy, weights, video_list, tmp_path / "ray", batch=3, blobs=("prob", "fc"), ray=True)
    local = {path.name: path.read_bytes() for path in sorted((tmp_path / "local").iterdir())}
    assert {"scores.txt", "scores_fc.txt", "predictions.csv", "frames.csv", "metrics.json", "confusion.png"} <= set(local)
    assert {path.name: path.read_bytes() for path in sorted(result.out.iterdir())} == local


@pytest.mark.parametrize("db", ["leveldb", "lmdb"])
def test_extract_on_ray_equals_a_local_run(cluster, setup, tmp_path, db):
    options = ["extract", "--net", str(setup["test"]), "--weights", str(setup["weights"]), "--blob", "prob",
               "--videos", str(setup["videos"]), "--db", db]  # 10 frames, batches of 4: the last wraps round
    outputs = {}
    for name, extra in (("local", []), ("ray", ["--ray", cluster.address])):
        out = tmp_path / name
        assert main([*options, "--out", str(out), *extra]) == 0
        prefix = str(out.resolve()).encode()
        outputs[name] = {
            "store": read_store(out / f"prob_{db}", use_lmdb=db == "lmdb"),
            "mat": (out / "features.mat").read_bytes()[128:],  # the header holds the time it was written
            **{file: (out / file).read_bytes().replace(prefix, b"OUT")
               for file in ("frames.txt", "test.prototxt", "extract.json")}}
        assert not leftovers(out)
    assert len(outputs["local"]["store"]) == 12
    assert outputs["ray"] == outputs["local"]
    feats = scipy.io.loadmat(tmp_path / "ray" / "features.mat")
    assert feats["feats"].shape == (10, 7) and feats["video_n_frames"].ravel().tolist() == [4, 3, 3]


def test_an_unreachable_cluster_is_one_line(dsn_setup, tmp_path, capsys):
    deploy, weights, video_list = dsn_setup
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there once the probe is closed
    assert main(["test", "--net", str(deploy), "--weights", str(weights), "--videos", str(video_list),
                 "--out", str(tmp_path), "--ray", closed]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"cannot reach the Ray cluster at {closed}" in err and "ray start --head" in err


def test_without_ray_installed_the_line_says_how_to_install_it(dsn_setup, tmp_path, capsys, monkeypatch):
    deploy, weights, video_list = dsn_setup
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` finds where Ray is not installed
    assert main(["test", "--net", str(deploy), "--weights", str(weights), "--videos", str(video_list),
                 "--out", str(tmp_path), "--ray"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'emotiw[ray]'" in err
