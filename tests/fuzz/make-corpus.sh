#!/bin/bash
# Regenerate the seed corpora of the fuzz harnesses (tests/fuzz/corpus-*):
# qcow2 and QED images made by qemu-img/qemu-io (v2/v3, cluster sizes from
# 512 B to 2 MiB, backing files, data, zero and compressed clusters, dirty,
# corrupt and need-check flags, snapshots, bitmaps, unsupported features,
# truncated copies) and control-file commands. Deterministic for a given
# qemu version, except the snapshot seed (it records the time).
#
# Every seed is at most 64 KiB (make fuzz's -max_len). An image that is
# larger (big clusters put the header, refcount table and L1 table in
# separate clusters far apart) is stored in the harnesses' sparse form
# ("SFZ1", see fuzz-image.h): only its non-zero 512-byte blocks.
set -euo pipefail
command -v qemu-img >/dev/null && command -v qemu-io >/dev/null && command -v python3 >/dev/null ||
	{ echo "make-corpus.sh: needs qemu-img, qemu-io and python3" >&2; exit 77; }
cd "$(dirname "$0")"
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
rm -rf corpus-qcow2 corpus-qed corpus-control
mkdir -p corpus-qcow2 corpus-qed corpus-control
OUT=$(pwd)

cat >"$T/keep.py" <<'PY'
# keep.py SRC DST [TRUNC]: copy SRC (its first TRUNC bytes) to DST, in the
# sparse SFZ1 form when it is over 64 KiB.
import struct, sys
MAX = 65536
data = open(sys.argv[1], 'rb').read()
if len(sys.argv) > 3:
    data = data[:int(sys.argv[3])]
if len(data) <= MAX:
    out = data
else:
    recs, i, blk = [], 0, 512
    while i < len(data):
        if data[i:i + blk].strip(b'\0'):
            j = i
            while j < len(data) and data[j:j + blk].strip(b'\0') and j - i < 65535 - blk:
                j += blk
            chunk = data[i:j].rstrip(b'\0')
            recs.append(struct.pack('<IH', i, len(chunk)) + chunk)
            i = j
        else:
            i += blk
    out = b'SFZ1' + struct.pack('<I', len(data))
    for r in recs:
        if len(out) + len(r) > MAX:
            print('keep.py: %s: sparse form over 64 KiB, dropping its tail' % sys.argv[2],
                  file=sys.stderr)
            break
        out += r
open(sys.argv[2], 'wb').write(out)
PY
keep() { python3 "$T/keep.py" "$1" "$OUT/$2" ${3:+"$3"}; }
# patch FILE OFFSET HEX: overwrite bytes of FILE at OFFSET.
patch() { printf "$(echo "$3" | sed 's/../\\x&/g')" | dd of="$1" bs=1 seek="$2" conv=notrunc status=none; }
io() { local f=$1 fmt=$2; shift 2; local a=(); for c in "$@"; do a+=(-c "$c"); done
	qemu-io -f "$fmt" "${a[@]}" "$f" >/dev/null; }

# Backing files: a raw one (random, then zeros: copy-on-write into big
# clusters copies zeros, which the sparse form drops) and a qcow2 over it.
# Pseudo-random with a fixed seed, so regenerating changes little.
python3 -c 'import random, sys; sys.stdout.buffer.write(random.Random(1).randbytes(4096))' >"$T/base.raw"
truncate -s 128k "$T/base.raw"
cd "$T" # relative backing names: the seeds do not depend on $T
qemu-img create -q -f qcow2 -o cluster_size=512 -b base.raw -F raw "$T/mid.qcow2" 256k
io "$T/mid.qcow2" qcow2 "write -P 0x44 4k 4k"

# ---- qcow2 ----
# q NAME SIZE CREATE-OPTS QEMU-IO-CMDS...: an overlay of mid.qcow2.
q() { local n=$1 size=$2 opts=$3; shift 3
	qemu-img create -q -f qcow2 -o "$opts" -b mid.qcow2 -F qcow2 "$T/$n" "$size"
	[ $# -gt 0 ] && io "$T/$n" qcow2 "$@"
	keep "$T/$n" "corpus-qcow2/$n"; }
W512=("write -P 0x11 0 4k" "write -z 8k 4k" "write -c -P 0x22 16k 512" "write -P 0x33 20000 300"
	"write -c -P 0x55 24k 512" "write -P 0x66 200k 1k")
q v3-512 256k cluster_size=512 "${W512[@]}"
q v2-512 256k compat=0.10,cluster_size=512 "${W512[@]}"
q v3-4k-rc1 1M cluster_size=4096,refcount_bits=1 "write -P 0x11 0 8k" "write -z 64k 64k" \
	"write -c -P 0x22 128k 4k" "write -P 3 700k 5k"
q v3-4k-rc64-lazy 1M cluster_size=4096,refcount_bits=64,lazy_refcounts=on \
	"write -P 0x11 0 8k" "write -z 64k 64k" "write -P 3 1020k 4k"
q v3-1k-rc8 512k cluster_size=1024,refcount_bits=8 "write -P 0x11 0 3k" "write -c -P 7 4k 1k" \
	"write -z 8k 2k" "discard 0 1k"
q v3-64k 1M cluster_size=65536 "write -P 0x11 0 4k" "write -z 64k 64k" "write -c -P 0x22 128k 64k" \
	"write -P 3 1000k 1k"
q v2-64k 1M compat=0.10,cluster_size=65536 "write -P 0x11 0 512" "write -c -P 0x22 64k 64k"
q v3-2m 4M cluster_size=2M "write -P 0x11 0 512" "write -c -P 0x22 2M 2M"
q v3-2m-zero 6M cluster_size=2M "write -z 0 2M" "write -P 0x11 4M 512"
q v3-4k-bigsize 64G cluster_size=4096 "write -P 0x11 0 4k" "write -P 0x12 63G 4k" \
	"write -z 32G 8k"
q v3-16k-extl2 256k cluster_size=16384,extended_l2=on "write -P 0x11 0 2k"
q v3-512-zstd 64k cluster_size=512,compression_type=zstd "write -c -P 1 0 512" 2>/dev/null ||
	echo "make-corpus.sh: no zstd support in qemu-img, skipped" >&2
qemu-img create -q -f qcow2 -o cluster_size=512,data_file=data.raw "$T/v3-512-datafile" 64k
keep "$T/v3-512-datafile" corpus-qcow2/v3-512-datafile
# No backing file: metadata preallocation; snapshots; a persistent bitmap (autoclear bit).
qemu-img create -q -f qcow2 -o cluster_size=512,preallocation=metadata "$T/v3-512-prealloc" 64k
io "$T/v3-512-prealloc" qcow2 "write -P 0x11 0 1k"
keep "$T/v3-512-prealloc" corpus-qcow2/v3-512-prealloc
qemu-img create -q -f qcow2 -o cluster_size=512 "$T/v3-512-snap" 64k
io "$T/v3-512-snap" qcow2 "write -P 0x11 0 2k"
qemu-img snapshot -c snap1 "$T/v3-512-snap"
io "$T/v3-512-snap" qcow2 "write -P 0x12 512 1k"
keep "$T/v3-512-snap" corpus-qcow2/v3-512-snap
qemu-img create -q -f qcow2 -o cluster_size=512 "$T/v3-512-bitmap" 64k
qemu-img bitmap --add "$T/v3-512-bitmap" bm0
io "$T/v3-512-bitmap" qcow2 "write -P 0x11 0 2k"
keep "$T/v3-512-bitmap" corpus-qcow2/v3-512-bitmap
# Compressed image from qemu-img convert.
qemu-img convert -c -f raw -O qcow2 -o cluster_size=4096 "$T/base.raw" "$T/convert-c"
keep "$T/convert-c" corpus-qcow2/convert-c
# Header flags set by hand: dirty, corrupt (incompatible bits 0 and 1).
cp "$T/v3-512" "$T/v3-512-dirty" && patch "$T/v3-512-dirty" 79 01 && keep "$T/v3-512-dirty" corpus-qcow2/v3-512-dirty
cp "$T/v3-512" "$T/v3-512-corrupt" && patch "$T/v3-512-corrupt" 79 02 && keep "$T/v3-512-corrupt" corpus-qcow2/v3-512-corrupt
# Guest cluster 1 mapped onto the L1 table's own cluster (a data/metadata
# overlap that QEMU's overlap checks refuse).
python3 - "$T/v3-512" "$OUT/corpus-qcow2/v3-512-overlap-l1" <<'PY'
import struct, sys
d = bytearray(open(sys.argv[1], 'rb').read())
l1 = struct.unpack_from('>Q', d, 40)[0]
l2 = struct.unpack_from('>Q', d, l1)[0] & 0x00fffffffffffe00
struct.pack_into('>Q', d, l2 + 8, l1 | 1 << 63)
open(sys.argv[2], 'wb').write(d)
PY
# Truncated copies: inside the header, the tables, the data.
for n in 72 104 512 4096 20000; do keep "$T/v3-512" "corpus-qcow2/trunc-v3-512-$n" $n; done
keep "$T/v2-512" corpus-qcow2/trunc-v2-512-1536 1536
keep "$T/v3-4k-rc1" corpus-qcow2/trunc-v3-4k-16k 16384

# ---- QED ----
e() { local n=$1 size=$2 opts=$3 bfmt=$4; shift 4
	qemu-img create -q -f qed -o "$opts" -b "${bfmt/qcow2/mid.qcow2}" -F "$bfmt" "$T/$n" "$size"
	[ $# -gt 0 ] && io "$T/$n" qed "$@"
	keep "$T/$n" "corpus-qed/$n"; }
cp "$T/base.raw" "$T/raw"
e qed-4k-t2 1M cluster_size=4096,table_size=2 qcow2 "write -P 0x22 0 8k" "write -z 64k 64k" \
	"write -P 0x23 100000 300" "write -P 0x24 1020k 4k"
e qed-4k-t4-raw 512k cluster_size=4096,table_size=4 raw "write -P 0x22 0 4k" "write -z 8k 4k"
e qed-4k-t16-big 100G cluster_size=4096,table_size=16 qcow2 "write -P 0x22 0 4k" \
	"write -P 0x25 99G 4k"
e qed-64k 1M cluster_size=65536,table_size=2 qcow2 "write -P 0x22 0 512" "write -z 64k 64k"
e qed-64k-t4 4M cluster_size=65536 raw "write -P 0x22 3M 512"
e qed-2m 8M cluster_size=2M,table_size=2 qcow2 "write -P 0x22 2M 512"
qemu-img create -q -f qed -o cluster_size=4096,table_size=2 "$T/qed-nobacking" 64k
io "$T/qed-nobacking" qed "write -P 0x26 0 12k"
keep "$T/qed-nobacking" corpus-qed/qed-nobacking
# need-check set (features bit 1): clean, and with a bad L2 entry.
cp "$T/qed-4k-t2" "$T/qed-needcheck" && patch "$T/qed-needcheck" 16 03 &&
	keep "$T/qed-needcheck" corpus-qed/qed-needcheck
cp "$T/qed-nobacking" "$T/qed-needcheck-bad" && patch "$T/qed-needcheck-bad" 16 02
l2=$(python3 -c "import struct,sys; d=open(sys.argv[1],'rb').read(); print(struct.unpack_from('<Q', d, struct.unpack_from('<Q', d, 40)[0])[0])" "$T/qed-needcheck-bad")
patch "$T/qed-needcheck-bad" $((l2 + 8)) 0010ff0000000000
keep "$T/qed-needcheck-bad" corpus-qed/qed-needcheck-bad
for n in 64 512 4096 9000; do keep "$T/qed-4k-t2" "corpus-qed/trunc-qed-4k-t2-$n" $n; done

# ---- control files ----
c() { printf "$2" >"$OUT/corpus-control/$1"; }
c start 'start base=/img/t.qcow2 speed=20M on-error=stop\n'
c start-report 'start on-error=report speed=1GiB\n'
c start-bare 'start'
c start-tabs 'start\tbase=http://example.com/a.qcow2\tspeed=0\n'
c pause 'pause\n'
c resume 'resume'
c cancel 'cancel\n'
c abort 'abort\n'
c pull '0x100000 1M\n'
c pull-dec '4096 65536'
c pull-hex '0xFFFFFFFFFFFFF000 0x1000\n'
c speed '50M\n'
c speed-kib ' 512KiB\n'
c speed-t '1T'
c speed-b '100b \n'
c speed-big '18446744073709551615\n'
cd "$OUT"
echo "corpus: $(ls corpus-qcow2 | wc -l) qcow2, $(ls corpus-qed | wc -l) qed," \
	"$(ls corpus-control | wc -l) control; $(du -cb corpus-*/* | tail -1 | cut -f1) bytes"
