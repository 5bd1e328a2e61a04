#!/bin/bash
# -o mirror=URL: the backing served by two nginx (the backing URL and a
# mirror, same file, same ETag). The stream job runs over both; the mirror
# is killed mid-stream (status: down), restarted (status: up again), then
# the backing URL's server is killed for good; guest reads and the stream
# complete without an error, with the bytes of the backing. A
# mirror serving other bytes under the same name (another ETag), or a file
# of another size, is refused at mount.
# formats: qcow2
. "$(dirname "$0")/functions.sh"
requires qemu-img fusermount3 nginx curl python3

# A second nginx serving ROOT: ngx2_start ROOT DIR [PORT] (a free port by
# default; the same one to come back). Sets NGX2_URL; its pid file is
# DIR/nginx.pid. ngx2_stop DIR stops it and waits.
ngx2_start() {
	local root=$1 dir=$2 port=${3:-} i
	mkdir -p "$dir"
	chmod 755 "$root"
	[ -n "$port" ] || port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
	cat >"$dir/nginx.conf" <<NGX
daemon on;
pid $dir/nginx.pid;
error_log $dir/error.log;
worker_processes 1;
events { worker_connections 64; }
http {
	access_log off;
	client_body_temp_path $dir;
	proxy_temp_path $dir;
	fastcgi_temp_path $dir;
	uwsgi_temp_path $dir;
	scgi_temp_path $dir;
	server {
		listen 127.0.0.1:$port;
		root $root;
	}
}
NGX
	rm -f "$dir/nginx.pid"
	for ((i = 0; i < 50; i++)); do
		nginx -c "$dir/nginx.conf" -p "$dir" 2>"$dir/start.log" && break
		sleep 0.1 # the port of a killed instance may take a moment to free
	done
	NGX2_URL=http://127.0.0.1:$port
	for ((i = 0; i < 100; i++)); do
		[ -s "$dir/nginx.pid" ] && curl -s -o /dev/null "$NGX2_URL/" && return 0
		sleep 0.05
	done
	fail "second nginx not serving on $NGX2_URL: $(cat "$dir/start.log" "$dir/error.log" 2>/dev/null)"
}

ngx2_stop() {
	local pid
	pid=$(cat "$1/nginx.pid" 2>/dev/null) || return 0
	kill "$pid" 2>/dev/null || return 0
	wait_gone "$pid" 10 || echo "nginx $pid did not stop" >&2
}

# mirror_state MNT I: the state of server I in control/status.
mirror_state() { awk -v k="mirror_$2:" '$1 == k {print $2}' "$1/control/status"; }
mirror_is() { [ "$(mirror_state "$1" "$2")" = "$3" ]; }

mkdir -p "$T/www1" "$T/www2" "$T/www3" "$T/www4"
mkbacking "$T/www1/base.raw" 64
cp -p "$T/www1/base.raw" "$T/www2/base.raw" # same size and mtime: same ETag
randfile "$T/www3/base.raw" 64             # same name and size, other bytes
touch -d '2020-01-01 00:00:00' "$T/www3/base.raw"
head -c $((63 * 1024 * 1024)) "$T/www1/base.raw" >"$T/www4/base.raw"
touch -r "$T/www1/base.raw" "$T/www4/base.raw" # same mtime, other size

http_serve "$T/www1" || skip "$HTTP_ERR"
url1=$HTTP_URL
ngx2_start "$T/www2" "$T/ngx2"
cleanup_fn ngx2_stop "$T/ngx2"
url2=$NGX2_URL
port2=${url2##*:}
ngx2_start "$T/www3" "$T/ngx3"
cleanup_fn ngx2_stop "$T/ngx3"
url3=$NGX2_URL
ngx2_start "$T/www4" "$T/ngx4"
cleanup_fn ngx2_stop "$T/ngx4"
url4=$NGX2_URL
e1=$(curl -sI "$url1/base.raw" | awk 'tolower($1) == "etag:" {print $2}')
e2=$(curl -sI "$url2/base.raw" | awk 'tolower($1) == "etag:" {print $2}')
{ [ -n "$e1" ] && [ "$e1" = "$e2" ]; } || fail "the two servers do not agree on the ETag ($e1, $e2)"

"$STREAMFS" create -f "$FMT" -b "$url1/base.raw" -F raw "$T/ovl" >/dev/null

# Refused at mount: other bytes (another ETag), another size. Exit 2.
mkdir -p "$T/mnt"
for bad in "$url3" "$url4"; do
	rc=0
	"$STREAMFS" "$T/ovl" "$T/mnt" -o "mirror=$url2/base.raw,mirror=$bad/base.raw" \
		2>"$T/err" || rc=$?
	mountpoint -q "$T/mnt" && fail "mounted with the mirror $bad"
	[ $rc -eq 2 ] || fail "mirror $bad: exit $rc, expected 2: $(cat "$T/err")"
	grep -q "mirror $bad/base.raw refused: it serves another version" "$T/err" ||
		fail "no clear message for $bad: $(cat "$T/err")"
done
info "refused at mount: $(head -1 "$T/err")"

# The stream job over both servers, slow enough to outlive the mirror's
# down period (5 s) once it is back.
sfs_mount "$T/ovl" "$T/mnt" -o "mirror=$url2/base.raw,speed=4M"
[ "$(field "$T/mnt" mirrors)" = 1 ] || fail "status: mirrors is not 1: $(grep mirror "$T/mnt/control/status")"
grep -q "^mirror_0: up [0-9]* [0-9]* $url1/base.raw\$" "$T/mnt/control/status" ||
	fail "status: no mirror_0 line for the backing URL: $(grep mirror "$T/mnt/control/status")"
grep -q "^mirror_1: up [0-9]* [0-9]* $url2/base.raw\$" "$T/mnt/control/status" ||
	fail "status: no mirror_1 line: $(grep mirror "$T/mnt/control/status")"
echo start >"$T/mnt/control/stream"
wait_offset "$T/mnt" $((12 * 1024 * 1024))
req=$(awk '$1 == "mirror_1:" {print $3}' "$T/mnt/control/status")
[ "$req" -gt 0 ] || fail "no request went to the mirror"

ngx2_stop "$T/ngx2" # the mirror dies mid-stream
wait_until 30 mirror_is "$T/mnt" 1 down || fail "the dead mirror is not down: $(grep mirror "$T/mnt/control/status")"
info "mirror killed: $(grep '^mirror_1:' "$T/mnt/control/status")"
ngx2_start "$T/www2" "$T/ngx2" "$port2"
wait_until 30 mirror_is "$T/mnt" 1 up || fail "the mirror is not back: $(grep mirror "$T/mnt/control/status")"
info "mirror back: $(grep '^mirror_1:' "$T/mnt/control/status")"
[ "$(field "$T/mnt" state)" = running ] || fail "the job stopped: $(field "$T/mnt" error)"

# Now the backing URL's own server dies: the mirror carries the rest, and
# guest reads meanwhile (cmp) see no error either.
pid1=$(cat "$T/ngx/nginx.pid")
kill "$pid1"
wait_gone "$pid1" 10 || fail "nginx $pid1 did not stop"
wait_until 30 mirror_is "$T/mnt" 0 down || fail "the dead backing server is not down: $(grep mirror "$T/mnt/control/status")"
cmp "$T/mnt/disk" "$T/www1/base.raw" || fail "guest reads differ while the backing server is dead"
echo 0 >"$T/mnt/control/speed"
wait_state "$T/mnt" completed
[ "$(field "$T/mnt" error)" = - ] || fail "job error: $(field "$T/mnt" error)"
cmp "$T/mnt/disk" "$T/www1/base.raw" || fail "the disk differs from the backing"
sfs_umount "$T/mnt"
qcheck_crash "$T/ovl"
echo ok
