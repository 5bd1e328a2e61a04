#!/bin/bash
# kill -9 the daemon while the guest writes and the stream job runs, at
# random moments; remount; qemu-img check never reports corruption; every
# flushed write is present; every other byte is the backing's or a write's.
#
# Local backing: one overlay crashed KILL_ITERS times (6; LONG=1: 60).
# HTTP backing (served by nginx on 127.0.0.1; skipped without it): a fresh
# overlay per iteration (HTTP_KILL_ITERS: 3; LONG=1: 20). The job runs alone
# to a random point, is throttled, the writer starts, and after a random
# number of writes the daemon is killed mid-stream, once guest fsyncs have
# made the job's progress durable. The remounted job must resume at or past that progress and copy
# only what lies beyond; the data checks hold before and after it completes.
# SEED=N replays the random choices (the timing is still the machine's).
# formats: qcow2 qed
. "$(dirname "$0")/functions.sh"
requires qemu-img fusermount3
[ -x "$HELPERS/writer" ] || missing "the writer helper (make check builds it)"

wpid=
cleanup_fn '[ -n "$wpid" ] && kill "$wpid" 2>/dev/null'

mkbacking "$T/base.raw" 32
"$STREAMFS" create -f "$FMT" -b "$T/base.raw" -F raw "$T/ovl" >/dev/null
iters=${KILL_ITERS:-6}
[ -n "${LONG:-}" ] && iters=60
hiters=${HTTP_KILL_ITERS:-3}
[ -n "${LONG:-}" ] && hiters=20
seed=${SEED:-$RANDOM}
info "seed $seed, $iters local and $hiters HTTP iterations"
RANDOM=$seed
for it in $(seq 1 $iters); do
	sfs_mount "$T/ovl" "$T/mnt" -o stream,speed=$((RANDOM % 64 + 8))M
	# The writer logs each write it made and each fsync that returned;
	# verify checks the logged state against the disk.
	"$HELPERS/writer" write "$T/mnt/disk" "$T/log" $((it * 1000 + RANDOM)) &
	wpid=$!
	sleep "0.$((RANDOM % 9 + 1))"
	sfs_kill9 "$T/mnt"
	wait $wpid 2>/dev/null || true
	wpid=
	qcheck_crash "$T/ovl"
	sfs_mount "$T/ovl" "$T/mnt" -o copy_on_read=off
	"$HELPERS/writer" verify "$T/mnt/disk" "$T/log" "$T/base.raw" || fail "iteration $it: data check failed (seed $seed)"
	sfs_umount "$T/mnt"
	qcheck_crash "$T/ovl"
done
# A clean unmount after all that leaves a clean image.
if [ "$iters" -gt 0 ]; then
	sfs_mount "$T/ovl" "$T/mnt" -o stream
	wait_state "$T/mnt" completed
	"$HELPERS/writer" verify "$T/mnt/disk" "$T/log" "$T/base.raw" || fail "final data check failed"
	sfs_umount "$T/mnt"
	qcheck_crash "$T/ovl"
fi

# nlogged W|S LOG: how many writes the writer began, or fsyncs returned.
nlogged() {
	local n
	n=$(grep -c "^$1" "$2" 2>/dev/null) || true
	echo "${n:-0}"
}

mkdir -p "$T/www"
mkbacking "$T/www/base.raw" 32
if [ "$hiters" -gt 0 ] && ! http_serve "$T/www"; then
	info "HTTP iterations skipped: $HTTP_ERR"
	hiters=0
fi
url=${HTTP_URL:-}/base.raw
for it in $(seq 1 $hiters); do
	h="HTTP iteration $it (seed $seed)"
	rm -f "$T/hovl" "$T/hlog"
	"$STREAMFS" create -f "$FMT" -b "$url" -F raw "$T/hovl" >/dev/null || fail "$h: create over $url"
	fast=$((RANDOM % 33 + 16)) slow=$((RANDOM % 7 + 2)) pct=$((RANDOM % 41 + 10))
	nw=$((RANDOM % 233 + 8)) wseed=$((it * 1000 + RANDOM))
	# The job alone to a random point, then throttled while the writer runs.
	sfs_mount "$T/hovl" "$T/mnt" -o stream,speed=${fast}M
	len=$(field "$T/mnt" length)
	wait_offset "$T/mnt" $((len * pct / 100))
	echo "${slow}M" >"$T/mnt/control/speed"
	"$HELPERS/writer" write "$T/mnt/disk" "$T/hlog" $wseed &
	wpid=$!
	# A number of writes rather than a time: on a fast machine the writer
	# would otherwise cover the whole disk, leaving the job nothing to do.
	for ((i = 0; i < 3000; i++)); do
		[ "$(nlogged W "$T/hlog")" -ge $nw ] && break
		kill -0 $wpid 2>/dev/null || fail "$h: the writer stopped before the kill"
		sleep 0.01
	done
	# Everything the job had covered now is durable once a guest fsync
	# that began after this point has returned: wait for two to return.
	read -r off _ <"$T/mnt/control/progress"
	s0=$(nlogged S "$T/hlog")
	for ((i = 0; i < 1000; i++)); do
		[ "$(nlogged S "$T/hlog")" -ge $((s0 + 2)) ] && break
		kill -0 $wpid 2>/dev/null || fail "$h: the writer stopped before the kill"
		sleep 0.01
	done
	[ "$(nlogged S "$T/hlog")" -ge $((s0 + 2)) ] || fail "$h: the writer's fsyncs do not return"
	read -r state <"$T/mnt/control/stream"
	read -r koff _ <"$T/mnt/control/progress"
	[ "$state" = running ] || fail "$h: the job was $state before the kill, not mid-stream"
	sfs_kill9 "$T/mnt"
	wait $wpid 2>/dev/null || true
	wpid=
	qcheck_crash "$T/hovl"
	hdr=$(qemu-img info -U "$T/hovl")
	[[ $hdr == *"backing file: $url"* ]] || fail "$h: the backing reference is gone after the crash: $hdr"

	# The job resumes past what was durable, and copies only what lies
	# beyond (copy-on-read is off, so the data check copies nothing).
	sfs_mount "$T/hovl" "$T/mnt" -o stream,speed=${slow}M,copy_on_read=off
	state=$(field "$T/mnt" state) from=$(field "$T/mnt" resumed_from)
	[ "$state" = running ] || [ "$state" = completed ] || fail "$h: the job is $state after the remount"
	[ "$from" -ge "$off" ] || fail "$h: the job resumed from $from, but it had covered $off before two guest fsyncs returned"
	"$HELPERS/writer" verify "$T/mnt/disk" "$T/hlog" "$T/www/base.raw" || fail "$h: data check after the crash failed"
	echo 0 >"$T/mnt/control/speed"
	wait_state "$T/mnt" completed
	copied=$(field "$T/mnt" bytes_copied_by_job)
	[ "$copied" -le $((len - from)) ] || fail "$h: the resumed job copied $copied bytes, more than the $((len - from)) past resumed_from $from"
	[ "$(field "$T/mnt" backing)" = - ] || fail "$h: the completed job kept the backing $(field "$T/mnt" backing)"
	"$HELPERS/writer" verify "$T/mnt/disk" "$T/hlog" "$T/www/base.raw" || fail "$h: data check after the job completed failed"
	sfs_umount "$T/mnt"
	qcheck_crash "$T/hovl"
	hdr=$(qemu-img info "$T/hovl")
	[[ $hdr != *"backing file"* ]] || fail "$h: the overlay still references the URL: $hdr"
	info "HTTP iteration $it: ${fast}M to $pct%, ${slow}M, $nw+ writes; killed at $koff (durable $off), resumed from $from, then copied $copied"
done
echo ok
