#!/usr/bin/env bash
# SSE-ResNet test features, as the released test_SSE_ResNet.sh: ./test_SSE_ResNet.sh [WEIGHTS.caffemodel] [FRAME_LIST] [OUT_DIR]
exec "$(dirname "$0")/scripts/test_sse.sh" sse_resnet50_4conv-c_concat models/SSE/SSE_ResNet_50_trval_iter_83000.caffemodel "$@"
