#!/bin/bash
# A real guest through crash failover (issue #16): QEMU (TCG) boots
# tests/guest/build-guest.sh's Linux with its root on MNT/disk of a
# daemonized mount (supervisor + server) with the stream job running. While
# the guest writes, syncs, drops its page cache and reads back (sfs.soak=N),
# the server is killed GUEST_KILLS times (10) at random moments and upgraded
# once (streamfs upgrade). The guest must see no I/O error (its kernel log),
# read back every round exactly, and shut down cleanly; the overlay is then
# checked against the guest's writes and with qemu-img check.
# About 50 s with the guest cached (make check). Without the write journal
# it fails: the guest reads back other bytes than it wrote (2 of 2 runs).
# formats: qcow2
. "$(dirname "$0")/functions.sh"
requires qemu-system-x86_64 qemu-img fusermount3
G=${SFS_GUEST_DIR:-/var/tmp/streamfs-guest}
kills=${GUEST_KILLS:-10}
seed=${SEED:-$RANDOM}
RANDOM=$seed
info "seed $seed, $kills kills and an upgrade"

"$(dirname "$0")/guest/build-guest.sh" "$G" >"$T/build.log" 2>&1 ||
	fail "guest build: $(tail -5 "$T/build.log")"

cp "$G/disk.raw" "$T/base.raw"
"$STREAMFS" create -f "$FMT" -b "$T/base.raw" -F raw "$T/ovl" >/dev/null
# The upgrade hands the mount to the binary at the server's path: a copy.
mkdir -p "$T/bin"
cp "$STREAMFS" "$T/bin/streamfs"
STREAMFS=$T/bin/streamfs sfs_mount "$T/ovl" "$T/mnt" -o stream,speed=4M
sup=$(cat "$T/pid.supervisor")

nonce=n$RANDOM$RANDOM
qemu-system-x86_64 -machine accel=tcg -m 256 -nodefaults -display none -no-reboot \
	-kernel "$G/vmlinuz" -initrd "$G/initrd.img" \
	-append "$(cat "$G/cmdline") sfs.soak=40 sfs.nonce=$nonce" \
	-drive "file=$T/mnt/disk,format=raw,if=virtio,cache=none,aio=threads" \
	-serial "file:$T/console.log" >"$T/qemu.log" 2>&1 &
QP=$!
cleanup_fn "kill $QP 2>/dev/null; wait $QP 2>/dev/null"

# wait_console TEXT SECONDS: TEXT on the guest's console, or fail.
wait_console() {
	local i
	for ((i = 0; i < $2 * 10; i++)); do
		grep -q "$1" "$T/console.log" 2>/dev/null && return 0
		alive $QP || break
		sleep 0.1
	done
	grep -q "$1" "$T/console.log" 2>/dev/null ||
		fail "no '$1' on the console in $2 s: $(tail -5 "$T/console.log" 2>/dev/null) $(tail -3 "$T/qemu.log")"
}

wait_console "STREAMFS-GUEST-SOAK 1 " 300
pid=$SFS_PID
up_at=$((kills / 2 + 1))
for ((k = 1; k <= kills + 1; k++)); do
	# 0.8-1.2 s: the new server must have served for SUP_STABLE_MS (500 ms)
	# or five kills in a row would be a crash loop by design.
	sleep 0.8
	sleep "0.$((RANDOM % 5))"
	grep -q "STREAMFS-GUEST-ERRORS" "$T/console.log" && fail "the guest finished its rounds before event $k: raise sfs.soak"
	if [ $k -eq $up_at ]; then
		"$T/bin/streamfs" upgrade "$T/mnt" >"$T/upgrade.out" 2>&1 ||
			fail "upgrade: $(cat "$T/upgrade.out")"
	else
		kill -9 "$pid"
	fi
	pid=$(new_server "$pid") || fail "event $k: no new server within 5 s"
done
alive "$sup" || fail "the supervisor died"
grep -q "^restarts: $((kills + 1))$" "$T/mnt/control/status" ||
	fail "status: $(grep restarts "$T/mnt/control/status")"

wait_console "STREAMFS-GUEST-DONE" 300
wait_gone $QP 60 || fail "the guest did not power off"
want=$(cat "$G/data.md5")
grep -q "STREAMFS-GUEST-ERRORS 0" "$T/console.log" ||
	fail "the guest logged I/O errors: $(grep -E 'GUEST-ERRORS|I/O error|EXT4-fs' "$T/console.log" | head -5)"
! grep -q "STREAMFS-GUEST-SOAK .* BAD" "$T/console.log" ||
	fail "the guest read back other bytes than it wrote: $(grep BAD "$T/console.log" | head -3)"
[ "$(grep -c "STREAMFS-GUEST-SOAK [0-9]* ok $want" "$T/console.log")" -eq 40 ] ||
	fail "not 40 good rounds: $(grep -c 'GUEST-SOAK' "$T/console.log") rounds, $(grep GUEST-SOAK "$T/console.log" | grep -vc " ok $want") bad"
grep -q "STREAMFS-GUEST-WROTE $nonce" "$T/console.log" || fail "the guest did not write its nonce"
info "$kills kills, 1 upgrade, 40 guest rounds: no I/O error"
sfs_umount "$T/mnt"
wait_gone "$sup" 10 || fail "supervisor still runs"
qcheck_crash "$T/ovl"
# The guest's last write is in the overlay.
qemu-img convert -f "$FMT" -O raw "$T/ovl" "$T/final.raw"
debugfs -R "cat /written" "$T/final.raw" 2>/dev/null | grep -q "^$nonce$" ||
	fail "the overlay does not hold the guest's /written"
echo "PASS: test-guest-failover"
