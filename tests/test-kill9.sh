#!/bin/bash
# kill -9 the daemon while the guest writes and the stream job runs, at
# random moments; remount; qemu-img check never reports corruption; every
# flushed write is present; every other byte is the backing's or a write's.
# formats: qcow2 qed
. "$(dirname "$0")/functions.sh"
requires qemu-img fusermount3
[ -x "$HELPERS/writer" ] || skip "writer helper not built"

mkbacking "$T/base.raw" 32
"$STREAMFS" create -f "$FMT" -b "$T/base.raw" -F raw "$T/ovl" >/dev/null
iters=${KILL_ITERS:-6}
[ -n "${LONG:-}" ] && iters=60
seed=${SEED:-$RANDOM}
info "seed $seed, $iters iterations"
RANDOM=$seed
for it in $(seq 1 $iters); do
	sfs_mount "$T/ovl" "$T/mnt" -o stream,speed=$((RANDOM % 64 + 8))M
	# The writer logs each write it made and each fsync that returned;
	# verify checks the logged state against the disk.
	"$HELPERS/writer" write "$T/mnt/disk" "$T/log" $((it * 1000 + RANDOM)) &
	wpid=$!
	sleep "0.$((RANDOM % 9 + 1))"
	sfs_kill9 "$T/mnt"
	wait $wpid 2>/dev/null || true
	qcheck_crash "$T/ovl"
	sfs_mount "$T/ovl" "$T/mnt" -o copy_on_read=off
	"$HELPERS/writer" verify "$T/mnt/disk" "$T/log" "$T/base.raw" || fail "iteration $it: data check failed (seed $seed)"
	sfs_umount "$T/mnt"
	qcheck_crash "$T/ovl"
done
# A clean unmount after all that leaves a clean image.
sfs_mount "$T/ovl" "$T/mnt" -o stream
wait_state "$T/mnt" completed
"$HELPERS/writer" verify "$T/mnt/disk" "$T/log" "$T/base.raw" || fail "final data check failed"
sfs_umount "$T/mnt"
qcheck_crash "$T/ovl"
echo ok
