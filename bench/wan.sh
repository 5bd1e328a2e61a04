#!/bin/bash
# Emulated wide-area link for the benchmark: bench/linkem in front of an HTTP server.
#
#   bench/wan.sh up RTT_MS RATE_MBIT TARGET_PORT   start a link, print its port (bare number)
#   bench/wan.sh down                              stop it (prints linkem's byte counts)
#   bench/wan.sh capacity URL SIZE                 the link's capacity, as `key: value` lines:
#                                                  4 parallel ranged curls, a quarter each,
#                                                  into one file on disk, then sync; medians
#                                                  of the time in all (capacity_time_s, the
#                                                  reference) and until the last curl ended
#                                                  (capacity_xfer_s: the link alone)
#   bench/wan.sh cpu                               CPU seconds the running linkem used so far
#
# Environment:
#   WAN_DIR=/tmp/streamfs-wan   state (pid, port, log); one link per WAN_DIR
#   WAN_WINDOW=2097152          per-connection window in bytes (one TCP flow's cwnd)
#   WAN_RUNS=3                  capacity runs (the median is reported)
#   WAN_PARTS=4                 parallel curls for capacity
#   LINKEM=build/bench/linkem   the emulator (built from bench/linkem.c if missing or stale)
#
# The RTT is split evenly: RTT_MS/2 of delay each way. The target is on 127.0.0.1.
# shellcheck disable=SC2015 # A && B || die: die is the intended outcome of either failing
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=${WAN_DIR:-/tmp/streamfs-wan}
WINDOW=${WAN_WINDOW:-2097152}
RUNS=${WAN_RUNS:-3}
PARTS=${WAN_PARTS:-4}
LINKEM=${LINKEM:-$ROOT/build/bench/linkem}

die() { echo "wan.sh: $*" >&2; exit 1; }
alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
now() { date +%s.%N; }
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }

build() {
	local src=$ROOT/bench/linkem.c
	[ -x "$LINKEM" ] && ! [ "$src" -nt "$LINKEM" ] && return 0
	mkdir -p "$(dirname "$LINKEM")"
	gcc -O2 -Wall -Wextra -Werror -pthread -o "$LINKEM" "$src" || die "cannot build $LINKEM"
}

wan_up() {
	local rtt=$1 rate=$2 tport=$3 i pid
	[[ $rtt =~ ^[0-9]+(\.[0-9]+)?$ && $rate =~ ^[0-9]+(\.[0-9]+)?$ && $tport =~ ^[0-9]+$ ]] ||
		die "usage: wan.sh up RTT_MS RATE_MBIT TARGET_PORT"
	build
	mkdir -p "$W"
	pid=$(cat "$W/linkem.pid" 2>/dev/null) && alive "$pid" && die "a link is up already (wan.sh down)"
	rm -f "$W/linkem.pid" "$W/linkem.port"
	# setsid: the link outlives this script and the caller's job control
	setsid "$LINKEM" -l 127.0.0.1:0 -t "127.0.0.1:$tport" -d "$(awk -v r="$rtt" 'BEGIN{print r/2}')" \
		-r "$rate" -w "$WINDOW" -p "$W/linkem.port" -P "$W/linkem.pid" \
		</dev/null >"$W/linkem.log" 2>&1 &
	pid=$!
	# linkem writes the port file once it is listening
	for ((i = 0; i < 200; i++)); do
		[ -s "$W/linkem.port" ] && { cat "$W/linkem.port"; return 0; }
		alive "$pid" || break
		sleep 0.025
	done
	kill "$pid" 2>/dev/null
	die "linkem did not start: $(cat "$W/linkem.log")"
}

wan_down() {
	local pid i
	pid=$(cat "$W/linkem.pid" 2>/dev/null) || return 0
	if alive "$pid"; then
		kill -TERM "$pid"
		for ((i = 0; i < 100; i++)); do
			alive "$pid" || break
			sleep 0.05
		done
		alive "$pid" && { kill -KILL "$pid"; echo "wan.sh: linkem $pid killed" >&2; }
	fi
	cat "$W/linkem.log" >&2
	rm -f "$W/linkem.pid" "$W/linkem.port"
}

# cpu: utime + stime of the running linkem, in seconds
wan_cpu() {
	local pid
	pid=$(cat "$W/linkem.pid" 2>/dev/null) && alive "$pid" || die "no link is up"
	# fields 14 and 15 of /proc/PID/stat, after the ")" that ends the command name
	awk -v hz="$(getconf CLK_TCK)" '{sub(/.*\) /, ""); printf "linkem_cpu_s: %.2f\n", ($12 + $13) / hz}' \
		"/proc/$pid/stat"
}

# one_run URL SIZE OUT: PARTS ranged curls into OUT at their offsets, then sync; prints the
# seconds in all and the seconds until the last curl ended (before the sync)
one_run() {
	local url=$1 size=$2 out=$3 part=$(($2 / PARTS)) i off len t0 tx t1 pids=() bad=0 got=0 n
	rm -f "$out"
	truncate -s "$size" "$out" || return 1
	t0=$(now)
	for ((i = 0; i < PARTS; i++)); do
		off=$((i * part))
		len=$part
		((i == PARTS - 1)) && len=$((size - off))
		(curl -sf -r "$off-$((off + len - 1))" -w '%{stderr}%{size_download}' "$url" \
			2>"$out.$i.n" | dd of="$out" bs=1M seek="$off" oflag=seek_bytes \
			conv=notrunc iflag=fullblock status=none) &
		pids+=($!)
	done
	for i in "${pids[@]}"; do wait "$i" || bad=1; done
	tx=$(now)
	sync
	t1=$(now)
	for ((i = 0; i < PARTS; i++)); do
		n=$(cat "$out.$i.n" 2>/dev/null) || n=0
		got=$((got + ${n:-0}))
		rm -f "$out.$i.n"
	done
	[ $bad = 0 ] && [ "$got" -eq "$size" ] || {
		echo "wan.sh: capacity run failed (curl error or $got of $size bytes)" >&2
		return 1
	}
	awk -v a="$t0" -v b="$t1" -v x="$tx" 'BEGIN{printf "%.3f %.3f\n", b - a, x - a}'
}

wan_capacity() {
	local url=$1 size=$2 out r t times=() xfers=()
	[[ $size =~ ^[0-9]+$ ]] && ((size >= PARTS)) || die "usage: wan.sh capacity URL SIZE"
	mkdir -p "$W"
	out=$W/capacity.bin
	for ((r = 0; r < RUNS; r++)); do
		t=$(one_run "$url" "$size" "$out") || { rm -f "$out"; return 1; }
		times+=("${t% *}")
		xfers+=("${t#* }")
	done
	rm -f "$out"
	echo "capacity_parts: $PARTS"
	echo "capacity_runs_s: ${times[*]}"
	echo "capacity_time_s: $(median "${times[@]}")"
	echo "capacity_xfer_s: $(median "${xfers[@]}")"
	awk -v s="$size" -v t="$(median "${times[@]}")" 'BEGIN {
		printf "capacity_mib_s: %.1f\n", s / t / 1048576
		printf "capacity_mbit_s: %.1f\n", s * 8 / t / 1e6 }'
}

case ${1:-} in
up) [ $# -eq 4 ] || die "usage: wan.sh up RTT_MS RATE_MBIT TARGET_PORT"; wan_up "$2" "$3" "$4" ;;
down) wan_down ;;
capacity) [ $# -eq 3 ] || die "usage: wan.sh capacity URL SIZE"; wan_capacity "$2" "$3" ;;
cpu) wan_cpu ;;
*) die "usage: wan.sh up RTT_MS RATE_MBIT TARGET_PORT | down | capacity URL SIZE | cpu" ;;
esac
