#!/bin/bash
# Regenerate the seed corpora of the fuzz harnesses from images made by
# qemu-img/qemu-io (small virtual sizes so every file stays small).
set -euo pipefail
cd "$(dirname "$0")"
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
mkdir -p corpus-qcow2 corpus-qed corpus-control
head -c 65536 /dev/urandom >"$T/base.raw"
n=0
for opts in "compat=1.1" "compat=0.10" "cluster_size=512" "cluster_size=4096" \
	"refcount_bits=1" "refcount_bits=64" "lazy_refcounts=on"; do
	qemu-img create -q -f qcow2 -o "$opts" -b "$T/base.raw" -F raw "$T/i.qcow2" 1M
	qemu-io -f qcow2 -c "write -P 0x11 0 8k" -c "write -z 64k 64k" -c "write -P 3 700k 5k" \
		"$T/i.qcow2" >/dev/null
	cp "$T/i.qcow2" "corpus-qcow2/seed-$n"
	n=$((n + 1))
done
qemu-img convert -c -f raw -O qcow2 "$T/base.raw" "$T/c.qcow2"
cp "$T/c.qcow2" corpus-qcow2/seed-compressed
for cs in 4096 65536; do
	qemu-img create -q -f qed -o cluster_size=$cs,table_size=2 -b "$T/base.raw" -F raw "$T/i.qed" 1M
	qemu-io -f qed -c "write -P 0x22 0 8k" -c "write -z 64k 64k" "$T/i.qed" >/dev/null
	cp "$T/i.qed" "corpus-qed/seed-$cs"
done
printf 'start base=/img/t.qcow2 speed=20M on-error=stop\n' >corpus-control/start
printf 'pause\n' >corpus-control/pause
printf '0x100000 1M\n' >corpus-control/pull
printf '50M\n' >corpus-control/speed
echo "corpus: $(ls corpus-qcow2 | wc -l) qcow2, $(ls corpus-qed | wc -l) qed, $(ls corpus-control | wc -l) control"
