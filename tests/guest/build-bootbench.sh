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

out=${1:?usage: build-bootbench.sh OUT_DIR}
PY=/usr/bin/python3.11
PYLIB=/usr/lib/python3.11
for c in apt-get apt-cache dpkg dpkg-deb dpkg-query cpio gzip mkfs.ext4 md5sum ldd; do
	command -v "$c" >/dev/null || { echo "build-bootbench: needs $c" >&2; exit 1; }
done
dpkg -s busybox-static >/dev/null 2>&1 || { echo "build-bootbench: needs busybox-static" >&2; exit 1; }
if ! [ -x "$PY" ] || ! [ -f "$PYLIB/os.py" ]; then
	echo "build-bootbench: needs $PY and $PYLIB (python3.11, libpython3.11-stdlib)" >&2
	exit 1
fi

# The kernel: the package that linux-image-amd64 depends on today.
kernel_pkg() {
	kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
		awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
	[ -n "$kpkg" ] || { echo "build-bootbench: no linux-image-amd64 in apt's lists (apt-get update?)" >&2; exit 1; }
	kver=$(apt-cache policy "$kpkg" | awk '/Candidate:/ {print $2}')
	inputs="script $(md5sum <"$0" | cut -c1-32)
kernel $kpkg $kver
busybox $(md5sum </bin/busybox | cut -c1-32)
python $(dpkg-query -W -f '${Version}' python3.11-minimal libpython3.11-stdlib 2>/dev/null | tr '\n' ' ')"
}
kernel_pkg

FILES="vmlinuz initrd.img disk.raw cmdline"
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ -f "$out/inputs" ] && [ "$(cat "$out/inputs")" = "$inputs" ]; then
	ok=1
	for f in $FILES; do [ -s "$out/$f" ] || ok=0; done
	[ $ok = 1 ] && exit 0
fi
rm -f "$out/inputs"
w=$(mktemp -d "$out/work.XXXXXX")
trap 'rm -rf "$w"' EXIT

# apt-get download writes to the current directory; as root it warns that
# _apt cannot write there unless the directory is world-writable.
chmod 777 "$w"
if ! (cd "$w" && apt-get download -q "$kpkg=$kver" >"$w/apt.log" 2>&1); then
	if [ "$(id -u)" -ne 0 ] || ! apt-get update -qq >/dev/null 2>&1; then
		cat "$w/apt.log" >&2
		exit 1
	fi
	kernel_pkg
	(cd "$w" && apt-get download -q "$kpkg=$kver" >"$w/apt.log" 2>&1) ||
		{ cat "$w/apt.log" >&2; exit 1; }
fi
mkdir "$w/k"
dpkg-deb --fsys-tarfile "$w"/"$kpkg"_*.deb | tar -x -C "$w/k" --wildcards './boot/vmlinuz-*' './lib/modules/*.ko'
rm -f "$w"/*.deb
kdir=$(echo "$w"/k/lib/modules/*)

# Modules with their dependencies (from each .ko's .modinfo "depends="),
# dependencies first. crc32c_generic: ext4's checksums need crc32c, a soft
# dependency that modinfo's depends= does not list.
declare -A seen=()
order=()
modpath() { find "$kdir" -name "$1.ko" -print -quit; }
addmod() {
	local m=$1 p d
	m=${m//-/_}
	[ -n "${seen[$m]:-}" ] && return 0
	seen[$m]=1
	p=$(modpath "$m")
	[ -n "$p" ] || { echo "build-bootbench: module $m not in $kpkg" >&2; exit 1; }
	for d in $(tr '\0' '\n' <"$p" | sed -n 's/^depends=//p' | tr ',' ' '); do
		addmod "$d"
	done
	order+=("$p")
}
for m in virtio_pci virtio_blk crc32c_generic ext4; do addmod "$m"; done

# initramfs: load the modules, mount root= (read-only for "ro": the
# benchmark's drives are read-only, and a read-write mount would write the
# superblock), switch to its /sbin/init.
ir=$w/initramfs
mkdir -p "$ir"/{bin,dev,proc,sys,newroot,modules}
cp /bin/busybox "$ir/bin/busybox"
for a in sh mount umount insmod switch_root sleep sed cat echo; do ln -s busybox "$ir/bin/$a"; done
: >"$ir/modules/order"
for p in "${order[@]}"; do
	cp "$p" "$ir/modules/"
	basename "$p" >>"$ir/modules/order"
done
cat >"$ir/init" <<'INIT'
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
while read -r m; do insmod "/modules/$m" || echo "initramfs: insmod $m failed"; done </modules/order
root=/dev/vda opt=rw
for a in $(cat /proc/cmdline); do
	case $a in
	root=*) root=${a#root=} ;;
	ro) opt=ro ;;
	esac
done
i=0
while [ ! -b "$root" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
mount -t ext4 -o "$opt" "$root" /newroot || { echo "initramfs: cannot mount $root"; exec sh; }
umount /proc /sys /dev
exec switch_root /newroot /sbin/init
INIT
chmod 755 "$ir/init"
(cd "$ir" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) | gzip -9 >"$w/initrd.img"

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

cp "$w"/k/boot/vmlinuz-* "$w/vmlinuz"
echo "root=/dev/vda ro console=ttyS0 quiet panic=-1" >"$w/cmdline"
for f in $FILES; do
	mv -f "$w/$f" "$out/$f"
done
chmod 644 "$out"/{vmlinuz,initrd.img,disk.raw,cmdline}
echo "$inputs" >"$out/inputs"
