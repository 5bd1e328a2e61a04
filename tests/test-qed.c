/* streamfs: unit tests for the QED driver (formats/qed.c).
 *
 * Most tests build images in memory ("mem:NAME" sources): either crafted
 * byte by byte (tqed_craft) to exercise the parser, the run merging and the
 * consistency check, or made by the driver itself. Crash tests stop the
 * file's writes at every possible point with the mem source's fault
 * injection, take the bytes as they are, and reopen them. Tests named
 * test_qed_qemu_* use qemu-img / qemu-io as an oracle on real files in a
 * mkdtemp directory; they skip when qemu-img is not installed.
 */
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <setjmp.h>
#include <stddef.h>
#include <cmocka.h>

#include "fetch.h"
#include "image.h"
#include "util.h"

#define TQED_KIB 1024ULL
#define TQED_MIB (1024ULL * TQED_KIB)
#define TQED_GIB (1024ULL * TQED_MIB)

/* Header field offsets, in bytes (qed_spec.txt) */
#define TQED_OFF_CLUSTER   4
#define TQED_OFF_TABLE	   8
#define TQED_OFF_HEADER	   12
#define TQED_OFF_FEATURES  16
#define TQED_OFF_COMPAT	   24
#define TQED_OFF_AUTOCLEAR 32
#define TQED_OFF_L1	   40
#define TQED_OFF_SIZE	   48
#define TQED_OFF_BOFF	   56
#define TQED_OFF_BSIZE	   60

#define TQED_F_BACKING	  1ULL
#define TQED_F_NEED_CHECK 2ULL
#define TQED_F_NO_PROBE	  4ULL

static const struct image_driver *drv = &image_qed_driver;

/* ---- small helpers ---- */

static uint64_t tqed_get64(const uint8_t *p)
{
	uint64_t v;

	memcpy(&v, p, 8);
	return le64toh(v);
}

static uint32_t tqed_get32(const uint8_t *p)
{
	uint32_t v;

	memcpy(&v, p, 4);
	return le32toh(v);
}

static void tqed_put64(uint8_t *p, uint64_t v)
{
	v = htole64(v);
	memcpy(p, &v, 8);
}

static void tqed_put32(uint8_t *p, uint32_t v)
{
	v = htole32(v);
	memcpy(p, &v, 4);
}

/* Deterministic pattern for guest bytes [off, off+len), generation g. */
static void tqed_fill(uint8_t *buf, size_t len, uint64_t off, unsigned g)
{
	for (size_t i = 0; i < len; i++) {
		uint64_t x = (off + i) * 2654435761ULL + g * 40503ULL + 7;

		buf[i] = (uint8_t)(x >> 13 ^ x >> 29);
	}
}

static bool tqed_is(const uint8_t *buf, size_t len, uint8_t v)
{
	for (size_t i = 0; i < len; i++)
		if (buf[i] != v)
			return false;
	return true;
}

/* Copy of the current bytes of mem file name (malloc'd). */
static uint8_t *tqed_mem_copy(const char *name, size_t *len)
{
	const void *d;
	uint8_t *c;

	assert_int_equal(fetch_mem_get(name, &d, len), 0);
	c = malloc(*len ? *len : 1);
	assert_non_null(c);
	memcpy(c, d, *len);
	return c;
}

/* Features field of the header of mem file name, as on "disk". */
static uint64_t tqed_mem_features(const char *name)
{
	const void *d;
	size_t len;

	assert_int_equal(fetch_mem_get(name, &d, &len), 0);
	assert_true(len >= 64);
	return tqed_get64((const uint8_t *)d + TQED_OFF_FEATURES);
}

static uint64_t tqed_mem_u64(const char *name, uint64_t off)
{
	const void *d;
	size_t len;

	assert_int_equal(fetch_mem_get(name, &d, &len), 0);
	assert_true(off + 8 <= len);
	return tqed_get64((const uint8_t *)d + off);
}

static int tqed_open(const char *uri, bool rw, struct image **out)
{
	return image_open_one(uri, "qed", rw ? IMAGE_RDWR : 0, out);
}

static struct image *tqed_open_ok(const char *uri, bool rw)
{
	struct image *img = NULL;

	assert_int_equal(tqed_open(uri, rw, &img), 0);
	assert_non_null(img);
	return img;
}

/* A crafted image: header (cluster cs, table ts clusters, header 1
 * cluster), L1 at cluster 1, room for 'clusters' clusters in all. */
struct tqed_craft {
	uint8_t *b;
	size_t len;
	uint32_t cs, ts;
};

static void tqed_craft_init(struct tqed_craft *c, uint32_t cs, uint32_t ts, uint64_t size,
			    size_t clusters)
{
	c->cs = cs;
	c->ts = ts;
	c->len = clusters * cs;
	c->b = calloc(1, c->len);
	assert_non_null(c->b);
	memcpy(c->b, "QED\0", 4);
	tqed_put32(c->b + TQED_OFF_CLUSTER, cs);
	tqed_put32(c->b + TQED_OFF_TABLE, ts);
	tqed_put32(c->b + TQED_OFF_HEADER, 1);
	tqed_put64(c->b + TQED_OFF_L1, cs);
	tqed_put64(c->b + TQED_OFF_SIZE, size);
}

static void tqed_craft_l1(struct tqed_craft *c, uint64_t i, uint64_t v)
{
	tqed_put64(c->b + c->cs + i * 8, v);
}

static void tqed_craft_l2(struct tqed_craft *c, uint64_t table, uint64_t i, uint64_t v)
{
	tqed_put64(c->b + table + i * 8, v);
}

/* Fill data cluster at host offset h with the pattern of guest offset g. */
static void tqed_craft_data(struct tqed_craft *c, uint64_t h, uint64_t g)
{
	tqed_fill(c->b + h, c->cs, g, 0);
}

static void tqed_craft_put(struct tqed_craft *c, const char *name)
{
	assert_int_equal(fetch_mem_put(name, c->b, c->len), 0);
	free(c->b);
	c->b = NULL;
}

/* The standard crafted image (4 KiB clusters, 1-cluster tables: 512
 * entries, 2 MiB per L2 table, 8 MiB guest):
 *   cluster 0 header, 1 L1, 2 L2#0 (guest 0..2M), 3..5 data for guest
 *   clusters 0..2, 6 spare, 7 data for guest cluster 3, 8 L2#1 (guest
 *   2M..4M), 9 data for the last cluster of L2#0 (511), 10 for the first of
 *   L2#1 (512).
 *   guest cluster 4,5: zero clusters; 6..510 unallocated. */
static void tqed_craft_standard(struct tqed_craft *c)
{
	tqed_craft_init(c, 4096, 1, 8 * TQED_MIB, 11);
	tqed_craft_l1(c, 0, 2 * 4096);
	tqed_craft_l1(c, 1, 8 * 4096);
	for (int i = 0; i < 3; i++) {
		tqed_craft_l2(c, 2 * 4096, i, (3 + i) * 4096);
		tqed_craft_data(c, (3 + i) * 4096, i * 4096);
	}
	tqed_craft_l2(c, 2 * 4096, 3, 7 * 4096);
	tqed_craft_data(c, 7 * 4096, 3 * 4096);
	tqed_craft_l2(c, 2 * 4096, 4, 1);
	tqed_craft_l2(c, 2 * 4096, 5, 1);
	tqed_craft_l2(c, 2 * 4096, 511, 9 * 4096);
	tqed_craft_data(c, 9 * 4096, 511 * 4096);
	tqed_craft_l2(c, 8 * 4096, 0, 10 * 4096);
	tqed_craft_data(c, 10 * 4096, 512 * 4096);
}

static int tqed_setup(void **state)
{
	fetch_mem_reset();
	return 0;
}

static int tqed_teardown(void **state)
{
	fetch_mem_reset();
	return 0;
}

/* Run fn with stderr captured; returns what was logged (malloc'd). */
static char *tqed_capture_stderr(int (*fn)(void *), void *arg, int *ret)
{
	char path[] = "/tmp/test-qed-log-XXXXXX";
	int fd = mkstemp(path), saved;
	char *out;
	struct stat st;

	assert_true(fd >= 0);
	fflush(stderr);
	saved = dup(2);
	dup2(fd, 2);
	*ret = fn(arg);
	fflush(stderr);
	dup2(saved, 2);
	close(saved);
	assert_int_equal(fstat(fd, &st), 0);
	out = calloc(1, (size_t)st.st_size + 1);
	assert_non_null(out);
	assert_int_equal(pread(fd, out, (size_t)st.st_size, 0), st.st_size);
	close(fd);
	unlink(path);
	return out;
}

/* ==== probe and create ==== */

static void test_qed_probe_magic(void **state)
{
	uint8_t buf[512] = {0};

	memcpy(buf, "QED\0", 4);
	assert_int_equal(drv->probe(buf, sizeof(buf)), 100);
	assert_int_equal(drv->probe(buf, 63), 0); /* shorter than the header */
	memcpy(buf, "QFI\xfb", 4);
	assert_int_equal(drv->probe(buf, sizeof(buf)), 0);
	memcpy(buf, "QED\1", 4);
	assert_int_equal(drv->probe(buf, sizeof(buf)), 0);
}

static void test_qed_create_layout(void **state)
{
	struct image_create_opts o = {
	    .size = 1000000, .backing_name = "base.raw", .backing_fmt = "raw"};
	struct fetch_source *f;
	struct image *img;
	struct extent e;
	uint8_t *b;
	size_t len;

	assert_int_equal(fetch_open("mem:c", FETCH_RDWR | FETCH_CREATE, &f), 0);
	assert_int_equal(drv->create(f, &o), 0);
	fetch_close(f);
	b = tqed_mem_copy("c", &len);
	assert_int_equal(len, 65536 + 4 * 65536); /* header cluster + L1, like qemu-img */
	assert_memory_equal(b, "QED\0", 4);
	assert_int_equal(tqed_get32(b + TQED_OFF_CLUSTER), 65536);
	assert_int_equal(tqed_get32(b + TQED_OFF_TABLE), 4);
	assert_int_equal(tqed_get32(b + TQED_OFF_HEADER), 1);
	assert_int_equal(tqed_get64(b + TQED_OFF_FEATURES), TQED_F_BACKING | TQED_F_NO_PROBE);
	assert_int_equal(tqed_get64(b + TQED_OFF_L1), 65536);
	assert_int_equal(tqed_get64(b + TQED_OFF_SIZE), 1000448); /* rounded up to 512 */
	assert_int_equal(tqed_get32(b + TQED_OFF_BOFF), 64);
	assert_int_equal(tqed_get32(b + TQED_OFF_BSIZE), 8);
	assert_memory_equal(b + 64, "base.raw", 8);
	assert_true(tqed_is(b + 65536, 4 * 65536, 0));
	free(b);

	img = tqed_open_ok("mem:c", false);
	assert_int_equal(img->size, 1000448);
	assert_int_equal(img->cluster_size, 65536);
	assert_string_equal(img->backing_name, "base.raw");
	assert_string_equal(img->backing_fmt, "raw");
	assert_int_equal(drv->map(img, 0, img->size, &e), 0);
	assert_int_equal(e.type, EXT_UNALLOC);
	assert_int_equal(e.len, img->size);
	image_close_chain(img);

	/* Without a raw backing format: no probe bit, format left to probing. */
	o.backing_fmt = "qcow2";
	o.cluster_size = 4096;
	assert_int_equal(fetch_open("mem:c2", FETCH_RDWR | FETCH_CREATE, &f), 0);
	assert_int_equal(drv->create(f, &o), 0);
	fetch_close(f);
	assert_int_equal(tqed_mem_features("c2"), TQED_F_BACKING);
	img = tqed_open_ok("mem:c2", false);
	assert_int_equal(img->cluster_size, 4096);
	assert_string_equal(img->backing_name, "base.raw");
	assert_null(img->backing_fmt);
	image_close_chain(img);
}

static void test_qed_create_rejects_bad_options(void **state)
{
	char longname[70000];
	struct image_create_opts o = {.size = 1 * TQED_MIB};
	struct fetch_source *f;

	assert_int_equal(fetch_open("mem:x", FETCH_RDWR | FETCH_CREATE, &f), 0);
	o.cluster_size = 3000;
	assert_int_equal(drv->create(f, &o), -EINVAL);
	o.cluster_size = 2048;
	assert_int_equal(drv->create(f, &o), -EINVAL);
	o.cluster_size = 128 * TQED_MIB;
	assert_int_equal(drv->create(f, &o), -EINVAL);
	/* At most (16 * 512)^2 clusters of 4 KiB = 256 GiB, with table size 16. */
	o.cluster_size = 4096;
	o.size = 256 * TQED_GIB + 512;
	assert_int_equal(drv->create(f, &o), -EINVAL);
	o.size = UINT64_MAX; /* rounding up to 512 wraps */
	assert_int_equal(drv->create(f, &o), -EINVAL);
	o.size = TQED_MIB;
	memset(longname, 'a', sizeof(longname) - 1);
	longname[4096 - 64 + 1] = '\0'; /* one byte more than the header cluster holds */
	o.backing_name = longname;
	assert_int_equal(drv->create(f, &o), -EINVAL);
	assert_int_equal(fetch_size(f), 0); /* nothing written */
	fetch_close(f);
}

/* QEMU's arithmetic for a header, as block/qed.c does it: the largest
 * image size in 64 bits (wraps to 0 from 2^64) and the L1 table offset check
 * (table size 1 fails its "overflow" test). */
static bool tqed_qemu_accepts(uint32_t cs, uint32_t ts, uint64_t size)
{
	uint64_t entries = (uint64_t)(ts * cs) / sizeof(uint64_t);
	uint64_t max = entries * cs * entries;
	uint64_t l1 = cs, end = l1 + (uint64_t)(ts - 1) * cs;

	return size % 512 == 0 && size <= max && end > l1;
}

/* Can QEMU open an image of cluster size cs and guest size size with some
 * table size? */
static bool tqed_qemu_can(uint32_t cs, uint64_t size)
{
	for (uint32_t ts = 1; ts <= 16; ts *= 2)
		if (tqed_qemu_accepts(cs, ts, size))
			return true;
	return false;
}

/* Every new image is one QEMU opens, whatever the cluster and guest size;
 * what no table size makes QEMU accept (clusters over 4 MiB, a guest too
 * large for the cluster size) is refused with nothing written. The table
 * size is QEMU's default 4 unless the geometry needs another. */
static void test_qed_create_qemu_geometry(void **state)
{
	const uint64_t sizes[] = {1 * TQED_MIB, 1 * TQED_GIB, 100 * TQED_GIB, 1ULL << 50};
	char name[32];

	for (uint32_t cs = 4096; cs <= 64 * TQED_MIB; cs *= 2) {
		for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
			struct image_create_opts o = {.size = sizes[i], .cluster_size = cs};
			struct fetch_source *f;
			struct image *img;
			const void *d;
			size_t len;
			uint32_t ts;
			int r;

			snprintf(name, sizeof(name), "mem:g%u-%zu", cs, i);
			assert_int_equal(fetch_open(name, FETCH_RDWR | FETCH_CREATE, &f), 0);
			r = drv->create(f, &o);
			fetch_close(f);
			assert_int_equal(fetch_mem_get(name + 4, &d, &len), 0);
			if (!tqed_qemu_can(cs, sizes[i])) {
				if (r != -EINVAL)
					fail_msg("cluster size %u, size %llu: QEMU cannot open it, "
						 "but create returned %d",
						 cs, (unsigned long long)sizes[i], r);
				assert_int_equal(len, 0);
				continue;
			}
			if (r != 0)
				fail_msg("cluster size %u, size %llu: %d", cs,
					 (unsigned long long)sizes[i], r);
			ts = tqed_get32((const uint8_t *)d + TQED_OFF_TABLE);
			if (!tqed_qemu_accepts(cs, ts, sizes[i]))
				fail_msg("cluster size %u, size %llu: QEMU refuses table size %u",
					 cs, (unsigned long long)sizes[i], ts);
			if (tqed_qemu_accepts(cs, 4, sizes[i]))
				assert_int_equal(ts, 4);
			assert_int_equal(len, (size_t)cs * (1 + ts));
			img = tqed_open_ok(name, false);
			assert_int_equal(img->size, sizes[i]);
			image_close_chain(img);
			assert_int_equal(fetch_mem_put(name + 4, NULL, 0), 0);
		}
	}
	/* The largest cluster size QEMU opens, and the smallest it does not. */
	assert_true(tqed_qemu_can(4 * TQED_MIB, 1 * TQED_GIB));
	assert_false(tqed_qemu_can(8 * TQED_MIB, 1 * TQED_MIB));
}

/* ==== header parsing ==== */

struct tqed_mut {
	const char *what;
	uint64_t off; /* header field to change */
	int width;    /* 4 or 8 */
	uint64_t value;
	int err;
};

static void tqed_expect_open(const char *what, int rw, int err)
{
	struct image *img = NULL;
	int r = tqed_open("mem:h", rw, &img);

	if (r != err)
		fail_msg("%s: open returned %d, expected %d", what, r, err);
	if (r == 0)
		image_close_chain(img);
}

static void test_qed_header_refusals(void **state)
{
	static const struct tqed_mut muts[] = {
	    {"bad magic", 0, 4, 0x00444552, -EINVAL},
	    {"unknown feature bit 4", TQED_OFF_FEATURES, 8, 0x10, -ENOTSUP},
	    {"unknown feature bit 63", TQED_OFF_FEATURES, 8, 1ULL << 63, -ENOTSUP},
	    {"cluster size not a power of 2", TQED_OFF_CLUSTER, 4, 6000, -EINVAL},
	    {"cluster size 2 KiB", TQED_OFF_CLUSTER, 4, 2048, -EINVAL},
	    {"cluster size 128 MiB", TQED_OFF_CLUSTER, 4, 128 << 20, -EINVAL},
	    {"cluster size 0", TQED_OFF_CLUSTER, 4, 0, -EINVAL},
	    {"table size 0", TQED_OFF_TABLE, 4, 0, -EINVAL},
	    {"table size 3", TQED_OFF_TABLE, 4, 3, -EINVAL},
	    {"table size 32", TQED_OFF_TABLE, 4, 32, -EINVAL},
	    {"header size 0", TQED_OFF_HEADER, 4, 0, -EINVAL},
	    {"header size past EOF", TQED_OFF_HEADER, 4, 0xffffffff, -EINVAL},
	    {"header size over the L1", TQED_OFF_HEADER, 4, 2, -EINVAL},
	    {"image size not a multiple of 512", TQED_OFF_SIZE, 8, 8 * TQED_MIB + 1, -EINVAL},
	    {"image size beyond the tables", TQED_OFF_SIZE, 8, 512ULL * 512 * 4096 + 512, -EINVAL},
	    {"image size 2^64-512", TQED_OFF_SIZE, 8, ~511ULL, -EINVAL},
	    {"L1 offset unaligned", TQED_OFF_L1, 8, 4096 + 8, -EINVAL},
	    {"L1 offset past EOF", TQED_OFF_L1, 8, 64 * 4096, -EINVAL},
	    {"L1 ends past EOF", TQED_OFF_L1, 8, 11 * 4096, -EINVAL},
	    {"L1 inside the header", TQED_OFF_L1, 8, 0, -EINVAL},
	    {"L1 offset overflows", TQED_OFF_L1, 8, ~4095ULL, -EINVAL},
	};
	struct tqed_craft c;

	for (size_t i = 0; i < sizeof(muts) / sizeof(muts[0]); i++) {
		tqed_craft_standard(&c);
		if (muts[i].width == 4)
			tqed_put32(c.b + muts[i].off, (uint32_t)muts[i].value);
		else
			tqed_put64(c.b + muts[i].off, muts[i].value);
		tqed_craft_put(&c, "h");
		tqed_expect_open(muts[i].what, false, muts[i].err);
		tqed_expect_open(muts[i].what, true, muts[i].err);
	}
	/* A file shorter than the header. */
	assert_int_equal(fetch_mem_put("h", "QED\0", 4), 0);
	tqed_expect_open("short file", false, -EINVAL);
	/* The unmodified image opens. */
	tqed_craft_standard(&c);
	tqed_craft_put(&c, "h");
	tqed_expect_open("standard image", false, 0);
}

static void test_qed_header_refuses_bad_backing_name(void **state)
{
	struct tqed_craft c;
	struct {
		const char *what;
		uint32_t off, size;
	} cases[] = {
	    {"name past the header cluster", 4090, 10},
	    {"name offset past the header", 5000, 1},
	    {"name offset overflow", 0xffffffff, 2},
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		tqed_craft_standard(&c);
		tqed_put64(c.b + TQED_OFF_FEATURES, TQED_F_BACKING);
		tqed_put32(c.b + TQED_OFF_BOFF, cases[i].off);
		tqed_put32(c.b + TQED_OFF_BSIZE, cases[i].size);
		tqed_craft_put(&c, "h");
		tqed_expect_open(cases[i].what, false, -EINVAL);
	}
	/* Too long (but inside a 16-cluster header area). */
	tqed_craft_init(&c, 4096, 1, TQED_MIB, 18);
	tqed_put32(c.b + TQED_OFF_HEADER, 16);
	tqed_put64(c.b + TQED_OFF_L1, 16 * 4096);
	tqed_put64(c.b + TQED_OFF_FEATURES, TQED_F_BACKING);
	tqed_put32(c.b + TQED_OFF_BOFF, 64);
	tqed_put32(c.b + TQED_OFF_BSIZE, 5000);
	memset(c.b + 64, 'a', 5000);
	tqed_craft_put(&c, "h");
	tqed_expect_open("name too long", false, -EINVAL);
	/* A NUL byte inside the name. */
	tqed_craft_standard(&c);
	tqed_put64(c.b + TQED_OFF_FEATURES, TQED_F_BACKING);
	tqed_put32(c.b + TQED_OFF_BOFF, 64);
	tqed_put32(c.b + TQED_OFF_BSIZE, 5);
	memcpy(c.b + 64, "ab\0cd", 5);
	tqed_craft_put(&c, "h");
	tqed_expect_open("NUL in the name", false, -EINVAL);
}

static int tqed_open_h_ro(void *arg)
{
	struct image *img = NULL;
	int r = tqed_open("mem:h", false, &img);

	if (r == 0)
		image_close_chain(img);
	return r;
}

/* The message names the file, the format and the problem. */
static void test_qed_header_error_message(void **state)
{
	struct tqed_craft c;
	char *log;
	int r;

	tqed_craft_standard(&c);
	tqed_put64(c.b + TQED_OFF_FEATURES, 0x30 | TQED_F_BACKING);
	tqed_craft_put(&c, "h");
	log = tqed_capture_stderr(tqed_open_h_ro, NULL, &r);
	assert_int_equal(r, -ENOTSUP);
	assert_non_null(strstr(log, "mem:h: qed: unsupported incompatible feature bits 0x30"));
	free(log);

	tqed_craft_standard(&c);
	tqed_put32(c.b + TQED_OFF_CLUSTER, 6000);
	tqed_craft_put(&c, "h");
	log = tqed_capture_stderr(tqed_open_h_ro, NULL, &r);
	assert_int_equal(r, -EINVAL);
	assert_non_null(strstr(log, "mem:h: qed: invalid cluster size 6000"));
	free(log);
}

static void test_qed_header_backing_fmt(void **state)
{
	struct tqed_craft c;
	struct image *img;

	tqed_craft_standard(&c);
	tqed_put64(c.b + TQED_OFF_FEATURES, TQED_F_BACKING | TQED_F_NO_PROBE);
	tqed_put32(c.b + TQED_OFF_BOFF, 100);
	tqed_put32(c.b + TQED_OFF_BSIZE, 9);
	memcpy(c.b + 100, "../b.img!", 9);
	tqed_craft_put(&c, "h");
	img = tqed_open_ok("mem:h", false);
	assert_string_equal(img->backing_name, "../b.img!");
	assert_string_equal(img->backing_fmt, "raw");
	image_close_chain(img);

	tqed_craft_standard(&c);
	tqed_put64(c.b + TQED_OFF_FEATURES, TQED_F_BACKING);
	tqed_put32(c.b + TQED_OFF_BOFF, 64);
	tqed_put32(c.b + TQED_OFF_BSIZE, 4);
	memcpy(c.b + 64, "b.qc", 4);
	tqed_craft_put(&c, "h");
	img = tqed_open_ok("mem:h", false);
	assert_string_equal(img->backing_name, "b.qc");
	assert_null(img->backing_fmt);
	image_close_chain(img);

	/* No-probe without a backing file means nothing. */
	tqed_craft_standard(&c);
	tqed_put64(c.b + TQED_OFF_FEATURES, TQED_F_NO_PROBE);
	tqed_craft_put(&c, "h");
	img = tqed_open_ok("mem:h", false);
	assert_null(img->backing_name);
	assert_null(img->backing_fmt);
	image_close_chain(img);
}

/* Unknown compat bits are ignored; unknown autoclear bits are cleared once
 * we open for writing (as QEMU does). */
static void test_qed_header_compat_and_autoclear(void **state)
{
	struct tqed_craft c;
	struct image *img;

	tqed_craft_standard(&c);
	tqed_put64(c.b + TQED_OFF_COMPAT, 0xff00);
	tqed_put64(c.b + TQED_OFF_AUTOCLEAR, 0x3);
	tqed_craft_put(&c, "h");
	img = tqed_open_ok("mem:h", false);
	image_close_chain(img);
	assert_int_equal(tqed_mem_u64("h", TQED_OFF_AUTOCLEAR), 0x3);
	img = tqed_open_ok("mem:h", true);
	image_close_chain(img);
	assert_int_equal(tqed_mem_u64("h", TQED_OFF_AUTOCLEAR), 0);
	assert_int_equal(tqed_mem_u64("h", TQED_OFF_COMPAT), 0xff00);
}

/* ==== table lookup and runs ==== */

#define TQED_ANY UINT64_MAX /* host offset not checked */

static void tqed_expect_map(struct image *img, uint64_t off, uint64_t len, enum extent_type type,
			    uint64_t elen, uint64_t host)
{
	struct extent e;

	assert_int_equal(drv->map(img, off, len, &e), 0);
	if (e.type != type || e.len != elen ||
	    (type == EXT_DATA && host != TQED_ANY && e.host_off != host))
		fail_msg("map(%llu, %llu) = type %d len %llu host %llu; expected %d %llu %llu",
			 (unsigned long long)off, (unsigned long long)len, e.type,
			 (unsigned long long)e.len, (unsigned long long)e.host_off, type,
			 (unsigned long long)elen, (unsigned long long)host);
}

static void test_qed_map_runs(void **state)
{
	struct tqed_craft c;
	struct image *img;
	uint8_t *buf, *want;

	tqed_craft_standard(&c);
	tqed_craft_put(&c, "m");
	img = tqed_open_ok("mem:m", false);
	assert_int_equal(img->size, 8 * TQED_MIB);
	/* Three contiguous data clusters merge; the fourth is elsewhere. */
	tqed_expect_map(img, 0, img->size, EXT_DATA, 3 * 4096, 3 * 4096);
	tqed_expect_map(img, 100, img->size - 100, EXT_DATA, 3 * 4096 - 100, 3 * 4096 + 100);
	tqed_expect_map(img, 0, 5000, EXT_DATA, 5000, 3 * 4096); /* clamped to len */
	tqed_expect_map(img, 3 * 4096, 4096 * 10, EXT_DATA, 4096, 7 * 4096);
	tqed_expect_map(img, 4 * 4096 + 1, 4096 * 10, EXT_ZERO, 2 * 4096 - 1, 0);
	/* Unallocated from cluster 6 to the end of L2#0 (cluster 510). */
	tqed_expect_map(img, 6 * 4096, img->size - 6 * 4096, EXT_UNALLOC, 505 * 4096, 0);
	/* Data run across the L2 tables: guest 511 -> host 9, 512 -> host 10. */
	tqed_expect_map(img, 511 * 4096, img->size - 511 * 4096, EXT_DATA, 2 * 4096, 9 * 4096);
	/* Unallocated from cluster 513 through the missing tables to the end. */
	tqed_expect_map(img, 513 * 4096, img->size - 513 * 4096, EXT_UNALLOC,
			img->size - 513 * 4096, 0);
	tqed_expect_map(img, 5 * TQED_MIB, 3 * TQED_MIB, EXT_UNALLOC, 3 * TQED_MIB, 0);

	/* Bytes through image_pread match the crafted pattern. */
	buf = malloc(520 * 4096);
	want = malloc(520 * 4096);
	assert_int_equal(image_pread(img, buf, 520 * 4096, 0), 0);
	memset(want, 0, 520 * 4096);
	tqed_fill(want, 4 * 4096, 0, 0);
	tqed_fill(want + 511 * 4096, 2 * 4096, 511 * 4096, 0);
	assert_memory_equal(buf, want, 520 * 4096);
	free(buf);
	free(want);
	image_close_chain(img);
}

/* Tables larger than a cache slice (64 KiB clusters, 4-cluster tables):
 * runs cross slice boundaries inside one table. */
static void test_qed_map_runs_cross_slices(void **state)
{
	struct tqed_craft c;
	struct image *img;
	uint64_t cs = 65536, t = 5 * cs;

	tqed_craft_init(&c, 65536, 4, 64 * TQED_GIB, 9 + 10);
	tqed_craft_l1(&c, 0, t);
	/* Entries 8190..8193 straddle the first slice boundary (8192). */
	for (int i = 0; i < 4; i++) {
		tqed_craft_l2(&c, t, 8190 + i, (9 + i) * cs);
		tqed_craft_data(&c, (9 + i) * cs, (8190 + i) * cs);
	}
	for (int i = 8194; i < 8200; i++)
		tqed_craft_l2(&c, t, i, 1);
	tqed_craft_put(&c, "m");
	img = tqed_open_ok("mem:m", false);
	tqed_expect_map(img, 0, img->size, EXT_UNALLOC, 8190 * cs, 0);
	tqed_expect_map(img, 8190 * cs, img->size - 8190 * cs, EXT_DATA, 4 * cs, 9 * cs);
	tqed_expect_map(img, 8194 * cs, img->size - 8194 * cs, EXT_ZERO, 6 * cs, 0);
	tqed_expect_map(img, 8200 * cs, img->size - 8200 * cs, EXT_UNALLOC, img->size - 8200 * cs,
			0);
	image_close_chain(img);
}

/* Bad offsets in tables fail the reads that need them, never crash. */
static void test_qed_map_bad_offsets_eio(void **state)
{
	struct tqed_craft c;
	struct image *img;
	struct extent e;
	uint8_t buf[4096];

	tqed_craft_standard(&c);
	tqed_craft_l1(&c, 2, 8 * 4096 + 8);		   /* unaligned L2 table */
	tqed_craft_l1(&c, 3, 100 * 4096);		   /* L2 table past EOF */
	tqed_craft_l2(&c, 8 * 4096, 1, 4096 * 4096);	   /* data past EOF */
	tqed_craft_l2(&c, 8 * 4096, 2, 10 * 4096 + 512);   /* unaligned data */
	tqed_craft_l2(&c, 8 * 4096, 3, 0);		   /* unallocated: fine */
	tqed_craft_l2(&c, 8 * 4096, 4, 0x10000000000ULL);  /* far away */
	tqed_craft_l2(&c, 8 * 4096, 5, 10 * 4096 | 0x100); /* reserved low bits set */
	tqed_craft_put(&c, "m");
	img = tqed_open_ok("mem:m", false);
	assert_int_equal(drv->map(img, 4 * TQED_MIB, 4096, &e), -EIO);
	assert_int_equal(drv->map(img, 6 * TQED_MIB + 4096, 4096, &e), -EIO);
	assert_int_equal(image_pread(img, buf, 4096, 4 * TQED_MIB), -EIO);
	/* Guest cluster 512 is fine; the run stops before the bad 513. */
	tqed_expect_map(img, 512 * 4096, 16 * 4096, EXT_DATA, 4096, 10 * 4096);
	for (int i = 513; i <= 514; i++) {
		assert_int_equal(drv->map(img, i * 4096ULL, 4096, &e), -EIO);
		assert_int_equal(image_pread(img, buf, 4096, i * 4096ULL), -EIO);
	}
	assert_int_equal(drv->map(img, 516 * 4096ULL, 4096, &e), -EIO);
	assert_int_equal(drv->map(img, 517 * 4096ULL, 4096, &e), -EIO);
	/* Entry 3 is 0 = unallocated: fine. */
	tqed_expect_map(img, 515 * 4096, 4096, EXT_UNALLOC, 4096, 0);
	/* The rest of the image still reads. */
	assert_int_equal(image_pread(img, buf, 4096, 4096), 0);
	{
		uint8_t want[4096];

		tqed_fill(want, 4096, 4096, 0);
		assert_memory_equal(buf, want, 4096);
	}
	image_close_chain(img);

	/* Writable, the same image is refused: an entry past the end of the
	 * file would become valid once our appends reach it. */
	assert_int_equal(tqed_open("mem:m", true, &img), -EINVAL);
	tqed_craft_standard(&c);
	tqed_craft_l1(&c, 2, 8 * 4096 + 8);
	tqed_craft_put(&c, "m");
	assert_int_equal(tqed_open("mem:m", true, &img), -EINVAL);
	img = tqed_open_ok("mem:m", false);
	assert_int_equal(drv->map(img, 4 * TQED_MIB, 4096, &e), -EIO);
	image_close_chain(img);
}

/* Random corruption of a crafted image (header, L1, L2, with or without
 * need-check): open may fail, reads may fail with -EIO, nothing crashes
 * (run under ASan/UBSan) and errors are -errno. */
static void test_qed_hostile_random_corruption(void **state)
{
	unsigned seed = 12345;
	uint8_t *buf = malloc(64 * 4096);
	int opened = 0, eio = 0;

	assert_non_null(buf);
	for (int it = 0; it < 3000; it++) {
		struct tqed_craft c;
		struct image *img = NULL;
		int flips = 1 + rand_r(&seed) % 4, r;

		tqed_craft_standard(&c);
		if (rand_r(&seed) % 2)
			tqed_put64(c.b + TQED_OFF_FEATURES, TQED_F_NEED_CHECK);
		for (int f = 0; f < flips; f++) {
			/* Mostly the header and the tables (clusters 0-2, 8). */
			static const uint64_t areas[] = {0, 4096, 2 * 4096, 8 * 4096};
			uint64_t a = areas[rand_r(&seed) % 4];
			uint64_t o = a + (uint64_t)(rand_r(&seed) % 64) * (a ? 8 : 1);

			c.b[o + rand_r(&seed) % 8] ^= (uint8_t)(1u << (rand_r(&seed) % 8));
		}
		tqed_craft_put(&c, "fz");
		r = tqed_open("mem:fz", it % 3 == 0, &img);
		assert_true(r == 0 || r == -EINVAL || r == -ENOTSUP || r == -EIO);
		if (r < 0)
			continue;
		opened++;
		for (uint64_t off = 0; off < img->size;) {
			struct extent e;
			uint64_t n = img->size - off;

			r = drv->map(img, off, n, &e);
			if (r < 0) {
				assert_int_equal(r, -EIO);
				eio++;
				off += 4096 - off % 4096;
				continue;
			}
			assert_true(e.len > 0 && e.len <= n);
			n = SFS_MIN(e.len, (uint64_t)64 * 4096);
			r = image_pread(img, buf, n, off);
			assert_true(r == 0 || r == -EIO);
			off += n;
		}
		if (!img->read_only) {
			memset(buf, 0x42, 4096);
			/* -EINVAL: the flips changed the cluster or image size. */
			r = drv->alloc_write(img, 6 * 4096, buf, 4096);
			assert_true(r == 0 || r == -EIO || r == -EINVAL);
		}
		image_close_chain(img);
	}
	free(buf);
	/* Not vacuous: most mutants open and many hit bad entries. */
	assert_true(opened > 1000);
	assert_true(eio > 100);
}

/* ==== allocation ==== */

/* Create a QED image in mem:name with cluster size cs and guest size. */
static void tqed_create(const char *name, uint32_t cs, uint64_t size, const char *backing)
{
	struct image_create_opts o = {.size = size, .cluster_size = cs, .backing_name = backing};
	struct fetch_source *f;
	char uri[64];

	snprintf(uri, sizeof(uri), "mem:%s", name);
	assert_int_equal(fetch_open(uri, FETCH_RDWR | FETCH_CREATE, &f), 0);
	assert_int_equal(drv->create(f, &o), 0);
	fetch_close(f);
}

static void tqed_write_pattern(struct image *img, uint64_t off, uint64_t len, unsigned g)
{
	uint8_t *buf = malloc(len);

	assert_non_null(buf);
	tqed_fill(buf, len, off, g);
	assert_int_equal(drv->alloc_write(img, off, buf, len), 0);
	free(buf);
}

static void tqed_expect_pattern(struct image *img, uint64_t off, uint64_t len, unsigned g)
{
	uint8_t *buf = malloc(len), *want = malloc(len);

	assert_non_null(buf);
	assert_non_null(want);
	tqed_fill(want, len, off, g);
	assert_int_equal(image_pread(img, buf, len, off), 0);
	if (memcmp(buf, want, len) != 0)
		fail_msg("data mismatch at guest offset %llu (+%llu)", (unsigned long long)off,
			 (unsigned long long)len);
	free(buf);
	free(want);
}

static void tqed_expect_zero(struct image *img, uint64_t off, uint64_t len)
{
	uint8_t *buf = malloc(len);

	assert_non_null(buf);
	assert_int_equal(image_pread(img, buf, len, off), 0);
	if (!tqed_is(buf, len, 0))
		fail_msg("not zero at guest offset %llu", (unsigned long long)off);
	free(buf);
}

/* A full disk fails the guest write that needs the space, never the flush
 * of writes already acknowledged: new L2 tables take their space when they
 * are reserved. Every acknowledged write then flushes and reads back. */
static void test_qed_full_disk_fails_writes_not_flush(void **state)
{
	const uint32_t cs = 4096;
	const uint64_t size = 1024 * TQED_MIB;
	uint64_t done[4096];
	unsigned n = 0, seed = 99;
	uint8_t buf[4096];
	struct image *img;
	int r = 0;

	tqed_create("full", cs, size, NULL);
	img = tqed_open_ok("mem:full", true);
	assert_int_equal(fetch_mem_limit("full", 512 * 1024), 0);
	while (n < 4096) {
		/* scattered: most writes need a new L2 table */
		uint64_t off = (uint64_t)(rand_r(&seed) % (size / cs)) * cs;

		tqed_fill(buf, cs, off, 7);
		r = drv->alloc_write(img, off, buf, cs);
		if (r < 0)
			break;
		done[n++] = off;
	}
	assert_int_equal(r, -ENOSPC);
	assert_true(n > 8);
	assert_int_equal(drv->flush(img), 0);
	image_close_chain(img);
	assert_int_equal(fetch_mem_limit("full", 0), 0);
	img = tqed_open_ok("mem:full", false);
	for (unsigned i = 0; i < n; i++) {
		bool later = false;

		for (unsigned j = i + 1; j < n; j++)
			later |= done[j] == done[i];
		if (!later)
			tqed_expect_pattern(img, done[i], cs, 7);
	}
	image_close_chain(img);
}

/* A legal but extreme geometry: 16 MiB clusters address more than 2^64
 * bytes, so the guest size can be 2^64 - 512. Runs, reads and writes at the
 * very end must not overflow. */
static void test_qed_map_huge_guest_size(void **state)
{
	const uint64_t cs = 16 * TQED_MIB, size = ~511ULL, last = (size - 1) & ~(cs - 1);
	struct tqed_craft c;
	struct image *img;
	uint8_t *buf;

	tqed_craft_init(&c, (uint32_t)cs, 1, size, 2);
	tqed_craft_put(&c, "huge");
	img = tqed_open_ok("mem:huge", true);
	assert_int_equal(img->size, size);
	tqed_expect_map(img, 0, size, EXT_UNALLOC, size, 0);
	tqed_expect_map(img, size - 4096, 4096, EXT_UNALLOC, 4096, 0);
	tqed_expect_zero(img, size - 512, 512);
	buf = malloc(cs);
	assert_non_null(buf);
	tqed_fill(buf, cs, last, 6);
	assert_int_equal(drv->alloc_write(img, last, buf, cs), 0);
	assert_int_equal(drv->alloc_write(img, last, buf, 2 * cs), -EINVAL); /* wraps */
	tqed_expect_map(img, last, size - last, EXT_DATA, size - last, TQED_ANY);
	tqed_expect_map(img, 0, size, EXT_UNALLOC, last, 0);
	free(buf);
	image_close_chain(img);
	img = tqed_open_ok("mem:huge", false);
	tqed_expect_pattern(img, size - 512, 512, 6);
	tqed_expect_pattern(img, last, 4096, 6);
	image_close_chain(img);
}

static void test_qed_alloc_write_flush_reopen(void **state)
{
	const uint64_t cs = 65536, size = 10 * TQED_GIB + 512;
	struct image *img;
	struct extent e;
	size_t len0, len1;
	uint8_t *b;

	tqed_create("a", 0, size, NULL);
	b = tqed_mem_copy("a", &len0);
	free(b);
	img = tqed_open_ok("mem:a", true);
	assert_int_equal(img->size, size);
	tqed_write_pattern(img, 0, 4 * cs, 1);
	tqed_write_pattern(img, 3 * TQED_GIB, cs, 2);
	tqed_write_pattern(img, 2 * TQED_GIB - cs, 2 * cs, 3); /* across two L2 tables */
	tqed_write_pattern(img, 10 * TQED_GIB, cs, 4);	       /* last, partial cluster */
	/* Visible before any flush. */
	tqed_expect_pattern(img, 0, 4 * cs, 1);
	tqed_expect_pattern(img, 2 * TQED_GIB - cs, 2 * cs, 3);
	/* One request = one contiguous host range. */
	assert_int_equal(drv->map(img, 0, img->size, &e), 0);
	assert_int_equal(e.type, EXT_DATA);
	assert_int_equal(e.len, 4 * cs);
	assert_true(e.host_off >= len0 + 4 * cs); /* after the new L2 table */
	assert_int_equal(drv->map(img, 2 * TQED_GIB - cs, 2 * cs, &e), 0);
	assert_int_equal(e.type, EXT_DATA);
	assert_int_equal(e.len, 2 * cs);
	/* Metadata is write-back: the L1 on disk is still empty. */
	assert_int_equal(tqed_mem_u64("a", cs), 0);
	assert_int_equal(drv->flush(img), 0);
	assert_int_not_equal(tqed_mem_u64("a", cs), 0);
	image_close_chain(img);

	b = tqed_mem_copy("a", &len1);
	assert_int_equal(len1 % cs, 0);
	free(b);
	assert_int_equal(tqed_mem_features("a") & TQED_F_NEED_CHECK, 0);
	img = tqed_open_ok("mem:a", false);
	tqed_expect_pattern(img, 0, 4 * cs, 1);
	tqed_expect_pattern(img, 3 * TQED_GIB, cs, 2);
	tqed_expect_pattern(img, 2 * TQED_GIB - cs, 2 * cs, 3);
	tqed_expect_pattern(img, 10 * TQED_GIB, 512, 4);
	tqed_expect_zero(img, 4 * cs, 2 * TQED_MIB);
	tqed_expect_zero(img, 3 * TQED_GIB + cs, cs);
	tqed_expect_map(img, 4 * cs, 3 * TQED_GIB - 4 * cs, EXT_UNALLOC, 2 * TQED_GIB - 5 * cs, 0);
	image_close_chain(img);
}

static void test_qed_alloc_write_rejects_misaligned(void **state)
{
	struct image *img;
	uint8_t buf[8192] = {0};

	tqed_create("a", 4096, TQED_MIB + 512, NULL);
	img = tqed_open_ok("mem:a", true);
	assert_int_equal(drv->alloc_write(img, 512, buf, 4096), -EINVAL);
	assert_int_equal(drv->alloc_write(img, 0, buf, 1000), -EINVAL);
	assert_int_equal(drv->alloc_write(img, TQED_MIB, buf, 8192), -EINVAL); /* past the end */
	assert_int_equal(drv->zero_clusters(img, 4096, 100), -EINVAL);
	assert_int_equal(drv->alloc_write(img, TQED_MIB, buf, 4096), 0); /* the partial last */
	image_close_chain(img);
	img = tqed_open_ok("mem:a", false);
	assert_int_equal(drv->alloc_write(img, 0, buf, 4096), -EROFS);
	image_close_chain(img);
}

static void test_qed_zero_clusters(void **state)
{
	const uint64_t cs = 4096;
	struct image *img;
	uint64_t l2;

	tqed_create("z", cs, 64 * TQED_MIB, "base");
	img = tqed_open_ok("mem:z", true);
	tqed_write_pattern(img, 0, 2 * cs, 1);
	assert_int_equal(drv->zero_clusters(img, 2 * cs, 3 * cs), 0);
	assert_int_equal(drv->zero_clusters(img, 40 * TQED_MIB, 2 * cs), 0); /* new L2 table */
	tqed_expect_map(img, 2 * cs, img->size, EXT_ZERO, 3 * cs, 0);
	tqed_expect_map(img, 40 * TQED_MIB, img->size - 40 * TQED_MIB, EXT_ZERO, 2 * cs, 0);
	assert_int_equal(drv->flush(img), 0);
	image_close_chain(img);

	/* On disk the entries are 1, and no data was allocated for them. */
	l2 = tqed_mem_u64("z", cs); /* L1[0] */
	assert_int_equal(tqed_mem_u64("z", l2 + 2 * 8), 1);
	assert_int_equal(tqed_mem_u64("z", l2 + 4 * 8), 1);
	assert_int_equal(tqed_mem_u64("z", l2 + 5 * 8), 0);
	img = tqed_open_ok("mem:z", false);
	tqed_expect_pattern(img, 0, 2 * cs, 1);
	tqed_expect_map(img, 2 * cs, img->size - 2 * cs, EXT_ZERO, 3 * cs, 0);
	tqed_expect_map(img, 5 * cs, cs, EXT_UNALLOC, cs, 0);
	tqed_expect_map(img, 40 * TQED_MIB, 4 * cs, EXT_ZERO, 2 * cs, 0);
	tqed_expect_zero(img, 2 * cs, 3 * cs);
	image_close_chain(img);
}

/* ==== need-check and recovery ==== */

static void test_qed_need_check_set_and_cleared(void **state)
{
	struct image *img;

	tqed_create("n", 4096, 8 * TQED_MIB, NULL);
	img = tqed_open_ok("mem:n", true);
	/* Not before the first allocating write. */
	assert_int_equal(tqed_mem_features("n") & TQED_F_NEED_CHECK, 0);
	tqed_write_pattern(img, 0, 4096, 1);
	assert_int_equal(tqed_mem_features("n") & TQED_F_NEED_CHECK, TQED_F_NEED_CHECK);
	assert_int_equal(drv->flush(img), 0);
	assert_int_equal(tqed_mem_features("n") & TQED_F_NEED_CHECK, TQED_F_NEED_CHECK);
	image_close_chain(img);
	assert_int_equal(tqed_mem_features("n"), 0);

	/* Also set by zero_clusters; a read-only open never writes. */
	img = tqed_open_ok("mem:n", true);
	assert_int_equal(drv->zero_clusters(img, 4096, 4096), 0);
	assert_int_equal(tqed_mem_features("n") & TQED_F_NEED_CHECK, TQED_F_NEED_CHECK);
	image_close_chain(img);
	assert_int_equal(tqed_mem_features("n"), 0);
	img = tqed_open_ok("mem:n", false);
	tqed_expect_pattern(img, 0, 4096, 1);
	tqed_expect_map(img, 4096, 8192, EXT_ZERO, 4096, 0);
	image_close_chain(img);
}

/* A failed flush leaves the metadata dirty (a later flush writes it) and
 * close() leaves the need-check bit set. */
static void test_qed_flush_failure(void **state)
{
	struct image *img;

	tqed_create("f", 4096, 8 * TQED_MIB, NULL);
	img = tqed_open_ok("mem:f", true);
	tqed_write_pattern(img, 0, 8192, 1);
	assert_int_equal(fetch_mem_fail("f", FETCH_MEM_FLUSH, 0, EIO), 0);
	assert_int_equal(drv->flush(img), -EIO);
	assert_int_equal(fetch_mem_fail("f", 0, 0, 0), 0);
	assert_int_equal(drv->flush(img), 0);
	tqed_write_pattern(img, 3 * TQED_MIB, 4096, 2);
	assert_int_equal(fetch_mem_fail("f", FETCH_MEM_WRITE, 0, EIO), 0);
	assert_int_equal(drv->flush(img), -EIO);
	image_close_chain(img); /* flush and clearing the bit fail */
	assert_int_equal(tqed_mem_features("f") & TQED_F_NEED_CHECK, TQED_F_NEED_CHECK);
	assert_int_equal(fetch_mem_fail("f", 0, 0, 0), 0);
	img = tqed_open_ok("mem:f", false); /* checked: consistent, leaks only */
	tqed_expect_pattern(img, 0, 8192, 1);
	tqed_expect_zero(img, 3 * TQED_MIB, 4096);
	image_close_chain(img);
	img = tqed_open_ok("mem:f", true); /* checked and marked clean */
	image_close_chain(img);
	assert_int_equal(tqed_mem_features("f"), 0);
}

/* An image with need-check set and L2 entries past EOF (allocations whose
 * data never reached the file): fixed when writable, refused otherwise. */
static void test_qed_check_drops_entries_past_eof(void **state)
{
	struct tqed_craft c;
	struct image *img;
	const void *d;
	size_t len;

	tqed_craft_standard(&c);
	tqed_put64(c.b + TQED_OFF_FEATURES, TQED_F_NEED_CHECK);
	tqed_craft_l2(&c, 2 * 4096, 6, 11 * 4096); /* exactly at EOF */
	tqed_craft_l2(&c, 2 * 4096, 7, 12 * 4096);
	tqed_craft_put(&c, "k");
	assert_int_equal(tqed_open("mem:k", false, &img), -EINVAL);
	assert_int_equal(tqed_mem_u64("k", 2 * 4096 + 6 * 8), 11 * 4096); /* untouched */

	img = tqed_open_ok("mem:k", true);
	tqed_expect_map(img, 6 * 4096, 4096 * 4, EXT_UNALLOC, 4096 * 4, 0);
	tqed_expect_pattern(img, 0, 4 * 4096, 0);
	tqed_expect_pattern(img, 511 * 4096, 2 * 4096, 0);
	image_close_chain(img);
	assert_int_equal(tqed_mem_u64("k", 2 * 4096 + 6 * 8), 0);
	assert_int_equal(tqed_mem_u64("k", 2 * 4096 + 7 * 8), 0);
	assert_int_equal(tqed_mem_u64("k", 2 * 4096 + 0 * 8), 3 * 4096); /* kept */
	assert_int_equal(tqed_mem_features("k"), 0);
	assert_int_equal(fetch_mem_get("k", &d, &len), 0);
	assert_int_equal(len, 11 * 4096);
	/* Clean now: a read-only open accepts it. */
	img = tqed_open_ok("mem:k", false);
	image_close_chain(img);
}

static void test_qed_check_drops_l1_entry_past_eof(void **state)
{
	struct tqed_craft c;
	struct image *img;

	tqed_craft_standard(&c);
	tqed_put64(c.b + TQED_OFF_FEATURES, TQED_F_NEED_CHECK);
	tqed_craft_l1(&c, 3, 11 * 4096); /* a new L2 table that never made it */
	tqed_craft_put(&c, "k");
	assert_int_equal(tqed_open("mem:k", false, &img), -EINVAL);
	img = tqed_open_ok("mem:k", true);
	tqed_expect_map(img, 6 * TQED_MIB, 2 * TQED_MIB, EXT_UNALLOC, 2 * TQED_MIB, 0);
	image_close_chain(img);
	assert_int_equal(tqed_mem_u64("k", 4096 + 3 * 8), 0);
	assert_int_equal(tqed_mem_u64("k", 4096 + 1 * 8), 8 * 4096);
	assert_int_equal(tqed_mem_features("k"), 0);
}

static void test_qed_check_refuses_double_reference(void **state)
{
	struct tqed_craft c;
	struct image *img;

	tqed_craft_standard(&c);
	tqed_put64(c.b + TQED_OFF_FEATURES, TQED_F_NEED_CHECK);
	tqed_craft_l2(&c, 8 * 4096, 1, 3 * 4096); /* also guest cluster 0's */
	tqed_craft_put(&c, "k");
	assert_int_equal(tqed_open("mem:k", true, &img), -EINVAL);
	assert_int_equal(tqed_open("mem:k", false, &img), -EINVAL);
	assert_int_equal(tqed_mem_features("k"), TQED_F_NEED_CHECK); /* left alone */

	/* A data cluster that is also an L2 table. */
	tqed_craft_standard(&c);
	tqed_put64(c.b + TQED_OFF_FEATURES, TQED_F_NEED_CHECK);
	tqed_craft_l2(&c, 8 * 4096, 1, 2 * 4096);
	tqed_craft_put(&c, "k");
	assert_int_equal(tqed_open("mem:k", true, &img), -EINVAL);

	/* Two L1 entries naming one table. */
	tqed_craft_standard(&c);
	tqed_put64(c.b + TQED_OFF_FEATURES, TQED_F_NEED_CHECK);
	tqed_craft_l1(&c, 2, 8 * 4096);
	tqed_craft_put(&c, "k");
	assert_int_equal(tqed_open("mem:k", true, &img), -EINVAL);

	/* Without the need-check bit, the same images open read-only (reads
	 * are harmless) but never writable: in-place writes to one guest
	 * cluster would change another, or a table. */
	for (int k = 0; k < 3; k++) {
		tqed_craft_standard(&c);
		if (k == 0)
			tqed_craft_l2(&c, 8 * 4096, 1, 3 * 4096); /* guest cluster 0's */
		else if (k == 1)
			tqed_craft_l2(&c, 8 * 4096, 1, 2 * 4096); /* an L2 table */
		else
			tqed_craft_l2(&c, 8 * 4096, 1, 4096); /* the L1 table */
		tqed_craft_put(&c, "k");
		img = tqed_open_ok("mem:k", false);
		image_close_chain(img);
		assert_int_equal(tqed_open("mem:k", true, &img), -EINVAL);
		assert_int_equal(tqed_mem_features("k"), 0); /* nothing written */
	}
	tqed_craft_standard(&c);
	tqed_craft_put(&c, "k");
	img = tqed_open_ok("mem:k", true);
	image_close_chain(img);
}

/* A torn append (a partial cluster at the end) is cut off; leaked clusters
 * are fine. */
static void test_qed_check_truncates_partial_cluster(void **state)
{
	struct tqed_craft c;
	struct image *img;
	const void *d;
	size_t len;
	uint8_t *b;

	tqed_craft_standard(&c);
	tqed_put64(c.b + TQED_OFF_FEATURES, TQED_F_NEED_CHECK);
	b = realloc(c.b, c.len + 2 * 4096 + 100); /* a leaked cluster + a torn one */
	assert_non_null(b);
	memset(b + c.len, 0x5a, 2 * 4096 + 100);
	c.b = b;
	c.len += 2 * 4096 + 100;
	tqed_craft_put(&c, "k");
	img = tqed_open_ok("mem:k", false); /* read-only: served, file untouched */
	tqed_expect_pattern(img, 0, 4 * 4096, 0);
	image_close_chain(img);
	assert_int_equal(fetch_mem_get("k", &d, &len), 0);
	assert_int_equal(len, 13 * 4096 + 100);
	img = tqed_open_ok("mem:k", true);
	assert_int_equal(fetch_mem_get("k", &d, &len), 0);
	assert_int_equal(len, 13 * 4096);
	tqed_write_pattern(img, 7 * 4096, 4096, 9);
	image_close_chain(img);
	img = tqed_open_ok("mem:k", false);
	tqed_expect_pattern(img, 7 * 4096, 4096, 9);
	tqed_expect_pattern(img, 0, 4 * 4096, 0);
	image_close_chain(img);
	assert_int_equal(tqed_mem_features("k"), 0);
}

/* The workload of the crash tests: allocating writes, zero clusters and
 * flushes. Stops at the first error (the "crash"). Generation g. */
static int tqed_crash_workload(struct image *img, unsigned g)
{
	static const uint64_t offs[] = {0, 5, 1024, 1025, 3000, 17, 600, 4000};
	uint8_t buf[3 * 4096];
	int r;

	for (size_t i = 0; i < sizeof(offs) / sizeof(offs[0]); i++) {
		uint64_t off = offs[i] * 4096;

		tqed_fill(buf, sizeof(buf), off, g);
		r = drv->alloc_write(img, off, buf, i % 2 ? 4096 : sizeof(buf));
		if (r < 0)
			return r;
		if (i == 3 && (r = drv->zero_clusters(img, 2000 * 4096ULL, 2 * 4096)) < 0)
			return r;
		if (i % 3 == 2 && (r = drv->flush(img)) < 0)
			return r;
	}
	return drv->flush(img);
}

/* Each cluster written by the workload reads either as never written (zero)
 * or as fully written; the image passes the check. */
static void tqed_crash_verify(struct image *img, unsigned g, bool complete)
{
	static const uint64_t offs[] = {0, 5, 1024, 1025, 3000, 17, 600, 4000};
	uint8_t buf[4096], want[4096];

	for (size_t i = 0; i < sizeof(offs) / sizeof(offs[0]); i++) {
		size_t n = i % 2 ? 1 : 3;

		for (size_t k = 0; k < n; k++) {
			uint64_t off = (offs[i] + k) * 4096;

			assert_int_equal(image_pread(img, buf, 4096, off), 0);
			tqed_fill(want, 4096, off, g);
			if (memcmp(buf, want, 4096) != 0 && (complete || !tqed_is(buf, 4096, 0)))
				fail_msg("cluster at %llu is neither old nor new",
					 (unsigned long long)off);
		}
	}
}

static void test_qed_crash_at_every_write(void **state)
{
	struct image *img;
	uint64_t k;
	bool done = false;

	for (k = 0; !done; k++) {
		size_t len;
		uint8_t *snap;
		int r;

		fetch_mem_reset();
		tqed_create("cr", 4096, 32 * TQED_MIB, NULL);
		img = tqed_open_ok("mem:cr", true);
		assert_int_equal(fetch_mem_fail("cr", FETCH_MEM_WRITE, k, EIO), 0);
		r = tqed_crash_workload(img, 1);
		done = r == 0;
		/* The bytes at the moment of the crash. */
		snap = tqed_mem_copy("cr", &len);
		assert_int_equal(fetch_mem_put("after", snap, len), 0);
		free(snap);
		assert_int_equal(fetch_mem_fail("cr", 0, 0, 0), 0);
		image_close_chain(img);

		img = tqed_open_ok("mem:after", true);
		tqed_crash_verify(img, 1, done);
		/* And it takes more writes after recovery. */
		tqed_write_pattern(img, 1024 * 4096, 4096, 2);
		image_close_chain(img);
		img = tqed_open_ok("mem:after", false);
		tqed_expect_pattern(img, 1024 * 4096, 4096, 2);
		image_close_chain(img);
		assert_true(k < 1000);
	}
	assert_true(k > 10); /* the workload really did that many writes */
}

/* Snapshots taken without any fault, between every step: unflushed
 * metadata is simply absent; flushed data is there. */
static void test_qed_crash_before_flush_leaks_only(void **state)
{
	struct image *img, *img2;
	uint8_t *snap;
	size_t len;

	tqed_create("s", 4096, 32 * TQED_MIB, NULL);
	img = tqed_open_ok("mem:s", true);
	tqed_write_pattern(img, 0, 8192, 1);
	assert_int_equal(drv->flush(img), 0);
	tqed_write_pattern(img, 8192, 8192, 2);
	tqed_write_pattern(img, 20 * TQED_MIB, 4096, 2);
	snap = tqed_mem_copy("s", &len);
	assert_int_equal(fetch_mem_put("s2", snap, len), 0);
	free(snap);
	image_close_chain(img);

	assert_int_equal(tqed_mem_features("s2") & TQED_F_NEED_CHECK, TQED_F_NEED_CHECK);
	img2 = tqed_open_ok("mem:s2", false);
	tqed_expect_pattern(img2, 0, 8192, 1);
	tqed_expect_map(img2, 8192, 8192, EXT_UNALLOC, 8192, 0);
	tqed_expect_map(img2, 20 * TQED_MIB, 4096, EXT_UNALLOC, 4096, 0);
	image_close_chain(img2);
	img2 = tqed_open_ok("mem:s2", true);
	image_close_chain(img2);
	assert_int_equal(tqed_mem_features("s2"), 0);
}

/* ==== set_backing ==== */

static void test_qed_set_backing(void **state)
{
	struct image *img;
	const uint8_t *d;
	size_t len;
	char name[5000];

	tqed_create("b", 4096, 8 * TQED_MIB, "old-backing.qcow2");
	img = tqed_open_ok("mem:b", true);
	tqed_write_pattern(img, 0, 4096, 1);
	assert_int_equal(drv->set_backing(img, "dir/new.raw", "raw"), 0);
	assert_string_equal(img->backing_name, "dir/new.raw");
	assert_string_equal(img->backing_fmt, "raw");
	/* Durable on return, metadata included (set_backing flushes). */
	assert_int_equal(fetch_mem_get("b", (const void **)&d, &len), 0);
	assert_int_equal(tqed_get64(d + TQED_OFF_FEATURES) & ~TQED_F_NEED_CHECK,
			 TQED_F_BACKING | TQED_F_NO_PROBE);
	assert_int_equal(tqed_get32(d + TQED_OFF_BOFF), 64);
	assert_int_equal(tqed_get32(d + TQED_OFF_BSIZE), 11);
	assert_memory_equal(d + 64, "dir/new.raw", 11);
	assert_int_not_equal(tqed_get64(d + 4096), 0); /* L1 written */

	/* Too long for the one-cluster header: refused, nothing changed. */
	memset(name, 'x', sizeof(name) - 1);
	name[4096 - 64 + 1] = '\0';
	assert_int_equal(drv->set_backing(img, name, NULL), -ENAMETOOLONG);
	assert_string_equal(img->backing_name, "dir/new.raw");
	name[4096 - 64] = '\0'; /* exactly fits */
	assert_int_equal(drv->set_backing(img, name, "qcow2"), 0);
	assert_null(img->backing_fmt);
	image_close_chain(img);
	img = tqed_open_ok("mem:b", false);
	assert_string_equal(img->backing_name, name);
	assert_null(img->backing_fmt);
	image_close_chain(img);

	img = tqed_open_ok("mem:b", true);
	assert_int_equal(drv->set_backing(img, NULL, NULL), 0);
	assert_null(img->backing_name);
	assert_null(img->backing_fmt);
	image_close_chain(img);
	assert_int_equal(fetch_mem_get("b", (const void **)&d, &len), 0);
	assert_int_equal(tqed_get64(d + TQED_OFF_FEATURES), 0);
	assert_int_equal(tqed_get32(d + TQED_OFF_BOFF), 0);
	assert_int_equal(tqed_get32(d + TQED_OFF_BSIZE), 0);
	img = tqed_open_ok("mem:b", false);
	assert_null(img->backing_name);
	tqed_expect_pattern(img, 0, 4096, 1);
	image_close_chain(img);
}

/* ==== memory bound and concurrency ==== */

/* In-use heap bytes (0 when the allocator does not say, as under ASan). */
static uint64_t tqed_heap_in_use(void)
{
	struct mallinfo2 m = mallinfo2();

	return m.uordblks + m.hblkhd;
}

/* More L2 tables than the cache holds (600 tables of 64 KiB = 37.5 MiB >
 * 16 MiB), each dirtied: evictions, flushes under pressure, reloads. On a
 * real file so that the heap holds only the driver's memory. */
static void test_qed_cache_pressure(void **state)
{
	const uint64_t cs = 65536, span = 8192 * cs; /* one L2 table (1 cluster) */
	const int ntables = 600;
	char path[] = "/tmp/test-qed-pressure-XXXXXX";
	struct tqed_craft c;
	struct image *img;
	uint64_t h0, h1;
	int fd;

	tqed_craft_init(&c, 65536, 1, ntables * span, 2);
	fd = mkstemp(path);
	assert_true(fd >= 0);
	assert_int_equal(write(fd, c.b, c.len), (ssize_t)c.len);
	close(fd);
	free(c.b);
	assert_int_equal(image_open_one(path, "qed", IMAGE_RDWR, &img), 0);
	h0 = tqed_heap_in_use();
	for (int i = 0; i < ntables; i++)
		tqed_write_pattern(img, i * span + (i % 7) * cs, cs, 3);
	h1 = tqed_heap_in_use();
	/* Bounded by the cache budget plus the dirty slack, not by the
	 * 37.5 MiB of tables. */
	if (h0)
		assert_true(h1 < h0 + 26 * TQED_MIB);
	for (int i = 0; i < ntables; i++) {
		tqed_expect_pattern(img, i * span + (i % 7) * cs, cs, 3);
		tqed_expect_map(img, i * span + 7 * cs, cs, EXT_UNALLOC, cs, 0);
	}
	if (h0)
		assert_true(tqed_heap_in_use() < h0 + 26 * TQED_MIB);
	image_close_chain(img);
	assert_int_equal(image_open_one(path, "qed", 0, &img), 0);
	for (int i = ntables - 1; i >= 0; i--)
		tqed_expect_pattern(img, i * span + (i % 7) * cs, cs, 3);
	image_close_chain(img);
	unlink(path);
}

struct tqed_thread {
	struct image *img;
	int id, nthreads;
	int err;
};

#define TQED_THREAD_CLUSTERS 300

/* Thread id writes guest clusters id, id+n, id+2n, ... (4 KiB clusters, L2
 * tables of 512 clusters, so tables are shared and created concurrently),
 * mapping and reading everywhere meanwhile. */
static void *tqed_thread(void *arg)
{
	struct tqed_thread *t = arg;
	uint8_t buf[4096], want[4096];

	for (int i = 0; i < TQED_THREAD_CLUSTERS && !t->err; i++) {
		uint64_t c = (uint64_t)i * t->nthreads + t->id, other;
		struct extent e;

		c = (c * 97) % (TQED_THREAD_CLUSTERS * t->nthreads); /* scatter */
		tqed_fill(buf, sizeof(buf), c * 4096, 5);
		if (drv->alloc_write(t->img, c * 4096, buf, 4096) < 0)
			t->err = 1;
		if (drv->map(t->img, c * 4096, 4096, &e) < 0 || e.type != EXT_DATA)
			t->err = 2;
		if (image_pread(t->img, buf, 4096, c * 4096) < 0)
			t->err = 3;
		tqed_fill(want, sizeof(want), c * 4096, 5);
		if (memcmp(buf, want, 4096) != 0)
			t->err = 4;
		/* Someone else's cluster: old (zero) or new, never garbage. */
		other = (c * 31 + 7) % (TQED_THREAD_CLUSTERS * t->nthreads);
		if (image_pread(t->img, buf, 4096, other * 4096) < 0)
			t->err = 5;
		tqed_fill(want, sizeof(want), other * 4096, 5);
		if (memcmp(buf, want, 4096) != 0 && !tqed_is(buf, 4096, 0))
			t->err = 6;
		if (i % 50 == 49 && drv->flush(t->img) < 0)
			t->err = 7;
	}
	return NULL;
}

static void test_qed_concurrent_writes_and_reads(void **state)
{
	enum { N = 8 };
	struct tqed_thread t[N];
	pthread_t th[N];
	struct image *img;

	tqed_create("t", 4096, 16 * TQED_MIB, NULL);
	img = tqed_open_ok("mem:t", true);
	for (int i = 0; i < N; i++) {
		t[i] = (struct tqed_thread){.img = img, .id = i, .nthreads = N};
		assert_int_equal(pthread_create(&th[i], NULL, tqed_thread, &t[i]), 0);
	}
	for (int i = 0; i < N; i++) {
		pthread_join(th[i], NULL);
		if (t[i].err)
			fail_msg("thread %d failed at step %d", i, t[i].err);
	}
	image_close_chain(img);
	img = tqed_open_ok("mem:t", false);
	for (uint64_t c = 0; c < TQED_THREAD_CLUSTERS * N; c++)
		tqed_expect_pattern(img, c * 4096, 4096, 5);
	/* All clusters written: 2400 clusters, each mapped exactly once. */
	tqed_expect_zero(img, TQED_THREAD_CLUSTERS * N * 4096, 4096);
	image_close_chain(img);
}

/* ==== qemu-img as an oracle ==== */

static char tqed_dir[256];

static bool tqed_have_qemu(void)
{
	return system("qemu-img --version >/dev/null 2>&1") == 0 &&
	       system("qemu-io --version >/dev/null 2>&1") == 0;
}

static int tqed_sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Run a shell command in the test directory; returns its exit status. */
static int tqed_sh(const char *fmt, ...)
{
	char cmd[4096];
	int n, st;
	va_list ap;

	n = snprintf(cmd, sizeof(cmd), "cd '%s' && ", tqed_dir);
	va_start(ap, fmt);
	vsnprintf(cmd + n, sizeof(cmd) - (size_t)n, fmt, ap);
	va_end(ap);
	st = system(cmd);
	return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static int tqed_qemu_setup(void **state)
{
	fetch_mem_reset();
	if (!tqed_have_qemu())
		return 0;
	snprintf(tqed_dir, sizeof(tqed_dir), "/tmp/test-qed-XXXXXX");
	assert_non_null(mkdtemp(tqed_dir));
	return 0;
}

static int tqed_qemu_teardown(void **state)
{
	char cmd[300];

	if (tqed_dir[0]) {
		snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tqed_dir);
		assert_int_equal(system(cmd), 0);
		tqed_dir[0] = '\0';
	}
	fetch_mem_reset();
	return 0;
}

#define TQED_NEED_QEMU()                                                                           \
	do {                                                                                       \
		if (!tqed_dir[0]) {                                                                \
			print_message("qemu-img/qemu-io not found: skipped\n");                    \
			skip();                                                                    \
		}                                                                                  \
	} while (0)

static char *tqed_path(const char *name)
{
	static char paths[4][512];
	static int i;
	char *p = paths[i++ % 4];

	snprintf(p, 512, "%s/%s", tqed_dir, name);
	return p;
}

/* qemu-img check: 0 = clean, 3 = leaks only (acceptable after a crash). */
static int tqed_qemu_check(const char *name)
{
	int r = tqed_sh("qemu-img check -q -f qed '%s'", name);

	if (r != 0)
		tqed_sh("qemu-img check -f qed '%s' >&2", name);
	return r;
}

/* Images written by qemu-io read back byte for byte. */
static void test_qed_qemu_image_reads(void **state)
{
	struct image *img;
	uint8_t *buf;
	uint64_t size = 8 * TQED_MIB;

	TQED_NEED_QEMU();
	assert_int_equal(tqed_sh("qemu-img create -q -f qed a.qed 8M && "
				 "qemu-io -f qed -c 'write -P 0xab 0 64k' "
				 "-c 'write -P 0xcd 1M 192k' -c 'write -P 0xef 4194000 1000' "
				 "-c 'write -z 6M 128k' a.qed >/dev/null && "
				 "qemu-img create -q -f raw ref.raw 8M && "
				 "qemu-io -f raw -c 'write -P 0xab 0 64k' "
				 "-c 'write -P 0xcd 1M 192k' -c 'write -P 0xef 4194000 1000' "
				 "ref.raw >/dev/null"),
			 0);
	assert_int_equal(image_open_one(tqed_path("a.qed"), NULL, 0, &img), 0); /* probed */
	assert_ptr_equal(img->drv, &image_qed_driver);
	assert_int_equal(img->size, size);
	assert_null(img->backing_name);
	{
		uint8_t *ref = malloc(size);
		FILE *f = fopen(tqed_path("ref.raw"), "rb");

		buf = malloc(size);
		assert_non_null(f);
		assert_int_equal(fread(ref, 1, size, f), size);
		fclose(f);
		assert_int_equal(image_pread(img, buf, size, 0), 0);
		assert_memory_equal(buf, ref, size);
		assert_true(tqed_is(buf, 65536, 0xab));
		free(ref);
		free(buf);
	}
	tqed_expect_map(img, 0, size, EXT_DATA, 65536, TQED_ANY);
	tqed_expect_map(img, 65536, size - 65536, EXT_UNALLOC, TQED_MIB - 65536, 0);
	tqed_expect_map(img, TQED_MIB, size - TQED_MIB, EXT_DATA, 3 * 65536, TQED_ANY);
	tqed_expect_map(img, 6 * TQED_MIB, size - 6 * TQED_MIB, EXT_ZERO, 2 * 65536, 0);
	image_close_chain(img);
}

/* A chain made by qemu-img: backing name and format from the header. */
static void test_qed_qemu_backing_chain(void **state)
{
	struct image *img;
	uint8_t buf[65536];

	TQED_NEED_QEMU();
	assert_int_equal(tqed_sh("qemu-img create -q -f raw base.raw 4M && "
				 "qemu-io -f raw -c 'write -P 0x11 0 4M' base.raw >/dev/null && "
				 "qemu-img create -q -f qed -b base.raw -F raw top.qed && "
				 "qemu-io -f qed -c 'write -P 0x22 64k 64k' top.qed >/dev/null"),
			 0);
	assert_int_equal(image_open_chain(tqed_path("top.qed"), NULL, 0, NULL, &img), 0);
	assert_string_equal(img->backing_name, "base.raw");
	assert_string_equal(img->backing_fmt, "raw");
	assert_non_null(img->backing);
	assert_int_equal(img->size, 4 * TQED_MIB);
	assert_int_equal(image_pread(img, buf, sizeof(buf), 0), 0);
	assert_true(tqed_is(buf, sizeof(buf), 0x11));
	assert_int_equal(image_pread(img, buf, sizeof(buf), 65536), 0);
	assert_true(tqed_is(buf, sizeof(buf), 0x22));
	assert_int_equal(image_pread(img, buf, sizeof(buf), 3 * TQED_MIB), 0);
	assert_true(tqed_is(buf, sizeof(buf), 0x11));
	image_close_chain(img);
}

/* Images created and written by us pass qemu-img check and compare equal
 * to a raw reference written the same way. */
static void test_qed_qemu_check_and_compare(void **state)
{
	const uint64_t size = 300 * TQED_MIB, cs = 65536;
	struct image_create_opts o = {.size = size};
	/* Clusters 0, 1-2, 3-5, 17, 4095-4096, 4097-4099, 4100 (never one twice:
	 * alloc_write's contract). */
	static const uint64_t offs[] = {0, 1, 3, 17, 4095, 4097, 4100};
	struct image *img;
	uint8_t *buf = malloc(4 * cs);
	int fd;

	TQED_NEED_QEMU();
	assert_int_equal(image_create(tqed_path("o.qed"), "qed", &o), 0);
	assert_int_equal(tqed_sh("qemu-img check -q -f qed o.qed"), 0);
	fd = open(tqed_path("ref.raw"), O_RDWR | O_CREAT | O_TRUNC, 0644);
	assert_true(fd >= 0);
	assert_int_equal(ftruncate(fd, (off_t)size), 0);
	assert_int_equal(image_open_one(tqed_path("o.qed"), "qed", IMAGE_RDWR, &img), 0);
	for (size_t i = 0; i < sizeof(offs) / sizeof(offs[0]); i++) {
		uint64_t off = offs[i] * cs;
		size_t len = (size_t)((i % 3 + 1) * cs);

		tqed_fill(buf, len, off, 8);
		assert_int_equal(drv->alloc_write(img, off, buf, len), 0);
		assert_int_equal(pwrite(fd, buf, len, (off_t)off), (ssize_t)len);
	}
	assert_int_equal(drv->zero_clusters(img, 100 * cs, 3 * cs), 0);
	assert_int_equal(drv->flush(img), 0);
	/* A snapshot while open (need-check set, everything flushed). */
	assert_int_equal(tqed_sh("cp o.qed open.qed"), 0);
	tqed_fill(buf, cs, 250 * TQED_MIB, 8);
	assert_int_equal(drv->alloc_write(img, 250 * TQED_MIB, buf, cs), 0);
	assert_int_equal(pwrite(fd, buf, cs, (off_t)(250 * TQED_MIB)), (ssize_t)cs);
	/* A snapshot with unflushed allocations: leaks at worst. */
	assert_int_equal(tqed_sh("cp o.qed crash.qed"), 0);
	image_close_chain(img);
	close(fd);
	free(buf);

	assert_int_equal(tqed_qemu_check("o.qed"), 0);
	assert_int_equal(tqed_sh("qemu-img compare -q -f qed -F raw o.qed ref.raw"), 0);
	assert_int_equal(tqed_sh("qemu-img info o.qed | grep -q 'file format: qed'"), 0);
	assert_int_equal(tqed_qemu_check("open.qed"), 0);
	/* The unflushed allocation is a leaked cluster (exit 3), nothing worse;
	 * QED's check cannot reclaim leaks, so -r all still says 3. */
	assert_int_equal(tqed_sh("qemu-img check -q -f qed crash.qed 2>/dev/null"), 3);
	assert_int_equal(tqed_sh("qemu-img check -q -r all -f qed crash.qed 2>/dev/null"), 3);
	assert_int_equal(tqed_sh("qemu-img compare -q -f qed -F raw crash.qed ref.raw"), 1);
	/* We read it too (it lacks the unflushed write). */
	assert_int_equal(image_open_one(tqed_path("crash.qed"), "qed", 0, &img), 0);
	tqed_expect_zero(img, 250 * TQED_MIB, cs);
	tqed_expect_pattern(img, 4095 * cs, cs, 8);
	image_close_chain(img);
}

/* set_backing writes what qemu-img understands. */
static void test_qed_qemu_set_backing(void **state)
{
	struct image_create_opts o = {.size = 4 * TQED_MIB};
	struct image *img;

	TQED_NEED_QEMU();
	assert_int_equal(tqed_sh("qemu-img create -q -f raw base.raw 4M && "
				 "qemu-io -f raw -c 'write -P 0x33 0 4M' base.raw >/dev/null"),
			 0);
	assert_int_equal(image_create(tqed_path("s.qed"), "qed", &o), 0);
	assert_int_equal(image_open_one(tqed_path("s.qed"), "qed", IMAGE_RDWR, &img), 0);
	tqed_write_pattern(img, 65536, 65536, 4);
	assert_int_equal(drv->set_backing(img, "base.raw", "raw"), 0);
	image_close_chain(img);
	assert_int_equal(tqed_qemu_check("s.qed"), 0);
	assert_int_equal(tqed_sh("qemu-img info --output=json s.qed | "
				 "grep -q '\"backing-filename\": \"base.raw\"' && "
				 "qemu-img info --output=json s.qed | "
				 "grep -q '\"backing-filename-format\": \"raw\"'"),
			 0);
	/* QEMU reads the chain as we do. */
	assert_int_equal(tqed_sh("qemu-io -f qed -c 'read -P 0x33 0 64k' "
				 "-c 'read -P 0x33 128k 64k' s.qed >io.out 2>&1 && "
				 "! grep -q -i 'fail' io.out && "
				 "test $(grep -c 'read 65536/65536' io.out) = 2"),
			 0);
	assert_int_equal(tqed_sh("qemu-img convert -f qed -O raw s.qed flat.raw"), 0);
	assert_int_equal(image_open_chain(tqed_path("s.qed"), NULL, 0, NULL, &img), 0);
	{
		uint8_t got[65536], want[65536];
		FILE *f = fopen(tqed_path("flat.raw"), "rb");

		assert_non_null(f);
		assert_int_equal(fseek(f, 65536, SEEK_SET), 0);
		assert_int_equal(fread(want, 1, sizeof(want), f), sizeof(want));
		fclose(f);
		assert_int_equal(image_pread(img, got, sizeof(got), 65536), 0);
		assert_memory_equal(got, want, sizeof(got));
		assert_int_equal(image_pread(img, got, sizeof(got), 0), 0);
		assert_true(tqed_is(got, sizeof(got), 0x33));
	}
	image_close_chain(img);
	assert_int_equal(tqed_sh("qemu-img compare -q s.qed flat.raw"), 0);
}

/* qemu-img check on an image crafted with need-check and an entry past
 * EOF agrees that our repair leaves it clean. (2-cluster tables: QEMU 7.2
 * cannot open images with table_size 1 at all.) */
static void test_qed_qemu_check_after_our_repair(void **state)
{
	struct tqed_craft c;
	struct image *img;
	FILE *f;

	TQED_NEED_QEMU();
	/* header, L1 (clusters 1-2), L2 (3-4), data for guest cluster 0 (5) */
	tqed_craft_init(&c, 4096, 2, 16 * TQED_MIB, 6);
	tqed_put64(c.b + TQED_OFF_FEATURES, TQED_F_NEED_CHECK);
	tqed_craft_l1(&c, 0, 3 * 4096);
	tqed_craft_l2(&c, 3 * 4096, 0, 5 * 4096);
	tqed_craft_data(&c, 5 * 4096, 0);
	tqed_craft_l2(&c, 3 * 4096, 1, 6 * 4096); /* at EOF: never written */
	f = fopen(tqed_path("r.qed"), "wb");
	assert_non_null(f);
	assert_int_equal(fwrite(c.b, 1, c.len, f), c.len);
	fclose(f);
	free(c.b);
	assert_int_equal(tqed_sh("qemu-img check -q -f qed r.qed 2>/dev/null"), 2); /* corrupt */
	assert_int_equal(image_open_one(tqed_path("r.qed"), "qed", 0, &img), -EINVAL);
	assert_int_equal(image_open_one(tqed_path("r.qed"), "qed", IMAGE_RDWR, &img), 0);
	image_close_chain(img);
	assert_int_equal(tqed_qemu_check("r.qed"), 0);
	assert_int_equal(tqed_sh("qemu-io -f qed -c 'read -P 0 4k 4k' r.qed >io.out 2>&1 && "
				 "! grep -q -i 'fail' io.out"),
			 0);
	assert_int_equal(image_open_one(tqed_path("r.qed"), "qed", 0, &img), 0);
	tqed_expect_pattern(img, 0, 4096, 0);
	tqed_expect_zero(img, 4096, 4096);
	image_close_chain(img);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test_setup_teardown(test_qed_probe_magic, tqed_setup, tqed_teardown),
	    cmocka_unit_test_setup_teardown(test_qed_create_layout, tqed_setup, tqed_teardown),
	    cmocka_unit_test_setup_teardown(test_qed_create_qemu_geometry, tqed_setup,
					    tqed_teardown),
	    cmocka_unit_test_setup_teardown(test_qed_create_rejects_bad_options, tqed_setup,
					    tqed_teardown),
	    cmocka_unit_test_setup_teardown(test_qed_header_refusals, tqed_setup, tqed_teardown),
	    cmocka_unit_test_setup_teardown(test_qed_header_refuses_bad_backing_name, tqed_setup,
					    tqed_teardown),
	    cmocka_unit_test_setup_teardown(test_qed_header_error_message, tqed_setup,
					    tqed_teardown),
	    cmocka_unit_test_setup_teardown(test_qed_header_backing_fmt, tqed_setup, tqed_teardown),
	    cmocka_unit_test_setup_teardown(test_qed_header_compat_and_autoclear, tqed_setup,
					    tqed_teardown),
	    cmocka_unit_test_setup_teardown(test_qed_map_runs, tqed_setup, tqed_teardown),
	    cmocka_unit_test_setup_teardown(test_qed_map_runs_cross_slices, tqed_setup,
					    tqed_teardown),
	    cmocka_unit_test_setup_teardown(test_qed_map_bad_offsets_eio, tqed_setup,
					    tqed_teardown),
	    cmocka_unit_test_setup_teardown(test_qed_hostile_random_corruption, tqed_setup,
					    tqed_teardown),
	    cmocka_unit_test_setup_teardown(test_qed_map_huge_guest_size, tqed_setup,
					    tqed_teardown),
	    cmocka_unit_test_setup_teardown(test_qed_alloc_write_flush_reopen, tqed_setup,
					    tqed_teardown),
	    cmocka_unit_test_setup_teardown(test_qed_alloc_write_rejects_misaligned, tqed_setup,
					    tqed_teardown),
	    cmocka_unit_test_setup_teardown(test_qed_zero_clusters, tqed_setup, tqed_teardown),
	    cmocka_unit_test_setup_teardown(test_qed_need_check_set_and_cleared, tqed_setup,
					    tqed_teardown),
	    cmocka_unit_test_setup_teardown(test_qed_flush_failure, tqed_setup, tqed_teardown),
	    cmocka_unit_test_setup_teardown(test_qed_check_drops_entries_past_eof, tqed_setup,
					    tqed_teardown),
	    cmocka_unit_test_setup_teardown(test_qed_check_drops_l1_entry_past_eof, tqed_setup,
					    tqed_teardown),
	    cmocka_unit_test_setup_teardown(test_qed_full_disk_fails_writes_not_flush, tqed_setup,
					    tqed_teardown),
	    cmocka_unit_test_setup_teardown(test_qed_check_refuses_double_reference, tqed_setup,
					    tqed_teardown),
	    cmocka_unit_test_setup_teardown(test_qed_check_truncates_partial_cluster, tqed_setup,
					    tqed_teardown),
	    cmocka_unit_test_setup_teardown(test_qed_crash_at_every_write, tqed_setup,
					    tqed_teardown),
	    cmocka_unit_test_setup_teardown(test_qed_crash_before_flush_leaks_only, tqed_setup,
					    tqed_teardown),
	    cmocka_unit_test_setup_teardown(test_qed_set_backing, tqed_setup, tqed_teardown),
	    cmocka_unit_test_setup_teardown(test_qed_cache_pressure, tqed_setup, tqed_teardown),
	    cmocka_unit_test_setup_teardown(test_qed_concurrent_writes_and_reads, tqed_setup,
					    tqed_teardown),
	    cmocka_unit_test_setup_teardown(test_qed_qemu_image_reads, tqed_qemu_setup,
					    tqed_qemu_teardown),
	    cmocka_unit_test_setup_teardown(test_qed_qemu_backing_chain, tqed_qemu_setup,
					    tqed_qemu_teardown),
	    cmocka_unit_test_setup_teardown(test_qed_qemu_check_and_compare, tqed_qemu_setup,
					    tqed_qemu_teardown),
	    cmocka_unit_test_setup_teardown(test_qed_qemu_set_backing, tqed_qemu_setup,
					    tqed_qemu_teardown),
	    cmocka_unit_test_setup_teardown(test_qed_qemu_check_after_our_repair, tqed_qemu_setup,
					    tqed_qemu_teardown),
	};

	sfs_log_level = SFS_LOG_ERROR;
	return cmocka_run_group_tests_name("qed", tests, NULL, NULL);
}
