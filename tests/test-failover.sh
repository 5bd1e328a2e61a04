#!/bin/bash
# Crash failover (fusefs/supervisor.c): kill -9 the server at random moments
# while fio writes and verifies through disk (O_DIRECT and buffered) and the
# stream job runs; the supervisor starts a new server on the same FUSE
# connection, the kernel resends what the dead one had not answered: fio
# sees no error and no verify failure, and every restart serves again.
# An acknowledged, unflushed write survives a kill (the write journal).
# Then: the crash-loop limit (EIO, no spinning, an upgrade restarts),
# streamfs upgrade onto a replaced binary, and the fallback on a kernel
# without FUSE_NOTIFY_RESEND (simulated): the mount ends as before.
# FAILOVER_KILLS: kills (4; LONG=1: 200). SEED=N replays the random delays.
# formats: qcow2 qed
. "$(dirname "$0")/functions.sh"
requires qemu-img fusermount3 fio python3

kills=${FAILOVER_KILLS:-4}
[ -n "${LONG:-}" ] && kills=200
seed=${SEED:-$RANDOM}
RANDOM=$seed
info "seed $seed, $kills kills"

getx() { python3 -c 'import os,sys; print(os.getxattr(sys.argv[1], sys.argv[2]).decode())' "$@"; }

mkbacking "$T/base.raw" 64
"$STREAMFS" create -f "$FMT" -b "$T/base.raw" -F raw "$T/ovl" >/dev/null
sfs_mount "$T/ovl" "$T/mnt" -o stream,speed=8M
sup=$(cat "$T/pid.supervisor")
alive "$sup" || fail "no supervisor pid in $T/pid.supervisor"
[ "$(getx "$T/mnt" user.streamfs.supervisor)" = "$sup" ] || fail "supervisor xattr"

# fio's writes allocate in the overlay: the journal (include/journal.h)
# keeps every write the server acknowledged until a flush covers it, so a
# killed server loses none of them; the next one replays them.

# fio in a loop, each run a fresh write+verify pass of its region with its
# own seed; any failure is kept.
fio_loop() {
	local name=$1 direct=$2 off=$3 n=0
	while [ ! -e "$T/stop" ]; do
		n=$((n + 1))
		fio --name="$name" --filename="$T/mnt/disk" --direct="$direct" --rw=randwrite \
			--bsrange=4k-64k --offset="$off" --size=8M --ioengine=psync \
			--verify=crc32c --do_verify=1 --verify_fatal=1 --randseed=$((seed + n)) \
			--fsync=16 >"$T/fio-$name.out" 2>&1 ||
			{ cp "$T/fio-$name.out" "$T/fio-$name.fail"; break; }
		echo "$n" >"$T/fio-$name.runs"
	done
}
fio_loop direct 1 0 &
f1=$!
fio_loop buffered 0 16M &
f2=$!
cleanup_fn "touch '$T/stop'; kill $f1 $f2 2>/dev/null"

pid=$SFS_PID
worst=0
for ((k = 1; k <= kills; k++)); do
	# 0.6-0.9 s after the server answered a read: past SUP_STABLE_MS
	# (500 ms), so these are not a crash loop. (This was 0.$((RANDOM % 6 +
	# 6)), which is 0.10 or 0.11 s a third of the time: five such kills in a
	# row made a crash loop, about once in 200 kills.)
	sleep "0.$((RANDOM % 4 + 6))"
	t0=$(date +%s%N)
	kill -9 "$pid"
	pid=$(new_server "$pid") || fail "kill $k: no new server within 5 s"
	# Service is back when a read through the mount is answered.
	dd if="$T/mnt/disk" of=/dev/null bs=4k count=1 iflag=direct status=none ||
		fail "kill $k: read after restart failed"
	ms=$((($(date +%s%N) - t0) / 1000000))
	[ $ms -gt $worst ] && worst=$ms
	[ -e "$T/fio-direct.fail" ] || [ -e "$T/fio-buffered.fail" ] && break
done
touch "$T/stop"
wait $f1 $f2
for j in direct buffered; do
	[ -e "$T/fio-$j.fail" ] && fail "fio $j failed after a kill (seed $seed): $(grep -iE "error|verify|bad|fio:" "$T/fio-$j.fail" | head -8)"
	[ -s "$T/fio-$j.runs" ] || fail "fio $j never completed a run"
done
info "$kills kills, fio runs: $(cat "$T/fio-direct.runs") direct, $(cat "$T/fio-buffered.runs") buffered; slowest resume $worst ms"
[ $worst -lt 5000 ] || fail "service took $worst ms to resume"
alive "$sup" || fail "the supervisor died"
grep -q "^restarts: $kills$" "$T/mnt/control/status" ||
	fail "control/status: $(grep -E '^(restarts|last_restart|supervisor_pid):' "$T/mnt/control/status")"
[ "$(field "$T/mnt" supervisor_pid)" = "$sup" ] || fail "supervisor_pid $(field "$T/mnt" supervisor_pid)"
# /disk's owner, mode and xattrs outlive the server (libvirt labels a
# running guest's disk and restores the owner from trusted.* at shutdown).
chown 4242:4243 "$T/mnt/disk"
chmod 0640 "$T/mnt/disk"
python3 -c 'import os,sys; os.setxattr(sys.argv[1], "trusted.libvirt.security.dac", b"+0:+0"); os.setxattr(sys.argv[1], "user.note", b"x" * 3000)' "$T/mnt/disk"
kill -9 "$pid"
pid=$(new_server "$pid") || fail "no new server after the attribute kill"
# --cached=never: a getattr from the new server, not the kernel's cache.
[ "$(stat --cached=never -c '%u:%g %a' "$T/mnt/disk")" = "4242:4243 640" ] ||
	fail "disk attributes after a restart: $(stat --cached=never -c '%u:%g %a' "$T/mnt/disk")"
[ "$(getx "$T/mnt/disk" trusted.libvirt.security.dac)" = "+0:+0" ] ||
	fail "trusted.* xattr lost in a restart"
[ "$(getx "$T/mnt/disk" user.note | wc -c)" = 3001 ] || fail "user.* xattr lost in a restart"
SFS_PID=$pid
sfs_umount "$T/mnt"
wait_gone "$sup" 10 || fail "supervisor $sup still runs after unmount"
qcheck_crash "$T/ovl"

# Crash loop: a request that kills every server. The supervisor gives up
# after 5 quick deaths, fails it and every later request with EIO, and
# does not spin; SIGUSR1 (what streamfs upgrade sends) starts a server.
STREAMFS_TEST_HOOKS=1 sfs_mount "$T/ovl" "$T/mnt"
sup=$(cat "$T/pid.supervisor")
out=$(timeout 20 python3 -c 'import os,sys; os.getxattr(sys.argv[1], "user.streamfs.test-crash")' \
	"$T/mnt" 2>&1) && fail "the crashing request succeeded"
echo "$out" | grep -q 'Input/output error' || fail "crash loop: want EIO, got: $out"
dd if="$T/mnt/disk" of=/dev/null bs=4k count=1 status=none 2>/dev/null &&
	fail "a read succeeded in the EIO state"
alive "$sup" || fail "supervisor died in the crash loop"
cpu=$(awk '{print $14 + $15}' "/proc/$sup/stat")
sleep 0.5
[ "$(awk '{print $14 + $15}' "/proc/$sup/stat")" -le $((cpu + 5)) ] || fail "supervisor spins"
old=$(cat "$T/pid")
kill -USR1 "$sup"
SFS_PID=$(new_server "$old") || fail "no server after SIGUSR1 in the EIO state"
cmp -n 65536 "$T/mnt/disk" "$T/base.raw" >/dev/null 2>&1 || true
dd if="$T/mnt/disk" of=/dev/null bs=4k count=1 status=none || fail "no service after SIGUSR1"
sfs_umount "$T/mnt"
wait_gone "$sup" 10 || fail "supervisor still runs"

# Upgrade: the supervisor runs the binary now at the mount's path.
mkdir -p "$T/bin"
cp "$STREAMFS" "$T/bin/streamfs"
STREAMFS=$T/bin/streamfs sfs_mount "$T/ovl" "$T/mnt"
sup=$(cat "$T/pid.supervisor")
old=$SFS_PID
cp "$STREAMFS" "$T/bin/streamfs.new"
mv "$T/bin/streamfs.new" "$T/bin/streamfs"
fio --name=up --filename="$T/mnt/disk" --direct=1 --rw=randwrite --bs=4k --size=8M \
	--verify=crc32c --do_verify=1 --verify_fatal=1 >"$T/fio-up.out" 2>&1 &
fp=$!
sleep 0.2
"$T/bin/streamfs" upgrade "$T/mnt" >"$T/up.out" || fail "streamfs upgrade: $(cat "$T/up.out")"
SFS_PID=$(cat "$T/pid")
[ "$SFS_PID" != "$old" ] || fail "upgrade kept server $old"
[ "$(stat -Lc %i "/proc/$SFS_PID/exe")" = "$(stat -c %i "$T/bin/streamfs")" ] ||
	fail "the new server does not run the new binary"
wait $fp || fail "fio failed across the upgrade: $(tail -15 "$T/fio-up.out")"
sfs_umount "$T/mnt"
wait_gone "$sup" 10 || fail "supervisor still runs"
qcheck_crash "$T/ovl" # leaks of the kills above stay

# An allocating write the server acknowledged, no flush after it, then
# the server is killed: the next server replays it from the journal, so
# the guest's later flush succeeds and the bytes are the written ones.
"$STREAMFS" create -f "$FMT" -b "$T/base.raw" -F raw "$T/ovl2" >/dev/null
sfs_mount "$T/ovl2" "$T/mnt" # fresh: nothing allocated, no stream job
off=$((48 << 20))
# One process: every close() of disk (also a process exit) flushes.
python3 - "$T/mnt/disk" $off "$T" >"$T/lost.out" 2>&1 <<'PY' &
import errno, os, sys, time
path, off, t = sys.argv[1], int(sys.argv[2]), sys.argv[3]
fd = os.open(path, os.O_RDWR)
os.pwrite(fd, b"M" * 65536, off)
open(t + "/lost.written", "w").close()
while not os.path.exists(t + "/lost.killed"):
    time.sleep(0.01)
try:
    os.fsync(fd)
    print("fsync: ok")
except OSError as e:
    print("fsync: %s" % errno.errorcode[e.errno])
PY
LP=$!
cleanup_fn "kill $LP 2>/dev/null" # it would hold disk open: no unmount
for ((i = 0; i < 500; i++)); do [ -e "$T/lost.written" ] && break; sleep 0.01; done
[ -e "$T/lost.written" ] || fail "the journaled writer did not write"
# The write is acknowledged and in the journal, not flushed.
grep -q "^journal_bytes: [1-9]" "$T/mnt/control/status" ||
	fail "no journaled bytes after an unflushed write: $(grep journal "$T/mnt/control/status")"
old_pid=$SFS_PID
kill -9 "$SFS_PID"
SFS_PID=$(new_server "$old_pid") || fail "no new server after the kill"
touch "$T/lost.killed"
wait $LP || fail "journaled writer: $(cat "$T/lost.out")"
grep -q "fsync: ok" "$T/lost.out" || fail "fsync after a kill: $(cat "$T/lost.out")"
grep -q "^journal_replayed_records: [1-9]" "$T/mnt/control/status" || fail "nothing replayed"
[ "$(dd if="$T/mnt/disk" bs=64k skip=$((off >> 16)) count=1 iflag=direct status=none | tr -d M | wc -c)" = 0 ] ||
	fail "the acknowledged write is not there after the kill"
sfs_umount "$T/mnt"
# And it is durable: a plain read of the overlay file (qemu-img) has it.
qemu-img convert -f "$FMT" -O raw "$T/ovl2" "$T/ovl2.raw"
[ "$(dd if="$T/ovl2.raw" bs=64k skip=$((off >> 16)) count=1 status=none | tr -d M | wc -c)" = 0 ] ||
	fail "the replayed write is not in the overlay after unmount"
qcheck_crash "$T/ovl2"

# No FUSE_NOTIFY_RESEND (simulated): no failover, the mount ends with the
# server as it did before supervisors.
STREAMFS_TEST_NO_RESEND=1 sfs_mount "$T/ovl" "$T/mnt"
sup=$(cat "$T/pid.supervisor")
kill -9 "$SFS_PID"
wait_gone "$sup" 10 || fail "supervisor outlived its server without resend"
err=$(stat "$T/mnt/disk" 2>&1) && fail "mount still serves"
echo "$err" | grep -q 'not connected' || fail "want ENOTCONN, got: $err"
fusermount3 -u "$T/mnt" 2>/dev/null || umount -l "$T/mnt"
SFS_PID=
qcheck_crash "$T/ovl"
