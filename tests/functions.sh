# streamfs shell-test helpers, sourced by tests/test-*.sh.
#
# Environment: STREAMFS (the binary), HELPERS (built test helpers),
# FMT (overlay format for format-parameterised tests: qcow2 or qed),
# LONG=1 for the long variants. A test exits 0 (pass), 77 (skip) or else (fail).
set -euo pipefail

: "${STREAMFS:=$(cd "$(dirname "$0")/.." && pwd)/streamfs}"
: "${HELPERS:=$(cd "$(dirname "$0")/.." && pwd)/build/tests/helpers}"
: "${FMT:=qcow2}"
export STREAMFS HELPERS FMT

TESTNAME=$(basename "$0" .sh)
T=$(mktemp -d "/tmp/streamfs-$TESTNAME.XXXXXX")
_cleanups=()

# Register a command to run at exit (last registered runs first).
cleanup_fn() { _cleanups+=("$*"); }

_run_cleanups() {
	local rc=$?
	set +e
	for ((i = ${#_cleanups[@]} - 1; i >= 0; i--)); do eval "${_cleanups[$i]}"; done
	# Never leave a mount behind.
	for m in $(awk -v t="$T" '$2 ~ "^"t {print $2}' /proc/mounts); do
		fusermount3 -u "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
	done
	rm -rf "$T"
	exit $rc
}
trap _run_cleanups EXIT

fail() { echo "FAIL: $TESTNAME: $*" >&2; exit 1; }
skip() { echo "SKIP: $TESTNAME: $*" >&2; exit 77; }
info() { echo "  $TESTNAME: $*" >&2; }

# requires CMD...: skip the test unless every command exists.
requires() { for c in "$@"; do command -v "$c" >/dev/null 2>&1 || skip "needs $c"; done; }

# Random data file: randfile PATH SIZE_MIB
randfile() { head -c "$(($2 * 1024 * 1024))" /dev/urandom >"$1"; }

# A backing image with data, zero runs and holes: mkbacking PATH SIZE_MIB
mkbacking() {
	local p=$1 mib=$2
	truncate -s "${mib}M" "$p"
	# data in 3 of every 4 MiB, with an odd-sized hole pattern inside
	local i
	for ((i = 0; i < mib; i += 4)); do
		dd if=/dev/urandom of="$p" bs=1M seek=$i count=3 conv=notrunc status=none
	done
	dd if=/dev/zero of="$p" bs=4096 seek=100 count=7 conv=notrunc status=none
}

# sfs_mount OVERLAY MNT [streamfs options...]: mount, wait for the pid file.
# Sets SFS_PID.
sfs_mount() {
	local ovl=$1 mnt=$2
	shift 2
	mkdir -p "$mnt"
	rm -f "$T/pid"
	"$STREAMFS" "$ovl" "$mnt" -o "pidfile=$T/pid" "$@" || return $?
	local i
	for ((i = 0; i < 200; i++)); do
		[ -s "$T/pid" ] && break
		sleep 0.05
	done
	[ -s "$T/pid" ] || fail "no pid file after mount"
	SFS_PID=$(cat "$T/pid")
	mountpoint -q "$mnt" || fail "$mnt is not mounted"
}

# sfs_umount MNT: unmount and wait for the daemon to exit (it flushes).
sfs_umount() {
	local mnt=$1 pid=${SFS_PID:-}
	fusermount3 -u "$mnt"
	if [ -n "$pid" ]; then
		local i
		for ((i = 0; i < 600; i++)); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.05
		done
		kill -0 "$pid" 2>/dev/null && fail "daemon $pid did not exit after unmount"
	fi
	SFS_PID=
}

# sfs_kill9 MNT: crash the daemon and clean the dead mount.
sfs_kill9() {
	local mnt=$1
	kill -9 "$SFS_PID"
	while kill -0 "$SFS_PID" 2>/dev/null; do sleep 0.02; done
	fusermount3 -u "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true
	SFS_PID=
}

# qcheck IMAGE: qemu-img check must pass with no leaks and no corruption.
qcheck() {
	local out rc=0
	out=$(qemu-img check -f "$FMT" "$1" 2>&1) || rc=$?
	[ $rc -eq 0 ] || fail "qemu-img check $1 exit $rc: $out"
}

# qcheck_crash IMAGE: after a crash, leaks are allowed (exit 3), corruption not.
qcheck_crash() {
	local out rc=0
	out=$(qemu-img check -f "$FMT" "$1" 2>&1) || rc=$?
	[ $rc -eq 0 ] || [ $rc -eq 3 ] || fail "qemu-img check $1 exit $rc: $out"
}

# wait_state MNT STATE [TIMEOUT_S]: wait for control/stream to show STATE.
wait_state() {
	local mnt=$1 want=$2 t=${3:-120} i
	for ((i = 0; i < t * 20; i++)); do
		[ "$(cat "$mnt/control/stream")" = "$want" ] && return 0
		sleep 0.05
	done
	fail "state never became $want (is $(cat "$mnt/control/stream"); error: $(field "$mnt" error))"
}

# field MNT KEY: a value from control/status.
field() { awk -v k="$2:" '$1 == k {print $2}' "$1/control/status"; }
