#!/usr/bin/env bash
# SSE-ResNet-50 (train_SSE_ResNet.sh): fine-tunes ImageNet ResNet-50.
# Usage: ./train_SSE_resnet.sh [caffe train flags...]; see scripts/caffe_train.sh for the EMOTIW_SOLVER,
# EMOTIW_WEIGHTS, CAFFE and GPU overrides, and docs/nets.md for the nets and weights.
exec "$(dirname "$0")/scripts/caffe_train.sh" prototxt/sse_resnet50_4conv-c_concat/solver.prototxt models/pretrained/ResNet-50-model.caffemodel "$@"
