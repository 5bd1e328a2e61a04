#!/bin/bash
# Real-guest boot benchmark (issue #14): time from QEMU start to a ready
# marker for a Linux guest (Debian kernel, ext4 root on a 2 GiB raw image
# with busybox and python3; ready = python3 has imported json, http.client,
# email, xml.etree, sqlite3 and asyncio), its root disk being:
#   local        the raw file on local disk
#   sfs-lo       streamfs cold, qcow2 overlay on the image over loopback HTTP
#   sfs-cold     streamfs cold, over the emulated far link
#   sfs-trace    streamfs with -o prefetch= of the trace of an earlier boot
#   sfs-stale    ... of that trace with another validator (an older image)
#   sfs-foreign  ... of a trace of the right image with the wrong ranges
#   qsd          qemu-storage-daemon: http driver + qcow2 + copy-on-read +
#                FUSE export (../shared/PEERS.md), far link
#   sfs-stream   streamfs cold with the stream job running (-o stream)
# The image is served by a private nginx on 127.0.0.1; the far link is
# bench/wan.sh (linkem) in front of it. QEMU: TCG, 512 MiB, direct kernel
# boot, virtio-blk, cache=none, aio=threads, read-only drive (the guest
# mounts root read-only, so every boot reads the same image). Per boot:
# time to ready, bytes fetched (streamfs: control/status network_bytes at
# ready; others: nginx's $bytes_sent), HTTP requests (nginx's access log, up
# to ready), what the guest read (QEMU's query-blockstats rd_bytes) and its
# share of the image; streamfs and qsd overlays are checked against the
# image afterwards (qemu-img compare). Prints a markdown table (medians) and
# PASS/FAIL lines for the targets.
#
#   bench/boot.sh                 (needs root for FUSE; streamfs built: make)
#   BOOT_RUNS=3                   boots per case (medians); cases interleave
#   BOOT_CASES="local sfs-lo sfs-cold sfs-trace sfs-stale sfs-foreign qsd sfs-stream"
#   BOOT_RTT=80 BOOT_RATE=500     the far link: RTT in ms, rate in Mbit/s
#   BOOT_DIR=/tmp/streamfs-boot   work dir (results in BOOT_DIR/results.txt)
#   BOOT_GUEST=BOOT_DIR/guest     guest build (cached, kept between runs)
#   BOOT_TIMEOUT=300              seconds a boot may take (then result=timeout)
#   STREAMFS=./streamfs           the binary under test
#   BOOT_RECORD_OPTS=             extra options of the recording mount (e.g. "-o ...")
#
# Trace cases need a streamfs whose --help names "prefetch"; otherwise they
# print "trace: not available in this build". Everything started here is
# stopped by PID on exit; the guest build stays.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
SFS=${STREAMFS:-$ROOT/streamfs}
W=${BOOT_DIR:-/tmp/streamfs-boot}
GUEST=${BOOT_GUEST:-$W/guest}
RUNS=${BOOT_RUNS:-3}
CASES=${BOOT_CASES:-local sfs-lo sfs-cold sfs-trace sfs-stale sfs-foreign qsd sfs-stream}
RTT=${BOOT_RTT:-80}
RATE=${BOOT_RATE:-500}
TMO=${BOOT_TIMEOUT:-300}
RES=$W/results.txt
BR=(python3 "$ROOT/bench/boot-run.py")
# one link per WAN_DIR: not the default one another benchmark may be using
export WAN_DIR=$W/wan

# the commit of the tree the binary is in (or its --version)
sfs_version() {
	git -C "$(dirname "$SFS")" rev-parse --short HEAD 2>/dev/null || "$SFS" --version 2>&1 | head -1
}
log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "boot.sh: $*"; exit 1; }
want() { [[ " $CASES " == *" $1 "* ]]; }
alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
is_mounted() { awk -v m="$1" '$2 == m {f = 1} END {exit !f}' /proc/mounts; }
wait_gone() {
	local i
	for ((i = 0; i < $2 * 20; i++)); do
		alive "$1" || return 0
		sleep 0.05
	done
	return 1
}
stop_pid() {
	alive "$1" || return 0
	kill -TERM "$1" 2>/dev/null
	wait_gone "$1" 20 || { kill -KILL "$1" 2>/dev/null; wait_gone "$1" 5; }
}
umount_path() {
	is_mounted "$1" || return 0
	fusermount3 -u "$1" 2>/dev/null || fusermount3 -uz "$1" 2>/dev/null || umount -l "$1" 2>/dev/null
}

for c in qemu-system-x86_64 qemu-img nginx curl python3 fusermount3; do
	command -v "$c" >/dev/null || die "needs $c"
done
[ -x "$SFS" ] || die "build streamfs first (make)"

# ------------------------------------------------------------ cleanup
PIDS=()
MOUNTS=()
NGX_PID=
LINK=0
cleanup() {
	set +e
	local i m
	for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do umount_path "${MOUNTS[$i]}"; done
	for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[$i]}"; done
	awk -v w="$W/" 'index($2, w) == 1 {print $2}' /proc/mounts | while read -r m; do umount_path "$m"; done
	[ $LINK = 1 ] && "$ROOT/bench/wan.sh" down 2>>"$W/wan.log"
	[ -n "$NGX_PID" ] && stop_pid "$NGX_PID"
	rm -f "$W"/*.qcow2 "$W"/qsd.export
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------ setup
mkdir -p "$W"
chmod 755 "$W"
rm -rf "${W:?}"/{*.qcow2,*.log,*.pid,*.sock,*.trace,boot.*,smnt,qsd.export,ngx,wan,results.txt}
log "building the guest in $GUEST (cached)"
"$ROOT/tests/guest/build-bootbench.sh" "$GUEST" || die "guest build failed"
IMG=$GUEST/disk.raw
IMG_SIZE=$(stat -c %s "$IMG")
CMDLINE="$(cat "$GUEST/cmdline") sfs.hold=1"
: >"$RES"

# nginx: serves the guest directory; the access log (time at completion,
# status, bytes sent) counts requests and bytes per boot.
NGX=$W/ngx
mkdir -p "$NGX"
chmod 755 "$GUEST"
for i in 1 2 3; do
	NGX_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
	cat >"$NGX/nginx.conf" <<NGINX
daemon on;
pid $NGX/nginx.pid;
error_log $NGX/error.log;
worker_processes 1;
events { worker_connections 256; }
http {
	log_format boot '\$msec \$status \$bytes_sent "\$http_range"';
	access_log $NGX/access.log boot;
	client_body_temp_path $NGX;
	proxy_temp_path $NGX;
	fastcgi_temp_path $NGX;
	uwsgi_temp_path $NGX;
	scgi_temp_path $NGX;
	server {
		listen 127.0.0.1:$NGX_PORT;
		root $GUEST;
	}
}
NGINX
	nginx -c "$NGX/nginx.conf" -p "$NGX" 2>"$NGX/start.log" && break
	NGX_PORT=
done
[ -n "$NGX_PORT" ] || die "nginx does not start: $(cat "$NGX/start.log")"
for ((i = 0; i < 100; i++)); do
	NGX_PID=$(cat "$NGX/nginx.pid" 2>/dev/null) && [ -n "$NGX_PID" ] && break
	sleep 0.05
done
LO_URL=http://127.0.0.1:$NGX_PORT/disk.raw
curl -sfI "$LO_URL" >/dev/null || die "nginx does not serve $LO_URL"
link_up() {
	WAN_PORT=$("$ROOT/bench/wan.sh" up "$RTT" "$RATE" "$NGX_PORT") || die "wan.sh up failed"
	LINK=1
	FAR_URL=http://127.0.0.1:$WAN_PORT/disk.raw
}
link_ok() { curl -sf -r 0-0 -o /dev/null --max-time 10 "$FAR_URL"; }
# link_check: a link that is gone (on a shared machine something may
# stop it) is brought up again, on a new port, before a case
link_check() {
	link_ok && return 0
	log "the link is down (linkem gone?): bringing it up again"
	"$ROOT/bench/wan.sh" down 2>>"$W/wan.log"
	link_up
}
link_up
log "work dir $W; image $IMG ($((IMG_SIZE >> 20)) MiB); link ${RTT} ms / ${RATE} Mbit/s;" \
	"$(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg); streamfs $(sfs_version)"

# ------------------------------------------------------------ the pieces
MNT=$W/smnt
SFS_PID=
sfs_up() { # sfs_up OVERLAY BACKING_URL [-o opts]
	local ovl=$1 url=$2 i
	shift 2
	rm -f "$ovl" "$W/sfs.pid"
	"$SFS" create -f qcow2 -b "$url" -F raw "$ovl" >>"$W/streamfs.log" 2>&1 || return 1
	mkdir -p "$MNT"
	MOUNTS+=("$MNT")
	timeout -k 5 60 "$SFS" "$ovl" "$MNT" -o "pidfile=$W/sfs.pid" "$@" >>"$W/streamfs.log" 2>&1 || return 1
	for ((i = 0; i < 200; i++)); do
		[ -s "$W/sfs.pid" ] && break
		sleep 0.05
	done
	SFS_PID=$(cat "$W/sfs.pid" 2>/dev/null)
	[ -n "$SFS_PID" ] && PIDS+=("$SFS_PID")
	is_mounted "$MNT"
}
sfs_down() {
	umount_path "$MNT"
	[ -n "$SFS_PID" ] && { wait_gone "$SFS_PID" 60 || stop_pid "$SFS_PID"; }
	SFS_PID=
}
QSD_PID=
QSD_FILE=$W/qsd.export
qsd_up() { # qsd_up OVERLAY BACKING_URL
	rm -f "$1" "$W/qsd.pid" "$W/qmp.sock"
	qemu-img create -q -f qcow2 -u -b "$2" -F raw "$1" "$IMG_SIZE" || return 1
	: >"$QSD_FILE"
	MOUNTS+=("$QSD_FILE")
	timeout -k 5 60 qemu-storage-daemon --daemonize --pidfile "$W/qsd.pid" \
		--chardev "socket,path=$W/qmp.sock,server=on,wait=off,id=qmp0" --monitor chardev=qmp0 \
		--blockdev "driver=http,node-name=bproto,url=$2,read-only=on" \
		--blockdev driver=raw,node-name=base,file=bproto,read-only=on \
		--blockdev "driver=file,node-name=ofile,filename=$1" \
		--blockdev driver=qcow2,node-name=ovl,file=ofile,backing=base \
		--blockdev driver=copy-on-read,node-name=cor,file=ovl \
		--export "type=fuse,id=exp0,node-name=cor,mountpoint=$QSD_FILE,writable=off" \
		>>"$W/qsd.log" 2>&1 || return 1
	QSD_PID=$(cat "$W/qsd.pid" 2>/dev/null)
	[ -n "$QSD_PID" ] && PIDS+=("$QSD_PID")
	is_mounted "$QSD_FILE"
}
qsd_down() {
	[ -n "$QSD_PID" ] && stop_pid "$QSD_PID"
	umount_path "$QSD_FILE"
	QSD_PID=
}
# verify OVERLAY: its data equal to the image's (unmounted; the backing is
# pointed at the local file, so the compare does not go through the link)
verify() {
	qemu-img rebase -q -u -f qcow2 -b "$IMG" -F raw "$1" 2>>"$W/verify.log" &&
		qemu-img compare -q -f qcow2 -F raw "$1" "$IMG" >>"$W/verify.log" 2>&1 && echo ok || echo DIFF
}
# boot DISK TAG: one timed boot; prints boot-run.py's key=value line
boot() {
	timeout -k 10 $((TMO + 60)) "${BR[@]}" boot "$W/boot.$2.log" "$TMO" \
		qemu-system-x86_64 -M pc -accel tcg -m 512 -nodefaults -display none -no-reboot \
		-kernel "$GUEST/vmlinuz" -initrd "$GUEST/initrd.img" -append "$CMDLINE" \
		-drive "file=$1,format=raw,if=virtio,cache=none,aio=threads,readonly=on" || echo result=hang
}
kv() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" <<<"$2"; }
# http_count FROM_LINE UNTIL_EPOCH: "requests=N req_bytes=B" of the access
# log lines after FROM_LINE that completed by UNTIL_EPOCH (+ 50 ms)
http_count() {
	tail -n +"$(($1 + 1))" "$NGX/access.log" 2>/dev/null |
		awk -v t="$2" 't == "-" || $1 <= t + 0.05 {n++; b += $3} END {printf "requests=%d req_bytes=%d\n", n, b}'
}
log_lines() { wc -l <"$NGX/access.log" 2>/dev/null || echo 0; }

# run_case CASE RUN: one boot of CASE, appended to RES
run_case() {
	local c=$1 r=$2 tag=$1.$2 from out net="" ver=- url opts=() http line from_log msg
	[ "$c" = local ] || [ "$c" = sfs-lo ] || link_check
	url=$FAR_URL
	from=$(log_lines)
	case $c in
	local)
		out=$(boot "$IMG" "$tag")
		;;
	sfs-*)
		[ "$c" = sfs-lo ] && url=$LO_URL
		case $c in
		sfs-trace) opts=(-o "prefetch=$W/boot.trace") ;;
		sfs-stale) opts=(-o "prefetch=$W/stale.trace") ;;
		sfs-foreign) opts=(-o "prefetch=$W/foreign.trace") ;;
		sfs-stream) opts=(-o stream) ;;
		esac
		from_log=$(wc -l <"$W/streamfs.log" 2>/dev/null || echo 0)
		if ! sfs_up "$W/sfs.qcow2" "$url" "${opts[@]}"; then
			sfs_down
			# a trace that does not match the backing is refused at mount
			msg=$(tail -n +"$((from_log + 1))" "$W/streamfs.log" | grep -m1 -i trace | tr -s ' \t' '_')
			log "$tag: streamfs mount failed: ${msg:-see $W/streamfs.log}"
			if [ -n "$msg" ]; then
				echo "case=$c run=$r result=refused msg=$msg" >>"$RES"
			else
				echo "case=$c run=$r result=mount-failed" >>"$RES"
			fi
			return
		fi
		out=$(BOOT_AT_READY=$MNT/control/status boot "$MNT/disk" "$tag")
		net=$(sed -n 's/^network_bytes: //p' "$W/boot.$tag.log.at-ready" 2>/dev/null)
		sfs_down
		ver=$(verify "$W/sfs.qcow2")
		;;
	qsd)
		if ! qsd_up "$W/qsd.qcow2" "$FAR_URL"; then
			log "$tag: qemu-storage-daemon failed (see $W/qsd.log)"
			qsd_down
			echo "case=$c run=$r result=qsd-failed" >>"$RES"
			return
		fi
		out=$(boot "$QSD_FILE" "$tag")
		qsd_down
		ver=$(verify "$W/qsd.qcow2")
		;;
	esac
	if [ "$c" = local ]; then
		http="requests=- req_bytes=-"
	else
		http=$(http_count "$from" "$(kv ready_epoch "$out")")
	fi
	line="case=$c run=$r $out $http net_bytes=${net:--} verify=$ver"
	# a link that died during the boot makes it no measurement of the link
	if [ "$c" != local ] && [ "$c" != sfs-lo ] && ! link_ok; then
		line="case=$c run=$r result=link-died ${out#result=* }"
	fi
	echo "$line" >>"$RES"
	log "$line"
}

# ------------------------------------------------------------ the trace
# A recording boot (streamfs cold, far link), then the trace of it; from
# it, a stale and a foreign one.
trace_cases() {
	local t=$W/boot.trace out
	if ! "$SFS" --help 2>&1 | grep -q prefetch; then
		echo "trace: not available in this build"
		return 1
	fi
	log "trace: recording boot"
	# shellcheck disable=SC2086 # BOOT_RECORD_OPTS: words
	sfs_up "$W/sfs.qcow2" "$FAR_URL" ${BOOT_RECORD_OPTS:-} || { echo "trace: mount failed"; sfs_down; return 1; }
	out=$(boot "$MNT/disk" record)
	log "trace: recording boot: $out"
	# control/trace first: "streamfs trace MNT" on a build without that
	# subcommand would be a mount of a file named "trace"
	cat "$MNT/control/trace" >"$t" 2>>"$W/streamfs.log" ||
		{ "$SFS" --help 2>&1 | grep -q 'streamfs trace' && "$SFS" trace "$MNT" >"$t" 2>>"$W/streamfs.log"; }
	sfs_down
	head -c 14 "$t" 2>/dev/null | grep -q '^streamfs-trace' ||
		{ echo "trace: no trace from 'streamfs trace' or control/trace"; return 1; }
	log "trace: $(grep -vc '^#' "$t") lines, $(awk 'NR > 1 && !/^#/ {b += $2} END {print b}' "$t") bytes"
	"${BR[@]}" stale-trace "$t" "$W/stale.trace" && "${BR[@]}" foreign-trace "$t" "$W/foreign.trace"
}
TRACE_CASES="sfs-trace sfs-stale sfs-foreign"
if want sfs-trace || want sfs-stale || want sfs-foreign; then
	if ! note=$(trace_cases); then
		log "$note"
		for c in $TRACE_CASES; do want "$c" && echo "case=$c note=$note" >>"$RES"; done
		CASES=" $CASES "
		for c in $TRACE_CASES; do CASES=${CASES/ $c / }; done
	fi
fi

# ------------------------------------------------------------ the boots
# runs outermost, cases inside: the host is shared, so every case sees the
# same slices of time
for ((r = 1; r <= RUNS; r++)); do
	for c in $CASES; do
		log "run $r/$RUNS: $c"
		run_case "$c" "$r"
	done
done

echo
echo "Boot to ready, $(nproc) CPUs (load $(cut -d' ' -f1-3 /proc/loadavg)), QEMU TCG, link ${RTT} ms RTT /" \
	"${RATE} Mbit/s, $RUNS runs (medians; each run in parentheses), image $((IMG_SIZE >> 20)) MiB," \
	"streamfs $(sfs_version):"
echo
"${BR[@]}" table "$RES" "$IMG_SIZE"
