#!/bin/bash
# Random unaligned writes through disk (dd, and fio if present), mirrored on
# a reference raw copy; after unmount qemu-img compare says identical and
# qemu-img check is clean. Then remount and compare the guest view again.
# formats: qcow2 qed
. "$(dirname "$0")/functions.sh"
requires qemu-img fusermount3

mkbacking "$T/base.raw" 32
cp "$T/base.raw" "$T/ref.raw"
"$STREAMFS" create -f "$FMT" -b "$T/base.raw" -F raw "$T/ovl" >/dev/null
sfs_mount "$T/ovl" "$T/mnt"

RANDOM=42
size=$((32 * 1024 * 1024))
for i in $(seq 1 60); do
	off=$(((RANDOM * 32768 + RANDOM) % (size - 300000)))
	len=$((RANDOM % 200000 + 1))
	head -c $len /dev/urandom >"$T/chunk"
	dd if="$T/chunk" of="$T/mnt/disk" bs=$len seek=$off oflag=seek_bytes conv=notrunc status=none
	dd if="$T/chunk" of="$T/ref.raw" bs=$len seek=$off oflag=seek_bytes conv=notrunc status=none
done
# Writes at the very start and end, and across the end must fail.
printf 'HEAD' | dd of="$T/mnt/disk" conv=notrunc status=none
printf 'HEAD' | dd of="$T/ref.raw" conv=notrunc status=none
printf 'TAIL' | dd of="$T/mnt/disk" bs=1 seek=$((size - 4)) conv=notrunc status=none
printf 'TAIL' | dd of="$T/ref.raw" bs=1 seek=$((size - 4)) conv=notrunc status=none
# Across the end: short write (2 bytes land), as on a block device.
if printf 'XXXX' | dd of="$T/mnt/disk" bs=4 count=1 seek=$((size - 2)) oflag=seek_bytes \
	conv=notrunc status=none 2>/dev/null; then
	fail "a write across the end of the disk succeeded"
fi
printf 'XX' | dd of="$T/ref.raw" bs=2 count=1 seek=$((size - 2)) oflag=seek_bytes conv=notrunc status=none
if printf 'XXXX' | dd of="$T/mnt/disk" bs=4 count=1 seek=$size oflag=seek_bytes \
	conv=notrunc status=none 2>/dev/null; then
	fail "a write past the end of the disk succeeded"
fi
[ "$(stat -c %s "$T/mnt/disk")" = $size ] || fail "disk size changed"
cmp "$T/mnt/disk" "$T/ref.raw" || fail "guest view differs from reference"

[ -n "${CI:-}" ] && ! command -v fio >/dev/null && fail "CI: missing fio"
if command -v fio >/dev/null; then
	# fio writes a verifiable pattern with O_DIRECT at depth, then verifies
	# (from $T: fio leaves its verify state file in the current directory).
	cd "$T" || fail "cd $T"
	fio --name=w --filename="$T/mnt/disk" --rw=randwrite --bs=4k --size=8m --offset=16m \
		--direct=1 --ioengine=psync --numjobs=1 --verify=crc32c --do_verify=1 --verify_state_save=0 \
		--randseed=7 --output="$T/fio.txt" >/dev/null || fail "fio verify failed: $(tail "$T/fio.txt")"
	dd if="$T/mnt/disk" of="$T/ref.raw" bs=1M skip=16 seek=16 count=8 conv=notrunc status=none
fi
sfs_umount "$T/mnt"
qcheck "$T/ovl"
qemu-img compare -f "$FMT" -F raw "$T/ovl" "$T/ref.raw" || fail "qemu-img compare differs"

sfs_mount "$T/ovl" "$T/mnt" -o ro
cmp "$T/mnt/disk" "$T/ref.raw" || fail "remounted view differs"
if echo x | dd of="$T/mnt/disk" conv=notrunc status=none 2>/dev/null; then fail "write on ro mount"; fi
sfs_umount "$T/mnt"
echo ok
