#!/bin/bash
# build-bootbench.sh OUT_DIR: the guest of the boot benchmark (bench/boot.sh),
# a bigger sibling of build-guest.sh, made from Debian packages only: the
# kernel .deb via apt-get download, the static busybox of busybox-static, and
# python3.11 with its standard library and shared libraries as installed on
# this host (python3.11-minimal, libpython3.11-stdlib). Writes to OUT_DIR:
#   vmlinuz     Debian's kernel, for direct kernel boot (-kernel)
#   initrd.img  busybox + virtio_pci/virtio_blk/ext4 modules (-initrd): mounts
#               root= (read-only if "ro" is on the command line) and
#               switch_roots to its /sbin/init
#   disk.raw    2 GiB sparse raw ext4 root: busybox, /usr/bin/python3.11, the
#               libraries ldd names for it and its extension modules,
#               /usr/lib/python3.11 (bytecode included), /sbin/init
#   cmdline     the kernel command line to boot it with (read-only root, so
#               the image is never written and boots can be compared)
#   inputs      what it was built from; same inputs: OUT_DIR is reused
# The guest's init prints on the serial console, in order:
#   STREAMFS-BOOT-INIT    root mounted, init running
#   STREAMFS-BOOT-READY   printed by python3 after importing json,
#                         http.client, email, xml.etree.ElementTree, sqlite3
#                         and asyncio (tens of MiB of reads from the disk)
# (STREAMFS-BOOT-FAILED if python3 fails), then powers off; sfs.hold=1 on the
# command line makes it idle instead, for benchmarks that read the disk
# statistics of the running QEMU first. Root is needed only to install
# busybox-static or e2fsprogs; apt-get update is tried (as root) once if the
# lists name a kernel the mirror no longer has.
set -euo pipefail

NAME=build-bootbench
OUT=${1:?usage: build-bootbench.sh OUT_DIR}
FILES="vmlinuz initrd.img disk.raw cmdline"
PY=/usr/bin/python3.11
PYLIB=/usr/lib/python3.11
EXTRA_INPUTS="python $(dpkg-query -W -f '${Version}' python3.11-minimal libpython3.11-stdlib 2>/dev/null | tr '\n' ' ')"
# shellcheck source=tests/guest/guest-lib.sh
. "$(dirname "$0")/guest-lib.sh"
guest_need dpkg-query ldd
guest_start
guest_kernel
guest_initrd

# The root filesystem, laid out like Debian 12's (merged /usr: /lib and
# /lib64 are links into /usr), so ldd's paths are valid in the guest.
rt=$w/root
mkdir -p "$rt"/{bin,sbin,dev,proc,sys,tmp,etc,usr/bin,usr/lib/x86_64-linux-gnu,usr/lib64}
ln -s usr/lib "$rt/lib"
ln -s usr/lib64 "$rt/lib64"
cp /bin/busybox "$rt/bin/busybox"
for a in $(/bin/busybox --list); do
	[ "$a" = busybox ] || ln -s busybox "$rt/bin/$a"
done
cp -a "$PY" "$rt/usr/bin/python3.11"
ln -s python3.11 "$rt/usr/bin/python3"
# -a keeps the mtimes the bytecode in __pycache__ was checked against, so
# the guest imports the .pyc files instead of compiling the sources
cp -a "$PYLIB" "$rt/usr/lib/"
[ -d /etc/python3.11 ] && cp -a /etc/python3.11 "$rt/etc/"
# The shared libraries of the interpreter and of every extension module
# (sqlite3, ssl, ...), at the paths ldd gives, as files (-L).
for f in "$PY" "$PYLIB"/lib-dynload/*.so; do
	ldd "$f" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'
done | sort -u | while read -r lib; do
	mkdir -p "$rt$(dirname "$lib")"
	cp -L "$lib" "$rt$lib"
done
cat >"$rt/sbin/init" <<'INIT'
#!/bin/sh
export PATH=/bin:/usr/bin HOME=/tmp PYTHONDONTWRITEBYTECODE=1
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
hold=
for a in $(cat /proc/cmdline); do
	case $a in sfs.hold=1) hold=1 ;; esac
done
echo "STREAMFS-BOOT-INIT"
python3 -c 'import json, http.client, email, xml.etree.ElementTree, sqlite3, asyncio; print("STREAMFS-BOOT-READY")' ||
	echo "STREAMFS-BOOT-FAILED"
if [ -n "$hold" ]; then
	while :; do sleep 3600; done
fi
poweroff -f
INIT
chmod 755 "$rt/sbin/init"
mkfs.ext4 -q -F -L sfs-bootbench -E root_owner=0:0 -d "$rt" "$w/disk.raw" 2G >/dev/null

echo "root=/dev/vda ro console=ttyS0 quiet panic=-1" >"$w/cmdline"
guest_finish
