#!/bin/bash
# Replay the fuzz harnesses (tests/fuzz/fuzz-*.c) without libFuzzer: each
# harness linked with tests/fuzz/replay-main.c runs over its seed corpus
# (tests/fuzz/corpus-<name>/), every crash kept as a regression input
# (tests/fuzz/regress-<name>-*), and a few hundred seeded mutations of the
# seeds (bit flips and magic values in the header and table areas,
# truncations): a cheap fuzzer in make check. `make fuzz` runs libFuzzer.
#
# The harnesses are only worth replaying with sanitizers. make check-asan
# passes sanitized replay binaries in $FUZZ_REPLAY and they are used as they
# are. Otherwise (make check passes plain ones; run alone, none) this test
# builds its own: harness + library sources with $CC -fsanitize=address,
# undefined into $T (about 10 s). Without a working sanitizer it falls back
# to the plain binaries, or links build/libstreamfs.a.
. "$(dirname "$0")/functions.sh"
requires python3
ROOT=$(cd "$(dirname "$0")/.." && pwd)
F=$ROOT/tests/fuzz
HARNESSES="qcow2 qed control trace"
: "${FUZZ_REPLAY:=}"
cc=${CC:-cc}
san=("-fsanitize=address,undefined" -fno-sanitize-recover=undefined)
sanitized() { grep -q __asan_init "$1" 2>/dev/null; }
# shellcheck disable=SC2207 # pkg-config output is split on purpose
cflags=(-O1 -g -std=gnu11 -D_GNU_SOURCE -D_FILE_OFFSET_BITS=64 -pthread -I"$ROOT/include"
	$(pkg-config --cflags fuse3 libnbd))
# shellcheck disable=SC2207
libs=($(pkg-config --libs fuse3 libcurl zlib libnbd) -pthread) # the Makefile's PKGS
if [ -n "$FUZZ_REPLAY" ] && sanitized "$FUZZ_REPLAY/replay-qcow2"; then
	info "using sanitized replay binaries from $FUZZ_REPLAY"
else
	echo 'int main(void){return 0;}' >"$T/san.c"
	if "$cc" "${san[@]}" -o "$T/san" "$T/san.c" 2>/dev/null && "$T/san"; then
		mkdir -p "$T/obj" "$T/bin"
		srcs=()
		for s in "$ROOT"/fetch/*.c "$ROOT"/formats/*.c "$ROOT"/util/*.c "$ROOT"/block/*.c "$ROOT"/job/*.c "$ROOT"/control/*.c "$ROOT"/fusefs/*.c; do
			[ "$(basename "$s")" = main.c ] || srcs+=("$s")
		done
		for s in "${srcs[@]}"; do
			o=$T/obj/$(basename "$(dirname "$s")")-$(basename "$s" .c).o
			"$cc" "${cflags[@]}" "${san[@]}" -c -o "$o" "$s" &
		done
		wait
		ar rcs "$T/lib.a" "$T"/obj/*.o
		for h in $HARNESSES; do
			"$cc" "${cflags[@]}" "${san[@]}" -o "$T/bin/replay-$h" "$F/fuzz-$h.c" \
				"$F/replay-main.c" "$T/lib.a" "${libs[@]}" || fail "cannot build replay-$h"
		done
		FUZZ_REPLAY=$T/bin
		info "built replay binaries with ${san[*]}"
	elif [ -z "$FUZZ_REPLAY" ] || [ ! -x "$FUZZ_REPLAY/replay-qcow2" ]; then
		lib=$ROOT/build/libstreamfs.a
		[ -f "$lib" ] || missing "a sanitizer runtime, the replay binaries or $lib"
		mkdir -p "$T/bin"
		for h in $HARNESSES; do
			"$cc" "${cflags[@]}" -o "$T/bin/replay-$h" "$F/fuzz-$h.c" "$F/replay-main.c" \
				"$lib" "${libs[@]}" || fail "cannot build replay-$h"
		done
		FUZZ_REPLAY=$T/bin
		info "no sanitizer: replaying without one (crashes only)"
	else
		info "no sanitizer: using the plain replay binaries from $FUZZ_REPLAY"
	fi
fi
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}:abort_on_error=1
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}:halt_on_error=1

# replay NAME FILE...: run the harness over the files, in batches so a
# failure names a small set; the output of a failing batch is shown.
replay() {
	local h=$1
	shift
	printf '%s\n' "$@" | xargs -d '\n' -n 100 sh -c \
		'"$0" "$@" >"'"$T/out-$h"'" 2>&1 || { tail -40 "'"$T/out-$h"'"; exit 255; }' \
		"$FUZZ_REPLAY/replay-$h"
}

n=${MUTATIONS:-300}
[ -n "${LONG:-}" ] && n=20000
seed=${SEED:-$RANDOM}
info "seed $seed, $n mutations per image format"
for h in $HARNESSES; do
	files=("$F"/corpus-"$h"/*)
	for r in "$F"/regress-$h-*; do [ -e "$r" ] && files+=("$r"); done
	[ -e "${files[0]}" ] || fail "no corpus for $h"
	replay $h "${files[@]}" || fail "replay-$h failed on the corpus or a regress-$h-* input"
	info "$h: ${#files[@]} corpus and regression inputs replayed"
	[ $h = control ] && continue
	mkdir -p "$T/mut-$h"
	python3 - "$seed" "$n" "$T/mut-$h" "$F"/corpus-$h/* <<'PY'
import os, random, sys
seed, n, out, seeds = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
rnd = random.Random(seed)
for i in range(n):
    data = bytearray(open(rnd.choice(seeds), 'rb').read())
    for _ in range(rnd.randint(1, 8)):
        where = rnd.randrange(0, min(128, len(data)) if rnd.random() < 0.5 else len(data))
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
	replay $h "$T/mut-$h"/* ||
		fail "replay-$h failed on a mutation (rerun with SEED=$seed; inputs above)"
done
echo ok
