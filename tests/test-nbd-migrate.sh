#!/bin/bash
# Moving a running VM's disk to another host by streaming it over NBD (#15).
# The source host exports the disk read-only on a Unix socket (qemu-nbd -r,
# then nbdkit file: each server that is installed; CI needs both); the
# destination creates an overlay over nbd+unix:///?socket=S, mounts it with
# -o stream, and a guest-like writer (tests/helpers/writer) writes while the
# job copies. Mid-stream the server is killed and started again on the same
# socket: neither the job nor the writer sees an error. After completion the
# server is stopped for good and the overlay stands alone: qemu-img check is
# clean and qemu-img compare equals the guest's view (source + writes, which
# the writer's log verifies sector by sector). Holes (base:allocation) are
# never transferred. Daemonized mounts (the daemon forks after opening the
# backing) read right. qemu-img info of a fresh overlay shows the nbd backing
# exactly as qemu-img create writes it, and QEMU reads our overlay through
# its own NBD client. Last, a server gone for good mid-stream: with
# on-error=stop the job pauses, the daemon's message names the server, a
# guest read of data not yet copied gets EIO (never other bytes), and the
# job resumes once the server is back.
# formats: qcow2 qed
. "$(dirname "$0")/functions.sh"
requires qemu-img fusermount3 cmp
[ -x "$HELPERS/writer" ] || missing "the writer helper (make check builds it)"
servers=()
for s in qemu-nbd nbdkit; do
	if command -v $s >/dev/null 2>&1; then
		servers+=("$s")
	elif [ -n "${CI:-}" ]; then
		missing $s
	fi
done
[ ${#servers[@]} -gt 0 ] || missing "qemu-nbd or nbdkit"

MIB=$((1024 * 1024))
SOCK=$T/nbd.sock
URI="nbd+unix:///?socket=$SOCK"
SRV_PID="" wpid=""

# srv_start KIND IMAGE: export IMAGE read-only on $SOCK; wait until it serves.
srv_start() {
	rm -f "$SOCK" "$T/srv.pid"
	case $1 in
	qemu-nbd) qemu-nbd -r -t -f raw -k "$SOCK" --pid-file "$T/srv.pid" "$2" 2>>"$T/srv.err" & ;;
	nbdkit) nbdkit -f -U "$SOCK" -P "$T/srv.pid" file "$2" 2>>"$T/srv.err" & ;;
	esac
	SRV_PID=$!
	wait_until 20 test -S "$SOCK" -a -s "$T/srv.pid" || fail "$1 does not serve: $(tail -3 "$T/srv.err")"
}

# srv_kill: kill -9 the server and wait for it (its socket file stays).
srv_kill() {
	[ -n "$SRV_PID" ] || return 0
	kill -9 "$SRV_PID" 2>/dev/null
	wait "$SRV_PID" 2>/dev/null || true
	SRV_PID=
}
# At exit (KEEP_LOG=FILE keeps the daemon's log): unmount first (a daemon
# whose server is gone retries before it exits), then the server and the
# writer.
cleanup_fn '[ -z "${KEEP_LOG:-}" ] || cp "$T/daemon.err" "$KEEP_LOG"; umount_all; srv_kill; [ -n "$wpid" ] && kill "$wpid" 2>/dev/null'

# daemon_said TEXT: the daemon's log (sfs_mount_fg) holds TEXT.
daemon_said() { grep -qF -- "$1" "$T/daemon.err"; }

# The source disk: data in 3 of every 4 MiB, a 1 MiB hole in each 4.
mkbacking "$T/src.raw" 64
data_bytes=$((48 * MIB))

for srv in "${servers[@]}"; do
	info "server: $srv"
	: >"$T/daemon.err"
	rm -f "$T/ovl" "$T/q.img" "$T/wlog" "$T/guest.raw"
	srv_start "$srv" "$T/src.raw"

	# The backing name as QEMU writes it, and QEMU reads our overlay.
	"$STREAMFS" create -f "$FMT" -b "$URI" -F raw "$T/ovl" >/dev/null || fail "$srv: create over $URI"
	qemu-img create -q -f "$FMT" -u -b "$URI" -F raw "$T/q.img" 64M
	ours=$(qemu-img info -U "$T/ovl" | grep '^backing file')
	theirs=$(qemu-img info -U "$T/q.img" | grep '^backing file')
	[ "$ours" = "$theirs" ] || fail "$srv: backing shown as '$ours', QEMU writes '$theirs'"
	[[ $ours == *"backing file: $URI"* ]] || fail "$srv: backing not recorded: $ours"
	qemu-img compare -q -f "$FMT" -F raw "$T/ovl" "$T/src.raw" || fail "$srv: QEMU reads the overlay differently"

	# Mount and stream while the guest writes; the log goes to daemon.err.
	sfs_mount_fg "$T/ovl" "$T/mnt" -o stream,speed=8M,verbose
	"$HELPERS/writer" write "$T/mnt/disk" "$T/wlog" $RANDOM &
	wpid=$!
	wait_offset "$T/mnt" $((16 * MIB))

	# Restart mid-stream: killed, the daemon notices and retries, started
	# again on the same socket, the daemon reconnects.
	srv_kill
	wait_until 30 daemon_said "connection lost" || fail "$srv: the daemon did not see the server go"
	wait_until 30 daemon_said "retrying in" || fail "$srv: nothing was retried while the server was down"
	srv_start "$srv" "$T/src.raw"
	wait_until 30 daemon_said "reconnected" || fail "$srv: no reconnect: $(tail -5 "$T/daemon.err")"
	kill -0 $wpid 2>/dev/null || fail "$srv: the writer stopped (a guest-visible error)"
	wait_state "$T/mnt" completed
	kill -0 $wpid 2>/dev/null || fail "$srv: the writer stopped (a guest-visible error)"
	kill $wpid
	wait $wpid 2>/dev/null || true
	wpid=
	[ "$(field "$T/mnt" error)" = - ] || fail "$srv: job error: $(field "$T/mnt" error)"
	[ "$(field "$T/mnt" backing)" = - ] || fail "$srv: the completed job kept the backing"
	net=$(field "$T/mnt" network_bytes)
	# Holes are never transferred: at most the data, and the 16 MiB of
	# holes would have shown.
	if [ "$net" -eq 0 ] || [ "$net" -gt $((data_bytes + 4 * MIB)) ]; then
		fail "$srv: $net bytes came over the network for $data_bytes of data"
	fi
	"$HELPERS/writer" verify "$T/mnt/disk" "$T/wlog" "$T/src.raw" || fail "$srv: guest data check failed"
	cat "$T/mnt/disk" >"$T/guest.raw"

	# The source goes away for good: the overlay stands alone.
	srv_kill
	cmp "$T/mnt/disk" "$T/guest.raw" || fail "$srv: reads differ once the server is gone"
	fusermount3 -u "$T/mnt"
	sfs_wait_exit
	[ "$SFS_RC" -eq 0 ] || fail "$srv: daemon exit status $SFS_RC"
	qcheck "$T/ovl"
	qemu-img info "$T/ovl" | grep -q "^backing file" && fail "$srv: the overlay still names the server"
	qemu-img compare -q -f "$FMT" -F raw "$T/ovl" "$T/guest.raw" || fail "$srv: the overlay differs from the guest's view"
	grep -F "$SOCK" "$T/daemon.err" | grep -q "restarted\|reconnected" || fail "$srv: messages do not name the server"
	info "$srv: restart mid-stream carried on; $net bytes over the network; overlay stands alone"
done

# Daemonized mounts: the daemon forks after the chain is open. A raw
# backing is not read before the fork; a qcow2 one is (its header).
qemu-img convert -f raw -O qcow2 "$T/src.raw" "$T/src.qcow2"
for bfmt in raw qcow2; do
	srv_start "${servers[0]}" "$T/src.$bfmt"
	rm -f "$T/ovl"
	"$STREAMFS" create -f "$FMT" -b "$URI" -F $bfmt "$T/ovl" >/dev/null || fail "create over $bfmt"
	sfs_mount "$T/ovl" "$T/mnt"
	timeout 60 cmp "$T/mnt/disk" "$T/src.raw" || fail "daemonized mount over an NBD $bfmt backing: reads differ or hang"
	sfs_umount "$T/mnt"
	srv_kill
done
info "daemonized mounts over raw and qcow2 NBD backings read right"

# A server gone for good mid-stream: the job pauses (on-error=stop) with an
# error, the daemon names the server, a guest read of missing data is EIO;
# the server is back, resume, complete.
srv=${servers[0]}
: >"$T/daemon.err"
rm -f "$T/ovl"
srv_start "$srv" "$T/src.raw"
"$STREAMFS" create -f "$FMT" -b "$URI" -F raw "$T/ovl" >/dev/null || fail "create over $URI"
# Two attempts per request: a refused connection fails after one backoff.
sfs_mount_fg "$T/ovl" "$T/mnt" -o stream,speed=4M,on_error=stop,http_retries=2,http_timeout=5
wait_offset "$T/mnt" $((4 * MIB))
srv_kill
rm -f "$SOCK"
wait_state "$T/mnt" paused 60
[ "$(field "$T/mnt" error)" != - ] || fail "gone: no job error shown"
grep -F "$URI" "$T/daemon.err" | grep -q "giving up after retries" ||
	fail "gone: no message naming the server: $(tail -5 "$T/daemon.err")"
read -r off _ <"$T/mnt/control/progress"
[ "$off" -lt $((60 * MIB)) ] || fail "gone: the job got to $off before the kill"
# 60 MiB is data, not copied yet: EIO, not zeros.
if out=$(timeout 120 dd if="$T/mnt/disk" of="$T/miss" bs=64k skip=960 count=1 2>&1); then
	fail "gone: a read of data not yet copied succeeded (server gone): $(od -An -tx1 -N16 "$T/miss")"
fi
[[ $out == *"Input/output error"* ]] || fail "gone: the read failed but not with EIO: $out"
# What was copied still reads right.
cmp -n "$off" "$T/mnt/disk" "$T/src.raw" || fail "gone: copied data differs"
srv_start "$srv" "$T/src.raw"
echo resume >"$T/mnt/control/stream"
wait_state "$T/mnt" completed
cmp "$T/mnt/disk" "$T/src.raw" || fail "gone: content differs after the resumed job"
srv_kill
fusermount3 -u "$T/mnt"
sfs_wait_exit
qcheck "$T/ovl"
info "server gone: paused with '$(grep -F "giving up" "$T/daemon.err" | tail -1)'"
echo ok
