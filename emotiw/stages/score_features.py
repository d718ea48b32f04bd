"""The `score_features` stage: a classifier of per-clip feature vectors on the HDF5 features that
`emotiw features` wrote (SSE's audio and LBP-TOP models: audio_linear_svm, audio_mlp).

The vectors are standardised with the statistics their training run stored beside its deploy net
(emotiw.formats.features), go through the net in batches, one row per clip, and give the same
scores.txt, predictions.csv, metrics.json and confusion.png as `test` gives for videos (no frames.csv).
"""

import csv
from pathlib import Path

import numpy as np

from emotiw import EMOTIONS
from emotiw.caffe.runtime import check_backend, load_net
from emotiw.caffe.weights import check_weights
from emotiw.errors import UserError
from emotiw.formats.features import feature_set_of, read_feature_vectors, read_standardisation, standardised
from emotiw.formats.lists import source_type
from emotiw.formats.scores import TestResult, write_clip_outputs
from emotiw.metrics import clip_metrics
from emotiw.nets.reference import resolve_net


def score_features(net, weights, features, out, backend="auto", batch=16, allow_partial=False,
                   fold=True) -> TestResult:
    """Scores every clip of an HDF5 feature list with a classifier of feature vectors.

    net: the deploy.prototxt of the classifier's training run (standardisation.json lies beside it);
    weights: its .caffemodel; features: the HDF5Data source `emotiw features` wrote
    (`<kind>/<split>.txt`); out: the output folder; backend, batch, allow_partial, fold: as for test.
    """
    if batch < 1:
        raise UserError(f"--batch must be at least 1, not {batch}")
    check_backend(backend)
    ref = resolve_net(net, "deploy")
    if source_type(features) != "hdf5":
        raise UserError(f"{features} is no list of HDF5 feature files; make one with `emotiw features`, or test "
                        "clip folders with `emotiw test`")
    deploy = ref.file
    stats_file, stats = read_standardisation(deploy.parent)
    data, labels = read_feature_vectors(features)
    if data.shape[1] != stats["dimension"] or feature_set_of(features) != stats["feature_set"]:
        raise UserError(f"{features} holds {data.shape[1]} values of {feature_set_of(features)} per clip but the "
                        f"net was trained on {stats['dimension']} of {stats['feature_set']} ({stats_file})")
    check_weights(ref.param_shapes(), weights, str(deploy), allow_partial=allow_partial)
    runner, backend = load_net(deploy, weights, backend, ref.preferred_backend, fold)
    vectors = standardised(data, stats)
    scores = np.concatenate([runner.forward(vectors[start:start + batch], ["prob"])["prob"].reshape(-1, len(EMOTIONS))
                             for start in range(0, len(vectors), batch)])
    clips_file = Path(features).with_name(f"{Path(features).stem}_clips.csv")
    if clips_file.is_file():
        with open(clips_file, newline="") as handle:
            clips = [row["clip"] for row in csv.DictReader(handle)]
    else:
        clips = [f"{index:04d}" for index in range(1, len(scores) + 1)]
    labels = labels.astype(np.int64)
    metrics = {"clips": len(clips), "clips_with_faces": len(clips), "fallback_clips": 0, "frames": 0,
               **(clip_metrics(labels, scores, np.ones(len(clips))) or {"accuracy": None})}
    config = {"net": str(deploy), "net_name": ref.name, "weights": str(weights), "features": str(features),
              "backend": backend, "fold": fold, "batch": batch, "standardisation": str(stats_file)}
    out = Path(out)
    files = write_clip_outputs(out, clips, labels, scores, metrics, config)
    return TestResult(out=out, metrics={**metrics, "config": config}, files=files)
