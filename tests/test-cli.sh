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
# wait exits 4 when the job is cancelled under it.
( sleep 1; "$STREAMFS" abort "$T/mnt" ) &
rc=0; "$STREAMFS" wait "$T/mnt" >"$T/wait.out" 2>&1 || rc=$?
[ $rc -eq 4 ] || fail "wait after abort exited $rc: $(cat "$T/wait.out")"
grep -q cancelled "$T/wait.out" || fail "wait output: $(cat "$T/wait.out")"
# stream --wait exits 0 on completion; plain lines when not a terminal.
"$STREAMFS" stream "$T/mnt" --wait >"$T/wait2.out" || fail "stream --wait failed"
tail -1 "$T/wait2.out" | grep -q "^completed 100.0%" || fail "wait output: $(tail -2 "$T/wait2.out")"
"$STREAMFS" map "$T/mnt" | grep -q "^0 " || fail "map"
sfs_umount "$T/mnt"

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
