"""Score files: EmotiW txt, .mat and predictions.csv readers and writers, video lists, submissions."""

import h5py
import numpy as np
import pytest
import scipy.io

from emotiw import EMOTIONS
from emotiw.errors import UserError
from emotiw.formats.lists import read_list
from emotiw.formats.scores import read_scores, write_predictions_csv, write_scores_txt, write_submission


def random_scores(rows, seed=0):
    return np.random.default_rng(seed).dirichlet(np.ones(len(EMOTIONS)), size=rows)


def test_txt_round_trip_uses_emotiw_format(tmp_path):
    scores = random_scores(5)
    scores[0, 0] = 1.0751e-10  # tiny values as in SSE's files must survive
    path = tmp_path / "scores.txt"
    write_scores_txt(path, scores)
    lines = path.read_text().splitlines()
    assert len(lines) == 5
    assert all(len(line.split(" ")) == len(EMOTIONS) for line in lines)  # single spaces, no trailing one
    assert lines[0].split(" ")[0] == "1.0751e-10"
    table = read_scores(path)
    assert table.clips is None and table.labels is None
    np.testing.assert_allclose(table.scores, scores, rtol=5e-6)


def test_txt_tolerates_dsn_trailing_space_and_final_blank_line(tmp_path):
    path = tmp_path / "pred_val_dsn_vgg_video.txt"
    path.write_text("1 2 3 4 5 6 7 \n0.5 0 0 0 0 0 0.5 \n\n")
    table = read_scores(path)
    np.testing.assert_array_equal(table.scores[0], np.arange(1, 8))
    assert table.scores.shape == (2, 7)


@pytest.mark.parametrize("text, expected", [
    ("1 2 3 4 5 6 7\n1 2 3 4 5 6\n", "row 2: expected 7 scores, found 6"),
    ("1 2 3 4 5 6 7\n\n1 2 3 4 5 6 7\n", "row 2: expected 7 scores, found 0"),
    ("1 2 3 4 5 6 7\n1 2 nan 4 5 6 7\n", "row 2, column 3: nan is not a finite number"),
    ("1 2 3 4 5 6 inf\n", "row 1, column 7: inf is not a finite number"),
    ("1 2 3 4 5 6 7\n1 2 3 4 5 6 x7\n", "row 2, column 7: 'x7' is not a number"),
    ("", "holds no scores"),
    ("\n\n", "holds no scores"),
])
def test_txt_errors_name_file_and_row(tmp_path, text, expected):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(UserError) as error:
        read_scores(path)
    assert str(path) in str(error.value) and expected in str(error.value)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_scores(tmp_path / "absent.txt")


def test_mat_default_variable_is_the_only_class_matrix(tmp_path):
    feats = random_scores(4, seed=1)
    path = tmp_path / "resnet.mat"
    scipy.io.savemat(path, {"feats": feats})
    np.testing.assert_array_equal(read_scores(path).scores, feats)


def test_mat_with_video_means_needs_a_name_and_carries_names_and_labels(tmp_path):
    frames, videos = random_scores(6, seed=2), random_scores(3, seed=3)
    path = tmp_path / "holonet.mat"
    scipy.io.savemat(path, {"feats": frames, "video_feats": videos,
                            "video_names": ["000029320", "000037160", "000046360"],
                            "video_labels": np.array([0, 3, 6])})
    with pytest.raises(UserError) as error:
        read_scores(path)
    assert "feats (6, 7)" in str(error.value) and "video_feats (3, 7)" in str(error.value)
    table = read_scores(path, variable="video_feats")
    np.testing.assert_array_equal(table.scores, videos)
    assert table.clips == ["000029320", "000037160", "000046360"]
    np.testing.assert_array_equal(table.labels, [0, 3, 6])
    np.testing.assert_array_equal(read_scores(path, variable="feats").scores, frames)
    with pytest.raises(UserError, match="no variable 'probs'"):
        read_scores(path, variable="probs")


def test_mat_errors(tmp_path):
    path = tmp_path / "bad.mat"
    scores = random_scores(3)
    scores[2, 4] = np.nan
    scipy.io.savemat(path, {"feats": scores})
    with pytest.raises(UserError, match=r"row 3, column 5: nan is not a finite number"):
        read_scores(path)
    scipy.io.savemat(path, {"feats": random_scores(3)[:, :5]})
    with pytest.raises(UserError, match="feats has 5 columns, expected 7|no 2-D variables with 7 columns"):
        read_scores(path)
    with pytest.raises(UserError, match="feats' has 5 columns, expected 7"):
        read_scores(path, variable="feats")


def test_mat_v73_is_read_in_matlab_column_major_order(tmp_path):
    feats = random_scores(4, seed=4)
    path = tmp_path / "big.mat"
    with h5py.File(path, "w", userblock_size=512) as handle:
        handle["feats"] = feats.T  # what MATLAB -v7.3 stores for a 4 x 7 matrix
    with open(path, "r+b") as handle:  # the MATLAB header that makes scipy recognise v7.3
        handle.write(b"MATLAB 7.3 MAT-file".ljust(116) + b"\0" * 8 + b"\x00\x02IM")
    np.testing.assert_array_equal(read_scores(path).scores, feats)


def test_predictions_csv_round_trip(tmp_path):
    scores = random_scores(4, seed=5)
    path = tmp_path / "predictions.csv"
    clips = ["a/000029320", "b/000037160", "c", "d"]
    write_predictions_csv(path, clips, [2, -1, 0, 6], scores, n_frames=[10, 0, 3, 1],
                          fallback=[False, True, False, False])
    rows = [line.split(",") for line in path.read_text().splitlines()]
    assert rows[0] == ["clip", "label", "prediction", *EMOTIONS, "n_frames", "fallback"]
    assert [int(row[2]) for row in rows[1:]] == list(np.argmax(scores, axis=1))
    assert [row[-2:] for row in rows[1:]] == [["10", "0"], ["0", "1"], ["3", "0"], ["1", "0"]]
    table = read_scores(path)
    assert table.clips == clips
    np.testing.assert_array_equal(table.labels, [2, -1, 0, 6])
    np.testing.assert_allclose(table.scores, scores, rtol=5e-6)


def test_predictions_csv_without_labels_and_errors(tmp_path):
    path = tmp_path / "predictions.csv"
    write_predictions_csv(path, ["x", "y"], None, random_scores(2))
    assert read_scores(path).labels is None
    text = path.read_text().splitlines()
    broken = text[2].split(",")
    broken[5] = "nan"
    path.write_text("\n".join([text[0], text[1], ",".join(broken)]) + "\n")
    with pytest.raises(UserError, match=r"row 2 \(line 3\), column 3: nan is not a finite number"):
        read_scores(path)
    path.write_text("clip,label,Angry\nx,1,0.5\n")
    with pytest.raises(UserError, match="missing column"):
        read_scores(path)


def test_submission_folder_holds_one_class_name_per_clip(tmp_path):
    out = tmp_path / "submission"
    write_submission(out, ["000029320.avi", "frames/000037160", "000046360.avi"], [6, 0, 3])
    assert sorted(p.name for p in out.iterdir()) == ["000029320.txt", "000037160.txt", "000046360.txt"]
    assert (out / "000029320.txt").read_text() == "Surprise"
    assert (out / "000037160.txt").read_text() == "Angry"
    write_submission(out, ["000029320.avi"], [4])  # a rerun replaces the folder, no stale files
    assert [p.name for p in out.iterdir()] == ["000029320.txt"]
    assert (out / "000029320.txt").read_text() == "Neutral"
    with pytest.raises(UserError, match="repeated: 000029320"):
        write_submission(out, ["a/000029320", "b/000029320.avi"], [0, 1])


def test_video_list_formats(tmp_path):
    labelled = tmp_path / "Val_video.txt"
    labelled.write_text("/data/Face/Val/000029320 3\n/data/with space/000037160 0\n\n/data/x Sad\n")
    clips, labels = read_list(labelled)
    assert clips == ["/data/Face/Val/000029320", "/data/with space/000037160", "/data/x"]
    np.testing.assert_array_equal(labels, [3, 0, EMOTIONS.index("Sad")])
    plain = tmp_path / "test_video_list.txt"
    plain.write_text("000029320.avi\n000037160.avi\n")
    clips, labels = read_list(plain)
    assert clips == ["000029320.avi", "000037160.avi"] and labels is None
    bad = tmp_path / "bad.txt"
    bad.write_text("a 1\nb 9\n")
    with pytest.raises(UserError, match=r"bad.txt: line 2: label '9'"):
        read_list(bad)
    bad.write_text("\n")
    with pytest.raises(UserError, match="empty"):
        read_list(bad)
