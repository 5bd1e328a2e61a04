#!/bin/bash
# Self-check of bench/linkem (the emulated wide-area link) against nginx on 127.0.0.1: does
# the link do what it claims? A benchmark helper, not part of `make check`.
#
#   bench/linkem-test.sh [RTT_MS:RATE_MBIT ...]        default: 80:500 40:200
#   LINKEM_TEST_MIB=64       file for the throughput checks
#   LINKEM_TEST_BIG_MIB=256  the 4-curl download that is only reported (0: skip)
#   WAN_WINDOW=2097152       per-connection window, as in bench/wan.sh
#
# Per profile, as `key: value` lines (prefix rRTT_bRATE_):
#   (a) tiny_s     a tiny file by curl (connect + request): 2 RTT, within +30 ms
#   (b) single_*   one connection, the 64 MiB file: min(rate, WINDOW/RTT), within -15 %/+5 %
#   (c) quad_*     bench/wan.sh capacity (4 ranged curls, one file, sync): the rate, same
#                  tolerance, on the transfer time without the sync and setup
#   (d) conc64     64 concurrent connections each fetch a 256 KiB file intact
#   (e) halfclose  a client that shuts its write side still gets the whole answer
#   (f) big_*      the 256 MiB download through 4 curls (reported, not checked)
#   linkem CPU per GiB, and its peak RSS: at most 16 MiB + 8 windows (the windows are its
#   only buffers: a slow link must push back on the sender, not pile up in the proxy)
# Exits 1 if a check fails.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MIB=${LINKEM_TEST_MIB:-64}
BIG_MIB=${LINKEM_TEST_BIG_MIB:-256}
WINDOW=${WAN_WINDOW:-2097152}
PROFILES=("$@")
[ ${#PROFILES[@]} -gt 0 ] || PROFILES=(80:500 40:200)
T=$(mktemp -d /tmp/linkem-test.XXXXXX)
export WAN_DIR=$T/wan WAN_WINDOW=$WINDOW
WAN=$ROOT/bench/wan.sh
FAILED=0

# shellcheck disable=SC2317 # called by the EXIT trap
alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
# shellcheck disable=SC2317
cleanup() {
	local pid i
	"$WAN" down 2>/dev/null
	pid=$(cat "$T/ngx/nginx.pid" 2>/dev/null) && kill "$pid" 2>/dev/null &&
		for ((i = 0; i < 100; i++)); do alive "$pid" || break; sleep 0.05; done
	rm -rf "$T"
}
trap cleanup EXIT
for c in nginx curl python3 gcc; do
	command -v $c >/dev/null || { echo "linkem-test: needs $c" >&2; exit 1; }
done

# ------------------------------------------------ nginx (as tests/functions.sh http_serve)
mkdir -p "$T/ngx" "$T/www"
chmod 755 "$T" "$T/www" # nginx workers run as an unprivileged user
for i in 1 2 3; do
	PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
	cat >"$T/ngx/nginx.conf" <<NGX
daemon on;
pid $T/ngx/nginx.pid;
error_log $T/ngx/error.log;
worker_processes 1;
events { worker_connections 512; }
http {
	access_log off;
	client_body_temp_path $T/ngx;
	proxy_temp_path $T/ngx;
	fastcgi_temp_path $T/ngx;
	uwsgi_temp_path $T/ngx;
	scgi_temp_path $T/ngx;
	server { listen 127.0.0.1:$PORT; root $T/www; }
}
NGX
	nginx -c "$T/ngx/nginx.conf" -p "$T/ngx" 2>"$T/ngx/start.log" && break
	PORT=
done
[ -n "$PORT" ] || { echo "linkem-test: nginx does not start: $(cat "$T/ngx/start.log")" >&2; exit 1; }
for ((i = 0; i < 100; i++)); do
	[ -s "$T/ngx/nginx.pid" ] && curl -s -o /dev/null "http://127.0.0.1:$PORT/" && break
	sleep 0.05
done
echo hi >"$T/www/tiny"
head -c $((MIB << 20)) /dev/urandom >"$T/www/file"
head -c $((256 << 10)) /dev/urandom >"$T/www/small"
[ "$BIG_MIB" -gt 0 ] && head -c $((BIG_MIB << 20)) /dev/urandom >"$T/www/big"

median() { printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }
# check NAME OK: record a verdict
check() {
	if [ "$2" = 1 ]; then
		echo "${P}$1: ok"
	else
		echo "${P}$1: FAIL"
		FAILED=1
	fi
}
# within X LO HI: 1 if LO <= X <= HI
within() { awk -v x="$1" -v lo="$2" -v hi="$3" 'BEGIN {print (x >= lo && x <= hi) ? 1 : 0}'; }
calc() { awk "BEGIN {printf \"%.${2:-3}f\", $1}"; }
cpu() { "$WAN" cpu | awk '{print $2}'; }

halfclose() {
	python3 - "$1" <<'PY'
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"GET /tiny HTTP/1.0\r\nHost: x\r\n\r\n")
s.shutdown(socket.SHUT_WR)
data = b""
while True:
    b = s.recv(65536)
    if not b:
        break
    data += b
sys.exit(0 if data.startswith(b"HTTP/1.1 200") and data.endswith(b"\r\n\r\nhi\n") else 1)
PY
}

for prof in "${PROFILES[@]}"; do
	RTT=${prof%:*}
	RATE=${prof#*:}
	P="r${RTT}_b${RATE}_"
	LPORT=$("$WAN" up "$RTT" "$RATE" "$PORT") || exit 1
	LPID=$(cat "$WAN_DIR/linkem.pid")
	URL=http://127.0.0.1:$LPORT
	RTT_S=$(calc "$RTT / 1000" 4)
	echo "${P}window_bytes: $WINDOW"

	# (a) connect + request: 2 RTT
	ts=()
	for i in 1 2 3 4 5; do ts+=("$(curl -s -o /dev/null -w '%{time_total}' "$URL/tiny")"); done
	t=$(median "${ts[@]}")
	echo "${P}tiny_s: $t (expected $(calc "2 * $RTT_S") + up to 0.030)"
	check tiny "$(within "$t" "$(calc "2 * $RTT_S - 0.002")" "$(calc "2 * $RTT_S + 0.030")")"

	# (b) one connection: min(rate, WINDOW/RTT); steady rate after the 2 RTT setup
	exp=$(calc "($WINDOW * 8 / $RTT_S / 1e6 < $RATE) ? $WINDOW * 8 / $RTT_S / 1e6 : $RATE" 1)
	ts=()
	for i in 1 2 3; do
		ts+=("$(curl -sf -o /dev/null -w '%{time_total}' "$URL/file")") || FAILED=1
	done
	t=$(median "${ts[@]}")
	m=$(calc "$MIB * 8388608 / ($t - 2 * $RTT_S) / 1e6" 1)
	echo "${P}single_s: $t"
	echo "${P}single_mbit_s: $m (expected $exp)"
	check single "$(within "$m" "$(calc "$exp * 0.85" 1)" "$(calc "$exp * 1.05" 1)")"

	# (c) 4 parallel ranged curls into one file + sync (bench/wan.sh capacity): the rate
	c0=$(cpu)
	"$WAN" capacity "$URL/file" $((MIB << 20)) >"$T/cap" || FAILED=1
	c1=$(cpu)
	sed "s/^/${P}quad_/" "$T/cap"
	x=$(awk '/^capacity_xfer_s:/ {print $2}' "$T/cap")
	exp=$(calc "(4 * $WINDOW * 8 / $RTT_S / 1e6 < $RATE) ? 4 * $WINDOW * 8 / $RTT_S / 1e6 : $RATE" 1)
	m=$(calc "$MIB * 8388608 / ($x - 2 * $RTT_S) / 1e6" 1)
	echo "${P}quad_link_mbit_s: $m (expected $exp)"
	check quad "$(within "$m" "$(calc "$exp * 0.85" 1)" "$(calc "$exp * 1.05" 1)")"
	echo "${P}linkem_cpu_s_per_gib: $(calc "($c1 - $c0) / (3 * $MIB / 1024)" 2)"
	echo "${P}linkem_cpu_core_pct: $(calc "100 * ($c1 - $c0) / (3 * $x)" 0)"

	# (d) 64 concurrent connections
	pids=()
	for i in $(seq 64); do
		curl -sf -o "$T/s.$i" "$URL/small" &
		pids+=($!)
	done
	ok=1
	for i in "${pids[@]}"; do wait "$i" || ok=0; done
	for i in $(seq 64); do cmp -s "$T/s.$i" "$T/www/small" || ok=0; done
	rm -f "$T"/s.*
	check conc64 $ok

	# (e) half-close
	ok=0
	halfclose "$LPORT" && ok=1
	check halfclose $ok

	# (f) the 256 MiB download through 4 curls
	if [ "$BIG_MIB" -gt 0 ]; then
		c0=$(cpu)
		WAN_RUNS=1 "$WAN" capacity "$URL/big" $((BIG_MIB << 20)) >"$T/cap" || FAILED=1
		c1=$(cpu)
		awk -v p="${P}big_" '/_s:|mbit/ {print p $0}' "$T/cap"
		echo "${P}big_linkem_cpu_s: $(calc "$c1 - $c0" 2)"
	fi
	# without the window linkem would read each file whole into memory at loopback speed
	rss=$(awk '/^VmHWM/ {print $2}' "/proc/$LPID/status")
	echo "${P}linkem_peak_rss_kib: $rss (bound $((16384 + 8 * WINDOW / 1024)))"
	check rss_bounded "$(within "$rss" 0 $((16384 + 8 * WINDOW / 1024)))"
	"$WAN" down 2>&1 | sed "s/^/${P}/"
done
[ $FAILED = 0 ] && echo "linkem-test: all checks passed" || echo "linkem-test: FAILED"
exit $FAILED
