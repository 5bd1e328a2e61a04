#!/bin/bash
# Overlays made by qemu-img (qcow2 v2 and v3, cluster sizes 512 B to 2 MiB;
# QED 4 KiB to 1 MiB) over raw and qcow2 backings, with data already written
# by qemu-io: mounted by streamfs, read, written, streamed; afterwards
# qemu-img check is clean and qemu-img compare matches a reference.
. "$(dirname "$0")/functions.sh"
requires qemu-img qemu-io fusermount3

randfile "$T/base.raw" 8
qemu-img convert -f raw -O qcow2 -c "$T/base.raw" "$T/base-compressed.qcow2"
run_case() { # fmt opts backing backing_fmt
	local fmt=$1 opts=$2 b=$3 bf=$4 name
	name=$(echo "$fmt-$opts" | tr ',=' '__')
	qemu-img create -q -f "$fmt" -o "$opts" -b "$b" -F "$bf" "$T/$name" 8M
	qemu-io -f "$fmt" -c "write -P 0x11 1000k 300k" -c "write -z 3M 1M" "$T/$name" >/dev/null
	qemu-img convert -O raw "$T/$name" "$T/ref.raw"
	sfs_mount "$T/$name" "$T/mnt"
	cmp "$T/mnt/disk" "$T/ref.raw" || fail "$name: read differs"
	head -c 70000 /dev/urandom >"$T/chunk"
	dd if="$T/chunk" of="$T/mnt/disk" bs=70000 seek=12345 oflag=seek_bytes conv=notrunc status=none
	dd if="$T/chunk" of="$T/ref.raw" bs=70000 seek=12345 oflag=seek_bytes conv=notrunc status=none
	echo start >"$T/mnt/control/stream"
	wait_state "$T/mnt" completed
	cmp "$T/mnt/disk" "$T/ref.raw" || fail "$name: differs after stream"
	sfs_umount "$T/mnt"
	FMT=$fmt qcheck "$T/$name"
	qemu-img compare -f "$fmt" -F raw "$T/$name" "$T/ref.raw" >/dev/null || fail "$name: compare"
	qemu-img info "$T/$name" | grep -q "backing file" && fail "$name: backing left"
	info "$name over $bf: ok"
}
for cs in 512 4096 65536 2097152; do
	run_case qcow2 "cluster_size=$cs,compat=1.1" "$T/base.raw" raw
	run_case qcow2 "cluster_size=$cs,compat=0.10" "$T/base.raw" raw
done
run_case qcow2 "refcount_bits=1" "$T/base.raw" raw
run_case qcow2 "refcount_bits=64" "$T/base.raw" raw
run_case qcow2 "cluster_size=65536" "$T/base-compressed.qcow2" qcow2
for cs in 4096 65536 1048576; do
	run_case qed "cluster_size=$cs" "$T/base.raw" raw
done
run_case qed "cluster_size=65536" "$T/base-compressed.qcow2" qcow2
echo ok
