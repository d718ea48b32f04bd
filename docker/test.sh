#!/bin/sh
# `make docker-test`: builds the CPU image and runs `emotiw doctor`, `emotiw preprocess` and
# `emotiw test` inside it, on clips the image itself generates, with the network off.
set -eu
IMAGE=${IMAGE:-emotiw:cpu}
cd "$(dirname "$0")/.."
docker info >/dev/null 2>&1 || { echo "docker/test.sh: no Docker daemon (start dockerd, e.g. dockerd --storage-driver=vfs)" >&2; exit 1; }
docker image inspect debian:12 >/dev/null 2>&1 || docker pull debian:12 >/dev/null 2>&1 || sh docker/debian-base.sh debian:12
# the host's own certificate authorities (a TLS-intercepting proxy's), for pip inside the build
added=""
for cert in ${EMOTIW_CA_CERTS:-/usr/local/share/ca-certificates/*.crt}; do
    [ -f "$cert" ] || continue
    cp "$cert" docker/ca-certificates/ && added="$added docker/ca-certificates/$(basename "$cert")"
done
trap 'rm -f $added' EXIT
docker build --network host -f docker/Dockerfile -t "$IMAGE" .
work=$(mktemp -d)
trap 'rm -f $added; rm -rf "$work"' EXIT
run() { docker run --rm --network none -u "$(id -u):$(id -g)" -v "$work:/data" "$IMAGE" "$@"; }
run doctor
run demo-data --out /data/clips --clips-per-class 1,1,2 --frames 4
run preprocess --videos /data/clips/test --split test --out /data/faces --recipe sse --size 64
run test --net fer2013_mini_xception --weights /opt/emotiw/models/fer/fer2013_mini_xception.caffemodel \
    --videos /data/faces/lists/test_videos.txt --out /data/scores
test -s "$work/scores/metrics.json" && test -s "$work/scores/predictions.csv"
echo "docker/test.sh: $IMAGE passed doctor, preprocess and test ($(wc -l < "$work/scores/predictions.csv") lines of predictions)"
