"""`emotiw test`'s two backends agree on every registered deploy net: pycaffe and OpenCV DNN read the
same generated deploy.prototxt and caffemodel and give the same `prob` within 1e-4, and the same
class scores before the softmax within 1e-4 of their range (random weights saturate the softmax, so
`prob` alone would compare near one-hot vectors).

Every net loads in OpenCV 4.14 (none has to be listed as unsupported). The weights are seeded random
values scaled like He initialisation, BatchNorm statistics included, so that no layer is left at a
zero or constant filler and the class scores differ between images and classes."""

import numpy as np
import pytest

from emotiw import nets
from emotiw.caffe.env import import_caffe
from emotiw.caffe.runtime import OpenCVNet, PycaffeNet
from helpers import random_weights  # noqa: E402

caffe = import_caffe()


@pytest.mark.parametrize("name", nets.names())
def test_opencv_and_pycaffe_give_the_same_prob(name, tmp_path):
    from google.protobuf import text_format

    deploy, weights = tmp_path / "deploy.prototxt", tmp_path / "weights.caffemodel"
    deploy.write_text(text_format.MessageToString(nets.build(name, "deploy")))
    random_weights(deploy, weights, seed=3)
    scores = next(layer.bottom[0] for layer in nets.build(name, "deploy").layer
                  if layer.type == "Softmax" and list(layer.top) == ["prob"])
    with_caffe = PycaffeNet(deploy, weights)
    batch = np.random.default_rng(4).normal(0, 50, size=(2, *with_caffe.input_shape)).astype(np.float32)
    flat = lambda outputs: {blob: values.reshape(len(batch), -1) for blob, values in outputs.items()}  # noqa: E731
    expected = flat(with_caffe.forward(batch, ["prob", scores]))
    del with_caffe
    found = flat(OpenCVNet(deploy, weights).forward(batch, ["prob", scores]))
    assert found["prob"].shape == expected["prob"].shape == (2, 7)
    np.testing.assert_allclose(found["prob"], expected["prob"], atol=1e-4)
    spread = np.ptp(expected[scores], axis=1).min()
    assert spread > 1e-3  # the scores differ between classes: not a constant the nets could share
    np.testing.assert_allclose(found[scores], expected[scores], atol=1e-4 * spread)
