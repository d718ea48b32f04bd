#!/bin/sh
# Makes the debian:12 base image from Debian's own packages, for hosts that cannot pull it
# (debootstrap from the mirror apt already uses; needs root, debootstrap and a running dockerd).
set -eu
TAG=${1:-debian:12}
MIRROR=${EMOTIW_DEBIAN_MIRROR:-$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)}
if [ -z "$MIRROR" ]; then
    echo "docker/debian-base.sh: no Debian mirror in /etc/apt/sources.list.d; set EMOTIW_DEBIAN_MIRROR" >&2
    exit 1
fi
command -v debootstrap >/dev/null || { echo "docker/debian-base.sh: debootstrap is missing: apt-get install debootstrap" >&2; exit 1; }
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase bookworm "$root" "$MIRROR" >/dev/null
tar -C "$root" -c . | docker import - "$TAG" >/dev/null
echo "made $TAG from $MIRROR"
