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

NAME=build-guest
OUT=${1:?usage: build-guest.sh OUT_DIR}
FILES="vmlinuz initrd.img disk.raw cmdline data.md5"
EXTRA_INPUTS=
# shellcheck source=tests/guest/guest-lib.sh
. "$(dirname "$0")/guest-lib.sh"
guest_need
guest_start
guest_kernel
guest_initrd

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

echo "root=/dev/vda rw console=ttyS0 quiet panic=-1" >"$w/cmdline"
guest_finish
