#!/usr/bin/env bash
# SSE-HoloNet test features, as the released test_SSE_HoloNet.sh but without its `rm -r dir &&` bug:
# Caffe's extract_features runs on the test net's blob prob for exactly ceil(N / batch) mini-batches,
# then leveldb2mat writes OUT_DIR/features.mat (feats: one row per frame of the list).
# Net: prototxt/sse_holonet_3conv-s_concat/test.prototxt
# Usage, from the repository root: ./test_SSE_HoloNet.sh [WEIGHTS.caffemodel] [FRAME_LIST] [OUT_DIR]
# Defaults: the released snapshot, the test net's own ImageData list, examples/<net>_features.
set -euo pipefail
net=sse_holonet_3conv-s_concat
weights=${1:-models/SSE/SSE_HoloNet_trval_iter_69500.caffemodel}
if [ ! -f "$weights" ]; then
    echo "$0: weights file $weights not found; give the trained .caffemodel as the first argument" >&2
    exit 2
fi
exec "$(dirname "$0")/.venv/bin/emotiw" extract --net "$net" --weights "$weights" ${2:+--list "$2"} \
    --blob prob --out "${3:-examples/${net}_features}"
