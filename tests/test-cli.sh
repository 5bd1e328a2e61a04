#!/bin/bash
# The command-line wrappers over the control files and their exit codes;
# "streamfs wait" drawing its bar in a real terminal (tmux); mounting with
# mount -t fuse.streamfs (the mount.fuse3 helper convention).
. "$(dirname "$0")/functions.sh"
requires qemu-img fusermount3

mkbacking "$T/base.raw" 32
"$STREAMFS" create -f qcow2 -b "$T/base.raw" -F raw "$T/ovl" | grep -q "Formatting" || fail "create output"
sfs_mount "$T/ovl" "$T/mnt"
"$STREAMFS" status "$T/mnt" | grep -q "^state: idle" || fail "status"
"$STREAMFS" progress "$T/mnt" | grep -q "^0 33554432 0.0%" || fail "progress"
"$STREAMFS" speed "$T/mnt" 2M || fail "speed set"
[ "$("$STREAMFS" speed "$T/mnt")" = 2097152 ] || fail "speed get"
"$STREAMFS" speed "$T/mnt" bogus 2>/dev/null && fail "bad speed accepted"
"$STREAMFS" stream "$T/mnt" --speed 1M || fail "stream start"
"$STREAMFS" stream "$T/mnt" 2>/dev/null && fail "second stream accepted"
"$STREAMFS" pause "$T/mnt" || fail "pause"
"$STREAMFS" resume "$T/mnt" || fail "resume"
# wait exits 4 when the job is cancelled under it: abort only once wait has
# seen the job running (its first line), so the abort lands during the wait.
"$STREAMFS" wait "$T/mnt" >"$T/wait.out" 2>&1 &
WP=$!
for ((i = 0; i < 200; i++)); do grep -q "^running" "$T/wait.out" && break; sleep 0.05; done
grep -q "^running" "$T/wait.out" || fail "wait never reported the running job: $(cat "$T/wait.out")"
alive $WP || fail "wait returned before the abort: $(cat "$T/wait.out")"
"$STREAMFS" abort "$T/mnt" || fail "abort"
rc=0; wait $WP || rc=$?
[ $rc -eq 4 ] || fail "wait after abort exited $rc: $(cat "$T/wait.out")"
grep -q cancelled "$T/wait.out" || fail "wait output: $(cat "$T/wait.out")"
# stream --wait exits 0 on completion; plain lines when not a terminal.
"$STREAMFS" stream "$T/mnt" --wait >"$T/wait2.out" || fail "stream --wait failed"
tail -1 "$T/wait2.out" | grep -q "^completed 100.0%" || fail "wait output: $(tail -2 "$T/wait2.out")"
"$STREAMFS" map "$T/mnt" | grep -q "^0 " || fail "map"
sfs_umount "$T/mnt"

# wait on something that is not a streamfs mount: exit 1 and say so (4 is
# only for a job that failed or was cancelled).
mkdir -p "$T/notmnt"
rc=0; "$STREAMFS" wait "$T/notmnt" >/dev/null 2>"$T/nm.err" || rc=$?
[ $rc -eq 1 ] || fail "wait on a plain directory exited $rc: $(cat "$T/nm.err")"
grep -q "is not a streamfs mount" "$T/nm.err" || fail "wait message: $(cat "$T/nm.err")"
rc=0; "$STREAMFS" stream "$T/notmnt" --wait >/dev/null 2>&1 || rc=$?
[ $rc -eq 1 ] || fail "stream --wait on a plain directory exited $rc"
# A control file that cannot be read is an error, not an empty answer: a
# directory where the file should be makes read() fail with EISDIR.
mkdir -p "$T/fake/control/status" "$T/fake/control/map" "$T/fake/control/events"
for c in status map events wait; do
	rc=0; "$STREAMFS" $c "$T/fake" >"$T/fake.out" 2>"$T/fake.err" || rc=$?
	[ $rc -eq 1 ] || fail "$c with an unreadable control file exited $rc"
	grep -q "Is a directory" "$T/fake.err" || fail "$c message: $(cat "$T/fake.err")"
done

# --base relative to the caller's directory (the daemon runs in /), and an
# absolute one whose directory has a blank, a quote and a backslash: chain
# top <- mid <- base, streaming down to base copies mid's data into top and
# leaves top <- base.
for d in "imgs" 'my imgs "q" \x'; do
	mkdir -p "$T/$d"
	mkbacking "$T/$d/base.raw" 8
	qemu-img create -q -f qcow2 -b "$T/$d/base.raw" -F raw "$T/$d/mid.qcow2"
	qemu-io -f qcow2 -c "write -P 0x5a 1M 1M" -c "write -P 0xa5 6M 64k" "$T/$d/mid.qcow2" >/dev/null
	"$STREAMFS" create -f qcow2 -b "$T/$d/mid.qcow2" -F qcow2 "$T/top.qcow2" >/dev/null
	qemu-img convert -O raw "$T/top.qcow2" "$T/want.raw"
	sfs_mount "$T/top.qcow2" "$T/mnt" -o copy_on_read=off
	if [ "$d" = imgs ]; then
		(cd "$T" && "$STREAMFS" stream "$T/mnt" --base "$d/base.raw" --wait >/dev/null) ||
			fail "stream --base $d/base.raw (relative) failed"
	else
		"$STREAMFS" stream "$T/mnt" --base "$T/$d/base.raw" --wait >/dev/null ||
			fail "stream --base '$T/$d/base.raw' failed"
	fi
	[ "$(sed -n 's/^backing: //p' "$T/mnt/control/status")" = "$T/$d/base.raw" ] ||
		fail "backing after streaming to '$d/base.raw': $(grep '^backing:' "$T/mnt/control/status")"
	grep -qxF "chain: $T/top.qcow2 (qcow2) <- $T/$d/base.raw (raw)" "$T/mnt/control/status" ||
		fail "chain: $(grep '^chain:' "$T/mnt/control/status")"
	cmp "$T/mnt/disk" "$T/want.raw" || fail "content after streaming to '$d/base.raw'"
	sfs_umount "$T/mnt"
	qemu-img info "$T/top.qcow2" | grep "^backing file: " | grep -qF "$T/$d/base.raw" ||
		fail "header after streaming to '$d/base.raw': $(qemu-img info "$T/top.qcow2")"
	rm -f "$T/top.qcow2"
done

# The progress bar in a real terminal.
if command -v tmux >/dev/null; then
	"$STREAMFS" create -f qcow2 -b "$T/base.raw" -F raw "$T/ovl2" >/dev/null
	sfs_mount "$T/ovl2" "$T/mnt" -o stream,speed=8M
	tmux -L "sfs$$" new-session -d -x 100 -y 10 "$STREAMFS wait $T/mnt; echo EXIT=\$?; sleep 30"
	cleanup_fn "tmux -L sfs$$ kill-server 2>/dev/null"
	for i in $(seq 1 200); do
		tmux -L "sfs$$" capture-pane -p >"$T/pane" 2>/dev/null || true
		grep -q "EXIT=" "$T/pane" && break
		sleep 0.1
	done
	grep -q "EXIT=0" "$T/pane" || fail "wait in tmux: $(cat "$T/pane")"
	grep -q '^\[########################################\] 100.0%' "$T/pane" ||
		fail "no full bar: $(cat "$T/pane")"
	grep -q $'\e' "$T/pane" && fail "escape garbage in the pane"
	sfs_umount "$T/mnt"
fi

# mount -t fuse.streamfs via mount.fuse3. mount(8) runs helpers with a
# sanitized PATH, so streamfs must be in /usr/bin or /usr/sbin (make install
# PREFIX=/usr); a temporary link stands in for the installed binary here.
if command -v mount.fuse3 >/dev/null && [ "$(id -u)" = 0 ] && [ ! -e /usr/sbin/streamfs ] &&
	[ ! -e /usr/bin/streamfs ]; then
	ln -s "$STREAMFS" /usr/sbin/streamfs
	cleanup_fn "rm -f /usr/sbin/streamfs"
	"$STREAMFS" create -f qcow2 -b "$T/base.raw" -F raw "$T/ovl3" >/dev/null
	mount -t fuse.streamfs "$T/ovl3" "$T/mnt" -o stream,speed=64M ||
		fail "mount -t fuse.streamfs failed"
	mountpoint -q "$T/mnt" || fail "not mounted by mount -t"
	wait_state "$T/mnt" completed
	cmp "$T/mnt/disk" "$T/base.raw" || fail "content via mount -t"
	grep -q "fuse.streamfs" /proc/mounts || fail "fs type not fuse.streamfs"
	umount "$T/mnt"
	for i in $(seq 1 100); do pgrep -f "streamfs $T/ovl3" >/dev/null || break; sleep 0.05; done
	qcheck "$T/ovl3"
fi
# make install / uninstall with DESTDIR and PREFIX.
make -s -C "$(dirname "$0")/.." install DESTDIR="$T/inst" PREFIX=/usr >/dev/null || fail "make install"
[ -x "$T/inst/usr/bin/streamfs" ] || fail "binary not installed"
[ -f "$T/inst/usr/share/man/man1/streamfs.1" ] || fail "man page not installed"
"$T/inst/usr/bin/streamfs" --version | grep -q streamfs || fail "installed binary broken"
make -s -C "$(dirname "$0")/.." uninstall DESTDIR="$T/inst" PREFIX=/usr >/dev/null || fail "make uninstall"
[ -e "$T/inst/usr/bin/streamfs" ] && fail "uninstall left the binary"
echo ok
