#!/usr/bin/env bash
# SSE-HoloNet test features, as the released test_SSE_HoloNet.sh: ./test_SSE_HoloNet.sh [WEIGHTS.caffemodel] [FRAME_LIST] [OUT_DIR]
exec "$(dirname "$0")/scripts/test_sse.sh" sse_holonet_3conv-s_concat models/SSE/SSE_HoloNet_trval_iter_69500.caffemodel "$@"
