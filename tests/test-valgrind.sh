#!/bin/bash
# The daemon under valgrind (memcheck): a session with the stream job,
# guest writes and reads, control-file reads and writes, pause/resume and
# unmount must end with no memory error and no definite or indirect leak.
# The unmount is lazy (-z) while a control file is still open: the kernel
# sends that file's RELEASE asynchronously and drops it when the connection
# goes, so the daemon never sees it and must free the handle itself at
# exit. (A plain unmount right after a `cat` of a control file can race
# the same way; this makes it deterministic.)
# formats: qcow2 qed
. "$(dirname "$0")/functions.sh"
# Not a missing tool: an ASan binary cannot run under valgrind at all.
[ -z "${SFS_SANITIZED:-}" ] || skip "valgrind does not run ASan builds (make check runs this)"
requires valgrind fusermount3

randfile "$T/base.raw" 32
"$STREAMFS" create -f "$FMT" -b "$T/base.raw" -F raw "$T/ovl" >/dev/null
cp "$T/base.raw" "$T/ref.raw"
mkdir -p "$T/mnt"
valgrind -q --leak-check=full --errors-for-leak-kinds=definite,indirect --error-exitcode=9 \
	--log-file="$T/vg.log" "$STREAMFS" -f "$T/ovl" "$T/mnt" -o stream,speed=4M 2>"$T/daemon.err" &
vpid=$!
cleanup_fn "kill $vpid 2>/dev/null"
mounted() { [ -e "$T/mnt/control/status" ] || ! alive $vpid; }
wait_until 20 mounted || true
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
wait_state "$T/mnt" completed 30
# Control files open at the unmount: one read already, one not yet.
exec 8<"$T/mnt/control/status" 9<"$T/mnt/control/progress"
cat <&8 >/dev/null
fusermount3 -u -z "$T/mnt"
mountpoint -q "$T/mnt" && fail "still mounted after a lazy unmount"
read -r off len pct <&9 || fail "the open control/progress does not read after a lazy unmount"
[ "$off" = "$len" ] || fail "control/progress says $off of $len ($pct) after completion"
# Closing the last files ends the connection; their RELEASEs are dropped.
exec 8<&- 9<&-
wait_gone $vpid 60 || fail "daemon still running 60 s after the last file closed"
rc=0
wait $vpid || rc=$?
[ $rc -eq 0 ] || fail "daemon exit $rc under valgrind: $(tail -5 "$T/daemon.err") $(head -40 "$T/vg.log")"
[ ! -s "$T/vg.log" ] || fail "valgrind reports: $(head -40 "$T/vg.log")"
qcheck "$T/ovl"
info "valgrind: no errors, no leaks (stream, pause/resume, guest I/O, control files, lazy unmount with control files open)"
echo ok
