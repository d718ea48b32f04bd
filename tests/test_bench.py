"""`make bench` plumbing on tiny sizes: rows, ratios, files and errors; never timings."""

import json
from pathlib import Path

import numpy as np
import pytest

from bench import bench

REFERENCE = bench.REFERENCE_PYTHON


def run_quick(out, *extra):
    return bench.main(["--quick", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    """GEMM and HoloNet inference at batch 1: the cheapest rows that touch Caffe, OpenCV and
    (when bench/.venv-ref exists) the PyTorch reference."""
    out = tmp_path_factory.mktemp("bench")
    assert run_quick(out, "--rows", "gemm,inference", "--nets", "sse_holonet_3conv-s_concat",
                     "--batches", "1") == 0
    return out, json.loads((out / "results.json").read_text())


def test_writes_machine_rows_and_markdown(quick_report):
    out, report = quick_report
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["blas_threads"] >= 1
    assert "openblas" in machine["blas_library"].lower() or "mkl" in machine["blas_library"].lower()
    ours = [row for row in report["rows"] if row["impl"] in ("libcaffe's BLAS (ctypes)", "pycaffe", "OpenCV DNN")]
    assert {row["section"] for row in ours} == {"gemm", "inference"}
    for row in report["rows"]:
        assert row["repeats"] >= (1 if row["section"] == "memory" else 5) and 0 < row["min"] <= row["median"] <= row["max"]
    markdown = (out / "results.md").read_text()
    assert machine["cpu"] in markdown and "| inference |" in markdown
    assert sorted(path.name for path in out.iterdir()) == ["results.json", "results.md"]  # its work folder gone


def test_memory_rows_give_the_peak_rss_of_both_convolution_paths(quick_report):
    _, report = quick_report
    rows = {row["impl"]: row for row in report["rows"] if row["section"] == "memory"}
    assert set(rows) == {"pycaffe, oneDNN convolutions", "pycaffe, CAFFE_DNNL=0"}
    from bench.baseline import peak_rss_mb

    ours = peak_rss_mb()  # this test process: every module and net of the run so far
    for row in rows.values():  # a process with numpy, pycaffe and HoloNet's weights: tens of MB at least
        assert row["unit"] == "MB" and row["name"] == "sse_holonet_3conv-s_concat 128px, batch 1"
        assert 50 < row["median"] < ours  # its own peak, not the forking bench's


def test_fraction_of_ceiling_is_rate_times_flops(quick_report):
    _, report = quick_report
    row = next(row for row in report["rows"] if row["impl"] == "pycaffe" and row["section"] == "inference")
    expected = row["median"] * row["gflop_per_image"] / report["gemm_ceiling_gflops"]
    assert row["fraction_of_gemm_ceiling"] == pytest.approx(expected)


def test_reference_rows_or_skips(quick_report):
    _, report = quick_report
    reference_rows = [row for row in report["rows"] if row["impl"].startswith("PyTorch")]
    if not REFERENCE.is_file():
        assert not reference_rows and report["skipped"]
        pytest.skip("no bench/.venv-ref: reference rows are reported as skipped")
    assert reference_rows and not report["skipped"]
    ratio = report["ratios"][0]
    ours = max((r for r in report["rows"] if r["section"] == "inference" and r["impl"] in ("pycaffe", "OpenCV DNN")),
               key=lambda r: r["median"])
    assert ratio["ratio"] == pytest.approx(ours["median"] / reference_rows[0]["median"])


def test_flops_of_one_convolution_and_inner_product():
    """2 x multiply-adds counted from the shapes Caffe infers, against the arithmetic by hand."""
    from emotiw.caffe.env import import_caffe
    from emotiw.caffe.shapes import infer

    caffe = import_caffe()
    n = caffe.NetSpec()
    n.data = caffe.layers.Input(shape={"dim": [1, 3, 16, 16]})
    n.conv = caffe.layers.Convolution(n.data, num_output=4, kernel_size=3, pad=1, stride=2)
    n.fc = caffe.layers.InnerProduct(n.conv, num_output=5)
    net = n.to_proto()
    conv_macs = 4 * 8 * 8 * 3 * 3 * 3
    fc_macs = 4 * 8 * 8 * 5
    assert bench.forward_flops(net, infer(net)) == 2 * (conv_macs + fc_macs)


def test_sgemm_through_caffes_openblas_multiplies():
    blas = bench.CaffeBLAS().library
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((5, 3), dtype=np.float32), rng.standard_normal((3, 4), dtype=np.float32)
    c = np.empty((5, 4), np.float32)
    bench.sgemm(blas, a, b, c)
    np.testing.assert_allclose(c, a @ b, rtol=1e-5)


def test_dummy_train_net_has_the_train_losses_and_no_data_layer():
    net = bench.dummy_train_net(bench.TRAIN_NETS[0], 2, 128)
    types = [layer.type for layer in net.layer]
    assert types[0] == "DummyData" and "Data" not in types and "Accuracy" not in types
    assert types.count("SoftmaxWithLoss") >= 1
    assert list(net.layer[0].dummy_data_param.shape[0].dim) == [2, 3, 128, 128]


@pytest.mark.parametrize("args, message", [
    (["--rows", "gemm,nope"], "unknown --rows nope"),
    (["--nets", "alexnet"], "--nets: unknown alexnet"),
    (["--repeats", "3"], "at least 5 repeats"),
    (["--batches", "one"], "whole numbers"),
    (["--precision", "fp32,fp16"], "unknown precision 'fp16'"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, args, message):
    assert run_quick(tmp_path, *args) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert not (Path(tmp_path) / "results.json").exists()


def test_footage_coverage_counts_the_reference_face_frames(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("frame,detected,x1,y1,x2,y2\n0,1,0,0,10,10\n1,1,0,0,10,10\n2,0,,,,\n3,1,50,50,60,60\n")
    # the reference: a face in frames 0 (same box), 1 (another face and ours), 2 (missed by us), none in 3
    faces = [[[0, 0, 10, 10]], [[30, 30, 40, 40], [0, 0, 10, 11]], [[0, 0, 10, 10]], []]
    coverage, close = bench.footage_coverage(manifest, faces)
    assert (coverage, close) == (pytest.approx(2 / 3), pytest.approx(2 / 3))


def test_gemm_is_set_against_the_peak_computed_from_the_measured_clock(quick_report):
    _, report = quick_report
    rows = {row["name"]: row for row in report["rows"] if row["section"] == "gemm"}
    peak = rows.pop("computed peak")
    clock = float(peak["impl"].split(" GHz")[0])
    assert 0.5 < clock < 7  # a real clock, not the 3-adds-a-cycle figure of adds of a constant
    assert peak["median"] == pytest.approx(clock * 1e9 * 64 * report["machine"]["blas_threads"] / 1e9, rel=0.01) \
        or "x 32 FLOP/cycle" in peak["impl"]
    measured = rows.pop("measured FMA peak", None)
    if measured is None:  # a CPU without FMA
        assert any("measured FMA peak" in line for line in report["skipped"])
    else:  # the chains cannot beat the clock's arithmetic; they reach a good part of it (a lower
        # vector clock, or 512-bit FMAs in two halves as on AMD's Zen 4)
        assert 0.3 * peak["median"] < measured["median"] < 1.1 * peak["median"]
    for row in rows.values():
        assert row["fraction_of_peak"] == pytest.approx(row["median"] / peak["median"])
        assert 0 < row["fraction_of_peak"] < 1.1
        if measured is not None:
            assert row["fraction_of_measured_peak"] == pytest.approx(row["median"] / measured["median"])
            assert row["median"] < 1.05 * measured["median"]  # no GEMM beats the FMA units


def test_gpu_rows_without_cudnn_put_every_cudnn_layer_on_caffes_kernels(tmp_path):
    """bench/gpu.py's "no cuDNN" rows: the same net with `engine: CAFFE` wherever a layer has a cuDNN
    engine; the original is left as it was, and the copy computes the same scores (here on the CPU)."""
    from google.protobuf import text_format

    from bench.gpu import ENGINE_FIELDS, without_cudnn
    from emotiw import nets
    from emotiw.caffe.env import import_caffe

    net = nets.build("sse_holonet_3conv-s_concat", "deploy")
    plain = without_cudnn(net)
    engines = {layer.type: getattr(layer, ENGINE_FIELDS[layer.type]).engine
               for layer in plain.layer if layer.type in ENGINE_FIELDS}
    assert {"Convolution", "Pooling", "ReLU", "Softmax"} <= set(engines) and set(engines.values()) == {1}
    assert all(getattr(layer, ENGINE_FIELDS[layer.type]).engine == 0 for layer in net.layer
               if layer.type in ENGINE_FIELDS)
    caffe = import_caffe()
    scores = []
    for name, param in (("net", net), ("plain", plain)):
        (tmp_path / f"{name}.prototxt").write_text(text_format.MessageToString(param))
        caffe.set_random_seed(0)
        loaded = caffe.Net(str(tmp_path / f"{name}.prototxt"), caffe.TEST)
        loaded.blobs["data"].data[...] = np.random.default_rng(0).standard_normal(loaded.blobs["data"].data.shape)
        scores.append(loaded.forward()[loaded.outputs[0]].copy())
    np.testing.assert_array_equal(*scores)


def test_gpu_table_sets_each_row_against_pytorch_on_the_same_net_and_batch():
    from bench.gpu import markdown

    rows = [{"net": "holonet", "task": "training", "batch": 32, "impl": impl, "median": rate, "peak_mib": 100}
            for impl, rate in (("caffe train, cuDNN", 300.0), ("caffe train, no cuDNN", 100.0),
                               ("PyTorch eager fp32, cuDNN", 200.0))]
    table = markdown(rows, ["infer holonet 1: no bench environment"])
    assert "| caffe train, cuDNN | 300.0 | 1.50x |" in table and "| caffe train, no cuDNN | 100.0 | 0.50x |" in table
    assert "- skipped: infer holonet 1" in table
