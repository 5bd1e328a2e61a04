#!/bin/bash
# The overlay's filesystem fills up (a 24 MiB tmpfs under a 64 MiB disk):
# guest writes fail with ENOSPC/EIO instead of hanging, the stream job fails
# with a message, nothing is corrupted; once space is freed the same mount
# accepts writes and a restarted job completes with the right content.
# formats: qcow2 qed
. "$(dirname "$0")/functions.sh"
requires qemu-img fusermount3
[ "$(id -u)" = 0 ] || skip "needs root for a tmpfs"

randfile "$T/base.raw" 64
mkdir -p "$T/small"
mount -t tmpfs -o size=24m tmpfs "$T/small" || skip "cannot mount tmpfs"
cleanup_fn "umount -l '$T/small' 2>/dev/null"
"$STREAMFS" create -f "$FMT" -b "$T/base.raw" -F raw "$T/small/ovl" >/dev/null
cp "$T/base.raw" "$T/ref.raw"
sfs_mount "$T/small/ovl" "$T/mnt" -o copy_on_read=off

# Fill: write 40 MiB of guest data; it must fail part way, not hang.
head -c 40M /dev/urandom >"$T/data"
rc=0
timeout 60 dd if="$T/data" of="$T/mnt/disk" bs=1M conv=notrunc,fsync status=none 2>"$T/dd.err" || rc=$?
[ $rc -ne 124 ] || fail "guest write hung on a full disk"
[ $rc -ne 0 ] || fail "40 MiB fit in a 24 MiB filesystem?"
grep -qiE "space|input/output" "$T/dd.err" || fail "unexpected error: $(cat "$T/dd.err")"
# The job fails cleanly too.
echo start >"$T/mnt/control/stream"
wait_state "$T/mnt" failed 60
field "$T/mnt" error | grep -qiE "space|input/output|offset" || fail "no error message"

# Free space: the same mount recovers.
mount -o remount,size=200m "$T/small"
dd if="$T/data" of="$T/mnt/disk" bs=1M conv=notrunc,fsync status=none || fail "writes after freeing space"
dd if="$T/data" of="$T/ref.raw" bs=1M conv=notrunc status=none
echo start >"$T/mnt/control/stream"
wait_state "$T/mnt" completed 60
cmp "$T/mnt/disk" "$T/ref.raw" || fail "content differs after recovery"
sfs_umount "$T/mnt"
qcheck_crash "$T/small/ovl"
qemu-img compare -f "$FMT" -F raw "$T/small/ovl" "$T/ref.raw" || fail "overlay differs"

# Small clusters, random writes: new metadata (L2 tables, refcount blocks)
# is needed all along. Its space is taken when a write allocates it, so the
# disk filling up fails a write (ENOSPC), never a later fdatasync of writes
# already acknowledged; every write synced before that is on disk.
umount -l "$T/small"
mount -t tmpfs -o size=6m tmpfs "$T/small" || skip "cannot mount tmpfs"
"$STREAMFS" create -f "$FMT" -c 4096 -b "$T/base.raw" -F raw "$T/small/ovl2" >/dev/null
sfs_mount "$T/small/ovl2" "$T/mnt"
timeout 120 "$HELPERS/writer" write "$T/mnt/disk" "$T/wlog" 77 2>"$T/writer.err" ||
	fail "writer: $(cat "$T/writer.err")"
info "full disk: $(cat "$T/writer.err"); $(grep -c '^W' "$T/wlog") writes issued"
grep -q "stopped: pwrite: No space left" "$T/writer.err" ||
	fail "the full disk did not fail a write with ENOSPC: $(cat "$T/writer.err")"
# Reads still work on the full disk (copy-on-read on): served from the
# backing without being copied, every sector right.
"$HELPERS/writer" verify "$T/mnt/disk" "$T/wlog" "$T/base.raw" ||
	fail "reads failed or returned wrong data on a full overlay"
skipped=$(field "$T/mnt" bytes_not_copied_overlay_full)
[ "$skipped" -gt 0 ] || fail "no read was served uncopied (bytes_not_copied_overlay_full=$skipped)"
info "reads on the full overlay: $skipped bytes served from the backing uncopied"
sfs_umount "$T/mnt" || true
qcheck_crash "$T/small/ovl2"
sfs_mount "$T/small/ovl2" "$T/mnt" -o ro,copy_on_read=off
"$HELPERS/writer" verify "$T/mnt/disk" "$T/wlog" "$T/base.raw" ||
	fail "synced writes lost on a full disk"
sfs_umount "$T/mnt"
echo ok
