"""`emotiw demo --quick`: every stage runs for real (MTCNN, caffe train, pycaffe, extract_features,
leveldb2mat, openSMILE, LBP-TOP, fusion) on a few generated clips, and the report lists every model
and both fusions."""

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


MODELS = (*demo.NETS, *demo.DESCRIPTORS)


def number(cell):
    return None if cell == "-" else float(cell)


def report_rows(report):
    """{model or fusion (weighting): [val, test, val .mat, test .mat, searched weight, SSE weight]}
    from the accuracy table of report.md."""
    rows = {}
    for line in report.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 7 and re.fullmatch(r"\d+\.\d", cells[1]):
            fusion = re.match(r"\*\*(fusion \(\w+\))\*\*", cells[0])
            name = fusion.group(1) if fusion else cells[0].split("`")[1]
            rows[name] = [number(cell) for cell in cells[1:]]
    return rows


def test_report_lists_every_model_and_both_fusions(quick_demo):
    report = (quick_demo / "report.md").read_text()
    rows = report_rows(report)
    assert set(rows) == {*MODELS, "fusion (searched)", "fusion (sse)"}
    assert all(0 <= value <= 100 for values in rows.values() for value in values[:4] if value is not None)
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    assert len(images) == 2 * len(MODELS) + 3  # curves and confusion per model, two fusions, samples
    for name in images:
        assert cv2.imread(str(quick_demo / name)) is not None, name


def test_fusion_numbers_in_the_report_are_those_of_fuse(quick_demo):
    rows = report_rows((quick_demo / "report.md").read_text())
    for weighting in ("searched", "sse"):
        fusion = json.loads((quick_demo / "work" / "fusion" / weighting / "fusion.json").read_text())
        assert [model["name"] for model in fusion["models"]] == list(MODELS)
        assert rows[f"fusion ({weighting})"][:2] == [round(100 * fusion[part]["fusion"], 1)
                                                     for part in ("validation", "test")]
        column = 4 if weighting == "searched" else 5
        assert [rows[model][column] for model in MODELS] == [round(model["unit_weight"], 2)
                                                             for model in fusion["models"]]
    for index, net in enumerate(demo.NETS):
        assert rows[net][2:4] == [round(100 * fusion[part]["models"][index], 1) for part in ("validation", "test")]
    # SSE's 1/1/1/4/7 with the demo's two CNNs at 1 each: LBP-TOP 4/13, audio 7/13
    assert [rows[model][5] for model in MODELS] == [round(w / 13, 2) for w in (1, 1, 4, 7)]


def test_descriptor_models_score_every_clip_they_can_and_fusion_renormalises_without_the_rest(quick_demo):
    """In the quick demo's 4-frame clips MTCNN misses a face now and then: a clip left with fewer
    than 3 crops has no LBP-TOP row, and both fusions use the other models' weights for it."""
    import csv

    work = quick_demo / "work"
    missing = {}
    for kind in demo.DESCRIPTORS:
        for split in demo.EVALUATED:
            metrics = json.loads((work / "test" / kind / split / "metrics.json").read_text())
            with open(work / "descriptors" / kind / f"{split}_errors.csv", newline="") as handle:
                errors = list(csv.DictReader(handle))
            assert all("too short for LBP-TOP" in row["message"] for row in errors)
            listed = len((work / "faces" / "lists" / f"{split}_videos.txt").read_text().splitlines())
            assert metrics["clips"] + len(errors) == listed
            missing[kind, split] = len(errors)
    for weighting in ("searched", "sse"):
        fusion = json.loads((work / "fusion" / weighting / "fusion.json").read_text())
        assert [model["missing_clips"] for model in fusion["models"]] == [
            0, 0, missing["lbptop", "test"], missing["audio", "test"]]


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
