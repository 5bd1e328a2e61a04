#!/bin/bash
# A backing URL's secrets never reach the control files, which every user of
# an allow_other mount can read: a signed URL's query (?token=...) is shown
# as token=*** in control/status (backing:, chain:, base:), control/map and
# "streamfs status"/"streamfs map", while the URL itself keeps working.
. "$(dirname "$0")/functions.sh"
requires qemu-img fusermount3 nginx curl python3

mkdir -p "$T/www"
mkbacking "$T/www/base.raw" 8
http_serve "$T/www" || {
	[ -z "${CI:-}" ] || fail "$HTTP_ERR"
	skip "$HTTP_ERR"
}
burl="$HTTP_URL/base.raw?token=SECRET1&sig=SECRET2"
"$STREAMFS" create -f qcow2 -b "$burl" -F raw "$T/ovl" >/dev/null || fail "create over $burl"
# No copy-on-read: the map keeps naming the URL for the backing's data.
sfs_mount "$T/ovl" "$T/mnt" -o copy_on_read=off
cmp "$T/mnt/disk" "$T/www/base.raw" || fail "read through the signed URL differs"
# base= names the layer by its full URL, secret included; it is shown masked.
# Streaming down to the backing itself copies nothing and keeps the chain.
echo "start base=$burl" >"$T/mnt/control/stream"
wait_state "$T/mnt" completed
for f in status map; do
	cat "$T/mnt/control/$f" >"$T/$f.out"
	"$STREAMFS" "$f" "$T/mnt" >"$T/cli-$f.out" || fail "streamfs $f failed"
	for out in "$T/$f.out" "$T/cli-$f.out"; do
		grep -q SECRET "$out" && fail "$f shows the secret: $(grep SECRET "$out")"
		grep -q "base.raw?token=\*\*\*&sig=\*\*\*" "$out" || fail "$f lacks the masked URL: $(cat "$out")"
	done
done
grep -q "^backing: $HTTP_URL/base.raw?token=\*\*\*&sig=\*\*\*$" "$T/status.out" ||
	fail "backing: $(grep '^backing:' "$T/status.out")"
grep -q "^base: $HTTP_URL/base.raw?token=\*\*\*&sig=\*\*\*$" "$T/status.out" ||
	fail "base: $(grep '^base:' "$T/status.out")"
grep -q "^chain: $T/ovl (qcow2) <- $HTTP_URL/base.raw?token=\*\*\*&sig=\*\*\* (raw)$" \
	"$T/status.out" || fail "chain: $(grep '^chain:' "$T/status.out")"
sfs_umount "$T/mnt"
echo ok
