#!/bin/bash
# Demand reads during a saturated stream: an HTTP backing behind an emulated
# far link (bench/linkem via bench/wan.sh: 20 ms RTT, 100 Mbit/s, a 256 KiB
# window per connection, so the job needs several connections to fill it).
# While the job streams, guest reads of ranges it has not copied yet
# complete with the right bytes; control/status has the net_* keys and
# control/metrics is valid Prometheus text (checked strictly here, and by
# promtool when installed); at the end the network counters add up.
# formats: qcow2
. "$(dirname "$0")/functions.sh"
requires qemu-img fusermount3 nginx curl python3 cc

ROOT=$(cd "$(dirname "$0")/.." && pwd)
MIB=48

# check_metrics FILE: the Prometheus text exposition format 0.0.4, strictly
# (see test_control_prom_checker_rejects in tests/test-control.c).
check_metrics() {
	python3 - "$1" <<'PY' || fail "control/metrics is not valid Prometheus text: $(cat "$T/prom.err")"
import re, sys
name = re.compile(r'[a-zA-Z_:][a-zA-Z0-9_:]*$')
sample = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\["\\n])*"'
                    r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\["\\n])*")*\})? (\S+)$')
fam, cur, seen, err = {}, None, set(), []
text = open(sys.argv[1]).read()
if not text.endswith("\n"):
    err.append("no final newline")
for line in text.split("\n")[:-1]:
    if line.startswith("#"):
        m = re.match(r'# (HELP|TYPE) (\S+) (.+)$', line)
        if not m or not name.match(m.group(2)):
            err.append("bad comment: " + line); continue
        kind, n, rest = m.groups()
        if n in fam and cur != n:
            err.append("described twice: " + n)
        f = fam.setdefault(n, {})
        cur = n
        if kind == "HELP":
            if f: err.append("HELP repeated or late: " + n)
            f["help"] = rest
        else:
            if "type" in f or "help" not in f: err.append("TYPE without HELP: " + n)
            if rest not in ("counter", "gauge", "summary"): err.append("type: " + line)
            if rest == "counter" and not n.endswith("_total"): err.append("counter: " + n)
            f["type"] = rest
        continue
    m = sample.match(line)
    if not m:
        err.append("bad sample: " + line); continue
    n, labels, v = m.groups()
    base = n
    if cur and fam[cur].get("type") == "summary" and n in (cur + "_sum", cur + "_count"):
        base = cur
    if base != cur or "type" not in fam.get(cur, {}):
        err.append("sample before its HELP/TYPE: " + line)
    try:
        x = float(v) if v not in ("NaN", "+Inf", "-Inf") else 0.0
        if v.lower() in ("nan", "inf", "-inf", "+inf", "infinity") and v not in ("NaN", "+Inf", "-Inf"):
            raise ValueError
    except ValueError:
        err.append("value: " + line); continue
    if fam[cur].get("type") == "counter" and not x >= 0:
        err.append("negative counter: " + line)
    if (n, labels) in seen:
        err.append("repeated: " + line)
    seen.add((n, labels))
open(sys.argv[1].rsplit("/", 1)[0] + "/prom.err", "w").write("\n".join(err))
sys.exit(1 if err else 0)
PY
	if command -v promtool >/dev/null; then
		promtool check metrics <"$1" >"$T/promtool.out" 2>&1 ||
			fail "promtool check metrics: $(cat "$T/promtool.out")"
	fi
}

mkdir -p "$T/www"
randfile "$T/www/base.raw" $MIB
http_serve "$T/www" || skip "$HTTP_ERR"
export WAN_DIR=$T/wan WAN_WINDOW=262144
lport=$("$ROOT/bench/wan.sh" up 20 100 "${HTTP_URL##*:}") || fail "bench/wan.sh up: $lport"
cleanup_fn "$ROOT/bench/wan.sh" down
url=http://127.0.0.1:$lport/base.raw
curl -sf -r 0-0 "$url" -o /dev/null || fail "the emulated link does not serve base.raw"

"$STREAMFS" create -f "$FMT" -b "$url" -F raw "$T/ovl" >/dev/null || fail "create over $url"
sfs_mount "$T/ovl" "$T/mnt"
for k in net_requests_in_flight net_requests_in_flight_guest net_requests_in_flight_job \
	net_requests_waiting_guest net_requests_waiting_job net_connections net_bytes_guest \
	net_bytes_job net_requests net_retries net_stalls net_errors net_latency_p50_ms \
	net_latency_p99_ms net_rtt_ms net_rate_bytes_per_s; do
	[ -n "$(field "$T/mnt" $k)" ] || fail "control/status has no $k"
done
cat "$T/mnt/control/metrics" >"$T/metrics.idle"
check_metrics "$T/metrics.idle"

echo start >"$T/mnt/control/stream"
wait_offset "$T/mnt" $((4 << 20))
# Guest reads in the last quarter, which the job reaches last: each comes
# over the link while the job keeps it busy.
for i in 0 1 2 3 4 5; do
	off=$(((MIB * 3 / 4) * 1024 + i * 1000 + 13)) # in KiB
	[ "$(cat "$T/mnt/control/stream")" = running ] || info "job no longer running at read $i"
	cmp <(timeout 120 dd if="$T/mnt/disk" bs=1K skip=$off count=64 iflag=direct status=none) \
		<(dd if="$T/www/base.raw" bs=1K skip=$off count=64 status=none) ||
		fail "guest read at $off KiB during the stream differs (or did not complete)"
done
cat "$T/mnt/control/metrics" >"$T/metrics.running"
check_metrics "$T/metrics.running"
grep -q '^streamfs_stream_state{state="running"} 1$' "$T/metrics.running" ||
	info "the job had finished before the metrics were read"
for ((i = 0; i < 2400; i++)); do
	alive "$SFS_PID" || fail "the daemon died during the stream: $(dmesg 2>/dev/null | grep streamfs | tail -1)"
	[ "$(cat "$T/mnt/control/stream")" = completed ] && break
	sleep 0.05
done
wait_state "$T/mnt" completed 1
cmp "$T/mnt/disk" "$T/www/base.raw" || fail "content differs after streaming"

# The counters add up: every backing byte was fetched for the guest or the job.
guest=$(field "$T/mnt" net_bytes_guest)
job=$(field "$T/mnt" net_bytes_job)
[ $((guest + job)) -eq "$(field "$T/mnt" network_bytes)" ] ||
	fail "net_bytes_guest $guest + net_bytes_job $job != network_bytes $(field "$T/mnt" network_bytes)"
[ "$guest" -ge $((6 * 65536)) ] || fail "net_bytes_guest $guest: the guest reads were not counted"
[ "$job" -gt 0 ] || fail "net_bytes_job 0: the stream job's reads were counted as the guest's"
[ "$(field "$T/mnt" net_errors)" = 0 ] || fail "net_errors $(field "$T/mnt" net_errors)"
[ "$(field "$T/mnt" net_requests_in_flight)" = 0 ] || fail "requests still in flight"
rtt=$(field "$T/mnt" net_rtt_ms)
awk -v r="$rtt" 'BEGIN { exit !(r >= 19 && r < 200) }' || fail "net_rtt_ms $rtt on a 20 ms link"
cat "$T/mnt/control/metrics" >"$T/metrics.done"
check_metrics "$T/metrics.done"
grep -q '^streamfs_stream_state{state="completed"} 1$' "$T/metrics.done" ||
	fail "metrics: the job is not shown completed"
info "guest $guest job $job bytes, rtt $rtt ms, p99 $(field "$T/mnt" net_latency_p99_ms) ms"
sfs_umount "$T/mnt"
echo ok
