#!/bin/sh
# Install what streamfs needs to build, test and benchmark on Debian/Ubuntu.
# Build: libfuse3, zlib, libcurl, cmocka. Test oracles and peers: qemu-img,
# fio, nginx, qemu-storage-daemon, nbdkit, nbdfuse, python3 (fault server).
set -e
SUDO=
[ "$(id -u)" -eq 0 ] || SUDO=sudo
PKGS="build-essential pkg-config libfuse3-dev fuse3 zlib1g-dev libcurl4-openssl-dev \
libcmocka-dev qemu-utils fio nginx-light python3 curl clang-format procps psmisc bc tmux openssl \
util-linux valgrind"
[ "${1:-}" = --bench ] && PKGS="$PKGS qemu-system-common qemu-block-extra nbdkit libnbd-bin"
missing=
for p in $PKGS; do
	dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
	echo "setup: installing$missing"
	$SUDO apt-get update -qq || true
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi
[ -e /dev/fuse ] || echo "setup: warning: /dev/fuse is missing; mounts will fail" >&2
