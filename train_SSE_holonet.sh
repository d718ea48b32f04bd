#!/usr/bin/env bash
# SSE-HoloNet (train_SSE_HoloNet.sh): trained from scratch.
# Usage: ./train_SSE_holonet.sh [caffe train flags...]; see scripts/caffe_train.sh for the EMOTIW_SOLVER,
# EMOTIW_WEIGHTS, CAFFE and GPU overrides, and docs/nets.md for the nets and weights.
exec "$(dirname "$0")/scripts/caffe_train.sh" prototxt/sse_holonet_3conv-s_concat/solver.prototxt none "$@"
