#!/bin/sh
# Install what streamfs needs to build, test and benchmark on Debian/Ubuntu.
# Build: libfuse3, zlib, libcurl, libnbd (nbd:// backings), cmocka. Test
# oracles and peers: qemu-img and qemu-nbd, fio, nginx, qemu-storage-daemon,
# nbdkit, nbdinfo, nbdfuse, python3 (fault server).
# For tests/test-libvirt.sh and its guest (tests/guest/), always: libvirtd,
# virtlogd, virsh and qemu-system-x86 (without recommends: ~40 packages,
# 21 MiB), busybox-static, e2fsprogs, cpio; the sysv flavour of
# libvirt-daemon-system, so apt pulls no systemd. --bench: the benchmark's peers.
set -e
SUDO=
[ "$(id -u)" -eq 0 ] || SUDO=sudo
PKGS="build-essential pkg-config libfuse3-dev fuse3 zlib1g-dev libcurl4-openssl-dev \
libnbd-dev libnbd-bin nbdkit libcmocka-dev qemu-utils fio nginx-light python3 curl clang-format \
procps psmisc bc tmux openssl util-linux valgrind"
NOREC="libvirt-daemon-system libvirt-daemon-system-sysv libvirt-clients \
qemu-system-x86 busybox-static e2fsprogs cpio"
for a in "$@"; do
	case $a in
	--bench) PKGS="$PKGS qemu-system-common qemu-block-extra" ;;
	--libvirt) ;; # always installed now; kept for old command lines
	*) echo "setup: unknown option $a (--bench)" >&2; exit 2 ;;
	esac
done
missing=
missing_norec=
for p in $PKGS; do
	dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
for p in $NOREC; do
	dpkg -s "$p" >/dev/null 2>&1 || missing_norec="$missing_norec $p"
done
if [ -n "$missing$missing_norec" ]; then
	echo "setup: installing$missing$missing_norec"
	$SUDO apt-get update -qq || true
fi
if [ -n "$missing" ]; then
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi
if [ -n "$missing_norec" ]; then
	# Recommends would bring ~170 more packages (desktop QEMU, dnsmasq...).
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
		$missing_norec >/dev/null
fi
[ -e /dev/fuse ] || echo "setup: warning: /dev/fuse is missing; mounts will fail" >&2
