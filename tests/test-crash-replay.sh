#!/bin/bash
# Crash images from a recorded write trace: the daemon records every overlay
# write and fdatasync (STREAMFS_TRACE) while a guest-like writer and the
# stream job run; replay builds, for sampled flush points, the overlay as a
# crash there could leave it (all writes before the previous flush, a random
# subset of those after). Each image: qemu-img check exit 0 or 3 (leaks),
# never corruption; its guest view (read by qemu-img, not by us) holds in
# every sector the backing's data or a logged write's, never zeros or junk.
# formats: qcow2 qed
. "$(dirname "$0")/functions.sh"
requires qemu-img fusermount3
[ -x "$HELPERS/replay" ] && [ -x "$HELPERS/writer" ] || skip "helpers not built"

mkbacking "$T/base.raw" 16
"$STREAMFS" create -f "$FMT" -b "$T/base.raw" -F raw "$T/ovl" >/dev/null
cp "$T/ovl" "$T/initial"
max=${CUTS:-12}
[ -n "${LONG:-}" ] && max=200
seed=${SEED:-$RANDOM}
info "seed $seed, up to $max crash points"

STREAMFS_TRACE="$T/trace" sfs_mount "$T/ovl" "$T/mnt" -o stream,speed=24M
"$HELPERS/writer" write "$T/mnt/disk" "$T/log" "$seed" &
wpid=$!
sleep 1.5
kill $wpid 2>/dev/null || true
wait $wpid 2>/dev/null || true
sfs_umount "$T/mnt"
[ -s "$T/trace" ] || fail "no trace recorded"
mkdir -p "$T/crash"
"$HELPERS/replay" "$T/initial" "$T/trace" "$T/crash" "$seed" "$max" >&2 || fail "replay failed"
n=0
for img in "$T"/crash/crash-*; do
	rc=0
	out=$(qemu-img check -f "$FMT" "$img" 2>&1) || rc=$?
	[ $rc -eq 0 ] || [ $rc -eq 3 ] || fail "$(basename "$img"): qemu-img check exit $rc: $out"
	# The header may still name the backing (crash before the rebase) or not.
	qemu-img convert -f "$FMT" -O raw "$img" "$T/view.raw" || fail "$(basename "$img"): unreadable"
	"$HELPERS/writer" verify-weak "$T/view.raw" "$T/log" "$T/base.raw" ||
		fail "$(basename "$img"): wrong data (seed $seed)"
	rm -f "$T/view.raw"
	n=$((n + 1))
done
info "$n crash images checked"
[ $n -ge 2 ] || fail "too few crash points ($n)"

# The checks can fail: images that drop durable writes (which no crash can
# produce) must be caught by qemu-img check or the data verifier.
rm -rf "$T/crash"; mkdir -p "$T/crash"
REPLAY_BREAK=1 "$HELPERS/replay" "$T/initial" "$T/trace" "$T/crash" "$seed" "$max" >/dev/null
caught=0
for img in "$T"/crash/crash-*; do
	rc=0
	qemu-img check -f "$FMT" "$img" >/dev/null 2>&1 || rc=$?
	if [ $rc -ne 0 ] && [ $rc -ne 3 ]; then caught=$((caught + 1)); continue; fi
	if ! qemu-img convert -f "$FMT" -O raw "$img" "$T/view.raw" 2>/dev/null ||
		! "$HELPERS/writer" verify-weak "$T/view.raw" "$T/log" "$T/base.raw" 2>/dev/null; then
		caught=$((caught + 1))
	fi
	rm -f "$T/view.raw"
done
info "self-test: $caught of $n broken images caught"
[ $caught -gt 0 ] || fail "no broken image was caught: the checks are too weak"
echo ok
