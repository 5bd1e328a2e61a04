#!/bin/bash
# The daemon under valgrind (memcheck): a session with the stream job,
# guest writes and reads, control-file reads and writes, pause/resume and
# unmount must end with no memory error and no definite or indirect leak.
# formats: qcow2 qed
. "$(dirname "$0")/functions.sh"
requires valgrind fusermount3
[ -z "${SFS_SANITIZED:-}" ] || skip "valgrind does not run ASan builds (make check runs this)"

randfile "$T/base.raw" 32
"$STREAMFS" create -f "$FMT" -b "$T/base.raw" -F raw "$T/ovl" >/dev/null
cp "$T/base.raw" "$T/ref.raw"
mkdir -p "$T/mnt"
valgrind -q --leak-check=full --errors-for-leak-kinds=definite,indirect --error-exitcode=9 \
	--log-file="$T/vg.log" "$STREAMFS" -f "$T/ovl" "$T/mnt" -o stream,speed=4M 2>"$T/daemon.err" &
vpid=$!
cleanup_fn "kill $vpid 2>/dev/null"
for ((i = 0; i < 200; i++)); do
	[ -e "$T/mnt/control/status" ] && break
	sleep 0.1
done
[ -e "$T/mnt/control/status" ] || fail "no mount under valgrind: $(cat "$T/daemon.err" "$T/vg.log")"
dd if=/dev/urandom of="$T/data" bs=64k count=40 status=none
dd if="$T/data" of="$T/mnt/disk" bs=64k seek=30 conv=notrunc,fsync status=none
dd if="$T/data" of="$T/ref.raw" bs=64k seek=30 conv=notrunc status=none
echo pause >"$T/mnt/control/stream"
cat "$T/mnt/control/status" "$T/mnt/control/map" "$T/mnt/control/progress" >/dev/null
echo bogus >"$T/mnt/control/speed" 2>/dev/null && fail "a bad speed was accepted"
echo resume >"$T/mnt/control/stream"
echo 0 >"$T/mnt/control/speed"
cmp "$T/mnt/disk" "$T/ref.raw" || fail "content differs"
for ((i = 0; i < 300; i++)); do
	[ "$(cat "$T/mnt/control/stream")" = completed ] && break
	sleep 0.1
done
[ "$(cat "$T/mnt/control/stream")" = completed ] || fail "the job did not complete"
fusermount3 -u "$T/mnt"
rc=0
wait $vpid || rc=$?
[ $rc -eq 0 ] || fail "daemon exit $rc under valgrind: $(head -40 "$T/vg.log")"
[ ! -s "$T/vg.log" ] || fail "valgrind reports: $(head -40 "$T/vg.log")"
qcheck "$T/ovl"
info "valgrind: no errors, no leaks (stream, pause/resume, guest I/O, control files, unmount)"
echo ok
