#!/bin/bash
# Stream job control: the speed limit is honoured within tolerance; control/pull
# allocates a range synchronously; control/map agrees with the data; a job
# resumes after kill -9 and reports where; on-error=stop pauses at a failing
# offset and resume retries; on-error=report fails the job with a message.
# formats: qcow2 qed
. "$(dirname "$0")/functions.sh"
requires qemu-img fusermount3

mkbacking "$T/base.raw" 64
cp "$T/base.raw" "$T/ref.raw"
"$STREAMFS" create -f "$FMT" -b "$T/base.raw" -F raw "$T/ovl" >/dev/null
sfs_mount "$T/ovl" "$T/mnt"

# pull: a synchronous copy of one range.
echo "0x100000 1M" >"$T/mnt/control/pull"
awk '$1 == 1048576 && $3 == 0 {found=1} END {exit !found}' "$T/mnt/control/map" ||
	fail "pulled range not in the overlay: $(head -5 "$T/mnt/control/map")"
if echo "1 2 3" >"$T/mnt/control/pull" 2>/dev/null; then fail "bad pull accepted"; fi
if echo "0 1G" >"$T/mnt/control/pull" 2>/dev/null; then fail "pull past the end accepted"; fi
# The map covers the disk exactly.
awk '!/^#/ { if ($1 != next_off) exit 1; next_off = $1 + $2 } END { exit next_off != 64*1024*1024 }' \
	next_off=0 "$T/mnt/control/map" || fail "map does not tile the disk"

# Speed limit: 8 MiB/s for ~3 s, then measure the achieved rate.
echo "start speed=8M" >"$T/mnt/control/stream"
sleep 3
c1=$(field "$T/mnt" bytes_copied_by_job); t1=$(date +%s.%N)
sleep 3
c2=$(field "$T/mnt" bytes_copied_by_job); t2=$(date +%s.%N)
rate=$(echo "($c2 - $c1) / ($t2 - $t1)" | bc -l)
info "achieved $(printf %.0f "$rate") B/s for 8 MiB/s"
awk -v r="$rate" 'BEGIN { exit !(r > 8388608 * 0.85 && r < 8388608 * 1.15) }' ||
	fail "rate $rate not within 15% of 8 MiB/s"
[ "$(cat "$T/mnt/control/speed")" = 8388608 ] || fail "control/speed shows $(cat "$T/mnt/control/speed")"

# Crash mid-job, then resume: the job reports where it resumed.
sleep 0.5
sfs_kill9 "$T/mnt"
qcheck_crash "$T/ovl"
sfs_mount "$T/ovl" "$T/mnt" -o stream
resumed=$(field "$T/mnt" resumed_from)
info "resumed from $resumed"
[ "$resumed" -gt 0 ] || fail "job did not resume past 0"
wait_state "$T/mnt" completed
cmp "$T/mnt/disk" "$T/ref.raw" || fail "content differs after resumed stream"
sfs_umount "$T/mnt"
qcheck_crash "$T/ovl"

# on-error=stop: the backing loses its tail, the job pauses with an error;
# restore it and resume.
"$STREAMFS" create -f "$FMT" -b "$T/base.raw" -F raw "$T/ovl2" >/dev/null
sfs_mount "$T/ovl2" "$T/mnt" -o copy_on_read=off
truncate -s 16M "$T/base.raw"
echo "start on-error=stop" >"$T/mnt/control/stream"
wait_state "$T/mnt" paused 60
[ "$(field "$T/mnt" error)" != "-" ] || fail "no error shown when stopped"
cmp -n 16M "$T/mnt/disk" "$T/ref.raw" || fail "data before the failure unreadable"
cp "$T/ref.raw" "$T/base.raw"
echo resume >"$T/mnt/control/stream"
wait_state "$T/mnt" completed
cmp "$T/mnt/disk" "$T/ref.raw" || fail "content differs after retry"
sfs_umount "$T/mnt"
qcheck "$T/ovl2"

# on-error=report (default): the job fails, status says why, a restart retries.
"$STREAMFS" create -f "$FMT" -b "$T/base.raw" -F raw "$T/ovl3" >/dev/null
sfs_mount "$T/ovl3" "$T/mnt" -o copy_on_read=off
truncate -s 16M "$T/base.raw"
echo start >"$T/mnt/control/stream"
wait_state "$T/mnt" failed 60
field "$T/mnt" error | grep -q "offset" || fail "failure lacks a message"
cp "$T/ref.raw" "$T/base.raw"
echo start >"$T/mnt/control/stream"
wait_state "$T/mnt" completed
cmp "$T/mnt/disk" "$T/ref.raw" || fail "content differs after restart"
sfs_umount "$T/mnt"
qcheck "$T/ovl3"
echo ok
