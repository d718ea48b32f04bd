"""emotiw: DSN (EmotiW 2018) and SSE (EmotiW 2017) video emotion recognition on real BVLC Caffe.

The pipeline as functions, each with the CLI's defaults, each returning a small result object and
raising UserError for an expected failure (bad input, a missing piece):

    preprocess(out, videos=... | images=..., recipe="dsn"|"sse"|"fer2013", ...) -> PreprocessResult
        video clips or face images -> MTCNN faces -> aligned crops, manifest.csv, Caffe lists, LMDB
    detect(images, ...) -> [Detections]          MTCNN boxes and landmarks of image files or arrays
    train(net, train, val, out, ...) -> TrainResult     the `caffe train` binary on a registered net
    test(net, weights, videos, out, ...) -> TestResult  per-frame `prob` -> per-video scores, metrics
    score_features(net, weights, features, out, ...) -> TestResult   a classifier of per-clip vectors
    extract(net, weights, out, ...) -> ExtractResult    extract_features -> LevelDB/LMDB -> .mat
    fuse(scores, out, model_weights=... | search=True, ...) -> FuseResult   weighted score fusion
    predict(videos, out, net=None, weights=None, ...) -> PredictResult
        your own videos -> emotions per frame (the embedded fer2013_mini_xception model by default)
    export(net, weights, onnx, opset=17) -> ExportResult   a deploy net and its caffemodel as ONNX
    nets                                          the registry of the DSN and SSE nets (nets.names())
    recipes                                       how each system makes its faces (recipes.RECIPES)

Stages talk through files: preprocess writes OUT/lists/<split>.txt (frames, for train and extract)
and OUT/lists/<split>_videos.txt (clips, for test); test writes scores.txt and predictions.csv,
which fuse reads. Class indices follow EMOTIONS (AFEW's order); NO_LABEL marks an unlabelled item.
"""

import importlib

from emotiw.errors import UserError

__version__ = "0.1.0"

# AFEW's class order, used everywhere a label is an integer (0..6).
EMOTIONS = ("Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise")
NO_LABEL = -1

# The stage functions load on first use: `import emotiw` stays light (no numpy, Caffe or OpenCV),
# which the installer, run by the system Python, relies on.
_STAGES = {"preprocess": "emotiw.stages.preprocess", "detect": "emotiw.stages.detect",
           "train": "emotiw.stages.train", "test": "emotiw.stages.test", "extract": "emotiw.stages.extract",
           "fuse": "emotiw.stages.fuse", "predict": "emotiw.stages.predict", "export": "emotiw.stages.export",
           "score_features": "emotiw.stages.score_features"}
_MODULES = {"nets": "emotiw.nets", "recipes": "emotiw.recipes"}
__all__ = ["EMOTIONS", "NO_LABEL", "UserError", *_STAGES, *_MODULES]


def __getattr__(name):
    if name in _STAGES:
        return getattr(importlib.import_module(_STAGES[name]), name)
    if name in _MODULES:
        return importlib.import_module(_MODULES[name])
    raise AttributeError(f"module 'emotiw' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *__all__})
