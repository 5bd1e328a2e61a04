#!/bin/bash
# streamfs demo: make a sample backing image, create a qcow2 overlay on it,
# mount it, read a little (copy-on-read), stream the rest in at a limited
# speed while watching the progress bar, then show the overlay stands alone.
set -euo pipefail
cd "$(dirname "$0")"
D=${DEMO_DIR:-/tmp/streamfs-demo}
SIZE_MIB=${DEMO_SIZE_MIB:-512}
SPEED=${DEMO_SPEED:-128M}
fusermount3 -u "$D/mnt" 2>/dev/null || true
rm -rf "$D"
mkdir -p "$D/mnt"
echo "== a ${SIZE_MIB} MiB backing image with data and holes: $D/base.raw"
truncate -s "${SIZE_MIB}M" "$D/base.raw"
for ((i = 0; i < SIZE_MIB; i += 8)); do
	dd if=/dev/urandom of="$D/base.raw" bs=1M seek=$i count=6 conv=notrunc status=none
done
echo "== streamfs create -f qcow2 -b base.raw -F raw vm.qcow2"
./streamfs create -f qcow2 -b base.raw -F raw "$D/vm.qcow2"
echo "== streamfs $D/vm.qcow2 $D/mnt"
./streamfs "$D/vm.qcow2" "$D/mnt"
trap 'fusermount3 -u "$D/mnt" 2>/dev/null || true' EXIT
ls -l "$D/mnt" "$D/mnt/control"
echo "== the guest boots: reads its first 16 MiB (copied on read into the overlay)"
dd if="$D/mnt/disk" of=/dev/null bs=1M count=16 status=none
grep -E '^(state|bytes_copied_on_read|chain):' "$D/mnt/control/status"
echo "== echo 'start speed=$SPEED' > control/stream; streamfs wait"
echo "start speed=$SPEED" >"$D/mnt/control/stream"
./streamfs wait "$D/mnt"
cat "$D/mnt/control/status"
echo "== the disk equals the backing:"
cmp "$D/mnt/disk" "$D/base.raw" && echo "identical"
fusermount3 -u "$D/mnt"
trap - EXIT
sleep 0.5
if command -v qemu-img >/dev/null; then
	echo "== qemu-img info / check of the overlay (no backing file any more):"
	qemu-img info "$D/vm.qcow2"
	qemu-img check "$D/vm.qcow2"
fi
echo "== demo done; files in $D"
