#!/bin/bash
# Many threads race on one unallocated cluster at a time: copy-on-read
# readers against guest writers (buffered and O_DIRECT), with and without
# the stream job running. No read may see stale or torn data, no guest
# write may be overwritten by a copy of backing data.
# formats: qcow2 qed
. "$(dirname "$0")/functions.sh"
requires qemu-img fusermount3
[ -x "$HELPERS/hammer" ] || missing "the hammer helper (make check builds it)"

randfile "$T/base.raw" 64
rounds=${ROUNDS:-120}
[ -n "${LONG:-}" ] && rounds=1000
"$STREAMFS" create -f "$FMT" -b "$T/base.raw" -F raw "$T/ovl" >/dev/null
sfs_mount "$T/ovl" "$T/mnt"
"$HELPERS/hammer" "$T/mnt/disk" "$T/base.raw" $rounds 8 direct || fail "race without stream"
sfs_umount "$T/mnt"
qcheck "$T/ovl"

"$STREAMFS" create -f "$FMT" -b "$T/base.raw" -F raw "$T/ovl2" >/dev/null
sfs_mount "$T/ovl2" "$T/mnt" -o stream,speed=20M
"$HELPERS/hammer" "$T/mnt/disk" "$T/base.raw" $rounds 8 direct || fail "race with stream"
sfs_umount "$T/mnt"
qcheck "$T/ovl2"
echo ok
