#!/bin/bash
# Bad input gets a clear error, a non-zero exit status and loses nothing:
# missing/corrupt/truncated images, unsupported features, backing loops,
# missing backings, locked overlays, paths inside the mountpoint, bad options.
# A raw backing that looks like qcow2 is never probed as qcow2.
# formats: qcow2 qed
. "$(dirname "$0")/functions.sh"
requires qemu-img fusermount3
mkdir -p "$T/mnt"

# expect_fail STATUS PATTERN CMD...: CMD exits STATUS with PATTERN on stderr.
expect_fail() {
	local want=$1 pat=$2 rc=0
	shift 2
	"$@" >"$T/out" 2>&1 || rc=$?
	[ $rc -eq "$want" ] || fail "'$*' exited $rc, not $want: $(cat "$T/out")"
	grep -qi -- "$pat" "$T/out" || fail "'$*': message lacks '$pat': $(cat "$T/out")"
	mountpoint -q "$T/mnt" && fail "'$*' left a mount"
	return 0
}

"$STREAMFS" --help | grep -q "usage: streamfs" || fail "--help"
"$STREAMFS" --version | grep -q "streamfs" || fail "--version"
expect_fail 1 "missing" "$STREAMFS"
expect_fail 2 "No such file" "$STREAMFS" "$T/nothere" "$T/mnt"
expect_fail 1 "bad\|invalid\|must" "$STREAMFS" "$T/nothere" "$T/mnt" -o copy_on_read=maybe

randfile "$T/base.raw" 4
"$STREAMFS" create -f "$FMT" -b "$T/base.raw" -F raw "$T/ovl" >/dev/null
cp "$T/ovl" "$T/ovl.orig"

# Missing backing: named in the message.
mv "$T/base.raw" "$T/base.away"
expect_fail 2 "base.raw" "$STREAMFS" "$T/ovl" "$T/mnt"
mv "$T/base.away" "$T/base.raw"
cmp "$T/ovl" "$T/ovl.orig" || fail "a failed mount changed the overlay"

# Corrupt headers: bad magic/version/cluster size, truncated file.
cp "$T/ovl.orig" "$T/bad1"; printf '\xff\xff\xff\xff' | dd of="$T/bad1" bs=1 seek=4 conv=notrunc status=none
cp "$T/ovl.orig" "$T/bad2"; printf '\x7f' | dd of="$T/bad2" bs=1 seek=$([ "$FMT" = qcow2 ] && echo 23 || echo 6) conv=notrunc status=none
head -c 100 "$T/ovl.orig" >"$T/bad3"
for b in bad1 bad2 bad3; do
	expect_fail 2 "$b" "$STREAMFS" "$T/$b" "$T/mnt" -o format=$FMT
done

# Tables past the end of the file.
if [ "$FMT" = qcow2 ]; then
	cp "$T/ovl.orig" "$T/bad4"
	# l1_table_offset (bytes 40..47) far past EOF
	printf '\x00\x00\x00\x10\x00\x00\x00\x00' | dd of="$T/bad4" bs=1 seek=40 conv=notrunc status=none
	expect_fail 2 "l1\|L1" "$STREAMFS" "$T/bad4" "$T/mnt"
	# External data file and unknown incompatible bits are refused by name.
	qemu-img create -q -f qcow2 -o data_file="$T/data.raw" "$T/ext.qcow2" 4M
	expect_fail 2 "data file" "$STREAMFS" "$T/ext.qcow2" "$T/mnt"
	cp "$T/ovl.orig" "$T/bad5"
	printf '\x00\x00\x00\x00\x00\x00\x80\x00' | dd of="$T/bad5" bs=1 seek=72 conv=notrunc status=none
	expect_fail 2 "incompatible\|feature" "$STREAMFS" "$T/bad5" "$T/mnt"
else
	cp "$T/ovl.orig" "$T/bad4"
	# l1_table_offset (bytes 40..47) far past EOF
	printf '\x00\x00\x00\x10\x00\x00\x00\x00' | dd of="$T/bad4" bs=1 seek=40 conv=notrunc status=none
	expect_fail 2 "l1\|L1\|table" "$STREAMFS" "$T/bad4" "$T/mnt"
	cp "$T/ovl.orig" "$T/bad5"
	# features (bytes 16..23): an unknown incompatible bit
	printf '\x00\x00\x00\x00\x00\x01\x00\x00' | dd of="$T/bad5" bs=1 seek=16 conv=notrunc status=none
	expect_fail 2 "feature" "$STREAMFS" "$T/bad5" "$T/mnt"
fi

# Backing loop: a <- b <- a.
qemu-img create -q -f qcow2 -b "$T/loop-b.qcow2" -F qcow2 -u "$T/loop-a.qcow2" 4M
qemu-img create -q -f qcow2 -b "$T/loop-a.qcow2" -F qcow2 -u "$T/loop-b.qcow2" 4M
expect_fail 2 "loop" "$STREAMFS" "$T/loop-a.qcow2" "$T/mnt"
# Overlay naming itself.
qemu-img create -q -f qcow2 -b "$T/other.qcow2" -F qcow2 -u "$T/self.qcow2" 4M
qemu-img rebase -q -u -f qcow2 -b "self.qcow2" -F qcow2 "$T/self.qcow2"
expect_fail 2 "loop" "$STREAMFS" "$T/self.qcow2" "$T/mnt"
# Unknown scheme and json: pseudo-URLs.
qemu-img create -q -f qcow2 -b "ftp://example.com/x.raw" -F raw -u "$T/ftp.qcow2" 4M
expect_fail 2 "scheme\|ftp" "$STREAMFS" "$T/ftp.qcow2" "$T/mnt"

# A raw backing holding a qcow2 header is served as raw bytes (never probed).
qemu-img create -q -f qcow2 "$T/looks.raw" 4M
truncate -s 4M "$T/looks.raw"
"$STREAMFS" create -f "$FMT" -b "$T/looks.raw" -F raw "$T/ovl-looks" >/dev/null
sfs_mount "$T/ovl-looks" "$T/mnt"
cmp "$T/mnt/disk" "$T/looks.raw" || fail "raw backing was not served as raw"
# Locked: a second streamfs and qemu-img (without -U) are refused.
mkdir -p "$T/mnt2"
rc=0; "$STREAMFS" "$T/ovl-looks" "$T/mnt2" 2>"$T/out" || rc=$?
[ $rc -eq 2 ] && grep -qi "in use\|lock" "$T/out" || fail "second mount not refused: $rc $(cat "$T/out")"
if qemu-img info "$T/ovl-looks" >/dev/null 2>&1; then fail "qemu-img opened a locked overlay"; fi
qemu-img info -U "$T/ovl-looks" >/dev/null || fail "qemu-img -U should work"
sfs_umount "$T/mnt"

# Paths inside the mountpoint are refused.
mkdir -p "$T/inner"
cp "$T/ovl.orig" "$T/inner/ovl"
expect_fail 1 "inside the mountpoint" "$STREAMFS" "$T/inner/ovl" "$T"
echo ok
