# streamfs build. `make` builds ./streamfs; `make check` runs unit and
# integration tests; `make check-asan` does the same under ASan/UBSan.
PREFIX ?= /usr/local
DESTDIR ?=
CC ?= cc
PKGS := fuse3 libcurl zlib libnbd
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS))
PKG_LIBS := $(shell pkg-config --libs $(PKGS))
CMOCKA_LIBS := $(shell pkg-config --libs cmocka 2>/dev/null || echo -lcmocka)

OPT ?= -O2 -g
SANITIZE ?=
CFLAGS_ALL = $(OPT) -std=gnu11 -Wall -Wextra -Werror -Wno-unused-parameter -Wshadow \
	-D_GNU_SOURCE -D_FILE_OFFSET_BITS=64 -pthread -Iinclude $(PKG_CFLAGS) $(SANITIZE) $(CFLAGS)
LDFLAGS_ALL = -pthread $(SANITIZE) $(LDFLAGS)

BUILD ?= build
# The FUSE-free core is libstreamfs.a (the tests, fuzzers and any other
# front end link it); fusefs/ is the FUSE front end and command line. See
# "Source layout" in README.md.
CORE_DIRS := util fetch formats block job control
LIB_SRCS := $(foreach d,$(CORE_DIRS),$(wildcard $(d)/*.c))
FUSE_SRCS := $(wildcard fusefs/*.c)
LIB_OBJS := $(LIB_SRCS:%.c=$(BUILD)/%.o)
FUSE_OBJS := $(FUSE_SRCS:%.c=$(BUILD)/%.o)
UNIT_SRCS := $(wildcard tests/test-*.c)
UNIT_BINS := $(UNIT_SRCS:tests/%.c=$(BUILD)/tests/%)
HELPER_SRCS := $(wildcard tests/helpers/*.c)
HELPER_BINS := $(HELPER_SRCS:tests/helpers/%.c=$(BUILD)/tests/helpers/%)

.PHONY: all check check-unit check-shell check-asan check-long check-valgrind clean install uninstall demo bench bench-boot bench-nbd linkem-test format format-check fuzz

all: streamfs

$(BUILD)/%.o: %.c $(wildcard include/*.h) $(wildcard */*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -c -o $@ $<

$(BUILD)/libstreamfs.a: $(LIB_OBJS)
	rm -f $@; ar rcs $@ $^

streamfs: $(FUSE_OBJS) $(BUILD)/libstreamfs.a
	$(CC) -o $@ $(FUSE_OBJS) $(BUILD)/libstreamfs.a $(LDFLAGS_ALL) $(PKG_LIBS)

$(BUILD)/tests/%: tests/%.c $(BUILD)/libstreamfs.a $(wildcard tests/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -Itests -o $@ $< $(BUILD)/libstreamfs.a $(LDFLAGS_ALL) $(PKG_LIBS) $(CMOCKA_LIBS)

$(BUILD)/tests/helpers/%: tests/helpers/%.c $(BUILD)/libstreamfs.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -Itests -o $@ $< $(BUILD)/libstreamfs.a $(LDFLAGS_ALL) $(PKG_LIBS)

check-unit: $(UNIT_BINS)
	@set -e; for t in $(UNIT_BINS); do echo "== $$t"; MALLOC_PERTURB_=165 $$t; done

# The fuzz harnesses built with gcc and a file-replaying main(), for make check.
FUZZ_REPLAY_BINS := $(patsubst tests/fuzz/fuzz-%.c,$(BUILD)/tests/fuzz/replay-%,$(wildcard tests/fuzz/fuzz-*.c))
$(BUILD)/tests/fuzz/replay-%: tests/fuzz/fuzz-%.c tests/fuzz/replay-main.c $(BUILD)/libstreamfs.a $(wildcard tests/fuzz/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) -o $@ $< tests/fuzz/replay-main.c $(BUILD)/libstreamfs.a $(LDFLAGS_ALL) $(PKG_LIBS)

check-shell: streamfs $(HELPER_BINS) $(FUZZ_REPLAY_BINS)
	@STREAMFS=$(CURDIR)/streamfs HELPERS=$(CURDIR)/$(BUILD)/tests/helpers \
		FUZZ_REPLAY=$(CURDIR)/$(BUILD)/tests/fuzz tests/run-shell-tests.sh

check: format-check check-unit check-shell

# The same suites under AddressSanitizer + UBSan, in a separate build tree.
# GCC's -fsanitize=undefined leaves out float-cast-overflow (a double out of
# range converted to an integer: rates, percentages, timeouts), so ask for it.
ASAN_SANITIZE := -fsanitize=address,undefined,float-cast-overflow \
	-fno-sanitize-recover=undefined,float-cast-overflow
check-asan:
	$(MAKE) BUILD=build-asan OPT="-O1 -g -fno-omit-frame-pointer" \
		SANITIZE="$(ASAN_SANITIZE)" STREAMFS_BIN=streamfs-asan check-unit
	$(MAKE) BUILD=build-asan OPT="-O1 -g -fno-omit-frame-pointer" \
		SANITIZE="$(ASAN_SANITIZE)" streamfs-asan
	@# The daemon detaches from stderr: sanitizer reports go to files, and
	@# any report fails the run.
	rm -rf $(CURDIR)/build-asan/reports; mkdir -p $(CURDIR)/build-asan/reports
	STREAMFS=$(CURDIR)/streamfs-asan HELPERS=$(CURDIR)/build-asan/tests/helpers \
		SFS_SANITIZED=1 FUZZ_REPLAY=$(CURDIR)/build-asan/tests/fuzz ASAN_OPTIONS=detect_leaks=1:log_path=$(CURDIR)/build-asan/reports/asan \
		UBSAN_OPTIONS=print_stacktrace=1:log_path=$(CURDIR)/build-asan/reports/ubsan \
		LSAN_OPTIONS=suppressions=$(CURDIR)/tests/lsan.supp \
		tests/run-shell-tests.sh
	@# A report file that only lists suppressions used (tests/lsan.supp) is
	@# not a finding; every ASan/LSan finding says ERROR:, UBSan's runtime error.
	@bad=$$(grep -lE 'ERROR:|runtime error' $(CURDIR)/build-asan/reports/* 2>/dev/null); \
	if [ -n "$$bad" ]; then \
		echo "sanitizer reports from the daemon:"; head -50 $$bad; exit 1; fi

streamfs-asan: $(FUSE_OBJS) $(BUILD)/libstreamfs.a $(HELPER_BINS) $(FUZZ_REPLAY_BINS)
	$(CC) -o $@ $(FUSE_OBJS) $(BUILD)/libstreamfs.a $(LDFLAGS_ALL) $(PKG_LIBS)

# The unit tests under valgrind memcheck (the daemon's run is test-valgrind.sh).
check-valgrind: $(UNIT_BINS)
	@set -e; for t in $(UNIT_BINS); do echo "== valgrind $$t"; \
		valgrind -q --leak-check=full --errors-for-leak-kinds=definite,indirect \
			--error-exitcode=9 $$t >/dev/null; done

check-long: streamfs $(HELPER_BINS) $(FUZZ_REPLAY_BINS) check-valgrind
	@STREAMFS=$(CURDIR)/streamfs HELPERS=$(CURDIR)/$(BUILD)/tests/helpers LONG=1 tests/run-shell-tests.sh

demo: streamfs
	./demo.sh

# bench/linkem: the user-space WAN link emulator of the WAN rows (no netem
# on this kernel); bench/linkem-test.sh checks it against nginx.
$(BUILD)/bench/linkem: bench/linkem.c
	@mkdir -p $(@D)
	$(CC) -O2 -Wall -Wextra -Werror -pthread -o $@ $<

bench: streamfs $(BUILD)/bench/linkem
	LINKEM=$(CURDIR)/$(BUILD)/bench/linkem bench/run.sh

# A real guest booting from disk over the emulated link (issue #14's figures).
bench-boot: streamfs $(BUILD)/bench/linkem
	LINKEM=$(CURDIR)/$(BUILD)/bench/linkem bench/boot.sh

# Streaming from an NBD export against nbdcopy and qemu-storage-daemon (issue #15).
bench-nbd: streamfs $(BUILD)/bench/linkem
	LINKEM=$(CURDIR)/$(BUILD)/bench/linkem bench/nbd.sh

linkem-test: $(BUILD)/bench/linkem
	LINKEM=$(CURDIR)/$(BUILD)/bench/linkem bench/linkem-test.sh

# libFuzzer harnesses (tests/fuzz/fuzz-*.c), each run for FUZZ_TIME seconds
# over its seed corpus tests/fuzz/corpus-<name>/ plus the inputs it found
# before (build-fuzz/corpus-<name>/). Crashes go to build-fuzz/crash-<name>-*:
# minimize them (build-fuzz/fuzz-<name> -minimize_crash=1 FILE) and keep them
# as tests/fuzz/regress-<name>-<n>, which tests/test-fuzz-corpus.sh replays
# in make check. Regenerate the seeds with tests/fuzz/make-corpus.sh.
FUZZ_TIME ?= 60
FUZZ_OPTS ?= -max_len=65536 -timeout=25 -rss_limit_mb=2560 -entropic_scale_per_exec_time=1
FUZZ_SRCS := $(wildcard tests/fuzz/fuzz-*.c)
FUZZ_BINS := $(FUZZ_SRCS:tests/fuzz/%.c=build-fuzz/%)
FUZZ_FLAGS := -g -O1 -std=gnu11 -D_GNU_SOURCE -D_FILE_OFFSET_BITS=64 -pthread -Iinclude \
	$(PKG_CFLAGS) -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
build-fuzz/%: tests/fuzz/%.c $(LIB_SRCS) $(wildcard include/*.h) $(wildcard */*.h) \
		$(wildcard tests/fuzz/*.h)
	@mkdir -p build-fuzz
	clang $(FUZZ_FLAGS) -o $@ $< $(LIB_SRCS) $(PKG_LIBS)
fuzz: $(FUZZ_BINS)
	@for f in $(FUZZ_BINS); do n=$${f#build-fuzz/fuzz-}; \
		mkdir -p tests/fuzz/corpus-$$n build-fuzz/corpus-$$n; \
		echo "== $$f ($(FUZZ_TIME)s, log build-fuzz/fuzz-$$n.log)"; \
		$$f -max_total_time=$(FUZZ_TIME) $(FUZZ_OPTS) -print_final_stats=1 \
			-artifact_prefix=build-fuzz/crash-$$n- \
			build-fuzz/corpus-$$n tests/fuzz/corpus-$$n >build-fuzz/fuzz-$$n.log 2>&1; \
		rc=$$?; grep -E "^(#[0-9]+.*DONE|stat::number_of_executed_units|stat::average_exec_per_sec)" \
			build-fuzz/fuzz-$$n.log; \
		if [ $$rc -ne 0 ]; then grep -A30 -E "^==[0-9]+==ERROR|runtime error|^SUMMARY" \
			build-fuzz/fuzz-$$n.log | head -60; echo "fuzz-$$n FAILED (see build-fuzz/crash-$$n-*)"; \
			exit 1; fi; done

format:
	clang-format -i $(wildcard */*.c */*.h tests/*/*.c)

format-check:
	@out=$$(for f in $(wildcard */*.c */*.h tests/*/*.c); do \
		clang-format --dry-run -Werror $$f >/dev/null 2>&1 || echo $$f; done); \
	if [ -n "$$out" ]; then echo "not clang-formatted (run make format):"; echo "$$out"; exit 1; fi

install: streamfs
	install -D -m 755 streamfs $(DESTDIR)$(PREFIX)/bin/streamfs
	install -D -m 644 man/streamfs.1 $(DESTDIR)$(PREFIX)/share/man/man1/streamfs.1

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/streamfs $(DESTDIR)$(PREFIX)/share/man/man1/streamfs.1

clean:
	rm -rf build build-asan build-fuzz streamfs streamfs-asan
