#!/bin/bash
# NBD backing benchmark (issue #15), one run, side by side: a raw image
# exported by qemu-nbd (read-only, shared) on 127.0.0.1, pulled
#   - by nbdcopy into a file, then sync        (the limit: a download to disk)
#   - by the streamfs stream job (qcow2 overlay over nbd://), then sync
#   - by qemu-storage-daemon's nbd driver + block-stream into a qcow2, then sync
# on loopback and through bench/linkem (NBD_LINKS="RTT_MS:RATE_MBIT ...").
# Medians of NBD_RUNS (3). Every streamfs and qsd overlay is compared with
# the source (qemu-img compare). Usage: make bench-nbd, or bench/nbd.sh.
# NBD_SFS_OPTS="-o stream_depth=2": extra streamfs mount options.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
S=${STREAMFS:-$ROOT/streamfs}
MIB=${NBD_SIZE_MIB:-256}
RUNS=${NBD_RUNS:-3}
LINKS=${NBD_LINKS:-"0:0 80:500"}
W=$(mktemp -d /tmp/streamfs-nbdbench.XXXXXX)
QP=
cleanup() {
	fusermount3 -u "$W/mnt" 2>/dev/null
	[ -s "$W/qsd.pid" ] && kill "$(cat "$W/qsd.pid")" 2>/dev/null
	[ -n "$QP" ] && kill "$QP" 2>/dev/null
	WAN_DIR=$W/wan "$ROOT/bench/wan.sh" down >/dev/null 2>&1
	rm -rf "$W"
}
trap cleanup EXIT
for c in qemu-nbd nbdcopy qemu-img qemu-storage-daemon python3; do
	command -v $c >/dev/null || { echo "bench/nbd.sh: needs $c (./setup.sh --bench)" >&2; exit 1; }
done
now() { date +%s.%N; }
el() { echo "$(now) - $1" | bc; }
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }
cd "$W" || exit 1
head -c $((MIB << 20)) /dev/urandom >src.raw
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
qemu-nbd -r -t -f raw -p "$port" -b 127.0.0.1 --shared=16 src.raw &
QP=$!
for ((i = 0; i < 100; i++)); do nbdinfo "nbd://127.0.0.1:$port/" >/dev/null 2>&1 && break; sleep 0.05; done

sfs_run() {
	rm -f ov.qcow2
	mkdir -p mnt
	"$S" create -f qcow2 -b "$1" -F raw ov.qcow2 >/dev/null || return 1
	# shellcheck disable=SC2086 # NBD_SFS_OPTS: words of extra mount options
	"$S" ov.qcow2 mnt ${NBD_SFS_OPTS:-} || return 1
	local t0
	t0=$(now)
	echo start >mnt/control/stream
	while [ "$(cat mnt/control/stream)" = running ]; do sleep 0.02; done
	local st
	st=$(cat mnt/control/stream)
	sync
	el "$t0"
	fusermount3 -u mnt
	[ "$st" = completed ] || echo "streamfs: $st" >&2
	qemu-img compare -q -f qcow2 -F raw ov.qcow2 src.raw || echo "streamfs: DATA MISMATCH" >&2
}
qsd_run() { # qsd_run HOST PORT
	rm -f q.qcow2 qsd.pid qmp.sock
	qemu-img create -q -f qcow2 -u -b "nbd://$1:$2/" -F raw q.qcow2 "${MIB}M"
	qemu-storage-daemon --daemonize --pidfile qsd.pid \
		--chardev socket,path=qmp.sock,server=on,wait=off,id=qmp0 --monitor chardev=qmp0 \
		--blockdev driver=nbd,node-name=bproto,server.type=inet,server.host="$1",server.port="$2",read-only=on \
		--blockdev driver=raw,node-name=base,file=bproto,read-only=on \
		--blockdev driver=file,node-name=ofile,filename=q.qcow2 \
		--blockdev driver=qcow2,node-name=ovl,file=ofile,backing=base || return 1
	local t0
	t0=$(now)
	timeout 900 python3 - <<'PY' || echo "qsd: block-stream failed or hung" >&2
import json, socket
s = socket.socket(socket.AF_UNIX); s.connect("qmp.sock"); f = s.makefile("rw")
f.readline(); f.write(json.dumps({"execute": "qmp_capabilities"}) + "\n"); f.flush(); f.readline()
f.write(json.dumps({"execute": "block-stream", "arguments": {"job-id": "s0", "device": "ovl"}}) + "\n"); f.flush()
while "BLOCK_JOB_COMPLETED" not in f.readline():
    pass
PY
	sync
	el "$t0"
	local qp
	qp=$(cat qsd.pid)
	kill "$qp"
	while kill -0 "$qp" 2>/dev/null; do sleep 0.05; done
	qemu-img compare -q -f qcow2 -F raw q.qcow2 src.raw || echo "qsd: DATA MISMATCH" >&2
}

echo "| NBD ${MIB} MiB, median of $RUNS (s) | nbdcopy to file + sync | streamfs stream + sync | qsd nbd + block-stream + sync | streamfs / nbdcopy | streamfs / qsd |"
echo "|---|---|---|---|---|---|"
for link in $LINKS; do
	rtt=${link%:*} rate=${link#*:} lport=$port name=loopback
	if [ "$rtt" != 0 ]; then
		lport=$(WAN_DIR=$W/wan "$ROOT/bench/wan.sh" up "$rtt" "$rate" "$port") || exit 1
		name="${rtt} ms / ${rate} Mbit"
	fi
	url="nbd://127.0.0.1:$lport/"
	a=() b=() c=()
	for ((r = 0; r < RUNS; r++)); do
		rm -f out.raw
		t0=$(now)
		nbdcopy "$url" out.raw && sync
		a+=("$(el "$t0")")
		b+=("$(sfs_run "$url")")
		c+=("$(qsd_run 127.0.0.1 "$lport")")
	done
	ma=$(median "${a[@]}") mb=$(median "${b[@]}") mc=$(median "${c[@]}")
	echo "| $name | $ma | $mb | $mc | $(echo "scale=2; $mb / $ma" | bc) | $(echo "scale=2; $mb / $mc" | bc) |"
	if [ "$rtt" != 0 ]; then WAN_DIR=$W/wan "$ROOT/bench/wan.sh" down >/dev/null; fi
done
exit 0
