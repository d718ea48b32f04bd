"""`emotiw demo --quick`: every stage runs for real (MTCNN, caffe train, pycaffe, extract_features,
leveldb2mat, fusion) on a few generated clips, and the report lists every model."""

import json
import re

import cv2
import numpy as np
import pytest
import scipy.io

from emotiw.cli import main
from emotiw.demo import pipeline as demo


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out


def report_rows(report):
    """{model: [val, test, val .mat, test .mat]} from the accuracy table of report.md."""
    rows = {}
    for line in report.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 6 and re.fullmatch(r"\d+\.\d", cells[1]):
            name = "fusion" if cells[0].startswith("**fusion**") else cells[0].strip("`")
            rows[name] = [float(cell) for cell in cells[1:5]]
    return rows


def test_report_lists_every_model_and_the_fusion(quick_demo):
    report = (quick_demo / "report.md").read_text()
    rows = report_rows(report)
    assert set(rows) == {*demo.NETS, "fusion"}
    assert all(0 <= value <= 100 for values in rows.values() for value in values)
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    assert len(images) == 2 * len(demo.NETS) + 2  # curves and confusion per net, fusion, samples
    for name in images:
        assert cv2.imread(str(quick_demo / name)) is not None, name


def test_fusion_numbers_in_the_report_are_those_of_fuse(quick_demo):
    fusion = json.loads((quick_demo / "work" / "fusion" / "fusion.json").read_text())
    rows = report_rows((quick_demo / "report.md").read_text())
    assert rows["fusion"][:2] == [round(100 * fusion[part]["fusion"], 1) for part in ("validation", "test")]
    for index, net in enumerate(demo.NETS):
        assert rows[net][2:] == [round(100 * fusion[part]["models"][index], 1) for part in ("validation", "test")]


def test_pycaffe_testing_and_extract_features_give_the_same_clip_scores(quick_demo):
    work = quick_demo / "work"
    for net in demo.NETS:
        for split in demo.EVALUATED:
            tested = np.loadtxt(work / "test" / net / split / "scores.txt", ndmin=2)
            extracted = scipy.io.loadmat(work / "features" / net / split / "features.mat")["video_feats"]
            np.testing.assert_allclose(tested, extracted, atol=1e-4)


def test_a_second_run_skips_every_finished_stage(quick_demo, capsys):
    before = {path: path.stat().st_mtime_ns for path in (quick_demo / "work").rglob("*.caffemodel")}
    assert main(["demo", "--quick", "--out", str(quick_demo)]) == 0
    printed = capsys.readouterr().out
    stages = [line for line in printed.splitlines() if line.startswith("[demo] ")]
    assert stages and all("done before, skipped" in line for line in stages)
    assert {path: path.stat().st_mtime_ns for path in before} == before
    assert (quick_demo / "report.md").is_file()


def test_other_settings_need_another_work_folder(quick_demo, capsys):
    assert main(["demo", "--out", str(quick_demo)]) == 2  # the full demo into the quick one's folder
    error = capsys.readouterr().err
    assert "other settings" in error and len(error.strip().splitlines()) == 1
