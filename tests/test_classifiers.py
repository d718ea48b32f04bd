"""audio_linear_svm and audio_mlp: real `caffe train` on HDF5 features through `emotiw train`
(standardised with the training statistics), scored by `emotiw test` like video nets."""

import json

import numpy as np
import pytest

import emotiw
from emotiw.errors import UserError
from emotiw.cli import main
from emotiw.stages.features import write_feature_file

CENTRES = np.random.default_rng(1).normal(0, 3, (7, 88))


def features(folder, split, count, seed, dimension=88, offset=500.0):
    """Seeded clusters per class, far from 0: training without standardisation would not learn."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 7
    data = CENTRES[labels][:, :dimension] + rng.normal(0, 1, (count, dimension)) + offset
    return str(write_feature_file(folder, split, data, labels))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("features")
    return features(folder, "train", 140, 2), features(folder, "val", 70, 3)


@pytest.mark.parametrize("net", ["audio_linear_svm", "audio_mlp"])
def test_train_and_test_a_feature_classifier(net, sources, tmp_path):
    train, val = sources
    run = emotiw.train(net, train, val, tmp_path / "run", max_iter=150, test_interval=150, test_iter=5,
                       batch_size=14)
    stats = json.loads((tmp_path / "run" / "standardisation.json").read_text())
    assert stats["dimension"] == 88 and min(stats["mean"]) > 400  # the offset is taken out
    assert run.best_val[1] > 0.9  # 7 separable clusters; chance is 1/7
    result = emotiw.score_features(run.files["deploy"], run.model, val, tmp_path / "scores")
    assert result.accuracy > 0.9 and len(result.clips) == 70
    assert {path.name for path in result.files} >= {"scores.txt", "predictions.csv", "metrics.json"}
    with pytest.raises(UserError, match="lists feature vectors, not clip folders; score them with `emotiw score-features"):
        emotiw.test(run.files["deploy"], run.model, val, tmp_path / "video-scores")  # the explicit entry point only


def test_the_wrong_kind_of_source_is_one_line(sources, tmp_path, capsys):
    train, val = sources
    list_file = tmp_path / "images.txt"
    list_file.write_text("a.png 0\n")
    assert main(["train", "audio_mlp", "--train", str(list_file), "--val", str(list_file),
                 "--out", str(tmp_path / "a")]) == 2
    assert "audio_mlp reads feature vectors" in capsys.readouterr().err
    assert main(["train", "sse_holonet_3conv-s_concat", "--train", train, "--val", val,
                 "--out", str(tmp_path / "b")]) == 2
    assert "reads images" in capsys.readouterr().err


def test_features_of_another_dimension_are_refused_naming_both(sources, tmp_path, capsys):
    train, val = sources
    other = features(tmp_path, "val", 14, 4, dimension=40)
    assert main(["train", "audio_linear_svm", "--train", train, "--val", other,
                 "--out", str(tmp_path / "run")]) == 2
    assert "88 values" in (err := capsys.readouterr().err) and "40" in err


def test_long_vectors_train_with_a_scaled_learning_rate(tmp_path, capsys):
    """2832 values a clip (LBP-TOP's size): at the solver's base_lr the SVM's loss diverges; the
    scaled default learns."""
    rng = np.random.default_rng(5)
    centres = rng.normal(0, 0.3, (7, 2832))

    def long_features(split, count, seed):
        labels = np.arange(count) % 7
        data = centres[labels] + np.random.default_rng(seed).normal(0, 1, (count, 2832))
        return str(write_feature_file(tmp_path / "long", split, data, labels))

    train, val = long_features("train", 140, 6), long_features("val", 70, 7)
    options = dict(max_iter=200, test_interval=200, test_iter=5, batch_size=14)
    with pytest.raises(emotiw.UserError, match="diverged"):
        emotiw.train("audio_linear_svm", train, val, tmp_path / "fixed", base_lr=0.01, **options)
    run = emotiw.train("audio_linear_svm", train, val, tmp_path / "scaled", **options)
    assert "base_lr 0.01 scaled to 0.000311" in capsys.readouterr().out
    assert run.best_val[1] > 0.9
