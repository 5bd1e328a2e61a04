#!/bin/bash
# Boot traces end to end: a scripted "boot" (scattered reads in a known
# order) is recorded by control/trace and `streamfs trace MNT`; a fresh
# overlay mounted with -o prefetch=TRACE has those ranges copied before the
# guest asks (status counters, the overlay's map), serves the guest from them,
# and its bytes equal the backing. A trace of another image (size, or a
# backing changed since: validator) or a malformed one is refused at mount
# with a message; `streamfs trace merge` keeps first-access order. Over HTTP
# the validator is the server's ETag.
# formats: qcow2 qed
. "$(dirname "$0")/functions.sh"
requires qemu-img fusermount3

randfile "$T/base.raw" 32
M=$T/mnt
# boot ORDER...: read 3 x 64 KiB at each MiB offset, in this order, O_DIRECT.
boot() {
	local o
	for o in "$@"; do
		dd if="$M/disk" of=/dev/null bs=64k skip=$((o * 16)) count=3 iflag=direct status=none ||
			fail "read at $o MiB"
	done
}
fresh() { rm -f "$T/ovl"; "$STREAMFS" create -f "$FMT" -b "$1" -F raw "$T/ovl" >/dev/null; }

run_case() { # run_case BACKING_URI
	local b=$1 n first
	fresh "$b"
	sfs_mount "$T/ovl" "$M"
	boot 5 1 20 2 13
	"$STREAMFS" trace "$M" >"$T/boot.trace" || fail "streamfs trace"
	cmp -s "$T/boot.trace" <(cat "$M/control/trace") || fail "control/trace and streamfs trace differ"
	head -1 "$T/boot.trace" | grep -q "^streamfs-trace 1 .*size=$((32 << 20))" ||
		fail "header: $(head -1 "$T/boot.trace")"
	# First-access order: the MiB offsets as read.
	first=$(grep -v '^[#s]' "$T/boot.trace" | awk '{printf "%d ", $1 / 1048576}')
	[ "$first" = "5 1 20 2 13 " ] || fail "trace order: $first ($(cat "$T/boot.trace"))"
	[ "$(field "$M" trace_ranges)" = 5 ] || fail "trace_ranges $(field "$M" trace_ranges)"
	sfs_umount "$M"

	# Replay into a fresh overlay: copied before the guest reads anything.
	fresh "$b"
	sfs_mount "$T/ovl" "$M" -o "prefetch=$T/boot.trace"
	for ((n = 0; n < 200; n++)); do
		[ "$(field "$M" prefetch)" = done ] && break
		sleep 0.05
	done
	[ "$(field "$M" prefetch)" = done ] || fail "prefetch: $(field "$M" prefetch) $(field "$M" prefetch_error)"
	[ "$(field "$M" prefetch_ranges_done)" = 5 ] || fail "ranges done $(field "$M" prefetch_ranges_done)"
	[ "$(field "$M" prefetch_bytes_copied)" = $((5 * 196608)) ] ||
		fail "bytes copied $(field "$M" prefetch_bytes_copied)"
	[ "$(field "$M" guest_bytes_read)" = 0 ] || fail "the guest read before the check"
	before=$(field "$M" bytes_copied_on_read)
	boot 5 1 20 2 13
	[ "$(field "$M" bytes_copied_on_read)" = "$before" ] ||
		fail "the boot still copied on read: $before -> $(field "$M" bytes_copied_on_read)"
	[ "$(field "$M" prefetch_guest_reads_served)" -ge 5 ] ||
		fail "reads served by the prefetch: $(field "$M" prefetch_guest_reads_served)"
	cmp "$M/disk" "$T/base.raw" || fail "bytes differ from the backing after a replay"
	sfs_umount "$M"
	qcheck "$T/ovl"
}

run_case "$T/base.raw"

# Refusals: the trace is not used, with a message, and the mount goes on
# without it (a trace only speeds a boot up; it must never block one), its
# bytes those of the backing.
refuse() { # refuse TRACE WHAT
	fresh "$T/base.raw"
	sfs_mount "$T/ovl" "$M" -o "prefetch=$1" 2>"$T/err" || fail "no mount with $2"
	grep -q "trace is not used" "$T/err" || fail "$2: message: $(cat "$T/err")"
	[ "$(field "$M" prefetch)" = none ] || fail "$2 replayed: $(field "$M" prefetch)"
	[ "$(field "$M" prefetch_bytes_copied)" = 0 ] || fail "$2 copied data"
	boot 5 1
	cmp "$M/disk" "$T/base.raw" || fail "bytes differ with $2"
	sfs_umount "$M"
}
sed "1s/size=[0-9]*/size=4096/" "$T/boot.trace" >"$T/other-size.trace"
refuse "$T/other-size.trace" "a trace of another size"
printf 'streamfs-trace 1 size=%d cluster=65536 validator=\n-5 7\n' $((32 << 20)) >"$T/junk.trace"
refuse "$T/junk.trace" "a malformed trace"
touch -d "2001-01-01" "$T/base.raw" # same bytes, but the validator changed: stale
refuse "$T/boot.trace" "a stale trace"
refuse "$T/no-such.trace" "a missing trace"

# Merge: a second boot's order, merged after the first, keeps first access.
{ head -1 "$T/boot.trace"; echo "$((30 << 20)) 65536"; echo "$((5 << 20)) 65536"; } >"$T/b2.trace"
"$STREAMFS" trace merge "$T/boot.trace" "$T/boot.trace" >"$T/same.trace" || fail "merge"
cmp "$T/boot.trace" "$T/same.trace" || fail "merging a trace with itself changed it"
"$STREAMFS" trace merge "$T/other-size.trace" "$T/boot.trace" >/dev/null 2>&1 &&
	fail "merged traces of different images"

# Over HTTP: the validator is the server's ETag.
if http_serve "$T"; then
	run_case "$HTTP_URL/base.raw"
	grep -q 'validator=.*"' "$T/boot.trace" || info "no ETag in the header: $(head -1 "$T/boot.trace")"
elif [ -n "${CI:-}" ]; then
	fail "CI: $HTTP_ERR"
fi
echo "PASS: $TESTNAME"
