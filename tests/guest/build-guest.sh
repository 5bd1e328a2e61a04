#!/bin/bash
# build-guest.sh OUT_DIR: a small Linux guest for tests and benchmarks, made
# from Debian packages only (the kernel .deb via apt-get download, the static
# busybox of busybox-static, mkfs.ext4 of e2fsprogs). Writes to OUT_DIR:
#   vmlinuz     Debian's kernel, for direct kernel boot (-kernel)
#   initrd.img  busybox + virtio_pci/virtio_blk/ext4 modules (-initrd): they
#               are modules in Debian's kernel; it mounts root= and
#               switch_roots to its /sbin/init
#   disk.raw    64 MiB raw ext4 root: busybox, /sbin/init, /data (4 MiB of
#               random bytes whose md5 is in data.md5)
#   cmdline     the kernel command line to boot it with
#   inputs      what it was built from; same inputs: OUT_DIR is reused
# The guest's init prints on the serial console, in order:
#   STREAMFS-GUEST-READY             root mounted, init running
#   STREAMFS-GUEST-READ <md5>        md5 of /data, read back from the disk
#   STREAMFS-GUEST-WROTE <nonce>     wrote <nonce> (sfs.nonce= on the kernel
#                                    command line) to /written, 4 MiB of
#                                    random bytes to /scratch, and synced
#   STREAMFS-GUEST-DONE              root remounted read-only
# then powers off. sfs.hold=1 on the command line skips the writes and the
# power-off (the guest idles, for benchmarks that time the boot only).
# sfs.soak=N first runs N rounds of: write 1 MiB of random bytes to a new
# file /soak.<i> with O_DIRECT, wait 0.4 s, sync, drop the page cache, read
# it and /data back, printing
#   STREAMFS-GUEST-SOAK <i> ok|BAD <md5 of /data>
# and then STREAMFS-GUEST-ERRORS <n>: kernel log lines about I/O errors.
# Under TCG (no KVM) it boots in seconds; root is needed only if busybox or
# e2fsprogs must be installed first (setup.sh installs them).
set -euo pipefail

out=${1:?usage: build-guest.sh OUT_DIR}
for c in apt-get apt-cache dpkg dpkg-deb cpio gzip mkfs.ext4 md5sum; do
	command -v "$c" >/dev/null || { echo "build-guest: needs $c" >&2; exit 1; }
done
# Debian's busybox package is dynamically linked: the guest needs the static one.
dpkg -s busybox-static >/dev/null 2>&1 || { echo "build-guest: needs busybox-static" >&2; exit 1; }

# The kernel: the package that linux-image-amd64 depends on today.
kernel_pkg() {
	kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
		awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
	[ -n "$kpkg" ] || { echo "build-guest: no linux-image-amd64 in apt's lists (apt-get update?)" >&2; exit 1; }
	kver=$(apt-cache policy "$kpkg" | awk '/Candidate:/ {print $2}')
	inputs="script $(md5sum <"$0" | cut -c1-32)
kernel $kpkg $kver
busybox $(md5sum </bin/busybox | cut -c1-32)"
}
kernel_pkg

mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ -f "$out/inputs" ] && [ "$(cat "$out/inputs")" = "$inputs" ]; then
	for f in vmlinuz initrd.img disk.raw cmdline data.md5; do
		[ -s "$out/$f" ] || break
	done
	[ -s "$out/$f" ] && exit 0
fi
rm -f "$out/inputs"
w=$(mktemp -d "$out/work.XXXXXX")
trap 'rm -rf "$w"' EXIT

# apt-get download writes to the current directory; as root it warns that
# _apt cannot write there unless the directory is world-writable.
chmod 777 "$w"
# Stale lists name a .deb the mirror no longer has: update them once (root).
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
	[ -n "$p" ] || { echo "build-guest: module $m not in $kpkg" >&2; exit 1; }
	for d in $(tr '\0' '\n' <"$p" | sed -n 's/^depends=//p' | tr ',' ' '); do
		addmod "$d"
	done
	order+=("$p")
}
for m in virtio_pci virtio_blk crc32c_generic ext4; do addmod "$m"; done

# initramfs: load the modules, mount root=, switch to its /sbin/init.
ir=$w/initramfs
mkdir -p "$ir"/{bin,dev,proc,sys,newroot,modules}
cp /bin/busybox "$ir/bin/busybox"
for a in sh mount umount insmod switch_root sleep sed cat echo; do ln -s busybox "$ir/bin/$a"; done
: >"$ir/modules/order"
for p in "${order[@]}"; do
	cp "$p" "$ir/modules/"
	basename "$p" >>"$ir/modules/order"
done
cat >"$ir/init" <<'EOF'
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
while read -r m; do insmod "/modules/$m" || echo "initramfs: insmod $m failed"; done </modules/order
root=/dev/vda
for a in $(cat /proc/cmdline); do
	case $a in root=*) root=${a#root=} ;; esac
done
i=0
while [ ! -b "$root" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
mount -t ext4 "$root" /newroot || { echo "initramfs: cannot mount $root"; exec sh; }
umount /proc /sys /dev
exec switch_root /newroot /sbin/init
EOF
chmod 755 "$ir/init"
(cd "$ir" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) | gzip -9 >"$w/initrd.img"

# The root filesystem.
rt=$w/root
mkdir -p "$rt"/{bin,sbin,dev,proc,sys,tmp,etc}
cp /bin/busybox "$rt/bin/busybox"
for a in $(/bin/busybox --list); do
	[ "$a" = busybox ] || ln -s busybox "$rt/bin/$a"
done
cat >"$rt/sbin/init" <<'EOF'
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
nonce=none hold= soak=0
for a in $(cat /proc/cmdline); do
	case $a in
	sfs.nonce=*) nonce=${a#sfs.nonce=} ;;
	sfs.hold=1) hold=1 ;;
	sfs.soak=*) soak=${a#sfs.soak=} ;;
	esac
done
echo "STREAMFS-GUEST-READY"
echo "STREAMFS-GUEST-READ $(md5sum /data | cut -d' ' -f1)"
if [ -n "$hold" ]; then
	while :; do sleep 3600; done
fi
i=0
while [ "$i" -lt "$soak" ]; do
	i=$((i + 1))
	# O_DIRECT into a new file (new blocks: allocating writes in an
	# overlay), acknowledged some time before the flush (sync).
	dd if=/dev/urandom of=/soak.$i bs=64k count=16 oflag=direct 2>/dev/null
	a=$(md5sum </soak.$i | cut -c1-32)
	sleep 0.4
	sync
	echo 3 >/proc/sys/vm/drop_caches
	b=$(md5sum </soak.$i | cut -c1-32)
	c=$(md5sum </data | cut -c1-32)
	if [ "$a" = "$b" ]; then r=ok; else r=BAD; fi
	echo "STREAMFS-GUEST-SOAK $i $r $c"
done
if [ "$soak" -gt 0 ]; then
	echo "STREAMFS-GUEST-ERRORS $(dmesg | grep -ciE 'I/O error|EXT4-fs (error|warning)|Buffer I/O|blk_update_request|critical medium')"
fi
echo "$nonce" >/written
dd if=/dev/urandom of=/scratch bs=1M count=4 2>/dev/null
sync
echo "STREAMFS-GUEST-WROTE $nonce"
mount -o remount,ro /
echo "STREAMFS-GUEST-DONE"
poweroff -f
EOF
chmod 755 "$rt/sbin/init"
head -c 4M /dev/urandom >"$rt/data"
md5sum <"$rt/data" | cut -c1-32 >"$w/data.md5"
mkfs.ext4 -q -F -L sfs-guest -E root_owner=0:0 -d "$rt" "$w/disk.raw" 64M >/dev/null

cp "$w"/k/boot/vmlinuz-* "$w/vmlinuz"
echo "root=/dev/vda rw console=ttyS0 quiet panic=-1" >"$w/cmdline"
for f in vmlinuz initrd.img disk.raw cmdline data.md5; do
	mv -f "$w/$f" "$out/$f"
done
chmod 644 "$out"/{vmlinuz,initrd.img,disk.raw,cmdline,data.md5}
echo "$inputs" >"$out/inputs"
