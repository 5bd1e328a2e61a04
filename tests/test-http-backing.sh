#!/bin/bash
# HTTP backing images served by a real nginx on 127.0.0.1 (started here,
# stopped by PID): raw, qcow2 and QED backings over HTTP; full read compare;
# stream to completion, after which the overlay no longer references the URL;
# -o backing=URL overrides the header for one mount.
# formats: qcow2 qed
. "$(dirname "$0")/functions.sh"
requires qemu-img fusermount3 nginx curl

mkdir -p "$T/www" "$T/ngx"
chmod 755 "$T" "$T/www" # nginx workers run as an unprivileged user
mkbacking "$T/www/base.raw" 32
qemu-img convert -f raw -O qcow2 "$T/www/base.raw" "$T/www/base.qcow2"
qemu-img convert -f raw -O qed "$T/www/base.raw" "$T/www/base.qed"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$T/ngx/nginx.conf" <<NGX
daemon on;
pid $T/ngx/nginx.pid;
error_log $T/ngx/error.log;
worker_processes 1;
events { worker_connections 64; }
http {
	access_log off;
	client_body_temp_path $T/ngx;
	proxy_temp_path $T/ngx;
	fastcgi_temp_path $T/ngx;
	uwsgi_temp_path $T/ngx;
	scgi_temp_path $T/ngx;
	server {
		listen 127.0.0.1:$port;
		root $T/www;
	}
}
NGX
nginx -c "$T/ngx/nginx.conf" -p "$T/ngx" 2>"$T/ngx/start.log" || skip "nginx does not start: $(cat "$T/ngx/start.log")"
cleanup_fn 'kill $(cat "$T/ngx/nginx.pid") 2>/dev/null'
url=http://127.0.0.1:$port
for i in $(seq 1 50); do curl -sf -r 0-0 "$url/base.raw" -o /dev/null && break; sleep 0.1; done
curl -sf -r 0-0 "$url/base.raw" -o /dev/null || fail "nginx not serving: $(cat "$T/ngx/error.log")"

for b in raw qcow2 qed; do
	"$STREAMFS" create -f "$FMT" -b "$url/base.$b" -F $b "$T/ovl-$b" >/dev/null ||
		fail "create over $url/base.$b"
	qemu-img info -U "$T/ovl-$b" | grep -q "backing file: $url/base.$b" || fail "URL not recorded"
	sfs_mount "$T/ovl-$b" "$T/mnt"
	cmp "$T/mnt/disk" "$T/www/base.raw" || fail "read over HTTP ($b) differs"
	echo start >"$T/mnt/control/stream"
	wait_state "$T/mnt" completed
	[ "$(field "$T/mnt" network_bytes)" -gt 0 ] || [ $b != raw ] || fail "no network bytes counted"
	cmp "$T/mnt/disk" "$T/www/base.raw" || fail "content differs after streaming $b"
	sfs_umount "$T/mnt"
	qemu-img info "$T/ovl-$b" | grep -q "backing file" && fail "overlay still references the URL"
	qcheck_crash "$T/ovl-$b"
	info "$b over HTTP: ok"
done

# -o backing=URL for one mount (the header names a file that does not exist).
"$STREAMFS" create -f "$FMT" -b "$T/www/base.raw" -F raw "$T/ovl-o" >/dev/null
mv "$T/www/base.raw" "$T/www/moved.raw"
sfs_mount "$T/ovl-o" "$T/mnt" -o backing=$url/moved.raw
cmp "$T/mnt/disk" "$T/www/moved.raw" || fail "backing= override differs"
sfs_umount "$T/mnt"
# A URL that is not there: a clear error at mount.
"$STREAMFS" create -f "$FMT" -b "$url/nothere.raw" -F raw "$T/ovl-404" 2>"$T/err" && fail "create over a 404 succeeded"
echo ok
