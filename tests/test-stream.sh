#!/bin/bash
# The stream job: progress rises monotonically to 100%, a blocked reader of
# control/events gets "completed", the overlay then has no backing
# (qemu-img info), the content equals the original backing, check is clean.
# Also: guest writes during the stream are preserved, EBUSY for a second job,
# EINVAL for bad commands.
# formats: qcow2 qed
. "$(dirname "$0")/functions.sh"
requires qemu-img fusermount3

mkbacking "$T/base.raw" 64
cp "$T/base.raw" "$T/ref.raw"
"$STREAMFS" create -f "$FMT" -b "$T/base.raw" -F raw "$T/ovl" >/dev/null
sfs_mount "$T/ovl" "$T/mnt"

# Bad commands change nothing.
for bad in "bogus" "start speed=fast" "start base=" "start foo=1" "pause now"; do
	if echo "$bad" >"$T/mnt/control/stream" 2>/dev/null; then fail "accepted '$bad'"; fi
done
if echo "abc" >"$T/mnt/control/speed" 2>/dev/null; then fail "accepted speed abc"; fi
if echo "start base=/nonexistent" >"$T/mnt/control/stream" 2>/dev/null; then fail "accepted bad base"; fi
[ "$(cat "$T/mnt/control/stream")" = idle ] || fail "state changed by bad commands"

# A reader blocked on events before the job starts (opened here, so its
# cursor is set before the job starts).
exec 3<"$T/mnt/control/events"
timeout 60 bash -c "while read -r line <&3; do echo \"\$line\"; case \$line in *' completed'*) exit 0;; esac; done" >"$T/events.txt" &
evpid=$!
exec 3<&-
cleanup_fn "kill $evpid 2>/dev/null"

echo "start speed=40M" >"$T/mnt/control/stream"
if echo start >"$T/mnt/control/stream" 2>/dev/null; then fail "second job not refused"; fi
# Guest writes while streaming.
head -c 1000000 /dev/urandom >"$T/chunk"
dd if="$T/chunk" of="$T/mnt/disk" bs=1000000 seek=12345 oflag=seek_bytes conv=notrunc status=none
dd if="$T/chunk" of="$T/ref.raw" bs=1000000 seek=12345 oflag=seek_bytes conv=notrunc status=none
dd if="$T/chunk" of="$T/mnt/disk" bs=1000000 seek=50000000 oflag=seek_bytes conv=notrunc status=none
dd if="$T/chunk" of="$T/ref.raw" bs=1000000 seek=50000000 oflag=seek_bytes conv=notrunc status=none
echo 0 >"$T/mnt/control/speed"

last=-1
for i in $(seq 1 1200); do
	read -r off len pct <"$T/mnt/control/progress"
	[ "$off" -ge "$last" ] || fail "progress went backwards: $last -> $off"
	last=$off
	st=$(cat "$T/mnt/control/stream")
	[ "$st" = completed ] && break
	[ "$st" = running ] || fail "unexpected state $st: $(cat "$T/mnt/control/status")"
	sleep 0.05
done
[ "$(cat "$T/mnt/control/stream")" = completed ] || fail "job did not complete"
read -r off len pct <"$T/mnt/control/progress"
[ "$pct" = "100.0%" ] || fail "progress at end: $off $len $pct"
wait $evpid || fail "events reader did not see completed: $(cat "$T/events.txt")"
grep -q ' started ' "$T/events.txt" || fail "no started event"
grep -q ' backing-changed ' "$T/events.txt" || fail "no backing-changed event"
[ "$(field "$T/mnt" backing)" = "-" ] || fail "status still shows a backing"
[ "$(field "$T/mnt" bytes_copied_by_job)" -gt 0 ] || fail "job copied nothing"
cmp "$T/mnt/disk" "$T/ref.raw" || fail "content differs after stream"
sfs_umount "$T/mnt"

qemu-img info "$T/ovl" | grep -q "backing file" && fail "overlay still has a backing file"
qcheck "$T/ovl"
rm "$T/base.raw" # the overlay must stand alone now
qemu-img compare -f "$FMT" -F raw "$T/ovl" "$T/ref.raw" || fail "overlay differs from reference"
echo ok
