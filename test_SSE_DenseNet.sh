#!/usr/bin/env bash
# SSE-DenseNet test features, as the released test_SSE_DenseNet.sh: ./test_SSE_DenseNet.sh [WEIGHTS.caffemodel] [FRAME_LIST] [OUT_DIR]
exec "$(dirname "$0")/scripts/test_sse.sh" sse_densenet121_3conv-s_concat models/SSE/SSE_DenseNet_121_trval_iter_69500.caffemodel "$@"
