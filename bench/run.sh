#!/bin/bash
# streamfs benchmark: streamfs vs qemu-storage-daemon (qsd) vs nbdkit+nbdfuse
# vs the physical limits, on one random-data backing image.
#
#   make bench                          (or bench/run.sh)
#   BENCH_SIZE_MIB=1024                 backing size (default 1 GiB)
#   BENCH_RUNS=3                        runs for the cheap workloads (medians)
#   BENCH_DIR=/tmp/streamfs-bench       work dir (results in BENCH_DIR/results.txt)
#   BENCH_FIO_SECS=5                    seconds per fio random-read run
#   BENCH_SPEED_MIB=100                 requested rate of the throttled stream
#   BENCH_ONLY="reads stream http throttle latency rss wan"   subset of sections
#   BENCH_BASELINE=FILE                 an earlier results.txt: the loopback HTTP
#                                       stream must be no slower than its figure
#
# WAN section (links emulated by bench/linkem through bench/wan.sh; the
# kernel has no netem):
#   WAN_LINKS="80:500 40:200"           RTT_MS:RATE_MBIT of each link
#   WAN_SIZE_MIB=256                    image size for the WAN runs
#   BENCH_WAN_RUNS=3                    interleaved runs per link (medians)
#   BENCH_WAN_LAT_RUNS=2                guest latency runs per link (samples pooled)
#   BENCH_WAN_LAT_IOS=150               cold 4K reads per idle latency run
#   With the defaults the section takes about 20 minutes on 2 shared cores:
#   the peers are slow at a distance (qsd block-stream ~50 s, nbdkit's curl
#   plugin ~90 s per 256 MiB over 80 ms).
#
# Peers and settings as in ../shared/PEERS.md (beside the repository). Every
# peer step runs under `timeout`; a step that times out is reported as "hang",
# one that fails as "fail", one that is not supported as "n/a". Cold runs drop
# the page cache (needs root). Everything started here is stopped by PID on
# exit.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SFS=$ROOT/streamfs
BH=(python3 "$ROOT/bench/bh.py")
SIZE_MIB=${BENCH_SIZE_MIB:-1024}
RUNS=${BENCH_RUNS:-3}
W=${BENCH_DIR:-/tmp/streamfs-bench}
FIO_SECS=${BENCH_FIO_SECS:-5}
SPEED_MIB=${BENCH_SPEED_MIB:-100}
ONLY=${BENCH_ONLY:-reads stream http throttle latency rss wan}
SIZE=$((SIZE_MIB * 1024 * 1024))
# per-step timeout: generous for a whole-disk pass at >= ~10 MiB/s
TMO=$((SIZE_MIB / 10 + 60))
RES=$W/results.txt
WAN_LINKS=${WAN_LINKS:-80:500 40:200}
WSIZE_MIB=${WAN_SIZE_MIB:-256}
WRUNS=${BENCH_WAN_RUNS:-3}
WLAT_RUNS=${BENCH_WAN_LAT_RUNS:-2}
WLAT_IOS=${BENCH_WAN_LAT_IOS:-150}
WSIZE=$((WSIZE_MIB * 1024 * 1024))
# per-step timeout at a distance: a whole-image pass at >= 1 MiB/s (nbdkit's
# curl plugin serializes its requests: ~3 MiB/s over 80 ms)
WTMO=$((WSIZE_MIB + 60))
# one capacity run per call: the runs are interleaved with the systems
WAN=(env "WAN_DIR=$W/wan" WAN_RUNS=1 "$ROOT/bench/wan.sh")

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
want() { [[ " $ONLY " == *" $1 "* ]]; }

# ------------------------------------------------------------ prerequisites
install_pkgs() {
	local need=() p
	for p in qemu-system-common qemu-block-extra nbdkit libnbd-bin nginx-light fio qemu-utils; do
		dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
	done
	[ ${#need[@]} -eq 0 ] && return 0
	local sudo=
	[ "$(id -u)" -eq 0 ] || sudo=sudo
	log "installing ${need[*]}"
	$sudo apt-get update -qq >/dev/null 2>&1 || true
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null ||
		log "warning: apt-get install failed; missing peers are reported as n/a"
}
install_pkgs
[ -x "$SFS" ] || { echo "bench: build streamfs first (make)" >&2; exit 1; }
CAN_DROP=1
if ! { sync && echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null; then
	CAN_DROP=0
	log "warning: cannot drop caches (not root?): cold runs are not cold"
fi
drop() { sync; [ $CAN_DROP = 1 ] && echo 3 >/proc/sys/vm/drop_caches; true; }
have() { command -v "$1" >/dev/null 2>&1; }
AIO=io_uring
fio --enghelp=io_uring >/dev/null 2>&1 || AIO=libaio

# ------------------------------------------------------------ cleanup
MOUNTS=()
PIDS=()
is_mounted() { awk -v m="$1" '$2 == m {f = 1} END {exit !f}' /proc/mounts; }
alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
# wait_gone PID SECS: 0 once PID is gone
wait_gone() {
	local i
	for ((i = 0; i < $2 * 20; i++)); do
		alive "$1" || return 0
		sleep 0.05
	done
	return 1
}
# stop_pid PID: TERM, then KILL
stop_pid() {
	alive "$1" || return 0
	kill -TERM "$1" 2>/dev/null
	wait_gone "$1" 20 || { kill -KILL "$1" 2>/dev/null; wait_gone "$1" 5; }
}
umount_path() {
	is_mounted "$1" || return 0
	fusermount3 -u "$1" 2>/dev/null || fusermount3 -uz "$1" 2>/dev/null || umount -l "$1" 2>/dev/null
}
cleanup() {
	set +e
	local i
	for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do umount_path "${MOUNTS[$i]}"; done
	for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[$i]}"; done
	[ -s "$W/wan/linkem.pid" ] && "${WAN[@]}" down >/dev/null 2>&1
	# anything still mounted under the work dir
	for m in $(awk -v w="$W/" 'index($2, w) == 1 {print $2}' /proc/mounts); do umount_path "$m"; done
	rm -f "$W"/*.raw "$W"/*.qcow2 "$W"/www/* "$W"/copy.* 2>/dev/null
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------ helpers
rec() { echo "$1 $2" >>"$RES"; }
# div A B [scale] -> A/B
div() { awk -v a="$1" -v b="$2" -v s="${3:-1}" 'BEGIN { if (b > 0) printf "%.4f\n", a * s / b; else print "fail" }'; }
isnum() { [[ "$1" =~ ^[0-9]+(\.[0-9]+)?$ ]]; }
kv() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" <<<"$2"; }
hwm_mib() { awk '/^VmHWM/ {printf "%.1f\n", $2 / 1024}' "/proc/$1/status" 2>/dev/null; }
cpu_s() { awk -v t="$(getconf CLK_TCK)" '{print ($14 + $15) / t}' "/proc/$1/stat" 2>/dev/null || echo 0; }

# dd_rate FILE [dd flags...]: whole-disk read, prints MiB/s | hang | fail
dd_rate() {
	local f=$1 t0 t1 rc
	shift
	t0=$EPOCHREALTIME
	timeout -k 5 "$TMO" dd if="$f" of=/dev/null bs=1M count="$SIZE_MIB" status=none "$@"
	rc=$?
	t1=$EPOCHREALTIME
	case $rc in
	0) div "$SIZE_MIB" "$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')" ;;
	124 | 137) echo hang ;;
	*) echo fail ;;
	esac
}

# fio_rand FILE ENGINE QD: 4 KiB random reads, prints "IOPS P50 P99"
fio_rand() {
	local out=$W/fio.json
	rm -f "$out"
	timeout -k 5 $((FIO_SECS + 60)) fio --name=r --filename="$1" --direct=1 --rw=randread --bs=4k \
		--ioengine="$2" --iodepth="$3" --runtime="$FIO_SECS" --time_based --size="$SIZE" \
		--norandommap --randrepeat=0 --invalidate=0 --output-format=json --output="$out" \
		>/dev/null 2>>"$W/fio.err"
	case $? in
	0) "${BH[@]}" fio "$out" ;;
	124 | 137) echo "hang hang hang" ;;
	*) echo "fail fail fail" ;;
	esac
}

# ---- streamfs
SFS_PID=
sfs_fresh() { # sfs_fresh OVERLAY BACKING
	rm -f "$1"
	"$SFS" create -f qcow2 -b "$2" -F raw "$1" >>"$W/streamfs.log" 2>&1
}
sfs_up() { # sfs_up OVERLAY [-o opts...]
	local ovl=$1 i
	shift
	mkdir -p "$W/smnt"
	rm -f "$W/sfs.pid"
	SFS_PID=
	MOUNTS+=("$W/smnt")
	timeout -k 5 60 "$SFS" "$ovl" "$W/smnt" -o "pidfile=$W/sfs.pid" "$@" >>"$W/streamfs.log" 2>&1 ||
		{ log "streamfs mount failed"; return 1; }
	for ((i = 0; i < 200; i++)); do
		[ -s "$W/sfs.pid" ] && break
		sleep 0.05
	done
	SFS_PID=$(cat "$W/sfs.pid" 2>/dev/null)
	[ -n "$SFS_PID" ] && PIDS+=("$SFS_PID")
	is_mounted "$W/smnt" || { log "streamfs not mounted"; return 1; }
}
# sfs_up_fg OVERLAY: like sfs_up, but in the foreground (-f), so the daemon
# stays in this session: with autogroup scheduling (the default on most
# distributions) a daemonized streamfs sits in its own group and CPU load
# started here cannot compete with its threads at all.
sfs_up_fg() {
	local i
	mkdir -p "$W/smnt"
	rm -f "$W/sfs.pid"
	SFS_PID=
	MOUNTS+=("$W/smnt")
	"$SFS" "$1" "$W/smnt" -f -o "pidfile=$W/sfs.pid" >>"$W/streamfs.log" 2>&1 &
	PIDS+=($!)
	for ((i = 0; i < 200; i++)); do
		[ -s "$W/sfs.pid" ] && break
		sleep 0.05
	done
	SFS_PID=$(cat "$W/sfs.pid" 2>/dev/null)
	is_mounted "$W/smnt" || { log "streamfs not mounted"; return 1; }
}
sfs_down() {
	umount_path "$W/smnt"
	[ -n "$SFS_PID" ] && { wait_gone "$SFS_PID" 60 || stop_pid "$SFS_PID"; }
	SFS_PID=
}

# ---- qemu-storage-daemon
QSD_PID=
QSD_SOCK=$W/qmp.sock
QSD_FILE=$W/qsd.export
qsd_overlay() { # qsd_overlay OVERLAY BACKING [SIZE]
	rm -f "$1"
	qemu-img create -q -f qcow2 -u -b "$2" -F raw "$1" "${3:-$SIZE}"
}
# qsd_up cor OVERLAY BACKING(file path or http url) | qsd_up floor RAWFILE
qsd_up() {
	local mode=$1 args=()
	rm -f "$W/qsd.pid" "$QSD_SOCK"
	: >"$QSD_FILE"
	QSD_PID=
	if [ "$mode" = floor ]; then
		args=(--blockdev "driver=file,node-name=f,filename=$2"
			--blockdev driver=raw,node-name=r0,file=f
			--export "type=fuse,id=e,node-name=r0,mountpoint=$QSD_FILE,writable=on")
	else
		local proto
		if [[ $3 == http* ]]; then
			proto="driver=http,node-name=bproto,url=$3,read-only=on"
		else
			proto="driver=file,node-name=bproto,filename=$3,read-only=on"
		fi
		args=(--blockdev "$proto"
			--blockdev driver=raw,node-name=base,file=bproto,read-only=on
			--blockdev "driver=file,node-name=ofile,filename=$2"
			--blockdev driver=qcow2,node-name=ovl,file=ofile,backing=base
			--blockdev driver=copy-on-read,node-name=cor,file=ovl
			--export "type=fuse,id=exp0,node-name=cor,mountpoint=$QSD_FILE,writable=off")
	fi
	MOUNTS+=("$QSD_FILE")
	timeout -k 5 60 qemu-storage-daemon --daemonize --pidfile "$W/qsd.pid" \
		--chardev "socket,path=$QSD_SOCK,server=on,wait=off,id=qmp0" --monitor chardev=qmp0 \
		"${args[@]}" >>"$W/qsd.log" 2>&1 || { log "qsd start failed"; return 1; }
	QSD_PID=$(cat "$W/qsd.pid" 2>/dev/null)
	[ -n "$QSD_PID" ] && PIDS+=("$QSD_PID")
	is_mounted "$QSD_FILE" || { log "qsd export not mounted"; return 1; }
}
qsd_down() {
	[ -n "$QSD_PID" ] && stop_pid "$QSD_PID"
	umount_path "$QSD_FILE"
	QSD_PID=
}

# ---- nbdkit + nbdfuse
NBDKIT_PID=
NBDFUSE_PID=
NBD_SOCK=$W/nbd.sock
nbd_up() { # nbd_up PLUGIN ARGS... (cow filter, cow-on-read); nbdfuse file $W/nmnt/nbd
	local i
	rm -f "$W/nbdkit.pid" "$W/nbdfuse.pid" "$NBD_SOCK"
	NBDKIT_PID=
	NBDFUSE_PID=
	TMPDIR=$W timeout -k 5 60 nbdkit -P "$W/nbdkit.pid" -U "$NBD_SOCK" --filter=cow "$@" \
		cow-on-read=true >>"$W/nbdkit.log" 2>&1 || { log "nbdkit start failed"; return 1; }
	NBDKIT_PID=$(cat "$W/nbdkit.pid" 2>/dev/null)
	[ -n "$NBDKIT_PID" ] && PIDS+=("$NBDKIT_PID")
	mkdir -p "$W/nmnt"
	MOUNTS+=("$W/nmnt")
	nbdfuse -P "$W/nbdfuse.pid" "$W/nmnt" --unix "$NBD_SOCK" >>"$W/nbdkit.log" 2>&1 &
	NBDFUSE_PID=$!
	PIDS+=("$NBDFUSE_PID")
	for ((i = 0; i < 200; i++)); do
		[ -s "$W/nbdfuse.pid" ] && break
		alive "$NBDFUSE_PID" || break
		sleep 0.05
	done
	is_mounted "$W/nmnt" || { log "nbdfuse not mounted"; return 1; }
}
nbdkit_only() { # nbdkit without nbdfuse (for nbdcopy)
	rm -f "$W/nbdkit.pid" "$NBD_SOCK"
	NBDKIT_PID=
	NBDFUSE_PID=
	TMPDIR=$W timeout -k 5 60 nbdkit -P "$W/nbdkit.pid" -U "$NBD_SOCK" --filter=cow "$@" \
		cow-on-read=true >>"$W/nbdkit.log" 2>&1 || return 1
	NBDKIT_PID=$(cat "$W/nbdkit.pid" 2>/dev/null)
	[ -n "$NBDKIT_PID" ] && PIDS+=("$NBDKIT_PID")
	return 0
}
nbd_down() {
	umount_path "$W/nmnt"
	[ -n "$NBDFUSE_PID" ] && { wait_gone "$NBDFUSE_PID" 10 || stop_pid "$NBDFUSE_PID"; wait "$NBDFUSE_PID" 2>/dev/null; }
	[ -n "$NBDKIT_PID" ] && stop_pid "$NBDKIT_PID"
	NBDKIT_PID=
	NBDFUSE_PID=
}

# ---- one system: up_fresh SYS -> sets DISK; down SYS
DISK=
up_fresh() {
	case $1 in
	streamfs)
		sfs_fresh "$W/sfs.qcow2" "$W/base.raw" && sfs_up "$W/sfs.qcow2" && DISK=$W/smnt/disk ;;
	qsd)
		qsd_overlay "$W/qsd.qcow2" "$W/base.raw" && qsd_up cor "$W/qsd.qcow2" "$W/base.raw" &&
			DISK=$QSD_FILE ;;
	nbdkit)
		have nbdfuse && nbd_up file "$W/base.raw" && DISK=$W/nmnt/nbd ;;
	floor)
		qsd_up floor "$W/base.raw" && DISK=$QSD_FILE ;;
	esac
}
down() {
	case $1 in
	streamfs) sfs_down ;;
	qsd | floor) qsd_down ;;
	nbdkit) nbd_down ;;
	esac
}

# ------------------------------------------------------------ setup
for m in $(awk -v w="$W/" 'index($2, w) == 1 {print $2}' /proc/mounts 2>/dev/null); do umount_path "$m"; done
mkdir -p "$W"
chmod 755 "$W"
rm -rf "${W:?}"/{*.qcow2,*.raw,*.log,*.pid,*.sock,fio.*,lat_*,wlat*,www,smnt,nmnt,qsd.export,results.txt}
: >"$RES"
rec size_mib "$SIZE_MIB"
rec runs "$RUNS"
rec aio_engine "$AIO"
rec limit.throttle_req "$SPEED_MIB"
if [ -n "${BENCH_BASELINE:-}" ]; then # figures of an earlier run, for "no slower than before"
	grep -E '^streamfs\.stream_http(_sync)? ' "$BENCH_BASELINE" | sed 's/^/baseline./' >>"$RES" ||
		log "warning: no loopback HTTP stream figures in $BENCH_BASELINE"
fi
log "work dir $W; backing $SIZE_MIB MiB; runs $RUNS; $(nproc) CPUs; streamfs $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)"
# gen_random FILE BYTES: incompressible data
gen_random() {
	# AES-CTR keystream: incompressible like /dev/urandom, several times faster
	if have openssl; then
		openssl enc -aes-128-ctr -pass "pass:streamfs-bench-$RANDOM" -nosalt -pbkdf2 </dev/zero 2>/dev/null |
			head -c "$2" >"$1"
	fi
	[ "$(stat -c %s "$1" 2>/dev/null)" = "$2" ] || head -c "$2" /dev/urandom >"$1"
}
if [ "${ONLY// /}" != wan ]; then
	log "generating random backing image"
	gen_random "$W/base.raw" "$SIZE" || exit 1
fi
BENCH_T0=$SECONDS

# ------------------------------------------------------------ 1-3: reads
if want reads; then
	SYSTEMS=(streamfs qsd nbdkit floor)
	# raw file limits (no FUSE)
	for ((r = 1; r <= RUNS; r++)); do
		drop; rec raw.cold_seq "$(dd_rate "$W/base.raw")"
		drop; rec raw.cold_seq_direct "$(dd_rate "$W/base.raw" iflag=direct)"
	done
	drop; read -r a _ <<<"$(fio_rand "$W/base.raw" psync 1)"; rec raw.cold_rand_qd1 "$a"
	drop; read -r a _ <<<"$(fio_rand "$W/base.raw" "$AIO" 16)"; rec raw.cold_rand_qd16 "$a"
	# runs outermost, systems inside: the host is shared and noisy, so every
	# system sees the same slices of time
	for ((r = 1; r <= RUNS; r++)); do
		for s in "${SYSTEMS[@]}"; do
			log "reads: sequential cold/warm, run $r/$RUNS: $s"
			if up_fresh "$s"; then
				drop
				rec "$s.cold_seq" "$(dd_rate "$DISK")"
				if [ "$r" = 1 ]; then
					if cmp -s "$DISK" "$W/base.raw"; then rec "$s.verify_read" ok; else rec "$s.verify_read" MISMATCH; fi
				fi
				rec "$s.warm_seq" "$(dd_rate "$DISK")"
				rec "$s.warm_seq_direct" "$(dd_rate "$DISK" iflag=direct)"
				[ "$s" = streamfs ] && rec streamfs.rss_reads "$(hwm_mib "$SFS_PID")"
			else
				rec "$s.cold_seq" fail
			fi
			down "$s"
			if up_fresh "$s"; then
				drop
				rec "$s.cold_seq_direct" "$(dd_rate "$DISK" iflag=direct)"
			else
				rec "$s.cold_seq_direct" fail
			fi
			down "$s"
		done
	done
	for s in "${SYSTEMS[@]}"; do
		log "reads: 4K random cold/warm: $s"
		if up_fresh "$s"; then
			drop
			read -r a _ <<<"$(fio_rand "$DISK" psync 1)"
			rec "$s.cold_rand_qd1" "$a"
		else
			rec "$s.cold_rand_qd1" fail
		fi
		down "$s"
		if up_fresh "$s"; then
			drop
			read -r a _ <<<"$(fio_rand "$DISK" "$AIO" 16)"
			rec "$s.cold_rand_qd16" "$a"
			dd_rate "$DISK" >/dev/null # warm it all
			read -r a _ <<<"$(fio_rand "$DISK" psync 1)"
			rec "$s.warm_rand_qd1" "$a"
			read -r a _ <<<"$(fio_rand "$DISK" "$AIO" 16)"
			rec "$s.warm_rand_qd16" "$a"
			if [ "$AIO" = io_uring ]; then # libaio too: io_uring and libaio differ a lot on FUSE
				read -r a _ <<<"$(fio_rand "$DISK" libaio 16)"
				rec "$s.warm_rand_libaio16" "$a"
			fi
		else
			rec "$s.cold_rand_qd16" fail
		fi
		down "$s"
	done
fi

# ------------------------------------------------------------ 4: full stream, local
# stream_one SYS OVERLAY|- BACKING SPEED_BYTES -> "result=... elapsed_s=..." (system is up)
sfs_stream() { "${BH[@]}" sfs-stream "$W/smnt" "$1" "$TMO"; }
qsd_stream() { timeout -k 5 $((TMO + 10)) "${BH[@]}" qmp-stream "$QSD_SOCK" ovl "$1" "$TMO" || echo result=hang; }
# res_time LINE: elapsed or hang/fail
res_time() {
	local r
	r=$(kv result "$1")
	[ "$r" = ok ] && { kv elapsed_s "$1"; return; }
	[ -n "$r" ] && echo "$r" || echo fail
}
timed_sync() { local t0=$EPOCHREALTIME; sync; awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.4f\n", b - a}'; }
addf() { if isnum "$1" && isnum "$2"; then awk -v a="$1" -v b="$2" 'BEGIN {printf "%.4f\n", a + b}'; else echo "$1"; fi; }

el() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.4f\n", b - a}'; }
sl_cp() {
	rm -f "$W/copy.raw"
	drop
	local t0=$EPOCHREALTIME
	cp "$W/base.raw" "$W/copy.raw" && sync
	rec limit.cp_sync "$(el "$t0")"
	rm -f "$W/copy.raw"
}
sl_streamfs() {
	local r=$1 c0 line t ts
	if sfs_fresh "$W/sfs.qcow2" "$W/base.raw" && sfs_up "$W/sfs.qcow2"; then
		drop
		c0=$(cpu_s "$SFS_PID")
		line=$(sfs_stream 0)
		t=$(res_time "$line")
		ts=$(timed_sync)
		echo "# streamfs local stream: $line" >>"$RES"
		rec streamfs.stream_local "$t"
		rec streamfs.stream_local_sync "$(addf "$t" "$ts")"
		rec streamfs.rss_local "$(hwm_mib "$SFS_PID")"
		rec streamfs.stream_local_cpu_s "$(awk -v a="$c0" -v b="$(cpu_s "$SFS_PID")" 'BEGIN {print b - a}')"
		if [ "$r" = 1 ]; then # the data must be right, or the figures mean nothing
			if cmp -s "$W/smnt/disk" "$W/base.raw"; then rec streamfs.verify_local ok; else rec streamfs.verify_local MISMATCH; fi
		fi
	else
		rec streamfs.stream_local fail
	fi
	sfs_down
}
sl_qsd() {
	local c0 line t ts
	if qsd_overlay "$W/qsd.qcow2" "$W/base.raw" && qsd_up cor "$W/qsd.qcow2" "$W/base.raw"; then
		drop
		c0=$(cpu_s "$QSD_PID")
		line=$(qsd_stream 0)
		t=$(res_time "$line")
		ts=$(timed_sync)
		echo "# qsd local stream: $line" >>"$RES"
		rec qsd.stream_local "$t"
		rec qsd.stream_local_sync "$(addf "$t" "$ts")"
		rec qsd.rss_local "$(hwm_mib "$QSD_PID")"
		rec qsd.stream_local_cpu_s "$(awk -v a="$c0" -v b="$(cpu_s "$QSD_PID")" 'BEGIN {print b - a}')"
	else
		rec qsd.stream_local fail
	fi
	qsd_down
}
# nbdkit has no stream job: a client-driven pull through cow-on-read
sl_nbdkit() { # sl_nbdkit KEY PLUGIN ARGS...
	local key=$1 t0 t ts
	shift
	if nbdkit_only "$@"; then
		drop
		t0=$EPOCHREALTIME
		if timeout -k 5 "$TMO" nbdcopy "nbd+unix:///?socket=$NBD_SOCK" null: 2>>"$W/nbdkit.log"; then
			t=$(el "$t0")
		else
			t=fail
		fi
		ts=$(timed_sync)
		if [ "$key" = stream_local ]; then
			rec nbdkit.stream_local "$t"
			rec nbdkit.stream_local_sync "$(addf "$t" "$ts")"
		elif isnum "$t"; then
			rec "nbdkit.$key" "$(div "$SIZE_MIB" "$t")"
			rec "nbdkit.${key}_sync" "$(addf "$t" "$ts")"
		else
			rec "nbdkit.$key" "$t"
		fi
	else
		rec "nbdkit.$key" fail
	fi
	nbd_down
}

if want stream; then
	for ((r = 1; r <= RUNS; r++)); do
		log "stream local, run $r/$RUNS: cp+sync, streamfs, qsd block-stream, nbdkit cow + nbdcopy pull"
		sl_cp
		sl_streamfs "$r"
		sl_qsd
		have nbdcopy && sl_nbdkit stream_local file "$W/base.raw"
	done
fi

# ------------------------------------------------------------ 5: full stream, HTTP
NGINX_PID=
PORT=
# nginx_up: serve $W/www on 127.0.0.1:$PORT; 0 once it answers
nginx_up() {
	local i
	PORT=$("${BH[@]}" freeport)
	mkdir -p "$W/www"
	cat >"$W/nginx.conf" <<EOF
daemon off;
worker_processes 2;
pid $W/nginx.pid;
error_log $W/nginx-error.log;
$([ "$(id -u)" -eq 0 ] && echo "user root;")
events { worker_connections 256; }
http {
  access_log off;
  sendfile on;
  keepalive_requests 1000000;
  default_type application/octet-stream;
  client_body_temp_path $W/tmp-body;
  proxy_temp_path $W/tmp-proxy;
  fastcgi_temp_path $W/tmp-fastcgi;
  server { listen 127.0.0.1:$PORT; root $W/www; }
}
EOF
	/usr/sbin/nginx -p "$W" -e "$W/nginx-error.log" -c "$W/nginx.conf" >>"$W/nginx-error.log" 2>&1 &
	NGINX_PID=$!
	PIDS+=("$NGINX_PID")
	for ((i = 0; i < 200; i++)); do
		curl -s -o /dev/null "http://127.0.0.1:$PORT/" && return 0
		alive "$NGINX_PID" || break
		sleep 0.05
	done
	return 1
}
nginx_down() {
	stop_pid "$NGINX_PID"
	wait "$NGINX_PID" 2>/dev/null
	NGINX_PID=
}
if want http; then
	mkdir -p "$W/www"
	ln -f "$W/base.raw" "$W/www/base.raw" 2>/dev/null || cp "$W/base.raw" "$W/www/base.raw"
	nginx_up
	URL=http://127.0.0.1:$PORT/base.raw
	if ! curl -s -o /dev/null -r 0-0 "$URL"; then
		log "nginx did not start (see $W/nginx-error.log): HTTP workloads n/a"
		for s in streamfs qsd nbdkit; do rec "$s.stream_http" n/a; done
		rec limit.curl n/a
	else
		log "stream http: $URL"
		for ((r = 1; r <= RUNS; r++)); do
			log "stream http, run $r/$RUNS: curl, streamfs, qsd http block-stream, nbdkit curl + cow + nbdcopy"
			drop
			t0=$EPOCHREALTIME
			if timeout -k 5 "$TMO" curl -sf -o /dev/null "$URL"; then
				rec limit.curl "$(div "$SIZE_MIB" "$(el "$t0")")"
			else
				rec limit.curl fail
			fi
			# the same download to disk: what a stream must do at least
			drop
			t0=$EPOCHREALTIME
			if timeout -k 5 "$TMO" curl -sf -o "$W/copy.http" "$URL" && sync; then
				rec limit.curl_file_sync "$(el "$t0")"
			else
				rec limit.curl_file_sync fail
			fi
			rm -f "$W/copy.http"
			if sfs_fresh "$W/sfs-http.qcow2" "$URL" && sfs_up "$W/sfs-http.qcow2"; then
				drop
				line=$(sfs_stream 0)
				echo "# streamfs http stream: $line" >>"$RES"
				t=$(res_time "$line")
				if isnum "$t"; then rec streamfs.stream_http "$(div "$SIZE_MIB" "$t")"; else rec streamfs.stream_http "$t"; fi
				rec streamfs.stream_http_sync "$(addf "$t" "$(timed_sync)")"
				rec streamfs.rss_http "$(hwm_mib "$SFS_PID")"
				if [ "$r" = 1 ] && isnum "$t"; then
					if cmp -s "$W/smnt/disk" "$W/base.raw"; then rec streamfs.verify_http ok; else rec streamfs.verify_http MISMATCH; fi
				fi
			else
				rec streamfs.stream_http n/a
			fi
			sfs_down
			if qsd_overlay "$W/qsd.qcow2" "$URL" && qsd_up cor "$W/qsd.qcow2" "$URL"; then
				drop
				line=$(qsd_stream 0)
				echo "# qsd http stream: $line" >>"$RES"
				t=$(res_time "$line")
				if isnum "$t"; then rec qsd.stream_http "$(div "$SIZE_MIB" "$t")"; else rec qsd.stream_http "$t"; fi
				rec qsd.stream_http_sync "$(addf "$t" "$(timed_sync)")"
			else
				rec qsd.stream_http fail
			fi
			qsd_down
			have nbdcopy && sl_nbdkit stream_http curl "url=$URL"
		done
	fi
	nginx_down
	rm -f "$W/www/base.raw"
fi

# ------------------------------------------------------------ 6: throttled stream
if want throttle; then
	SPD=$((SPEED_MIB * 1024 * 1024))
	log "throttled stream ${SPEED_MIB}M: streamfs"
	if sfs_fresh "$W/sfs.qcow2" "$W/base.raw" && sfs_up "$W/sfs.qcow2"; then
		line=$(sfs_stream "${SPEED_MIB}M")
		echo "# streamfs throttled stream: $line" >>"$RES"
		t=$(res_time "$line")
		if isnum "$t"; then
			rec streamfs.throttle "$(div "$SIZE_MIB" "$t")"
			avg=$(kv avg_rate "$line")
			isnum "$avg" && rec streamfs.throttle_avg "$(div "$avg" 1048576)"
		else
			rec streamfs.throttle "$t"
		fi
	else
		rec streamfs.throttle fail
	fi
	sfs_down
	# The same limit and 8M with one busy loop per CPU competing with the
	# daemon (same session, see sfs_up_fg); rates from control/progress.
	HOGS=()
	for ((i = 0; i < $(nproc); i++)); do
		yes >/dev/null &
		HOGS+=($!)
		PIDS+=($!)
	done
	rec limit.load_hogs "${#HOGS[@]}"
	rec limit.throttle_req8 8
	for key in throttle_load throttle_load8; do
		spd=$SPEED_MIB
		[ "$key" = throttle_load8 ] && spd=8
		key=streamfs.$key
		log "throttled stream ${spd}M under CPU load: streamfs"
		if sfs_fresh "$W/sfs.qcow2" "$W/base.raw" && sfs_up_fg "$W/sfs.qcow2"; then
			line=$(timeout -k 5 60 "${BH[@]}" sfs-rate "$W/smnt" "${spd}M" 8 || echo result=hang)
			echo "# streamfs throttled ${spd}M under load: $line" >>"$RES"
			r=$(kv result "$line")
			if [ "$r" = ok ]; then rec "$key" "$(kv rate_mib "$line")"; else rec "$key" "${r:-fail}"; fi
		else
			rec "$key" fail
		fi
		sfs_down
	done
	for h in "${HOGS[@]}"; do stop_pid "$h"; done
	log "throttled stream ${SPEED_MIB}M: qsd"
	if qsd_overlay "$W/qsd.qcow2" "$W/base.raw" && qsd_up cor "$W/qsd.qcow2" "$W/base.raw"; then
		line=$(qsd_stream "$SPD")
		echo "# qsd throttled stream: $line" >>"$RES"
		t=$(res_time "$line")
		if isnum "$t"; then rec qsd.throttle "$(div "$SIZE_MIB" "$t")"; else rec qsd.throttle "$t"; fi
	else
		rec qsd.throttle fail
	fi
	qsd_down
fi

# ------------------------------------------------------------ 7: guest latency idle vs streaming
# One fio (psync qd1 4K random over an already-copied region) runs 2 s idle,
# then an unthrottled stream starts; fio is stopped when the stream completes.
# p50/p99 come from fio's per-I/O clat log, split at the stream's start/end.
lat_run() { # lat_run SYS
	local s=$1 region=$((SIZE_MIB / 4)) fp t_s t_e t_k line r
	[ $region -gt 256 ] && region=256
	if ! up_fresh "$s"; then rec "$s.lat_idle_p99" fail; down "$s"; return; fi
	dd if="$DISK" of=/dev/null bs=1M count=$region status=none
	rm -f "$W"/lat_*
	fio --name=r --filename="$DISK" --direct=1 --rw=randread --bs=4k --ioengine=psync --iodepth=1 \
		--size=${region}M --runtime=$((TMO + 30)) --time_based --norandommap --randrepeat=0 \
		--invalidate=0 --write_lat_log="$W/lat" --log_avg_msec=0 --output-format=json \
		--output="$W/fio-lat.json" >/dev/null 2>>"$W/fio.err" &
	fp=$!
	sleep 2.5
	t_s=$EPOCHREALTIME
	if [ "$s" = streamfs ]; then line=$(sfs_stream 0); else line=$(qsd_stream 0); fi
	t_e=$EPOCHREALTIME
	t_k=$EPOCHREALTIME
	kill -INT "$fp" 2>/dev/null
	wait_gone "$fp" 30 || kill -KILL "$fp"
	wait "$fp" 2>/dev/null
	echo "# $s latency stream: $line" >>"$RES"
	r=$(res_time "$line")
	if ! isnum "$r"; then rec "$s.lat_busy_p99" "$r"; down "$s"; return; fi
	read -r i50 i99 b50 b99 biops ni nb <<<"$("${BH[@]}" latwin "$W/lat_clat.1.log" "$t_s" "$t_e" "$t_k")"
	echo "# $s latency samples idle=$ni busy=$nb stream_s=$r" >>"$RES"
	rec "$s.lat_idle_p50" "$i50"
	rec "$s.lat_idle_p99" "$i99"
	rec "$s.lat_busy_p50" "$b50"
	rec "$s.lat_busy_p99" "$b99"
	rec "$s.lat_busy_iops" "$biops"
	isnum "$b99" && isnum "$i99" && rec "$s.lat_p99_ratio" "$(div "$b99" "$i99")"
	down "$s"
}
if want latency; then
	for ((r = 1; r <= RUNS; r++)); do
		log "latency during stream: streamfs ($r/$RUNS)"
		lat_run streamfs
		log "latency during stream: qsd ($r/$RUNS)"
		lat_run qsd
	done
fi

# ------------------------------------------------------------ 8: RSS on a 64 GiB sparse image
if want rss; then
	log "RSS: 64 GiB sparse image with 1 GiB of data"
	rm -f "$W/sparse.raw"
	truncate -s 64G "$W/sparse.raw"
	for ((i = 0; i < 64; i++)); do
		dd if="$W/base.raw" of="$W/sparse.raw" bs=1M count=16 skip=$(((i * 16) % (SIZE_MIB > 16 ? SIZE_MIB - 16 : 1))) \
			seek=$((i * 1024 + (i * 37) % 1000)) conv=notrunc status=none
	done
	if sfs_fresh "$W/sfs-sparse.qcow2" "$W/sparse.raw" && sfs_up "$W/sfs-sparse.qcow2"; then
		rec streamfs.rss_mount "$(hwm_mib "$SFS_PID")"
		line=$("${BH[@]}" sfs-stream "$W/smnt" 0 600)
		echo "# streamfs sparse stream: $line" >>"$RES"
		rec streamfs.sparse_stream "$(res_time "$line")"
		rec streamfs.rss_sparse "$(hwm_mib "$SFS_PID")"
	else
		rec streamfs.rss_sparse fail
	fi
	sfs_down
	if qsd_overlay "$W/qsd-sparse.qcow2" "$W/sparse.raw" 64G && qsd_up cor "$W/qsd-sparse.qcow2" "$W/sparse.raw"; then
		# qsd copies the 63 GiB of holes too (minutes): capped, reported as ">N s"
		QCAP=${BENCH_QSD_SPARSE_CAP:-40}
		line=$(timeout -k 5 $((QCAP + 10)) "${BH[@]}" qmp-stream "$QSD_SOCK" ovl 0 "$QCAP" || echo result=hang)
		echo "# qsd sparse stream: $line" >>"$RES"
		t=$(res_time "$line")
		[ "$t" = hang ] && t=">${QCAP}s"
		rec qsd.sparse_stream "$t"
		rec qsd.rss_sparse "$(hwm_mib "$QSD_PID")"
	fi
	qsd_down
	rm -f "$W/sparse.raw" "$W"/*-sparse.qcow2
fi

# ------------------------------------------------------------ 9: WAN
# Per link (bench/wan.sh up: linkem in front of one nginx serving the
# backing), WAN_RUNS interleaved runs of: the link's capacity (4 ranged curls
# into one file + sync), streamfs, qsd and nbdkit pulling the whole image
# through the link; each time includes a final sync, since each system writes
# what it pulls (streamfs and qsd their qcow2 overlay, nbdkit its cow overlay).
# Then cold 4K reads by the guest over the link, idle and during a stream.
col() { sed -n "s/^$1: //p" <<<"$2"; } # col KEY TEXT: value of a "key: value" line

# ws_streamfs TAG URL RUN: full stream of a fresh overlay through the link
ws_streamfs() {
	local k=streamfs.$1 line t=fail v
	if sfs_fresh "$W/sfs-wan.qcow2" "$2" && sfs_up "$W/sfs-wan.qcow2"; then
		drop
		line=$("${BH[@]}" sfs-stream "$W/smnt" 0 "$WTMO")
		t=$(res_time "$line")
		echo "# streamfs $1 stream: $line" >>"$RES"
		rec "$k.stream" "$(addf "$t" "$(timed_sync)")"
		rec "$k.stream_job" "$t"
		v=$(kv network_bytes "$line")
		isnum "$v" && rec "$k.net_mib" "$(div "$v" 1048576)"
	else
		rec "$k.stream" fail
	fi
	sfs_down
	[ "$3" = 1 ] && isnum "$t" && rec "$k.verify" "$(verify_ovl "$W/sfs-wan.qcow2")"
}
# ws_qsd TAG URL RUN: http driver + qcow2 overlay + copy-on-read, block-stream
ws_qsd() {
	local k=qsd.$1 line t=fail
	if qsd_overlay "$W/qsd-wan.qcow2" "$2" "$WSIZE" && qsd_up cor "$W/qsd-wan.qcow2" "$2"; then
		drop
		line=$(timeout -k 5 $((WTMO + 10)) "${BH[@]}" qmp-stream "$QSD_SOCK" ovl 0 "$WTMO" ||
			echo result=hang)
		t=$(res_time "$line")
		echo "# qsd $1 stream: $line" >>"$RES"
		rec "$k.stream" "$(addf "$t" "$(timed_sync)")"
		rec "$k.stream_job" "$t"
	else
		rec "$k.stream" fail
	fi
	qsd_down
	[ "$3" = 1 ] && isnum "$t" && rec "$k.verify" "$(verify_ovl "$W/qsd-wan.qcow2")"
}
# ws_nbdkit TAG URL: curl plugin + cow filter (cow-on-read), pulled by nbdcopy
# to null:, so every block is written once, to the cow overlay on disk (in
# $W), as a stream writes its overlay; a copy to a file would write it twice.
ws_nbdkit() {
	local k=nbdkit.$1 t0 t
	if nbdkit_only curl "url=$2"; then
		drop
		t0=$EPOCHREALTIME
		timeout -k 5 "$WTMO" nbdcopy "nbd+unix:///?socket=$NBD_SOCK" null: 2>>"$W/nbdkit.log"
		case $? in
		0) t=$(el "$t0") ;;
		124 | 137) t=hang ;;
		*) t=fail ;;
		esac
		rec "$k.stream" "$(addf "$t" "$(timed_sync)")"
		rec "$k.stream_job" "$t"
	else
		rec "$k.stream" fail
	fi
	nbd_down
}
# verify_ovl QCOW2: ok if the streamed overlay reads as the backing and no
# longer refers to it (else the data may still come through the backing)
verify_ovl() {
	if qemu-img info -U --output=json "$1" 2>/dev/null | grep -q '"backing-filename"'; then
		echo BACKING_LEFT
	elif qemu-img compare -q -U -f qcow2 -F raw "$1" "$W/wan.raw" 2>>"$W/wan.log"; then
		echo ok
	else
		echo MISMATCH
	fi
}
# wl_run SYS TAG URL: cold 4K random reads (psync qd1, O_DIRECT) on a fresh
# overlay, in its second half: WLAT_IOS of them idle, then as many as fit in
# an unthrottled stream until the stream gets near that half (32 MiB before
# it: streamfs's lanes run up to 8 chunks of 4 MiB ahead of its progress), so
# that every read counted is still cold: the stream copies in offset order.
# Samples (ms) are appended to $W/wlat-TAG-SYS-{idle,busy}.txt.
wl_run() {
	local s=$1 tag=$2 url=$3 fp t_s t_e line t fio_args half=$((WSIZE / 2)) mark
	mark=$((half - (32 << 20)))
	[ $mark -lt $((half / 2)) ] && mark=$((half / 2))
	case $s in
	streamfs) sfs_fresh "$W/sfs-wan.qcow2" "$url" && sfs_up "$W/sfs-wan.qcow2" && DISK=$W/smnt/disk ;;
	qsd)
		qsd_overlay "$W/qsd-wan.qcow2" "$url" "$WSIZE" && qsd_up cor "$W/qsd-wan.qcow2" "$url" &&
			DISK=$QSD_FILE ;;
	esac || { rec "$s.$tag.lat" fail; down "$s"; return; }
	drop
	# the first read opens the HTTP connection(s): not a read's latency
	dd if="$DISK" of=/dev/null bs=4k count=1 iflag=direct status=none
	rm -f "$W"/wlat_*
	fio_args=(--name=r "--filename=$DISK" --direct=1 --rw=randread --bs=4k --ioengine=psync
		--iodepth=1 "--offset=$half" "--size=$half" --norandommap --randrepeat=0 --invalidate=0
		--log_avg_msec=0 --log_unix_epoch=1 --output-format=json "--output=$W/fio-wlat.json")
	timeout -k 5 "$WTMO" fio "${fio_args[@]}" "--number_ios=$WLAT_IOS" \
		"--write_lat_log=$W/wlat_idle" >/dev/null 2>>"$W/fio.err"
	"${BH[@]}" latsamples "$W/wlat_idle_clat.1.log" >>"$W/wlat-$tag-$s-idle.txt"
	# reads complete during the stream only: fio runs until it is stopped
	fio "${fio_args[@]}" --time_based "--runtime=$((WTMO + 30))" \
		"--write_lat_log=$W/wlat_busy" >/dev/null 2>>"$W/fio.err" &
	fp=$!
	t_s=$EPOCHREALTIME
	if [ "$s" = streamfs ]; then
		line=$("${BH[@]}" sfs-stream "$W/smnt" 0 "$WTMO" "$mark")
	else
		line=$(timeout -k 5 $((WTMO + 10)) "${BH[@]}" qmp-stream "$QSD_SOCK" ovl 0 "$WTMO" "$mark" ||
			echo result=hang)
	fi
	kill -INT "$fp" 2>/dev/null
	wait_gone "$fp" 30 || kill -KILL "$fp"
	wait "$fp" 2>/dev/null
	t=$(res_time "$line")
	t_e=$(kv mark_t "$line")
	echo "# $s $tag latency stream: $line" >>"$RES"
	rec "$s.$tag.stream_busy" "$t"
	isnum "$t" && isnum "$t_e" &&
		"${BH[@]}" latsamples "$W/wlat_busy_clat.1.log" "$t_s" "$t_e" >>"$W/wlat-$tag-$s-busy.txt"
	down "$s"
}

if want wan; then
	WAN_T0=$SECONDS
	log "WAN: generating a $WSIZE_MIB MiB backing image; links: $WAN_LINKS"
	gen_random "$W/wan.raw" "$WSIZE" || exit 1
	mkdir -p "$W/www"
	ln -f "$W/wan.raw" "$W/www/wan.raw" 2>/dev/null || cp "$W/wan.raw" "$W/www/wan.raw"
	rec wan_size_mib "$WSIZE_MIB"
	rec wan_runs "$WRUNS"
	rec wan_links "$(tr ' ' ',' <<<"$WAN_LINKS")"
	if ! nginx_up; then
		log "nginx did not start (see $W/nginx-error.log): WAN rows n/a"
		WAN_LINKS=
	fi
	for link in $WAN_LINKS; do
		rtt=${link%:*}
		rate=${link#*:}
		tag=wan_${rtt//./p}_${rate//./p}
		if ! lport=$("${WAN[@]}" up "$rtt" "$rate" "$PORT" 2>>"$W/wan.log"); then
			log "WAN $link: the link did not come up (see $W/wan.log)"
			rec "limit.$tag.capacity" fail
			continue
		fi
		PIDS+=("$(cat "$W/wan/linkem.pid")")
		WURL=http://127.0.0.1:$lport/wan.raw
		for ((r = 1; r <= WRUNS; r++)); do
			log "WAN $rtt ms / $rate Mbit/s, run $r/$WRUNS: capacity (4 curls + sync), streamfs, qsd, nbdkit"
			drop
			out=$("${WAN[@]}" capacity "$WURL" "$WSIZE" 2>>"$W/wan.log")
			v=$(col capacity_time_s "$out")
			if isnum "$v"; then
				rec "limit.$tag.capacity" "$v"
				rec "limit.$tag.capacity_xfer" "$(col capacity_xfer_s "$out")"
			else
				rec "limit.$tag.capacity" fail
			fi
			ws_streamfs "$tag" "$WURL" "$r"
			ws_qsd "$tag" "$WURL" "$r"
			if have nbdcopy; then ws_nbdkit "$tag" "$WURL"; else rec "nbdkit.$tag.stream" n/a; fi
		done
		rm -f "$W/wlat-$tag"-*.txt
		for ((r = 1; r <= WLAT_RUNS; r++)); do
			for s in streamfs qsd; do
				log "WAN $rtt ms / $rate Mbit/s, guest latency run $r/$WLAT_RUNS: $s"
				wl_run "$s" "$tag" "$WURL"
			done
		done
		for s in streamfs qsd; do
			read -r i50 i99 ni <<<"$("${BH[@]}" pcts "$W/wlat-$tag-$s-idle.txt")"
			read -r b50 b99 nb <<<"$("${BH[@]}" pcts "$W/wlat-$tag-$s-busy.txt")"
			echo "# $s $tag latency samples idle=$ni busy=$nb" >>"$RES"
			rec "$s.$tag.lat_idle_p50" "$i50"
			rec "$s.$tag.lat_idle_p99" "$i99"
			rec "$s.$tag.lat_busy_p50" "$b50"
			rec "$s.$tag.lat_busy_p99" "$b99"
			rec "$s.$tag.lat_idle_n" "$ni"
			rec "$s.$tag.lat_busy_n" "$nb"
			isnum "$b99" && isnum "$i99" && rec "$s.$tag.lat_p99_ratio" "$(div "$b99" "$i99")"
		done
		rec "limit.$tag.linkem_cpu_s" "$(col linkem_cpu_s "$("${WAN[@]}" cpu 2>/dev/null)")"
		"${WAN[@]}" down 2>>"$W/wan.log" | sed "s/^/# $tag /" >>"$RES"
	done
	nginx_down
	rm -f "$W/www/wan.raw" "$W/wan.raw" "$W"/*-wan.qcow2
	rec wan_s $((SECONDS - WAN_T0))
	log "WAN section: $((SECONDS - WAN_T0)) s"
fi

rec total_s $((SECONDS - BENCH_T0))
log "done in $((SECONDS - BENCH_T0)) s; raw results in $RES"
echo
"${BH[@]}" report "$RES" "$SIZE_MIB" | tee "$W/table.txt"
