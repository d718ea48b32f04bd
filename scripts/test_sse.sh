#!/usr/bin/env bash
# The body of the root test_SSE_*.sh scripts: SSE test features as the released scripts make them,
# without their `rm -r dir &&` bug. Caffe's extract_features runs on the net's test.prototxt, blob
# prob, for exactly ceil(N / batch) mini-batches; then leveldb2mat writes OUT_DIR/features.mat
# (feats: one row per frame of the list).
# Usage: scripts/test_sse.sh NET DEFAULT_WEIGHTS [WEIGHTS.caffemodel] [FRAME_LIST] [OUT_DIR]
# Defaults: DEFAULT_WEIGHTS (the released snapshot), the test net's own ImageData list,
# examples/<net>_features. Run from the repository root.
set -euo pipefail
net=$1 default_weights=$2
shift 2
weights=${1:-$default_weights}
if [ ! -f "$weights" ]; then
    echo "$0: weights file $weights not found; give the trained .caffemodel as the first argument" >&2
    exit 2
fi
exec "$(dirname "$0")/../.venv/bin/emotiw" extract --net "$net" --weights "$weights" ${2:+--list "$2"} \
    --blob prob --out "${3:-examples/${net}_features}"
