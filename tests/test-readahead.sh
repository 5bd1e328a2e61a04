#!/bin/bash
# Read-ahead over HTTP: a cold O_DIRECT reader of 4 KiB blocks (QEMU
# cache=none does the same) costs a handful of HTTP requests, not one per
# overlay cluster: copy-on-read misses that continue a sequential stream
# fetch a growing window ahead. Requests are counted in nginx's access log;
# the bytes read equal the backing. A random reader gets no read-ahead.
# formats: qcow2 qed
. "$(dirname "$0")/functions.sh"
requires fusermount3 nginx curl python3 dd cmp

mkdir -p "$T/www"
randfile "$T/www/base.raw" 16
http_serve "$T/www" || skip "$HTTP_ERR"

# The suite's nginx logs nothing: turn its access log on and reload it,
# then wait until a probe request shows up there.
log=$T/ngx/access.log
sed -i "s|access_log off;|access_log $log;|" "$T/ngx/nginx.conf"
nginx -c "$T/ngx/nginx.conf" -p "$T/ngx" -s reload 2>"$T/reload.err" ||
	fail "nginx reload: $(cat "$T/reload.err")"
probe() {
	curl -s -o /dev/null "$HTTP_URL/probe-$1"
	grep -q "probe-$1" "$log" 2>/dev/null
}
wait_until 10 probe 1 || fail "nginx access log never appeared"
# Requests for the backing so far.
requests() { grep -c 'base\.raw' "$log" || true; }

"$STREAMFS" create -f "$FMT" -b "$HTTP_URL/base.raw" -F raw "$T/ovl" >/dev/null
sfs_mount "$T/ovl" "$T/mnt"
before=$(requests)
start=$(date +%s%N)
dd if="$T/mnt/disk" of="$T/out" bs=4k iflag=direct count=4096 status=none ||
	fail "dd from disk"
ms=$((($(date +%s%N) - start) / 1000000))
# The access log is written when a request completes: all of them have.
n=$(($(requests) - before))
cmp "$T/out" "$T/www/base.raw" || fail "sequential read differs from the backing"
info "4096 sequential 4 KiB O_DIRECT reads: $n HTTP requests, $ms ms"
# One request per 64 KiB cluster would be 256; with read-ahead about 10.
[ "$n" -le 32 ] || fail "$n HTTP requests for 4096 sequential reads (read-ahead off?)"
ra=$(field "$T/mnt" readahead_bytes)
[ -z "$ra" ] || [ "$ra" -gt 0 ] || fail "readahead_bytes is 0"
sfs_umount "$T/mnt"

# A random reader (stride of 37 clusters): no read-ahead, one request per read.
"$STREAMFS" create -f "$FMT" -b "$HTTP_URL/base.raw" -F raw "$T/ovl2" >/dev/null
sfs_mount "$T/ovl2" "$T/mnt"
before=$(requests)
for i in $(seq 1 40); do
	blk=$((i * 37 % 256 * 16))
	dd if="$T/mnt/disk" of="$T/blk" bs=4k iflag=direct skip=$blk count=1 status=none ||
		fail "dd at block $blk"
	cmp -s "$T/blk" <(dd if="$T/www/base.raw" bs=4k skip=$blk count=1 status=none) ||
		fail "random read at block $blk differs"
done
n=$(($(requests) - before))
info "40 random 4 KiB reads: $n HTTP requests"
[ "$n" -eq 40 ] || fail "$n HTTP requests for 40 random reads of distinct clusters"
ra=$(field "$T/mnt" readahead_bytes)
[ -z "$ra" ] || [ "$ra" = 0 ] || fail "random reads read ahead $ra bytes"
sfs_umount "$T/mnt"
qcheck "$T/ovl"
echo ok
