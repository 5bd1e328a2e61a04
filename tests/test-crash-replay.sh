#!/bin/bash
# Crash replay, the sharper tool of crash testing: instead of killing the
# daemon at a few random moments (test-kill9.sh), record every overlay write
# and fdatasync the daemon makes (STREAMFS_TRACE) while a guest-like writer
# and the stream job run, then rebuild the overlay as a crash at each flush
# point could have left it, and check every one of those images.
#
# The writer (replay write) places each fsync it saw return in the trace as a
# marker, so for each crash image the verifier knows exactly which guest
# writes must be there, which may be, and which cannot (see the comment at the
# top of tests/helpers/replay.c for the argument). For each image:
#   - qemu-img check exits 0 or 3 (leaked clusters), never 2 (corruption);
#   - streamfs mounts it read-only, and every sector of the disk is the last
#     guest write made durable before the crash, or a write in flight at the
#     crash, or (if no durable write covers it) the backing's data: never
#     zeros, never stale data, never a lost fsynced write.
# Also: the whole trace replayed equals the overlay left by the unmount (the
# trace misses no write), and images that drop durable writes on purpose
# (REPLAY_BREAK) are caught, so the checks have teeth.
# Two sessions (one buffered writer, one O_DIRECT) of CUTS=N crash images
# (default 20: the first and last eight flush points, the rest sampled);
# LONG=1: three sessions, every flush point. SEED=N repeats a run;
# REPLAY_PAGE=512 (sector tearing) and REPLAY_MODEL=record (any subset of
# whole writes, stricter than a real crash) pass through to the replayer.
# formats: qcow2 qed
. "$(dirname "$0")/functions.sh"
requires qemu-img fusermount3 cmp
[ -x "$HELPERS/replay" ] || missing "the replay helper (make check builds it)"

seed=${SEED:-$RANDOM}
RANDOM=$seed
cuts=${CUTS:-20}
sessions=2
if [ -n "${LONG:-}" ]; then cuts=${CUTS:-1000000}; sessions=3; fi
info "seed $seed, $sessions session(s), up to $cuts crash images each"

mkbacking "$T/base.raw" 16
total_images=0 total_cuts=0

# gone PID: wait for a daemon to exit. A zombie has exited: the daemon's
# parent is init, which may reap it only a second or two later.
gone() {
	local i
	for ((i = 0; i < 1000; i++)); do
		[ -z "$1" ] && return 0
		case $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null || echo Z) in Z) return 0 ;; esac
		sleep 0.01
	done
	fail "daemon $1 did not exit"
}

# check_image IMG D: qemu-img check, then the data check through a read-only
# streamfs mount. Returns non-zero (with a message) on any problem.
check_image() {
	local img=$1 d=$2 rc=0 out
	out=$(qemu-img check -f "$FMT" "$img" 2>&1) || rc=$?
	if [ $rc -ne 0 ] && [ $rc -ne 3 ]; then
		echo "$(basename "$img"): qemu-img check exit $rc: $out" >&2
		return 1
	fi
	if ! "$STREAMFS" "$img" "$T/vmnt" -o ro,copy_on_read=off,pidfile="$T/vpid" 2>"$T/vmount.err"; then
		echo "$(basename "$img"): streamfs refused it: $(cat "$T/vmount.err")" >&2
		return 1
	fi
	rc=0
	timeout 60 "$HELPERS/replay" verify "$T/vmnt/disk" "$T/log" "$T/base.raw" "$d" 2>"$T/verify.out" || rc=$?
	local vpid
	vpid=$(cat "$T/vpid" 2>/dev/null || true)
	fusermount3 -u "$T/vmnt" || umount -l "$T/vmnt"
	gone "$vpid"
	if [ $rc -ne 0 ]; then
		echo "$(basename "$img") (D=$d): data check failed:" >&2
		sed 's/^/    /' "$T/verify.out" >&2
		return 1
	fi
	return 0
}

mkdir -p "$T/vmnt"
for s in $(seq 1 $sessions); do
	rm -rf "$T/crash" "$T/trace" "$T/log" "$T/ovl"
	"$STREAMFS" create -f "$FMT" -b "$T/base.raw" -F raw "$T/ovl" >/dev/null
	cp "$T/ovl" "$T/initial"
	: >"$T/trace"
	wseed=$((seed * 10 + s))
	direct=
	[ $(((seed + s) % 2)) -eq 1 ] && direct=direct
	speed=$((RANDOM % 24 + 8))M
	info "session $s: writer seed $wseed ${direct:-buffered}, stream speed $speed"
	STREAMFS_TRACE="$T/trace" sfs_mount "$T/ovl" "$T/mnt" -o stream,speed=$speed
	"$HELPERS/replay" write "$T/mnt/disk" "$T/log" "$wseed" "$T/trace" $direct &
	wpid=$!
	# Until the job has completed (and dropped the backing), then a little
	# more: the trace covers streaming, the rebase and writes after it.
	for ((i = 0; i < 200; i++)); do
		[ "$(cat "$T/mnt/control/stream")" = completed ] && break
		sleep 0.05
	done
	sleep 0.$((RANDOM % 5 + 2))
	kill $wpid 2>/dev/null || true
	wait $wpid 2>/dev/null || true
	state=$(cat "$T/mnt/control/stream")
	sfs_umount "$T/mnt"
	qcheck "$T/ovl"
	mkdir -p "$T/crash"
	"$HELPERS/replay" build "$T/initial" "$T/trace" "$T/crash" "$wseed" "$cuts" >"$T/build.out" ||
		fail "replay build failed"
	info "job $state; $(cat "$T/build.out")"
	cmp "$T/ovl" "$T/crash/full" ||
		fail "the whole trace replayed differs from the overlay: the trace misses writes"
	n=0
	while read -r name d cut window; do
		check_image "$T/crash/$name" "$d" ||
			fail "session $s, $name (cut at record $cut, $window records in the crash window): seed $seed"
		n=$((n + 1))
		rm -f "$T/crash/$name"
	done <"$T/crash/manifest"
	[ $n -ge 2 ] || fail "too few crash points ($n)"
	info "session $s: $n crash images checked: qemu-img check clean, data as expected"
	total_images=$((total_images + n))
done

# Teeth: images that lost durable writes (no crash can produce them) must
# fail the checks.
rm -rf "$T/crash"
mkdir -p "$T/crash"
REPLAY_BREAK=1 "$HELPERS/replay" build "$T/initial" "$T/trace" "$T/crash" "$seed" 4 >/dev/null
caught=0 tried=0
while read -r name d cut window; do
	[ "$d" -gt 0 ] || continue # nothing durable yet: nothing to lose
	tried=$((tried + 1))
	check_image "$T/crash/$name" "$d" 2>/dev/null || caught=$((caught + 1))
done <"$T/crash/manifest"
info "self-test: $caught of $tried images with durable writes dropped were caught"
[ $tried -eq 0 ] || [ $caught -gt 0 ] || fail "no broken image was caught: the checks are too weak"
info "total: $total_images crash images checked"
echo ok
