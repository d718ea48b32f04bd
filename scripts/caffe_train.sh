#!/usr/bin/env bash
# The body of the root train_*.sh scripts: `caffe train` with the right gflags syntax.
#
# Usage: scripts/caffe_train.sh SOLVER WEIGHTS|none [caffe train flags...]
# Runs from the checkout's root (the solvers' net and snapshot paths are relative to it).
#   EMOTIW_SOLVER   another solver prototxt (e.g. one `emotiw nets --out DIR` wrote)
#   EMOTIW_WEIGHTS  another pretrained .caffemodel to fine-tune from
#   CAFFE           the caffe binary (default: .venv/bin/caffe, else caffe on PATH)
#   GPU             device id on a CUDA build of Caffe (default 0); a CPU-only build gets no --gpu
# A --snapshot=FILE.solverstate flag resumes training instead of starting from WEIGHTS.
set -euo pipefail

fail() { echo "error: $*" >&2; exit 2; }
absolute() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }

[ $# -ge 2 ] || fail "usage: $0 SOLVER WEIGHTS|none [caffe train flags...]"
solver=$1 weights=$2
shift 2
[ -n "${EMOTIW_SOLVER:-}" ] && solver=$(absolute "$EMOTIW_SOLVER")
[ -n "${EMOTIW_WEIGHTS:-}" ] && weights=$(absolute "$EMOTIW_WEIGHTS")
cd "$(dirname "$0")/.."

caffe=${CAFFE:-}
if [ -z "$caffe" ]; then
    if [ -x .venv/bin/caffe ]; then caffe=.venv/bin/caffe
    else caffe=$(command -v caffe) || fail "no caffe binary; run \`make install\` or set CAFFE"
    fi
fi
[ -f "$solver" ] || fail "solver $solver not found; run \`make nets\` to write prototxt/"

args=(train "--solver=$solver")
resuming=false
for arg in "$@"; do
    case "$arg" in --snapshot=*|--snapshot) resuming=true ;; esac
done
if [ "$weights" != none ] && [ "$resuming" = false ]; then
    [ -f "$weights" ] || fail "pretrained weights $weights not found; download them and put them" \
        "there (docs/nets.md lists the files), or set EMOTIW_WEIGHTS"
    args+=("--weights=$weights")
fi
if ldd "$(readlink -f "$(command -v "$caffe")")" 2>/dev/null | grep -q libcudart \
        && [[ " $* " != *" --gpu"* ]]; then
    args+=("--gpu=${GPU:-0}")
fi

# Caffe's OpenBLAS runs generic kernels on CPUs newer than itself; emotiw knows which to ask for
# (emotiw/caffe_env.py). A value already set is kept.
if [ -z "${OPENBLAS_CORETYPE+set}" ] && [ -x .venv/bin/python ]; then
    core=$(.venv/bin/python -m emotiw.caffe.env openblas-coretype 2>/dev/null) || core=
    [ -n "$core" ] && export OPENBLAS_CORETYPE=$core
fi

# Caffe does not create the snapshot folder; a missing one aborts at the first snapshot.
prefix=$(sed -n 's/^snapshot_prefix: *"\(.*\)"$/\1/p' "$solver")
[ -n "$prefix" ] && mkdir -p "$(dirname "$prefix")"
exec "$caffe" "${args[@]}" "$@"
