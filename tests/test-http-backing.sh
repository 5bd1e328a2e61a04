#!/bin/bash
# HTTP backing images served by a real nginx on 127.0.0.1 (started here,
# stopped by PID): raw, qcow2 and QED backings over HTTP; full read compare;
# stream to completion, after which the overlay no longer references the URL;
# -o backing=URL overrides the header for one mount.
# formats: qcow2 qed
. "$(dirname "$0")/functions.sh"
requires qemu-img fusermount3 nginx curl python3

mkdir -p "$T/www"
mkbacking "$T/www/base.raw" 32
qemu-img convert -f raw -O qcow2 "$T/www/base.raw" "$T/www/base.qcow2"
qemu-img convert -f raw -O qed "$T/www/base.raw" "$T/www/base.qed"
http_serve "$T/www" || skip "$HTTP_ERR"
url=$HTTP_URL
curl -sf -r 0-0 "$url/base.raw" -o /dev/null || fail "nginx does not serve base.raw"

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
