#!/bin/bash
# Guest discard and write-zeroes: fallocate(PUNCH_HOLE|KEEP_SIZE) and
# fallocate(ZERO_RANGE) on MNT/disk make the range read as zeros (the
# backing is hidden), aligned or not, before and after the stream job; the
# overlay stays clean for qemu-img; a plain preallocation (mode 0) and
# ranges past the end are refused.
# formats: qcow2 qed
. "$(dirname "$0")/functions.sh"
requires qemu-img fusermount3 fallocate

randfile "$T/base.raw" 16
cp "$T/base.raw" "$T/ref.raw"
"$STREAMFS" create -f "$FMT" -b "$T/base.raw" -F raw "$T/ovl" >/dev/null
sfs_mount "$T/ovl" "$T/mnt"
# Some written data first, so discards hit data, backing and mixed runs.
dd if=/dev/urandom of="$T/w" bs=64k count=8 status=none
dd if="$T/w" of="$T/mnt/disk" bs=64k seek=40 conv=notrunc status=none
dd if="$T/w" of="$T/ref.raw" bs=64k seek=40 conv=notrunc status=none
both() { # both OPTS...: the same fallocate on the disk and on the reference file
	fallocate "$@" "$T/mnt/disk" || fail "fallocate $* failed on the disk"
	fallocate "$@" "$T/ref.raw"
}
both -p -o 0 -l 1M                      # aligned, backing data
both -p -o $((40 * 65536 + 100)) -l 200000 # unaligned, over written data
both -z -o $((3 * 1048576 + 7)) -l 3M   # zero range, unaligned both ends
both -p -o $((16 * 1048576 - 1000)) -l 1000 # up to the end
both -z -o 12345 -l 1                   # one byte
cmp "$T/mnt/disk" "$T/ref.raw" || fail "content differs after discards"
# Refusals: plain preallocation cannot be promised; no growing the disk.
fallocate -o 0 -l 4096 "$T/mnt/disk" 2>/dev/null && fail "fallocate mode 0 accepted"
fallocate -z -o $((16 * 1048576 - 10)) -l 100 "$T/mnt/disk" 2>/dev/null &&
	fail "zero range past the end accepted without keep-size"
# The job copies the rest; the zeros stay zeros.
echo start >"$T/mnt/control/stream"
wait_state "$T/mnt" completed 60
cmp "$T/mnt/disk" "$T/ref.raw" || fail "content differs after the stream"
sfs_umount "$T/mnt"
qcheck "$T/ovl"
qemu-img compare -f "$FMT" -F raw "$T/ovl" "$T/ref.raw" >/dev/null || fail "qemu-img compare differs"
# Whole discarded clusters are zero clusters, not data (qcow2 v3 / QED).
qemu-img map --output=json -f "$FMT" "$T/ovl" | grep -q '"zero": true' || fail "no zero clusters in the map"
echo ok
