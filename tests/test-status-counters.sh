#!/bin/bash
# control/status counters stay sane through a job's completion, read in a
# tight loop by several processes: top (local) <- http://.../mid3.qcow2 <-
# mid2 <- mid1 <- http://.../base.raw, streamed at 2 MiB/s. The completion
# rebases the top onto nothing and closes the HTTP layers; their bytes must
# move into the total of closed layers without network_bytes ever falling
# short: it never decreases. network_rate_bytes_per_s (a difference of
# network_bytes samples over the rate window) stays plausible:
#   - always below 2^40 B/s (1 TiB/s, beyond anything this machine moves),
#     while a difference of counters that went backwards wraps to ~2^63+;
#   - once the job has run 0.5 s, at most 100x the speed limit. The
#     window's oldest sample is then at least 0.5 s old, and the job reads
#     each byte of the 2 MiB disk over the network about once (plus qcow2
#     metadata), so a true rate stays within a few MiB/s. Earlier, the
#     window can be a few milliseconds long and the first chunk's burst
#     legitimately reads as 100 MB/s and more.
# offset and percent never go backwards; the data and the image are right
# at the end.
# formats: qcow2 qed
. "$(dirname "$0")/functions.sh"
requires qemu-img qemu-io fusermount3 python3

mib=2
speed=$((2 * 1024 * 1024))
mkdir -p "$T/www"
randfile "$T/www/base.raw" "$mib"
# Each layer names its backing relatively: over HTTP it resolves to the URL
# beside it. The completion closes the HTTP layers one by one, and until
# the last one is closed the bytes of those below it are missing from
# network_bytes: LAYERS qcow2 layers over base.raw, LAYERS windows.
layers=${LAYERS:-3}
below=base.raw below_fmt=raw
for ((l = 1; l <= layers; l++)); do
	(cd "$T/www" && qemu-img create -q -f qcow2 -b $below -F $below_fmt mid$l.qcow2)
	qemu-io -f qcow2 -c "write -P $((l + 160)) $((l * 128))k 64k" "$T/www/mid$l.qcow2" >/dev/null
	below=mid$l.qcow2 below_fmt=qcow2
done
qemu-img convert -f qcow2 -O raw "$T/www/$below" "$T/want.raw"
http_serve "$T/www" || skip "$HTTP_ERR"
"$STREAMFS" create -f "$FMT" -b "$HTTP_URL/$below" -F qcow2 "$T/top0" >/dev/null

# A poller: reads control/status as fast as it can, checking each read
# against its previous one. Touches READY after its first read, so that the
# job starts only once all pollers are at work; stops 50 reads after the
# job has left the running state. Prints "ok READS RUNNING_READS MAX_NET
# MAX_RATE", or the violations.
cat >"$T/poll.py" <<'EOF'
import os, sys
path, limit, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3]
KEYS = (b"network_bytes", b"network_rate_bytes_per_s", b"offset", b"percent", b"elapsed_s")
CEILING = 1 << 40

def status():
    fd = os.open(path, os.O_RDONLY)
    try:
        text = os.read(fd, 65536)
    finally:
        os.close(fd)
    # Only the fields checked, found directly: a lean loop reads more often.
    f = {"state": text[7:text.index(b"\n")].decode()}  # "state: X" comes first
    for k in KEYS:
        i = text.index(b"\n" + k + b": ") + len(k) + 3
        f[k.decode()] = float(text[i:text.index(b"\n", i)])
    return f

bad, prev, n, nrun, after, seen = [], None, 0, 0, -1, False
max_net = max_rate = 0
while after < 50:
    try:
        cur = status()
    except (OSError, ValueError) as e:
        bad.append("read %d: %r" % (n, e))
        break
    n += 1
    if n == 1:
        open(ready, "w").close()
    msgs = []
    rate = cur["network_rate_bytes_per_s"]
    if rate > CEILING or (rate > limit and cur["elapsed_s"] >= 0.5):
        msgs.append("network_rate_bytes_per_s %d at %.1f s" % (rate, cur["elapsed_s"]))
    if prev:
        for k in ("network_bytes", "offset", "percent"):
            if cur[k] < prev[k]:
                msgs.append("%s went back: %d -> %d" % (k, prev[k], cur[k]))
    if msgs:
        bad.append("read %d (state %s): %s" % (n, cur["state"], "; ".join(msgs)))
    prev = cur
    max_net = max(max_net, cur["network_bytes"])
    max_rate = max(max_rate, cur["network_rate_bytes_per_s"])
    if cur["state"] == "running":
        seen = True
        nrun += 1
    elif after >= 0:
        after += 1
    elif seen:
        after = 0
if bad:
    print("%d bad reads; first ones: %s" % (len(bad), " | ".join(bad[:3])))
else:
    print("ok %d %d %d %d" % (n, nrun, max_net, max_rate))
EOF
all_ready() { [ "$(find "$T" -maxdepth 1 -name 'ready.*' | wc -l)" -eq "$pollers" ]; }

# One completion per iteration, ITERS of them (3; LONG=1: 20), each
# watched by POLLERS processes (3). KEEP_GOING=1 runs them all and counts
# the failing ones.
iters=${ITERS:-3}
[ -n "${LONG:-}" ] && iters=${ITERS:-20}
pollers=${POLLERS:-3}
bad=0 first=""
for ((it = 1; it <= iters; it++)); do
	cp "$T/top0" "$T/top"
	sfs_mount "$T/top" "$T/mnt"
	# Processes, not threads: they read in parallel (no shared interpreter lock).
	rm -f "$T"/ready.* "$T"/out.*
	for ((p = 0; p < pollers; p++)); do
		timeout 120 python3 "$T/poll.py" "$T/mnt/control/status" $((100 * speed)) "$T/ready.$p" \
			>"$T/out.$p" &
	done
	wait_until 30 all_ready || fail "the pollers did not start"
	echo "start speed=$speed" >"$T/mnt/control/stream"
	wait
	why="" n=0 nrun=0 net=0 rate=0
	for ((p = 0; p < pollers; p++)); do
		read -r ok pn prun pnet prate <"$T/out.$p" || ok=
		if [ "$ok" != ok ]; then
			[ -s "$T/out.$p" ] || echo "the poller failed" >"$T/out.$p"
			why+=" control/status through the completion: $(cat "$T/out.$p");"
			continue
		fi
		n=$((n + pn)) nrun=$((nrun + prun))
		[ "$pnet" -gt "$net" ] && net=$pnet
		[ "$prate" -gt "$rate" ] && rate=$prate
	done
	[ -n "$why" ] || [ "$nrun" -gt 0 ] || why=" no read saw the job running (too short a job?);"
	if [ -z "$why" ]; then
		st=$(cat "$T/mnt/control/stream")
		final=$(field "$T/mnt" network_bytes)
		if [ "$st" != completed ]; then
			why=" job $st"
		elif [ "$final" -lt "$net" ]; then
			why=" network_bytes $final at the end, $net seen before"
		elif [ "$final" -lt $((mib * 1024 * 1024)) ]; then
			why=" network_bytes $final: the backing was not all counted"
		elif ! cmp "$T/mnt/disk" "$T/want.raw"; then
			why=" disk differs from the chain's data"
		fi
	fi
	sfs_umount "$T/mnt"
	if [ -z "$why" ]; then
		out=$(qemu-img check -f "$FMT" "$T/top" 2>&1) || why=" qemu-img check: $out"
	fi
	if [ -z "$why" ]; then
		out=$(qemu-img compare -f "$FMT" -F raw "$T/top" "$T/want.raw" 2>&1) ||
			why=" the overlay differs: $out"
	fi
	if [ -n "$why" ]; then
		bad=$((bad + 1))
		info "iteration $it:$why"
		[ -n "$first" ] || first="iteration $it of $iters:$why"
		[ -n "${KEEP_GOING:-}" ] || break
	else
		info "iteration $it: $n status reads ($nrun while running), network_bytes up to $final, network rate up to $rate B/s (limit $speed B/s)"
	fi
done
info "$bad of $((it > iters ? iters : it)) iterations failed"
[ $bad -eq 0 ] || fail "$first"
echo ok
