#!/usr/bin/env bash
# SSE-DenseNet-121 (train_SSE_DenseNet.sh): fine-tunes ImageNet DenseNet-121.
# Usage: ./train_SSE_densenet.sh [caffe train flags...]; see scripts/caffe_train.sh for the EMOTIW_SOLVER,
# EMOTIW_WEIGHTS, CAFFE and GPU overrides, and docs/nets.md for the nets and weights.
exec "$(dirname "$0")/scripts/caffe_train.sh" prototxt/sse_densenet121_3conv-s_concat/solver.prototxt models/pretrained/DenseNet_121.caffemodel "$@"
