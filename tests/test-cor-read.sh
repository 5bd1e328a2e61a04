#!/bin/bash
# Mount an overlay over a raw backing, read all of disk, compare with the
# backing; the second read is served from the overlay (copy-on-read);
# after unmount the overlay holds the data and qemu-img check is clean.
# formats: qcow2 qed
. "$(dirname "$0")/functions.sh"
requires qemu-img fusermount3

mkbacking "$T/base.raw" 48
"$STREAMFS" create -f "$FMT" -b "$T/base.raw" -F raw "$T/ovl" >/dev/null
qemu-img info "$T/ovl" | grep -q "backing file: $T/base.raw" || fail "backing not recorded"
qemu-img info "$T/ovl" | grep -q "backing file format: raw" || [ "$FMT" = qed ] ||
	fail "backing format not recorded"

sfs_mount "$T/ovl" "$T/mnt"
[ "$(stat -c %s "$T/mnt/disk")" = "$(stat -c %s "$T/base.raw")" ] || fail "disk size differs"
cmp "$T/mnt/disk" "$T/base.raw" || fail "first read differs from backing"
cor=$(field "$T/mnt" bytes_copied_on_read)
[ "$cor" -gt 0 ] || fail "nothing copied on read"
# Drop the page cache so the second read really comes from the daemon.
sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
dd if="$T/mnt/disk" of=/dev/null bs=1M iflag=direct status=none
cmp "$T/mnt/disk" "$T/base.raw" || fail "second read differs"
[ "$(field "$T/mnt" bytes_copied_on_read)" = "$cor" ] || fail "second read copied again"
sfs_umount "$T/mnt"

qcheck "$T/ovl"
# The overlay now holds every data cluster: compare it without its backing.
qemu-img compare -f "$FMT" -F raw "$T/ovl" "$T/base.raw" >/dev/null || fail "compare with backing"

# copy_on_read=off leaves the overlay untouched.
"$STREAMFS" create -f "$FMT" -b "$T/base.raw" -F raw "$T/ovl2" >/dev/null
size0=$(stat -c %s "$T/ovl2")
sfs_mount "$T/ovl2" "$T/mnt" -o copy_on_read=off
cmp "$T/mnt/disk" "$T/base.raw" || fail "read with copy_on_read=off differs"
[ "$(field "$T/mnt" bytes_copied_on_read)" = 0 ] || fail "copied with copy_on_read=off"
sfs_umount "$T/mnt"
[ "$(stat -c %s "$T/ovl2")" = "$size0" ] || fail "overlay grew with copy_on_read=off"
qcheck "$T/ovl2"
echo ok
