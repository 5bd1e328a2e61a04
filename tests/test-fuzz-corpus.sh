#!/bin/bash
# Replay the fuzz harnesses (tests/fuzz/fuzz-*.c, built with gcc and a
# file-replaying main) over their seed corpora, every crash input kept as a
# regression (tests/fuzz/regress-*), and a few thousand seeded mutations of
# the seeds (byte flips in the header and table areas, truncations): a
# cheap fuzzer in make check. make fuzz runs the real libFuzzer.
. "$(dirname "$0")/functions.sh"
requires python3
: "${FUZZ_REPLAY:=$(cd "$(dirname "$0")/.." && pwd)/build/tests/fuzz}"
[ -x "$FUZZ_REPLAY/replay-qcow2" ] || skip "replay binaries not built"
F=$(cd "$(dirname "$0")/fuzz" && pwd)
n=${MUTATIONS:-1500}
[ -n "${LONG:-}" ] && n=30000
seed=${SEED:-$RANDOM}
info "seed $seed, $n mutations per format"
for h in qcow2 qed control; do
	files=("$F"/corpus-$h/* $(ls "$F"/regress-$h-* 2>/dev/null || true))
	"$FUZZ_REPLAY/replay-$h" "${files[@]}" >/dev/null || fail "replay-$h crashed on the corpus"
	[ $h = control ] && continue
	mkdir -p "$T/mut-$h"
	python3 - "$seed" "$n" "$T/mut-$h" "$F"/corpus-$h/* <<'PY'
import os, random, sys
seed, n, out, seeds = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
rnd = random.Random(seed)
for i in range(n):
    data = bytearray(open(rnd.choice(seeds), 'rb').read())
    for _ in range(rnd.randint(1, 8)):
        where = rnd.choice([rnd.randrange(0, 128), rnd.randrange(0, len(data))])
        kind = rnd.random()
        if kind < 0.5:
            data[where] ^= 1 << rnd.randrange(8)
        elif kind < 0.8:
            data[where] = rnd.choice([0, 0xff, 0x7f, 0x80, 1])
        else:
            data[where:where + 8] = rnd.getrandbits(64).to_bytes(8, 'big')
    if rnd.random() < 0.1:
        data = data[:rnd.randrange(1, len(data))]
    open(os.path.join(out, 'm%05d' % i), 'wb').write(data)
PY
	# In batches so a crash names a small set.
	ls "$T/mut-$h" | sed "s|^|$T/mut-$h/|" | xargs -n 300 "$FUZZ_REPLAY/replay-$h" >/dev/null ||
		fail "replay-$h crashed on a mutation (seed $seed)"
done
echo ok
