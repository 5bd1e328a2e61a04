#!/bin/bash
# Files that cannot hold a disk are refused at once, by name and kind,
# never waited on: a FIFO (open() would block until a writer comes), a
# socket, a character device or a directory, as the overlay, as a backing
# named in its header or as the backing of 'streamfs create'. An empty file
# is never a disk. A raw image (no overlay format) is refused read-write
# with the two ways out named, and served with -o ro.
# formats: qcow2 qed
. "$(dirname "$0")/functions.sh"
requires qemu-img fusermount3 timeout
mkdir -p "$T/mnt"

# expect_fail STATUS PATTERN CMD...: CMD exits STATUS within 20 s with
# PATTERN on stderr (case-insensitive) and leaves no mount.
expect_fail() {
	local want=$1 pat=$2 rc=0
	shift 2
	timeout -k 5 20 "$@" >"$T/out" 2>&1 || rc=$?
	[ $rc -ne 124 ] && [ $rc -ne 137 ] || fail "'$*' hung (killed after 20 s)"
	[ $rc -eq "$want" ] || fail "'$*' exited $rc, not $want: $(cat "$T/out")"
	grep -qi -- "$pat" "$T/out" || fail "'$*': message lacks '$pat': $(cat "$T/out")"
	mountpoint -q "$T/mnt" && fail "'$*' left a mount"
	return 0
}

mkfifo "$T/fifo"
mkdir "$T/dir"
touch "$T/empty"
randfile "$T/disk.raw" 4
cp "$T/disk.raw" "$T/disk.orig"
special=("fifo:FIFO" "dir:directory" "/dev/null:character device")
if command -v python3 >/dev/null 2>&1; then
	python3 -c "import socket; socket.socket(socket.AF_UNIX).bind('$T/sock')"
	special+=("sock:socket")
fi

for s in "${special[@]}"; do
	f=${s%%:*} kind=${s#*:}
	[[ $f == /* ]] || f=$T/$f
	# As the backing of a new overlay: refused, nothing created.
	expect_fail 2 "$f: .*$kind" "$STREAMFS" create -f "$FMT" -b "$f" -F raw "$T/new" 8M
	[ -e "$T/new" ] && fail "create over $f left an overlay"
	# As the backing named in an overlay's header.
	rm -f "$T/ovl"
	qemu-img create -q -f "$FMT" -b "$f" -F raw -u "$T/ovl" 8M
	expect_fail 2 "$f: .*$kind" "$STREAMFS" "$T/ovl" "$T/mnt"
	expect_fail 2 "$f: .*$kind" "$STREAMFS" "$T/ovl" "$T/mnt" -o ro
	# As the image itself.
	expect_fail 2 "$f: .*$kind" "$STREAMFS" "$f" "$T/mnt" -o ro
done
expect_fail 2 "fifo: .*FIFO" "$STREAMFS" "$T/fifo" "$T/mnt"

# An empty file is no disk, in any mode and as a backing.
expect_fail 2 "empty: .*empty" "$STREAMFS" "$T/empty" "$T/mnt"
expect_fail 2 "empty: .*empty" "$STREAMFS" "$T/empty" "$T/mnt" -o ro
expect_fail 2 "empty: .*empty" "$STREAMFS" create -f "$FMT" -b "$T/empty" -F raw "$T/new" 8M
[ -e "$T/new" ] && fail "create over an empty file left an overlay"

# A raw image is not an overlay: refused read-write, naming both fixes...
expect_fail 2 "streamfs create -b .*disk.raw -F raw" "$STREAMFS" "$T/disk.raw" "$T/mnt"
grep -q -- "-o ro" "$T/out" || fail "no '-o ro' in: $(cat "$T/out")"
expect_fail 2 "not an overlay" "$STREAMFS" "$T/disk.raw" "$T/mnt" -o format=raw
cmp "$T/disk.raw" "$T/disk.orig" || fail "a refused mount changed the raw image"
# ...and each fix works.
sfs_mount "$T/disk.raw" "$T/mnt" -o ro
cmp "$T/mnt/disk" "$T/disk.orig" || fail "raw image served read-only differs"
sfs_umount "$T/mnt"
"$STREAMFS" create -f "$FMT" -b "$T/disk.raw" -F raw "$T/ovl2" >/dev/null
sfs_mount "$T/ovl2" "$T/mnt"
head -c 65536 /dev/urandom >"$T/chunk"
dd if="$T/chunk" of="$T/mnt/disk" bs=65536 seek=3 conv=notrunc status=none
sfs_umount "$T/mnt"
cmp "$T/disk.raw" "$T/disk.orig" || fail "a write through the overlay changed its backing"
echo ok
