#!/bin/bash
# fio with verify (O_DIRECT, queue depth) while the stream job runs, then a
# clean SIGTERM shutdown: the overlay is consistent, the job's and fio's data
# are all there, the disk equals backing + fio's writes.
# formats: qcow2 qed
. "$(dirname "$0")/functions.sh"
requires qemu-img fusermount3 fio

mkbacking "$T/base.raw" 64
"$STREAMFS" create -f "$FMT" -b "$T/base.raw" -F raw "$T/ovl" >/dev/null
sfs_mount "$T/ovl" "$T/mnt" -o stream,speed=32M
cd "$T" || fail "cd $T" # fio may drop verify state files in the current directory
engine=libaio
fio --enghelp=io_uring >/dev/null 2>&1 && engine=io_uring
fio --name=v --filename="$T/mnt/disk" --rw=randwrite --bs=4k:64k --size=16m --offset=24m \
	--direct=1 --ioengine=$engine --iodepth=8 --verify=crc32c --do_verify=1 --verify_state_save=0 --randseed=3 \
	--output="$T/fio.txt" >/dev/null || fail "fio verify: $(tail -20 "$T/fio.txt")"
grep -q "err= 0" "$T/fio.txt" || fail "fio reported errors"
# Snapshot the expected content: backing outside fio's region, fio's data in it.
cp "$T/base.raw" "$T/ref.raw"
dd if="$T/mnt/disk" of="$T/ref.raw" bs=1M skip=24 seek=24 count=16 conv=notrunc status=none
echo 0 >"$T/mnt/control/speed"
wait_state "$T/mnt" completed
cmp "$T/mnt/disk" "$T/ref.raw" || fail "disk differs from backing + fio data"
# SIGTERM: a clean shutdown, like unmount. Wait for the daemon to exit
# (alive: an exited daemon stays a zombie that kill -0 still finds).
kill -TERM "$SFS_PID"
for ((i = 0; i < 200; i++)); do
	alive "$SFS_PID" || break
	sleep 0.05
done
alive "$SFS_PID" && fail "daemon ignored SIGTERM"
SFS_PID=
mountpoint -q "$T/mnt" && fail "still mounted after SIGTERM"
qcheck "$T/ovl"
qemu-img compare -f "$FMT" -F raw "$T/ovl" "$T/ref.raw" || fail "overlay differs"
echo ok
