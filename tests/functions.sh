# streamfs shell-test helpers, sourced by tests/test-*.sh.
# shellcheck shell=bash
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
	umount_all
	rm -rf "$T"
	exit $rc
}
trap _run_cleanups EXIT

# umount_all: unmount everything mounted under $T, and wait for the daemon
# of the last sfs_mount (if still mounted) to exit; kill it if it hangs.
umount_all() {
	local m i
	for m in $(awk -v t="$T" '$2 ~ "^"t {print $2}' /proc/mounts); do
		fusermount3 -u "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
	done
	[ -n "${SFS_PID:-}" ] || return 0
	for ((i = 0; i < 200; i++)); do
		alive "$SFS_PID" || break
		sleep 0.05
	done
	if alive "$SFS_PID"; then
		echo "  $TESTNAME: daemon $SFS_PID still running 10 s after unmount: killed" >&2
		kill -9 "$SFS_PID"
	fi
	SFS_PID=
}

fail() { echo "FAIL: $TESTNAME: $*" >&2; exit 1; }
info() { echo "  $TESTNAME: $*" >&2; }

# skip REASON: the test does not apply here, for a reason that is not a
# missing tool (e.g. valgrind cannot run an ASan build). A skip, in CI too.
skip() { echo "SKIP: $TESTNAME: $*" >&2; exit 77; }

# missing WHAT: a tool or oracle the test needs is not there. Outside CI
# the test is skipped; in CI (CI set) a skip would hide a broken setup, so
# the test fails.
missing() {
	[ -z "${CI:-}" ] || fail "CI: missing $*"
	skip "needs $*"
}

# requires CMD...: every command must exist (see missing).
requires() { for c in "$@"; do command -v "$c" >/dev/null 2>&1 || missing "$c"; done; }

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

# alive PID: the process exists and has not exited. Nobody here waits for a
# daemon: once exited it stays a zombie until init reaps it, which can take
# seconds, and kill -0 still finds it. (A zombie main thread with other
# threads still running is alive.)
alive() {
	local st tasks
	kill -0 "$1" 2>/dev/null || return 1
	read -r st <"/proc/$1/stat" 2>/dev/null || return 1
	st=${st##*) }
	[ "${st%% *}" != Z ] && return 0
	tasks=("/proc/$1/task/"*)
	[ ${#tasks[@]} -gt 1 ]
}

# wait_gone PID [TIMEOUT_S]: wait until PID has exited (see alive); returns
# 1 if it is still alive after TIMEOUT_S (default 30).
wait_gone() {
	local i
	for ((i = 0; i < ${2:-30} * 20; i++)); do
		alive "$1" || return 0
		sleep 0.05
	done
	! alive "$1"
}

# wait_until TIMEOUT_S CMD...: poll until CMD succeeds; returns 1 if it
# still fails after TIMEOUT_S.
wait_until() {
	local t=$1 i
	shift
	for ((i = 0; i < t * 50; i++)); do
		"$@" && return 0
		sleep 0.02
	done
	"$@"
}

# sfs_mount OVERLAY MNT [streamfs options...]: mount, wait for the pid file.
# Sets SFS_PID.
sfs_mount() {
	local ovl=$1 mnt=$2
	shift 2
	mkdir -p "$mnt"
	rm -f "$T/pid"
	# SFS_STREAM_DEPTH=N: run the stream job with N chunks in flight
	# (test-stream-lanes.sh reruns the stream tests so).
	"$STREAMFS" "$ovl" "$mnt" -o "pidfile=$T/pid" ${SFS_STREAM_DEPTH:+-o stream_depth=$SFS_STREAM_DEPTH} \
		"$@" || return $?
	local i
	for ((i = 0; i < 200; i++)); do
		[ -s "$T/pid" ] && break
		sleep 0.05
	done
	[ -s "$T/pid" ] || fail "no pid file after mount"
	SFS_PID=$(cat "$T/pid")
	mountpoint -q "$mnt" || fail "$mnt is not mounted"
}

# sfs_mount_fg OVERLAY MNT [streamfs options...]: run the daemon in the
# foreground (-f) as a child of this shell, so that sfs_wait_exit can
# collect its exit status; wait until the mount serves control/status.
# Fails if the daemon exits first. Sets SFS_PID.
sfs_mount_fg() {
	local ovl=$1 mnt=$2 i
	shift 2
	mkdir -p "$mnt"
	"$STREAMFS" -f "$ovl" "$mnt" "$@" 2>>"$T/daemon.err" &
	SFS_PID=$!
	for ((i = 0; i < 400; i++)); do
		mountpoint -q "$mnt" && [ -e "$mnt/control/status" ] && return 0
		alive "$SFS_PID" || fail "daemon exited before mounting: $(tail -5 "$T/daemon.err")"
		sleep 0.025
	done
	fail "$mnt not mounted after 10 s"
}

# sfs_wait_exit: wait for sfs_mount_fg's daemon to exit (after an unmount)
# and set SFS_RC to its exit status (128+N: killed by signal N).
# shellcheck disable=SC2034 # SFS_RC is for the caller
sfs_wait_exit() {
	local pid=$SFS_PID
	wait_gone "$pid" 60 || fail "daemon $pid did not exit after unmount"
	SFS_RC=0
	wait "$pid" || SFS_RC=$?
	SFS_PID=
}

# sfs_umount MNT: unmount and wait for the daemon to exit (it flushes).
sfs_umount() {
	local mnt=$1 pid=${SFS_PID:-}
	fusermount3 -u "$mnt"
	if [ -n "$pid" ]; then
		local i
		for ((i = 0; i < 600; i++)); do
			alive "$pid" || break
			sleep 0.05
		done
		alive "$pid" && fail "daemon $pid did not exit after unmount"
	fi
	SFS_PID=
}

# sfs_kill9 MNT: crash the daemon and clean the dead mount.
sfs_kill9() {
	local mnt=$1 sup
	# The whole daemon: the server, and its supervisor, which would
	# otherwise start a new server (crash failover; see test-failover.sh).
	sup=$(cat "$T/pid.supervisor" 2>/dev/null) || true
	kill -9 ${sup:+"$sup"} "$SFS_PID"
	while alive "$SFS_PID" || { [ -n "$sup" ] && alive "$sup"; }; do sleep 0.02; done
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
# new_server OLD_PID: under crash failover, print the server pid in $T/pid
# once it differs from OLD_PID and is alive (5 s at most; else fail 1).
new_server() {
	local old=$1 p i
	for ((i = 0; i < 500; i++)); do
		p=$(cat "$T/pid" 2>/dev/null) || true
		if [ -n "$p" ] && [ "$p" != "$old" ] && alive "$p"; then
			echo "$p"
			return 0
		fi
		sleep 0.01
	done
	return 1
}

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

# wait_offset MNT BYTES [TIMEOUT_S]: wait until the running job has covered
# BYTES of the disk (control/progress). Fails if the job stops running first.
wait_offset() {
	local mnt=$1 want=$2 t=${3:-120} i off len pct st
	for ((i = 0; i < t * 50; i++)); do
		read -r st <"$mnt/control/stream"
		read -r off len pct <"$mnt/control/progress"
		[ "$st" = running ] || fail "job $st at $off of $len before reaching $want (error: $(field "$mnt" error))"
		[ "$off" -ge "$want" ] && return 0
		sleep 0.02
	done
	fail "job at $off of $len ($pct), never reached $want"
}

# http_serve DIR: serve DIR over HTTP with a private nginx on a free
# 127.0.0.1 port, stopped by PID at exit. Sets HTTP_URL. Returns 1 and
# sets HTTP_ERR if nginx, curl or python3 is missing or nginx does not start
# (callers skip); in CI those fail instead ("CI: missing nginx"). Fails if
# nginx starts but does not answer.
# shellcheck disable=SC2034 # HTTP_URL, HTTP_ERR are for the caller
http_serve() {
	local root=$1 ngx=$T/ngx port="" i
	HTTP_ERR=
	for i in nginx curl python3; do
		command -v $i >/dev/null 2>&1 && continue
		[ -z "${CI:-}" ] || fail "CI: missing $i"
		HTTP_ERR="needs $i"
		return 1
	done
	mkdir -p "$ngx"
	chmod 755 "$T" "$root" # nginx workers run as an unprivileged user
	# The port is free when probed; another process may take it before
	# nginx binds it, hence the retries.
	for i in 1 2 3; do
		port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
		cat >"$ngx/nginx.conf" <<NGX
daemon on;
pid $ngx/nginx.pid;
error_log $ngx/error.log;
worker_processes 1;
events { worker_connections 64; }
http {
	access_log off;
	client_body_temp_path $ngx;
	proxy_temp_path $ngx;
	fastcgi_temp_path $ngx;
	uwsgi_temp_path $ngx;
	scgi_temp_path $ngx;
	server {
		listen 127.0.0.1:$port;
		root $root;
	}
}
NGX
		nginx -c "$ngx/nginx.conf" -p "$ngx" 2>"$ngx/start.log" && break
		port=""
	done
	if [ -z "$port" ]; then
		HTTP_ERR="nginx does not start: $(cat "$ngx/start.log")"
		[ -z "${CI:-}" ] || fail "CI: $HTTP_ERR"
		return 1
	fi
	cleanup_fn http_stop
	HTTP_URL=http://127.0.0.1:$port
	# The daemonised master writes its pid file after nginx returns.
	for ((i = 0; i < 100; i++)); do
		[ -s "$ngx/nginx.pid" ] && curl -s -o /dev/null "$HTTP_URL/" && return 0
		sleep 0.05
	done
	fail "nginx not serving on $HTTP_URL: $(cat "$ngx/error.log")"
}

# http_stop: stop http_serve's nginx (by the PID in its pid file), wait for
# it. It runs at exit: first unmount, since a daemon whose server is gone
# retries its requests before it exits.
http_stop() {
	local pid i
	umount_all
	pid=$(cat "$T/ngx/nginx.pid" 2>/dev/null) || return 0
	kill "$pid" 2>/dev/null || return 0
	for ((i = 0; i < 100; i++)); do
		alive "$pid" || return 0
		sleep 0.05
	done
	echo "nginx $pid did not stop" >&2
}
