"""The root train_*.sh scripts run the real `caffe train` binary: 2 iterations on a tiny list, from a
pretrained file made by pycaffe, and a snapshot at the end.

The nets are generated small (64 px, batch 2) through EMOTIW_SOLVER; train_SSE_resnet.sh trains
SSE-ResNet's backbone alone (sse_resnet50_original): its released net holds 390 M parameters
whatever the input size, too much for one training step on the CI machine (docs/nets.md).
"""

import os
import subprocess
from pathlib import Path

import pytest
from helpers import write_image_list

from emotiw import nets
from emotiw.nets.options import NetOptions

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {  # script -> (net it trains in the test, fine-tunes from a pretrained file)
    "train_DSN_vgg.sh": ("dsn_vgg_face", True),
    "train_DSN_res.sh": ("dsn_resnet50", True),
    "train_SSE_holonet.sh": ("sse_holonet_3conv-s_concat", False),
    "train_SSE_densenet.sh": ("sse_densenet121_3conv-s_concat", True),
    "train_SSE_resnet.sh": ("sse_resnet50_original", True),
}
TWO_ITERATIONS = {"max_iter": 2, "test_iter": [1], "test_interval": 1000, "test_initialization": False,
                  "display": 1, "snapshot": 0}


@pytest.fixture(scope="module")
def image_list(tmp_path_factory):
    return write_image_list(tmp_path_factory.mktemp("images"), 72)


def small_net(name, out, image_list):
    """A 64-px, batch-2 version of the net with a 2-iteration solver snapshotting into out/snap."""
    options = NetOptions(input_size=64, resize=72, train_batch=2, test_batch=2, source_type="list",
                         train_source=image_list, val_source=image_list, mean_values=(104, 117, 123))
    return nets.write_net(name, out, options, snapshot_prefix=out / "snap" / name,
                          solver_overrides=TWO_ITERATIONS)


def pretrained(paths, out):
    """A stand-in for the ImageNet / VGG-Face file: the net's own weights, saved by pycaffe."""
    from emotiw.caffe.env import import_caffe
    caffe = import_caffe()
    path = out / "pretrained.caffemodel"
    caffe.Net(str(paths["deploy"]), caffe.TEST).save(str(path))
    return path


def run_script(script, *args, **env):
    """Runs a root script from another directory, with Caffe's INFO log (pycaffe quietens it here)."""
    return subprocess.run([str(REPO / script), *args], capture_output=True, text=True,
                          env={**os.environ, "GLOG_minloglevel": "0", **env}, cwd="/")


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_script_trains_two_iterations_and_snapshots(script, image_list, tmp_path):
    name, fine_tunes = SCRIPTS[script]
    paths = small_net(name, tmp_path, image_list)
    env = {"EMOTIW_SOLVER": str(paths["solver"])}
    if fine_tunes:
        env["EMOTIW_WEIGHTS"] = str(pretrained(paths, tmp_path))
    result = run_script(script, **env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "snap" / f"{name}_iter_2.caffemodel").is_file()
    assert (tmp_path / "snap" / f"{name}_iter_2.solverstate").is_file()
    log = result.stderr
    assert "Use CPU." in log and "Iteration 2" in log
    assert ("Finetuning from" in log) == fine_tunes


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_default_paths(script, tmp_path):
    """Each script's default solver is a committed prototxt; absent weights are a clear error."""
    text = (REPO / script).read_text()
    solver = text.split("caffe_train.sh\" ")[1].split()[0]
    assert (REPO / solver).is_file()
    if SCRIPTS[script][1]:
        result = run_script(script, CAFFE="/bin/true", EMOTIW_WEIGHTS=str(tmp_path / "absent.caffemodel"))
        assert result.returncode == 2
        assert "pretrained weights" in result.stderr and "not found" in result.stderr


def test_extra_arguments_reach_caffe_and_a_missing_solver_is_an_error(tmp_path):
    result = run_script("train_SSE_holonet.sh", "--no_such_flag=1")
    assert result.returncode != 0 and "no_such_flag" in result.stderr
    missing = run_script("train_SSE_holonet.sh", EMOTIW_SOLVER=str(tmp_path / "none.prototxt"))
    assert missing.returncode == 2 and "make nets" in missing.stderr
