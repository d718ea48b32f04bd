"""`emotiw fuse`: weighted-mean fusion, the validation weight search, outputs and bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.special

from emotiw import EMOTIONS
from emotiw.cli import main
from emotiw.errors import UserError
from emotiw.formats.scores import read_scores, write_predictions_csv, write_scores_txt
from emotiw.stages.fuse import MAX_WEIGHT_VECTORS, search_weights, weight_vectors

SSE = Path(__file__).resolve().parents[2] / "shared" / "sse-submitted-predictions"
SSE_FILES = ["1_sse_resnet_model_predictions.txt", "2_sse_densenet_model_predictions.txt",
             "3_sse_holonet_model_predictions.txt", "4_relationlet_model_predictions.txt",
             "5_audio_model_predictions.txt"]


def random_stack(models, clips, seed):
    return np.random.default_rng(seed).dirichlet(np.ones(len(EMOTIONS)), size=(models, clips))


def write_stack(folder, stack, prefix="model"):
    paths = []
    for index, scores in enumerate(stack, start=1):
        path = folder / f"{prefix}{index}.txt"
        np.savetxt(path, scores, fmt="%.17g")  # full precision: tests compare exact fusions
        paths.append(str(path))
    return paths


def write_list(path, names, labels=None):
    rows = names if labels is None else [f"{name} {label}" for name, label in zip(names, labels)]
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def run_fuse(capsys, *argv):
    code = main(["fuse", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.skipif(not SSE.is_dir(), reason=f"{SSE} is absent")
def test_sse_2017_submission_is_reproduced(tmp_path, capsys):
    out = tmp_path / "sse"
    code, printed, _ = run_fuse(capsys, *(SSE / name for name in SSE_FILES), "--weights", 1, 1, 1, 4, 7,
                                "--videos", SSE / "test_video_list_emotiw2017.txt", "--out", out)
    assert code == 0 and "audio" in printed
    fused = read_scores(out / "scores.txt").scores
    submitted = read_scores(SSE / "ensemble_model_predictions.txt").scores
    assert fused.shape == submitted.shape == (653, 7)
    assert np.max(np.abs(fused - submitted)) <= 2e-5
    np.testing.assert_array_equal(fused.argmax(axis=1), submitted.argmax(axis=1))
    clips = (SSE / "test_video_list_emotiw2017.txt").read_text().split()
    first = clips[0].removesuffix(".avi")
    assert (out / "submission" / f"{first}.txt").read_text() == EMOTIONS[submitted[0].argmax()]
    assert len(list((out / "submission").iterdir())) == 653
    summary = json.loads((out / "fusion.json").read_text())
    assert [model["unit_weight"] for model in summary["models"]] == pytest.approx([1 / 14] * 3 + [4 / 14, 0.5])


def test_fixed_weights_give_the_weighted_mean_and_all_outputs(tmp_path, capsys):
    stack = random_stack(3, 12, seed=0)
    stack[1] -= 0.1  # negative scores (like relationlet) are fused as they are
    names = [f"{index:09d}.avi" for index in range(12)]
    labels = np.random.default_rng(1).integers(0, 7, 12)
    listing = write_list(tmp_path / "test.txt", names, labels)
    code, printed, _ = run_fuse(capsys, *write_stack(tmp_path, stack), "--weights", 2, 0.5, 1.5,
                                "--videos", listing, "--names", "a", "b", "c", "--out", tmp_path / "out")
    assert code == 0
    expected = (2 * stack[0] + 0.5 * stack[1] + 1.5 * stack[2]) / 4
    predictions = read_scores(tmp_path / "out" / "predictions.csv")
    np.testing.assert_allclose(read_scores(tmp_path / "out" / "scores.txt").scores, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(predictions.scores, expected, rtol=1e-5, atol=1e-7)
    assert predictions.clips == names
    np.testing.assert_array_equal(predictions.labels, labels)
    submission = tmp_path / "out" / "submission"
    assert sorted(path.name for path in submission.iterdir()) == [f"{index:09d}.txt" for index in range(12)]
    for name, row in zip(names, expected):
        assert (submission / name.replace(".avi", ".txt")).read_text() == EMOTIONS[row.argmax()]
    summary = json.loads((tmp_path / "out" / "fusion.json").read_text())
    assert summary["test"]["fusion"] == pytest.approx(np.mean(expected.argmax(axis=1) == labels))
    assert summary["test"]["models"] == pytest.approx([np.mean(s.argmax(axis=1) == labels) for s in stack])
    assert [line.split()[0] for line in printed.splitlines()[1:5]] == ["a", "b", "c", "fusion"]


def test_default_weights_are_equal_and_clips_are_numbered(tmp_path, capsys):
    stack = random_stack(2, 3, seed=2)
    code, _, _ = run_fuse(capsys, *write_stack(tmp_path, stack), "--out", tmp_path / "out")
    assert code == 0
    np.testing.assert_allclose(read_scores(tmp_path / "out" / "scores.txt").scores, stack.mean(axis=0), rtol=1e-5)
    assert sorted(path.name for path in (tmp_path / "out" / "submission").iterdir()) == \
        ["0001.txt", "0002.txt", "0003.txt"]


@pytest.mark.parametrize("method, reference", [
    ("softmax", lambda s: scipy.special.softmax(s, axis=-1)),
    ("l1", lambda s: s / np.abs(s).sum(axis=-1, keepdims=True)),
])
def test_normalisation_is_applied_to_each_input(tmp_path, capsys, method, reference):
    stack = random_stack(2, 4, seed=3) * np.array([[[3.0]], [[0.5]]]) - 0.05
    code, _, _ = run_fuse(capsys, *write_stack(tmp_path, stack), "--weights", 1, 3,
                          "--normalize", method, "--out", tmp_path / "out")
    assert code == 0
    expected = (reference(stack[0]) + 3 * reference(stack[1])) / 4
    np.testing.assert_allclose(read_scores(tmp_path / "out" / "scores.txt").scores, expected, rtol=1e-5)


def labelled_by(stack, weights):
    """Labels that the given weighting gets all right; with many clips, no other grid point does."""
    return np.tensordot(weights, stack, axes=1).argmax(axis=1)


def test_grid_search_recovers_the_weights_that_made_the_labels():
    stack = random_stack(4, 2000, seed=4)
    truth = np.array([0.2, 0.5, 0.0, 0.3])
    result = search_weights(stack, labelled_by(stack, truth), step=0.1)
    np.testing.assert_allclose(result.weights, truth, atol=1e-12)
    assert result.correct == 2000 and result.method == "grid" and result.evaluated == 286  # C(13, 3)


def test_coordinate_ascent_beyond_five_models_recovers_the_weights():
    stack = random_stack(6, 2000, seed=5)
    truth = np.array([0.1, 0.0, 0.4, 0.2, 0.0, 0.3])
    result = search_weights(stack, labelled_by(stack, truth), step=0.1)
    assert result.method == "coordinate-ascent"
    np.testing.assert_allclose(result.weights, truth, atol=1e-12)


def test_ties_go_to_log_likelihood_then_to_uniform_weights():
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 7, 50)
    confident, unsure = (np.full((50, 7), (1 - p) / 6) for p in (0.9, 0.5))
    confident[np.arange(50), labels] = 0.9
    unsure[np.arange(50), labels] = 0.5
    # every weighting is 100 % right; the label's share is highest with the confident model alone
    result = search_weights(np.stack([unsure, confident, unsure]), labels, step=0.25)
    np.testing.assert_allclose(result.weights, [0, 1, 0])
    # identical models: every weighting ties on both, so the most uniform one wins
    result = search_weights(np.stack([confident, confident, confident, confident]), labels, step=0.25)
    np.testing.assert_allclose(result.weights, [0.25] * 4)


def test_search_on_validation_then_applied_to_test(tmp_path, capsys):
    val = random_stack(3, 1500, seed=7)
    truth = np.array([0.6, 0.0, 0.4])
    val_labels = labelled_by(val, truth)
    val_list = write_list(tmp_path / "val.txt", [f"v{index}" for index in range(1500)], val_labels)
    test = random_stack(3, 5, seed=8)
    code, printed, _ = run_fuse(capsys, *write_stack(tmp_path, test, "test"), "--search",
                                "--val-scores", *write_stack(tmp_path, val, "val"), "--val-labels", val_list,
                                "--step", 0.2, "--out", tmp_path / "out")
    assert code == 0, printed
    summary = json.loads((tmp_path / "out" / "fusion.json").read_text())
    assert [model["unit_weight"] for model in summary["models"]] == pytest.approx(truth)
    assert summary["validation"]["fusion"] == 1.0
    assert summary["validation"]["models"] == pytest.approx([np.mean(s.argmax(1) == val_labels) for s in val])
    assert summary["search"] == {"method": "grid", "step": 0.2, "weight_vectors": 21}  # C(7, 2)
    np.testing.assert_allclose(read_scores(tmp_path / "out" / "scores.txt").scores,
                               np.tensordot(truth, test, axes=1), rtol=1e-5)
    assert "100.00" in printed.splitlines()[-2]  # the fusion row's validation accuracy


def test_validation_labels_may_come_from_predictions_csv(tmp_path, capsys):
    val = random_stack(2, 300, seed=9)
    labels = labelled_by(val, np.array([0.25, 0.75]))
    clips = [f"c{index}" for index in range(300)]
    val_files = []
    for index, scores in enumerate(val):
        write_predictions_csv(tmp_path / f"val{index}.csv", clips, labels, scores)
        val_files.append(tmp_path / f"val{index}.csv")
    code, _, err = run_fuse(capsys, *val_files, "--search", "--val-scores", *val_files, "--step", 0.25,
                            "--out", tmp_path / "out")
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "fusion.json").read_text())
    assert [model["unit_weight"] for model in summary["models"]] == [0.25, 0.75]


def bad_case(tmp_path, case):
    """Arguments for `emotiw fuse` with one defect, and the text the error line must hold."""
    stack = random_stack(2, 4, seed=10)
    good = write_stack(tmp_path, stack)
    names = [f"clip{index}" for index in range(4)]
    if case == "rows":
        write_scores_txt(tmp_path / "short.txt", stack[1][:3])
        return [good[0], tmp_path / "short.txt"], "short.txt: 3 rows but"
    if case == "nan":
        lines = Path(good[1]).read_text().splitlines()
        lines[2] = " ".join(["0.1"] * 6 + ["NaN"])
        (tmp_path / "nan.txt").write_text("\n".join(lines) + "\n")
        return [good[0], tmp_path / "nan.txt"], "nan.txt: row 3, column 7: NaN is not a finite number"
    if case == "columns":
        write_scores_txt(tmp_path / "six.txt", stack[1][:, :6])
        return [good[0], tmp_path / "six.txt"], "six.txt: row 1: expected 7 scores, found 6"
    if case == "list":
        listing = write_list(tmp_path / "list.txt", names[:3])
        return [*good, "--videos", listing], "model1.txt: 4 rows but the video list"
    if case == "names":
        write_predictions_csv(tmp_path / "p.csv", ["clip0", "clip2", "clip1", "clip3"], None, stack[1])
        listing = write_list(tmp_path / "list.txt", names)
        return [good[0], tmp_path / "p.csv", "--videos", listing], "p.csv: row 2 is clip clip2 but"
    if case == "weights":
        return [*good, "--weights", 1], "--model-weights has 1 values for 2 score files"
    if case == "val":
        listing = write_list(tmp_path / "val.txt", names, [0, 1, 2, 3])
        return [*good, "--search", "--val-scores", good[0], tmp_path / "missing.txt", "--val-labels", listing], \
            "missing.txt: score file not found"
    if case == "val-rows":
        listing = write_list(tmp_path / "val.txt", names[:3], [0, 1, 2])
        return [*good, "--search", "--val-scores", *good, "--val-labels", listing], \
            "model1.txt: 4 rows but the video list"
    if case == "mat":
        scipy.io.savemat(tmp_path / "two.mat", {"feats": stack[0], "video_feats": stack[1]})
        return [good[0], tmp_path / "two.mat"], "several 2-D variables with 7 columns"
    raise ValueError(case)


@pytest.mark.parametrize("case", ["rows", "nan", "columns", "list", "names", "weights", "val",
                                  "val-rows", "mat"])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, case):
    argv, expected = bad_case(tmp_path, case)
    code, _, err = run_fuse(capsys, *argv, "--out", tmp_path / "out")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert expected in err
    assert not (tmp_path / "out" / "scores.txt").exists()


@pytest.mark.parametrize("weights", [("nan", "1"), ("1", "nan"), ("inf", "1"), ("1", "inf")])
def test_weights_that_are_not_finite_are_refused(tmp_path, capsys, weights):
    code, _, err = run_fuse(capsys, *write_stack(tmp_path, random_stack(2, 4, seed=12)), "--weights", *weights,
                            "--out", tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "every weight must be a finite number" in err
    assert not (tmp_path / "out").exists()


def test_huge_weights_are_normalised_without_overflow(tmp_path, capsys):
    stack = random_stack(2, 6, seed=13)
    code, _, err = run_fuse(capsys, *write_stack(tmp_path, stack), "--weights", "1e308", "1.5e308",
                            "--out", tmp_path / "out")
    assert code == 0, err
    np.testing.assert_allclose(read_scores(tmp_path / "out" / "scores.txt").scores,
                               (stack[0] + 1.5 * stack[1]) / 2.5, rtol=1e-5)
    summary = json.loads((tmp_path / "out" / "fusion.json").read_text())
    assert [model["unit_weight"] for model in summary["models"]] == pytest.approx([0.4, 0.6])


@pytest.mark.parametrize("models, step, fits", [(2, 1e-9, 2e-06), (5, 0.01, 0.02), (7, 1e-7, 1e-05),
                                                (2, 5e-324, 2e-06)])
def test_a_step_too_fine_for_memory_is_refused_with_one_that_fits(tmp_path, capsys, models, step, fits):
    stack = random_stack(models, 6, seed=14)
    files = write_stack(tmp_path, stack)
    labels = write_list(tmp_path / "val.txt", [f"c{index}" for index in range(6)], stack[0].argmax(axis=1))
    code, _, err = run_fuse(capsys, *files, "--search", "--val-scores", *files, "--val-labels", labels,
                            "--step", step, "--out", tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"over the limit of 1,000,000; use --step {fits} or larger" in err
    assert weight_vectors(models, round(1 / fits)) <= MAX_WEIGHT_VECTORS  # the suggestion fits
    with pytest.raises(UserError, match="over the limit"):
        search_weights(stack, stack[0].argmax(axis=1), step=step)


def test_mat_variable_can_be_named_on_the_command_line(tmp_path, capsys):
    stack = random_stack(2, 4, seed=11)
    scipy.io.savemat(tmp_path / "two.mat", {"feats": stack[0], "video_feats": stack[1]})
    code, _, err = run_fuse(capsys, tmp_path / "two.mat:video_feats", tmp_path / "two.mat:feats",
                            "--weights", 3, 1, "--out", tmp_path / "out")
    assert code == 0, err
    np.testing.assert_allclose(read_scores(tmp_path / "out" / "scores.txt").scores,
                               (3 * stack[1] + stack[0]) / 4, rtol=1e-5)


def test_a_model_without_some_clips_leaves_them_to_the_others_with_renormalised_weights(tmp_path, capsys):
    """An audio model lacks clips without sound: those clips fuse the other models alone, their
    weights renormalised; never as if the missing model had scored zeros."""
    names = [f"clip{index:02d}" for index in range(6)]
    labels = [0, 1, 2, 3, 4, 5]
    cnn, audio = random_stack(2, 6, seed=21)
    write_predictions_csv(tmp_path / "cnn.csv", names, labels, cnn)
    kept = [0, 2, 3, 5]  # clips 1 and 4 have no audio score
    write_predictions_csv(tmp_path / "audio.csv", [names[k] for k in kept], [labels[k] for k in kept], audio[kept])
    code, _, err = run_fuse(capsys, tmp_path / "audio.csv", tmp_path / "cnn.csv", "--weights", 7, 1,
                            "--out", tmp_path / "out")
    assert code == 0, err
    fused = read_scores(tmp_path / "out" / "predictions.csv")
    assert fused.clips == names  # the reference: the file with the most clips, in its order
    expected = cnn.copy()
    expected[kept] = (7 * audio[kept] + cnn[kept]) / 8
    np.testing.assert_allclose(fused.scores, expected, atol=1e-6)
    summary = json.loads((tmp_path / "out" / "fusion.json").read_text())
    assert [model["missing_clips"] for model in summary["models"]] == [2, 0]
    assert summary["test"]["models"][0] == pytest.approx(
        np.mean(audio[kept].argmax(axis=1) == np.array(labels)[kept]))  # over the clips it has


def test_missing_clips_take_part_in_the_weight_search(tmp_path):
    from emotiw.stages.fuse import fuse_stack

    stack = random_stack(2, 50, seed=22)
    stack[0, ::5] = np.nan  # model 0 lacks every fifth clip
    fused = fuse_stack(stack, [1.0, 0.0])
    np.testing.assert_allclose(fused[::5], stack[1, ::5])  # weight 0 left alone: the plain mean of who has it
    labels = np.random.default_rng(23).integers(0, 7, 50)
    found = search_weights(stack, labels, step=0.1)
    assert np.isfinite(found.log_likelihood) and found.weights.sum() == pytest.approx(1)


def test_a_clip_in_no_file_or_a_stranger_is_one_line(tmp_path, capsys):
    a, b = random_stack(2, 3, seed=24)
    write_predictions_csv(tmp_path / "a.csv", ["x", "y", "z"], None, a)
    write_predictions_csv(tmp_path / "b.csv", ["x", "w"], None, b[:2])
    code, _, err = run_fuse(capsys, tmp_path / "a.csv", tmp_path / "b.csv", "--out", tmp_path / "out")
    assert code == 2 and "clip w is not in" in err
