#!/bin/bash
# The mount command line as a careless user or a service manager drives it:
# formats: qcow2 qed
# a regular file as mountpoint is refused (not daemonized into EIO);
# SIGTERM and SIGINT end a foreground daemon with exit 0 (systemd would
# call anything else a failure); a mountpoint with a space still gets its
# read-ahead (mountinfo escapes it as \040); create -u records a backing
# that cannot be opened yet, as qemu-img -u does.
. "$(dirname "$0")/functions.sh"
requires qemu-img fusermount3 mountpoint

randfile "$T/base.raw" 2
"$STREAMFS" create -f "$FMT" -b "$T/base.raw" -F raw "$T/ovl" >/dev/null

# 1. Regular file as mountpoint.
touch "$T/afile"
rc=0
"$STREAMFS" "$T/ovl" "$T/afile" 2>"$T/err" || rc=$?
[ $rc -eq 1 ] || fail "mount on a regular file: exit $rc"
grep -q "not a directory" "$T/err" || fail "message: $(cat "$T/err")"
# The overlay is not left locked: a real mount works at once.
sfs_mount "$T/ovl" "$T/mnt"
sfs_umount "$T/mnt"

# 2. Signals end a foreground daemon cleanly, with exit status 0.
for sig in TERM INT; do
	mkdir -p "$T/mnt"
	# A background job of a script starts with SIGINT ignored (bash
	# does that without job control): give it the default back, as a
	# terminal or a service manager would.
	env --default-signal=INT "$STREAMFS" -f "$T/ovl" "$T/mnt" -o "pidfile=$T/fpid" 2>"$T/ferr" &
	P=$!
	for ((i = 0; i < 200; i++)); do [ -s "$T/fpid" ] && break; sleep 0.05; done
	mountpoint -q "$T/mnt" || fail "foreground mount not up"
	kill -$sig $P
	for ((i = 0; i < 200; i++)); do alive $P || break; sleep 0.05; done
	alive $P && fail "SIG$sig did not stop the daemon in 10 s"
	rc=0
	wait $P || rc=$?
	[ $rc -eq 0 ] || fail "SIG$sig: exit $rc ($(cat "$T/ferr"))"
	mountpoint -q "$T/mnt" && fail "still mounted after SIG$sig"
	rm -f "$T/fpid"
done
qcheck "$T/ovl"

# 3. A mountpoint whose path needs mountinfo escapes.
if [ "$(id -u)" -eq 0 ]; then
	mkdir -p "$T/with space"
	sfs_mount "$T/ovl" "$T/with space"
	dev=$(mountpoint -d "$T/with space")
	ra=$(cat "/sys/class/bdi/$dev/read_ahead_kb")
	[ "$ra" = 1024 ] || fail "read-ahead of a mountpoint with a space: $ra KiB"
	sfs_umount "$T/with space"
fi

# 4. create -u: the backing need not exist; size and format are required.
"$STREAMFS" create -f "$FMT" -u -b "http://127.0.0.1:9/not-yet.raw" -F raw "$T/u.img" 64M >/dev/null ||
	fail "create -u"
info=$(qemu-img info "$T/u.img")
echo "$info" | grep -q "backing file: http://127.0.0.1:9/not-yet.raw" || fail "create -u: $info"
echo "$info" | grep -q "virtual size: 64 MiB" || fail "create -u size: $info"
"$STREAMFS" create -f "$FMT" -u -b "$T/base.raw" "$T/u2.img" 2>/dev/null && fail "-u without -F and SIZE accepted"
[ -e "$T/u2.img" ] && fail "-u without SIZE wrote a file"
echo "PASS: $TESTNAME"
