#!/bin/bash
# Mixed load for a while: three fio jobs with verify (O_DIRECT, different
# regions, different engines and block sizes) rewrite and re-verify their
# regions over and over, while the stream job runs (throttled so that it
# spans most of the run), a loop reads control/status and control/map, and
# an events reader sits blocked on control/events. Then:
#   - no fio error or verify failure, no control-file read error, the job
#     completed and the events reader saw it;
#   - the daemon's peak RSS (VmHWM) stays under 64 MiB;
#   - after the unmount, qemu-img check is clean, qemu-img's view of the
#     overlay equals what streamfs served, fio re-verifies its last pass
#     against qemu-img's view, and every byte outside fio's regions is the
#     backing's.
# Short by default (LOAD_SECONDS=15 of load); LONG=1: 300 s and a larger disk.
# formats: qcow2 qed
. "$(dirname "$0")/functions.sh"
requires qemu-img fusermount3 fio python3

secs=${LOAD_SECONDS:-15}
mib=128
if [ -n "${LONG:-}" ]; then secs=${LOAD_SECONDS:-300}; mib=512; fi
# AddressSanitizer's shadow memory and free quarantine (256 MiB by default)
# multiply RSS; under it the bound only catches runaway growth.
rss_limit_mib=64
[ -n "${SFS_SANITIZED:-}" ] && rss_limit_mib=512
rss_limit_kib=$((rss_limit_mib * 1024))
seed=${SEED:-$RANDOM}
info "seed $seed, $secs s of load on a $mib MiB disk"

mkbacking "$T/base.raw" $mib
"$STREAMFS" create -f "$FMT" -b "$T/base.raw" -F raw "$T/ovl" >/dev/null
# Throttle the job so that it spans most of the run: it copies about 55% of
# the disk (a quarter is holes, fio writes some), so that much in 80% of the
# time. It also yields to guest I/O, so it may not be done by the end.
speed=$((mib * 1024 * 1024 * 55 / (secs * 80)))
sfs_mount "$T/ovl" "$T/mnt"
pid=$SFS_PID
cd "$T" || fail "cd $T" # fio drops verify state files in the current directory

engine=libaio
fio --enghelp=io_uring >/dev/null 2>&1 && engine=io_uring
# Regions (MiB): job a [0,16) psync 4k; b [mib/4, +16) $engine qd8 64k;
# c [mib/2, +16) psync 4k..128k. Everything else must stay the backing's.
ra=0 rb=$((mib / 4)) rc=$((mib / 2)) rsz=16
fio_jobs() { # fio_jobs SEED [extra options]: the job file on stdout
	cat <<EOF
[global]
filename=$T/mnt/disk
direct=1
rw=randwrite
size=${rsz}m
verify=crc32c
do_verify=1
verify_fatal=1
verify_state_save=0
randseed=$1
${2:-}
[a]
offset=${ra}m
ioengine=psync
bs=4k
[b]
offset=${rb}m
ioengine=$engine
iodepth=8
bs=64k
[c]
offset=${rc}m
ioengine=psync
bsrange=4k-128k
EOF
}

# The blocked events reader and the control-file loop. The reader's cursor
# is set when it opens control/events: start the job once it has.
cat "$T/mnt/control/events" >"$T/events.log" 2>"$T/events.err" &
epid=$!
events_open() {
	local fd
	for fd in "/proc/$epid/fd/"*; do
		[ "$(readlink "$fd")" = "$T/mnt/control/events" ] && return 0
	done
	alive $epid || fail "the events reader died: $(cat "$T/events.err")"
	return 1
}
wait_until 10 events_open || fail "the events reader did not open control/events"
echo "start speed=$speed" >"$T/mnt/control/stream"
(
	n=0 errs=0
	while [ ! -e "$T/stop" ]; do
		cat "$T/mnt/control/status" >/dev/null 2>>"$T/ctl.err" || errs=$((errs + 1))
		cat "$T/mnt/control/map" >/dev/null 2>>"$T/ctl.err" || errs=$((errs + 1))
		n=$((n + 1))
	done
	echo "$n $errs" >"$T/ctl.count"
) &
cpid=$!
# RSS sampler.
(
	max=0
	while [ ! -e "$T/stop" ]; do
		r=$(awk '/^VmRSS/ {print $2}' /proc/$pid/status 2>/dev/null || echo 0)
		[ "${r:-0}" -gt $max ] && max=$r
		sleep 0.2
	done
	echo $max >"$T/rss.max"
) &
spid=$!
cleanup_fn "touch '$T/stop'; kill $epid $cpid $spid 2>/dev/null"

start=$SECONDS passes=0
while [ $((SECONDS - start)) -lt $secs ]; do
	passes=$((passes + 1))
	last=$((seed * 100 + passes))
	fio_jobs $last >"$T/jobs.fio"
	fio --output="$T/fio.txt" "$T/jobs.fio" >/dev/null 2>"$T/fio.err" ||
		fail "fio pass $passes failed: $(grep -iE 'err|verify' "$T/fio.txt" "$T/fio.err" | head -5)"
	grep -q "err= 0" "$T/fio.txt" || fail "fio pass $passes reported errors"
	alive $epid || fail "the events reader died: $(cat "$T/events.err")"
done
state=$(cat "$T/mnt/control/stream")
info "$passes fio passes (3 jobs x ${rsz} MiB written and verified each) in $((SECONDS - start)) s; job: $state at $(field "$T/mnt" percent)"
echo 0 >"$T/mnt/control/speed"
wait_state "$T/mnt" completed 120
touch "$T/stop"
wait $cpid $spid
read -r ctl_n ctl_errs <"$T/ctl.count"
[ "$ctl_errs" -eq 0 ] || fail "$ctl_errs control-file reads failed: $(head -3 "$T/ctl.err")"
hwm=$(awk '/^VmHWM/ {print $2}' /proc/$pid/status)
info "control loop: $ctl_n status+map reads, no error; daemon VmHWM $((hwm / 1024)) MiB (max VmRSS sampled $(($(cat "$T/rss.max") / 1024)) MiB)"
[ "$hwm" -lt $rss_limit_kib ] || fail "daemon peak RSS $hwm KiB >= $rss_limit_mib MiB"
# The reader, still blocked on control/events, must have seen both.
saw_completed() { grep -q completed "$T/events.log"; }
wait_until 10 saw_completed || fail "events reader missed completed: $(cat "$T/events.log")"
alive $epid || fail "the events reader died: $(cat "$T/events.err")"
kill $epid 2>/dev/null
wait $epid 2>/dev/null || true
grep -q started "$T/events.log" || fail "events reader missed started: $(cat "$T/events.log")"
info "events seen: $(awk '{print $2}' "$T/events.log" | sort | uniq -c | tr -s ' \n' ' ')"

# What streamfs serves now, then the overlay after a clean unmount.
dd if="$T/mnt/disk" of="$T/view.raw" bs=1M status=none
sfs_umount "$T/mnt"
qcheck "$T/ovl"
qemu-img convert -f "$FMT" -O raw "$T/ovl" "$T/qview.raw"
cmp "$T/view.raw" "$T/qview.raw" || fail "qemu-img's view of the overlay differs from what streamfs served"
# fio's last pass, verified again against qemu-img's view.
fio_jobs $last "verify_only=1" | sed "s|^filename=.*|filename=$T/qview.raw|; s|^direct=1|direct=0|" >"$T/verify.fio"
fio --output="$T/fio-verify.txt" "$T/verify.fio" >/dev/null 2>&1 ||
	fail "fio's data does not verify in the unmounted overlay: $(grep -iE 'verify|err' "$T/fio-verify.txt" | head -5)"
# Outside fio's regions: the backing.
python3 - "$T/qview.raw" "$T/base.raw" $ra $rb $rc $rsz <<'EOF' || fail "data outside fio's regions differs from the backing"
import sys
view, base = open(sys.argv[1], 'rb').read(), open(sys.argv[2], 'rb').read()
M = 1 << 20
regions = [(int(a) * M, (int(a) + int(sys.argv[6])) * M) for a in sys.argv[3:6]]
assert len(view) == len(base)
pos = 0
for lo, hi in sorted(regions) + [(len(base), len(base))]:
    if view[pos:lo] != base[pos:lo]:
        sys.exit("differs in [%d, %d)" % (pos, lo))
    pos = hi
EOF
info "after unmount: qemu-img check clean, qemu-img view == streamfs view, fio's last pass re-verified, rest == backing"
echo ok
