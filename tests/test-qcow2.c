/* streamfs: unit tests for the qcow2 driver (formats/qcow2*.c).
 *
 * Most tests build images in memory ("mem:NAME" sources) and check them with
 * an independent refcount recount (tq_recount) that follows qcow2.txt, so
 * "no leaks, no corruption" is asserted without qemu-img. Tests named
 * test_qcow2_qemu_* use qemu-img / qemu-io as an oracle on real files in a
 * mkdtemp directory; they skip when qemu-img is not installed.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zlib.h>

#include <setjmp.h>
#include <stddef.h>
#include <cmocka.h>

#include "fetch.h"
#include "image.h"
#include "util.h"

#define TQ_MIB (1024ULL * 1024)
#define TQ_GIB (1024ULL * TQ_MIB)

static const struct image_driver *drv = &image_qcow2_driver;

/* ---- small helpers ---- */

static uint64_t tq_get64(const uint8_t *p)
{
	uint64_t v;
	memcpy(&v, p, 8);
	return be64toh(v);
}

static uint32_t tq_get32(const uint8_t *p)
{
	uint32_t v;
	memcpy(&v, p, 4);
	return be32toh(v);
}

static void tq_put64(uint8_t *p, uint64_t v)
{
	v = htobe64(v);
	memcpy(p, &v, 8);
}

static void tq_put32(uint8_t *p, uint32_t v)
{
	v = htobe32(v);
	memcpy(p, &v, 4);
}

/* Deterministic pattern: byte i of guest cluster c, generation g. */
static void tq_fill(uint8_t *buf, size_t len, uint64_t off, unsigned g)
{
	for (size_t i = 0; i < len; i++) {
		uint64_t x = (off + i) * 2654435761ULL + g * 40503ULL;
		buf[i] = (uint8_t)(x >> 13 ^ x >> 29);
	}
}

/* Copy of the current bytes of mem file name (malloc'd). */
static uint8_t *tq_mem_copy(const char *name, size_t *len)
{
	const void *d;
	uint8_t *c;

	assert_int_equal(fetch_mem_get(name, &d, len), 0);
	c = malloc(*len ? *len : 1);
	assert_non_null(c);
	memcpy(c, d, *len);
	return c;
}

/* Patch bytes of a mem file in place. */
static void tq_patch(const char *name, uint64_t off, const void *bytes, size_t n)
{
	size_t len;
	uint8_t *c = tq_mem_copy(name, &len);

	if (off + n > len) {
		c = realloc(c, off + n);
		memset(c + len, 0, off + n - len);
		len = off + n;
	}
	memcpy(c + off, bytes, n);
	assert_int_equal(fetch_mem_put(name, c, len), 0);
	free(c);
}

static void tq_patch32(const char *name, uint64_t off, uint32_t v)
{
	uint8_t b[4];
	tq_put32(b, v);
	tq_patch(name, off, b, 4);
}

static void tq_patch64(const char *name, uint64_t off, uint64_t v)
{
	uint8_t b[8];
	tq_put64(b, v);
	tq_patch(name, off, b, 8);
}

/* Open uri as one qcow2 layer (no backing chain, no probing) with the image
 * layer's own open, so that its setup and its cleanup of a failed open are
 * the ones under test. */
static int tq_open(const char *uri, bool rw, struct image **out)
{
	return image_open_one(uri, "qcow2", rw ? IMAGE_RDWR : 0, out);
}

/* Close without flushing (a "crash" for writable images), through the image
 * layer's own close and free: image_close_chain() flushes writable layers
 * only, so the layer is marked read-only first. (image.c keeps image_free()
 * static; the driver's close() never looks at read_only.) */
static void tq_drop(struct image *img)
{
	assert_null(img->backing); /* tq_open opens no backing */
	img->read_only = true;
	image_close_chain(img);
}

static void tq_close(struct image *img)
{
	if (!img->read_only)
		assert_int_equal(drv->flush(img), 0);
	tq_drop(img);
}

static struct image *tq_open_ok(const char *uri, bool rw)
{
	struct image *img = NULL;

	assert_int_equal(tq_open(uri, rw, &img), 0);
	return img;
}

/* Create an image with our create() at uri. */
static int tq_create(const char *uri, uint64_t size, uint32_t cs, int version, const char *bname,
		     const char *bfmt)
{
	struct image_create_opts o = {
	    .size = size,
	    .cluster_size = cs,
	    .backing_name = bname,
	    .backing_fmt = bfmt,
	    .version = version,
	};
	struct fetch_source *f;
	int r;

	if (strncmp(uri, "mem:", 4) == 0)
		assert_int_equal(fetch_mem_put(uri + 4, NULL, 0), 0);
	r = fetch_open(uri, FETCH_RDWR | FETCH_CREATE, &f);
	if (r < 0)
		return r;
	r = drv->create(f, &o);
	fetch_close(f);
	return r;
}

/* Build a minimal image by hand (independent of create()): any version,
 * cluster size and refcount order. Layout: header, rct, refblock, L1. */
static void tq_build(const char *name, int version, unsigned cbits, unsigned rorder, uint64_t size)
{
	uint64_t cs = 1ULL << cbits, l2_cover = cs * (cs / 8);
	uint64_t l1_size = (size + l2_cover - 1) / l2_cover;
	uint64_t l1_clusters = (l1_size * 8 + cs - 1) / cs;
	uint64_t total = 3 + l1_clusters, e = cs * 8 >> rorder;
	size_t len = (size_t)((3 + l1_clusters) * cs);
	uint8_t *d = calloc(1, len);

	assert_true(total <= e); /* one refcount block is enough for our tests */
	tq_put32(d, 0x514649fb);
	tq_put32(d + 4, (uint32_t)version);
	tq_put32(d + 20, cbits);
	tq_put64(d + 24, size);
	tq_put32(d + 36, (uint32_t)l1_size);
	tq_put64(d + 40, 3 * cs);
	tq_put64(d + 48, cs);
	tq_put32(d + 56, 1);
	if (version == 3) {
		tq_put32(d + 96, rorder);
		tq_put32(d + 100, 104);
	}
	tq_put64(d + cs, 2 * cs);
	for (uint64_t c = 0; c < total; c++) {
		uint64_t bit = c << rorder;
		uint8_t *b = d + 2 * cs;

		if (rorder < 3)
			b[bit / 8] |= (uint8_t)(1u << (bit % 8));
		else
			b[bit / 8 + (1u << (rorder - 3)) - 1] = 1;
	}
	assert_int_equal(fetch_mem_put(name, d, len), 0);
	free(d);
}

/* Read guest bytes through map() (no backing: unallocated reads as zeros). */
static int tq_read(struct image *img, uint64_t off, void *buf, size_t len)
{
	uint8_t *b = buf;

	while (len > 0) {
		struct extent ext;
		int r = drv->map(img, off, len, &ext);

		if (r < 0)
			return r;
		assert_true(ext.len > 0 && ext.len <= len);
		switch (ext.type) {
		case EXT_DATA:
			r = fetch_pread(img->file, b, ext.len, ext.host_off);
			break;
		case EXT_COMPRESSED:
			r = drv->read_compressed(img, off, &ext, b, ext.len);
			break;
		default:
			memset(b, 0, ext.len);
			break;
		}
		if (r < 0)
			return r;
		b += ext.len;
		off += ext.len;
		len -= ext.len;
	}
	return 0;
}

static void tq_expect_read(struct image *img, const uint8_t *ref, uint64_t off, size_t len)
{
	uint8_t *buf = malloc(len);

	assert_non_null(buf);
	assert_int_equal(tq_read(img, off, buf, len), 0);
	assert_memory_equal(buf, ref + off, len);
	free(buf);
}

/* ---- independent refcount recount (what `qemu-img check` does) ---- */

struct tq_check {
	uint64_t leaks;	      /* clusters with refcount > references */
	uint64_t corruptions; /* refcount < references, bad flags, refs past EOF */
	uint64_t data_clusters;
};

static uint64_t tq_rc_entry(const uint8_t *blk, unsigned order, uint64_t i)
{
	unsigned bits = 1u << order;

	if (order < 3)
		return (blk[i * bits / 8] >> (i * bits % 8)) & ((1u << bits) - 1);
	uint64_t v = 0;
	for (unsigned k = 0; k < bits / 8; k++)
		v = v << 8 | blk[i * bits / 8 + k];
	return v;
}

static void tq_recount_bytes(const uint8_t *d, size_t n, struct tq_check *res)
{
	unsigned version = tq_get32(d + 4), cbits = tq_get32(d + 20);
	unsigned order = version == 3 ? tq_get32(d + 96) : 4;
	uint64_t cs = 1ULL << cbits, l1_size = tq_get32(d + 36), l1_off = tq_get64(d + 40);
	uint64_t rct_off = tq_get64(d + 48), rct_cl = tq_get32(d + 56);
	uint64_t rb_entries = cs * 8 >> order, nfile = (n + cs - 1) / cs;
	uint64_t rct_n = rct_cl * cs / 8, ncl = nfile + 1;
	uint64_t *ref, *stored;

	memset(res, 0, sizeof(*res));
	/* Clusters covered by the refcount table can be more than the file. */
	for (uint64_t i = 0; i < rct_n; i++)
		if (rct_off + i * 8 + 8 <= n && tq_get64(d + rct_off + i * 8))
			ncl = SFS_MAX(ncl, (i + 1) * rb_entries);
	ref = calloc(ncl, sizeof(*ref));
	stored = calloc(ncl, sizeof(*stored));
	assert_non_null(ref);
	assert_non_null(stored);
#define TQ_REF(off, len)                                                                           \
	do {                                                                                       \
		for (uint64_t _c = (off) / cs; _c <= ((off) + (len)-1) / cs; _c++) {               \
			if (_c >= nfile || _c >= ncl)                                              \
				res->corruptions++;                                                \
			else                                                                       \
				ref[_c]++;                                                         \
		}                                                                                  \
	} while (0)
	TQ_REF(0, cs);
	if (l1_size)
		TQ_REF(l1_off, l1_size * 8);
	TQ_REF(rct_off, rct_cl * cs);
	for (uint64_t i = 0; i < rct_n; i++) {
		uint64_t b = rct_off + i * 8 + 8 <= n ? tq_get64(d + rct_off + i * 8) : 0;

		if (!b)
			continue;
		TQ_REF(b, cs);
		uint8_t *blk = calloc(1, cs); /* a block partly past EOF reads as zeros */
		assert_non_null(blk);
		if (b < n)
			memcpy(blk, d + b, SFS_MIN(cs, n - b));
		for (uint64_t k = 0; k < rb_entries; k++)
			stored[i * rb_entries + k] = tq_rc_entry(blk, order, k);
		free(blk);
	}
	for (uint64_t i = 0; i < l1_size; i++) {
		uint64_t e1 = tq_get64(d + l1_off + 8 * i), l2 = e1 & 0x00fffffffffffe00ULL;

		if (!l2)
			continue;
		TQ_REF(l2, cs);
		if (l2 + cs > n) {
			res->corruptions++;
			continue;
		}
		for (uint64_t j = 0; j < cs / 8; j++) {
			uint64_t e2 = tq_get64(d + l2 + 8 * j);

			if (e2 & (1ULL << 62)) {
				unsigned x = 62 - (cbits - 8);
				uint64_t coff = e2 & ((1ULL << x) - 1);
				uint64_t nsec = ((e2 >> x) & ((1ULL << (cbits - 8)) - 1)) + 1;

				TQ_REF(coff, nsec * 512 - (coff & 511));
			} else if (e2 & 0x00fffffffffffe00ULL) {
				TQ_REF(e2 & 0x00fffffffffffe00ULL, cs);
				if (!(e2 & 1))
					res->data_clusters++;
			}
		}
	}
	for (uint64_t c = 0; c < ncl; c++) {
		if (stored[c] > ref[c])
			res->leaks++;
		else if (stored[c] < ref[c])
			res->corruptions++;
	}
	/* COPIED flags must match refcount == 1 (QEMU checks them). */
	for (uint64_t i = 0; i < l1_size; i++) {
		uint64_t e1 = tq_get64(d + l1_off + 8 * i), l2 = e1 & 0x00fffffffffffe00ULL;

		if (!l2 || l2 / cs >= ncl)
			continue;
		if ((stored[l2 / cs] == 1) != !!(e1 >> 63))
			res->corruptions++;
		if (l2 + cs > n)
			continue;
		for (uint64_t j = 0; j < cs / 8; j++) {
			uint64_t e2 = tq_get64(d + l2 + 8 * j), h = e2 & 0x00fffffffffffe00ULL;

			if ((e2 & (1ULL << 62)) || !h || h / cs >= ncl)
				continue;
			if ((stored[h / cs] == 1) != !!(e2 >> 63))
				res->corruptions++;
		}
	}
#undef TQ_REF
	free(ref);
	free(stored);
}

static void tq_recount(const char *name, struct tq_check *res)
{
	const void *d;
	size_t n;

	assert_int_equal(fetch_mem_get(name, &d, &n), 0);
	tq_recount_bytes(d, n, res);
}

static void tq_assert_clean(const char *name)
{
	struct tq_check c;

	tq_recount(name, &c);
	if (c.leaks || c.corruptions)
		fprintf(stderr, "%s: leaks %llu corruptions %llu\n", name,
			(unsigned long long)c.leaks, (unsigned long long)c.corruptions);
	assert_int_equal(c.corruptions, 0);
	assert_int_equal(c.leaks, 0);
}

/* ---- stderr capture, to check the messages of refusals ---- */

static char tq_msg[16384];
static int tq_saved_fd = -1;
static FILE *tq_tmp;

static void tq_capture(void)
{
	fflush(stderr);
	tq_tmp = tmpfile();
	assert_non_null(tq_tmp);
	tq_saved_fd = dup(2);
	dup2(fileno(tq_tmp), 2);
}

static const char *tq_captured(void)
{
	size_t n;

	fflush(stderr);
	dup2(tq_saved_fd, 2);
	close(tq_saved_fd);
	rewind(tq_tmp);
	n = fread(tq_msg, 1, sizeof(tq_msg) - 1, tq_tmp);
	tq_msg[n] = 0;
	fclose(tq_tmp);
	return tq_msg;
}

/* Open must fail with err and log a message containing 'needle'. */
static void tq_expect_refusal(const char *uri, bool rw, int err, const char *needle)
{
	struct image *img = NULL;
	const char *msg;
	int r;

	tq_capture();
	r = tq_open(uri, rw, &img);
	msg = tq_captured();
	if (r == 0)
		tq_close(img);
	if (r != err || !strstr(msg, needle) || !strstr(msg, "qcow2: "))
		fprintf(stderr, "open %s (%s): got %d, message: %s\n", uri, rw ? "rw" : "ro", r,
			msg);
	assert_int_equal(r, err);
	assert_non_null(strstr(msg, needle));
	assert_non_null(strstr(msg, uri));
}

static int tq_setup(void **state)
{
	fetch_mem_reset();
	return 0;
}

/* ==== probe, create, header parsing ==== */

static void test_qcow2_probe_magic(void **state)
{
	uint8_t hdr[8] = {'Q', 'F', 'I', 0xfb, 0, 0, 0, 3};
	uint8_t bad[8] = {'Q', 'F', 'I', 0xfa, 0, 0, 0, 3};

	assert_int_equal(drv->probe(hdr, sizeof(hdr)), 100);
	assert_int_equal(drv->probe(bad, sizeof(bad)), 0);
	assert_int_equal(drv->probe(hdr, 3), 0);
}

static void test_qcow2_create_v3_opens(void **state)
{
	struct image *img;
	struct extent ext;
	const void *d;
	size_t n;

	assert_int_equal(tq_create("mem:c3", 1 * TQ_GIB, 0, 0, "base.raw", "raw"), 0);
	assert_int_equal(fetch_mem_get("c3", &d, &n), 0);
	assert_int_equal(n, 3 * 65536 + 16); /* like qemu-img: file ends inside the L1 */
	assert_int_equal(tq_get32((const uint8_t *)d + 4), 3);
	assert_int_equal(tq_get32((const uint8_t *)d + 100), 112);
	tq_assert_clean("c3");
	img = tq_open_ok("mem:c3", false);
	assert_int_equal(img->size, 1 * TQ_GIB);
	assert_int_equal(img->cluster_size, 65536);
	assert_string_equal(img->backing_name, "base.raw");
	assert_string_equal(img->backing_fmt, "raw");
	assert_int_equal(drv->map(img, 0, img->size, &ext), 0);
	assert_int_equal(ext.type, EXT_UNALLOC);
	assert_int_equal(ext.len, img->size);
	tq_close(img);
}

static void test_qcow2_create_v2_opens(void **state)
{
	struct image *img;
	const void *d;
	size_t n;

	assert_int_equal(tq_create("mem:c2", 10 * TQ_MIB, 4096, 2, "b.qcow2", "qcow2"), 0);
	assert_int_equal(fetch_mem_get("c2", &d, &n), 0);
	assert_int_equal(tq_get32((const uint8_t *)d + 4), 2);
	tq_assert_clean("c2");
	img = tq_open_ok("mem:c2", true);
	assert_int_equal(img->cluster_size, 4096);
	assert_string_equal(img->backing_name, "b.qcow2");
	assert_string_equal(img->backing_fmt, "qcow2");
	tq_close(img);
}

static void test_qcow2_create_no_backing(void **state)
{
	struct image *img;

	assert_int_equal(tq_create("mem:nb", 5 * TQ_MIB + 123, 512, 3, NULL, NULL), 0);
	tq_assert_clean("nb");
	img = tq_open_ok("mem:nb", true);
	assert_null(img->backing_name);
	assert_null(img->backing_fmt);
	assert_int_equal(img->size, 5 * TQ_MIB + 512); /* rounded up to sectors like qemu-img */
	tq_close(img);
}

static void test_qcow2_create_large_l1_many_refblocks(void **state)
{
	/* 512 B clusters, 20 GiB: the L1 alone is 2.5 MiB, more than one refblock. */
	assert_int_equal(tq_create("mem:big", 20 * TQ_GIB, 512, 3, NULL, NULL), 0);
	tq_assert_clean("big");
	tq_close(tq_open_ok("mem:big", true));
}

static void test_qcow2_create_rejects_bad_options(void **state)
{
	tq_capture();
	assert_int_equal(tq_create("mem:x", TQ_MIB, 1000, 3, NULL, NULL), -EINVAL);
	assert_int_equal(tq_create("mem:x", TQ_MIB, 256, 3, NULL, NULL), -EINVAL);
	assert_int_equal(tq_create("mem:x", TQ_MIB, 4u << 20, 3, NULL, NULL), -EINVAL);
	assert_int_equal(tq_create("mem:x", TQ_MIB, 0, 4, NULL, NULL), -EINVAL);
	assert_int_equal(tq_create("mem:x", 1ULL << 50, 512, 3, NULL, NULL), -EINVAL);
	tq_captured();
}

static void test_qcow2_header_refusals(void **state)
{
	char big[1100];

	/* each case: fresh valid image, one field broken */
#define FRESH() assert_int_equal(tq_create("mem:h", 64 * TQ_MIB, 65536, 3, "bk", "raw"), 0)
	FRESH();
	tq_patch32("h", 4, 4);
	tq_expect_refusal("mem:h", false, -ENOTSUP, "version 4");
	FRESH();
	tq_patch32("h", 20, 8);
	tq_expect_refusal("mem:h", false, -EINVAL, "cluster_bits 8");
	FRESH();
	tq_patch32("h", 20, 22);
	tq_expect_refusal("mem:h", false, -ENOTSUP, "cluster_bits 22");
	FRESH();
	tq_patch32("h", 100, 100);
	tq_expect_refusal("mem:h", false, -EINVAL, "header_length");
	FRESH();
	tq_patch32("h", 100, 1 << 20);
	tq_expect_refusal("mem:h", false, -EINVAL, "header_length");
	FRESH();
	tq_patch32("h", 32, 1);
	tq_expect_refusal("mem:h", false, -ENOTSUP, "encrypt");
	FRESH();
	tq_patch32("h", 32, 2);
	tq_expect_refusal("mem:h", false, -ENOTSUP, "LUKS");
	FRESH();
	tq_patch64("h", 72, 1ULL << 4);
	tq_expect_refusal("mem:h", false, -ENOTSUP, "extended L2");
	FRESH();
	tq_patch64("h", 72, 1ULL << 3);
	tq_patch("h", 104, "\x01", 1);
	tq_expect_refusal("mem:h", false, -ENOTSUP, "zstd");
	FRESH();
	tq_patch64("h", 72, 1ULL << 2);
	tq_expect_refusal("mem:h", false, -ENOTSUP, "external data file");
	FRESH();
	tq_patch64("h", 72, 1ULL << 9);
	tq_expect_refusal("mem:h", false, -ENOTSUP, "bit 9");
	FRESH(); /* unknown bit named by the image's own feature table */
	{
		const void *d;
		size_t n;
		uint8_t e[48] = {0, 5};

		assert_int_equal(fetch_mem_get("h", &d, &n), 0);
		/* overwrite the "extended L2 entries" entry (5th) of our table */
		memcpy(e + 2, "frobnication", 12);
		tq_patch("h", 112 + 16 + 8 + 4 * 48, e, 48);
		tq_patch64("h", 72, 1ULL << 5);
		tq_expect_refusal("mem:h", false, -ENOTSUP, "bit 5 (frobnication)");
	}
	FRESH();
	tq_patch32("h", 96, 7);
	tq_expect_refusal("mem:h", false, -EINVAL, "refcount_order");
	FRESH();
	tq_patch32("h", 36, 0); /* L1 too small for 64 MiB */
	tq_expect_refusal("mem:h", false, -EINVAL, "L1 table size");
	FRESH();
	tq_patch64("h", 24, UINT64_MAX);
	tq_expect_refusal("mem:h", false, -EINVAL, "L1 table size");
	FRESH();
	tq_patch64("h", 40, 3 * 65536 + 512);
	tq_expect_refusal("mem:h", false, -EINVAL, "not cluster aligned");
	FRESH();
	tq_patch64("h", 40, 0);
	tq_expect_refusal("mem:h", false, -EINVAL, "overlaps the header");
	FRESH();
	tq_patch64("h", 40, 100 * 65536);
	tq_expect_refusal("mem:h", false, -EINVAL, "past the end of the file");
	FRESH();
	tq_patch64("h", 48, 65536 + 4096);
	tq_expect_refusal("mem:h", false, -EINVAL, "refcount table offset");
	FRESH();
	tq_patch32("h", 56, 0);
	tq_expect_refusal("mem:h", false, -EINVAL, "refcount table size");
	FRESH();
	tq_patch32("h", 56, 1000);
	tq_expect_refusal("mem:h", false, -EINVAL, "refcount table size");
	FRESH();
	tq_patch64("h", 40, 65536); /* L1 on top of the refcount table */
	tq_expect_refusal("mem:h", false, -EINVAL, "overlap");
	FRESH();
	tq_patch32("h", 16, 1024);
	tq_expect_refusal("mem:h", false, -EINVAL, "backing file name");
	FRESH();
	tq_patch64("h", 8, 65536 - 1);
	tq_expect_refusal("mem:h", false, -EINVAL, "backing file name");
	FRESH();
	tq_patch32("h", 112 + 4, 60000); /* backing format extension overflows */
	tq_expect_refusal("mem:h", false, -EINVAL, "overflows");
	FRESH(); /* external data file extension without the bit */
	tq_patch32("h", 112, 0x44415441);
	tq_expect_refusal("mem:h", false, -ENOTSUP, "external data file");
	FRESH();
	tq_patch("h", 0, "QFI\xfa", 4);
	tq_expect_refusal("mem:h", false, -EINVAL, "magic");
	/* a header cut short */
	assert_int_equal(fetch_mem_put("h", "QFI\xfb\0\0\0\3", 8), 0);
	tq_expect_refusal("mem:h", false, -EINVAL, "too short");
	/* backing name longer than 1023 bytes cannot be created */
	memset(big, 'a', sizeof(big) - 1);
	big[sizeof(big) - 1] = 0;
	tq_capture();
	assert_true(tq_create("mem:h", TQ_MIB, 65536, 3, big, "raw") < 0);
	tq_captured();
#undef FRESH
}

static void test_qcow2_header_dirty_corrupt_snapshots(void **state)
{
	struct image *img;

	assert_int_equal(tq_create("mem:d", 8 * TQ_MIB, 65536, 3, NULL, NULL), 0);
	tq_patch64("d", 72, 1); /* dirty */
	tq_expect_refusal("mem:d", true, -ENOTSUP, "qemu-img check -r all");
	img = tq_open_ok("mem:d", false);
	tq_close(img);

	tq_patch64("d", 72, 2); /* corrupt */
	tq_expect_refusal("mem:d", true, -ENOTSUP, "corrupt");
	img = tq_open_ok("mem:d", false);
	tq_close(img);

	tq_patch64("d", 72, 0);
	tq_patch32("d", 60, 1); /* one snapshot */
	tq_expect_refusal("mem:d", true, -ENOTSUP, "snapshot");
	img = tq_open_ok("mem:d", false);
	tq_close(img);
}

static void test_qcow2_header_autoclear_cleared_on_rw(void **state)
{
	struct image *img;
	uint8_t *c;
	size_t n;

	assert_int_equal(tq_create("mem:a", 8 * TQ_MIB, 65536, 3, NULL, NULL), 0);
	tq_patch64("a", 88, 0x8000000000000003ULL);
	img = tq_open_ok("mem:a", false);
	tq_close(img);
	c = tq_mem_copy("a", &n);
	assert_int_equal(tq_get64(c + 88), 0x8000000000000003ULL); /* read-only: untouched */
	free(c);
	img = tq_open_ok("mem:a", true);
	c = tq_mem_copy("a", &n);
	assert_int_equal(tq_get64(c + 88), 0);
	assert_int_equal(tq_get64(c + 72), 0); /* and nothing marked dirty */
	free(c);
	tq_close(img);
}

static void test_qcow2_header_v2_and_v3_104(void **state)
{
	struct image *img;

	tq_build("v2", 2, 16, 4, 100 * TQ_MIB);
	img = tq_open_ok("mem:v2", true);
	assert_int_equal(img->size, 100 * TQ_MIB);
	assert_null(img->backing_name);
	tq_close(img);
	tq_build("v3", 3, 12, 0, 3 * TQ_MIB); /* header_length 104, 1-bit refcounts */
	img = tq_open_ok("mem:v3", true);
	assert_int_equal(img->cluster_size, 4096);
	tq_close(img);
	tq_assert_clean("v3");
}

static void test_qcow2_header_v2_name_right_after_header(void **state)
{
	struct image *img;
	uint8_t *c;
	size_t n;

	/* Old v2 images: no extension area, the name starts at byte 72. */
	assert_int_equal(tq_create("mem:old", 8 * TQ_MIB, 65536, 2, NULL, NULL), 0);
	tq_patch("old", 72, "base.img", 8);
	tq_patch64("old", 8, 72);
	tq_patch32("old", 16, 8);
	img = tq_open_ok("mem:old", true);
	assert_string_equal(img->backing_name, "base.img");
	assert_null(img->backing_fmt);
	assert_int_equal(drv->set_backing(img, "other.img", "raw"), 0);
	tq_close(img);
	c = tq_mem_copy("old", &n);
	assert_int_equal(tq_get32(c + 72), 0xe2792aca);
	free(c);
	img = tq_open_ok("mem:old", false);
	assert_string_equal(img->backing_name, "other.img");
	assert_string_equal(img->backing_fmt, "raw");
	tq_close(img);
	tq_assert_clean("old");
}

/* ==== mapping runs ==== */

static void test_qcow2_map_runs_merge(void **state)
{
	const uint32_t cs = 512;
	uint64_t size = 256 * 1024;
	uint8_t *ref = calloc(1, size);
	struct image *img;
	struct extent e;

	assert_int_equal(tq_create("mem:m", size, cs, 3, NULL, NULL), 0);
	img = tq_open_ok("mem:m", true);
	/* 200 clusters in one call: contiguous on the host, spanning 4 L2 tables */
	tq_fill(ref + 10 * cs, 200 * cs, 10 * cs, 1);
	assert_int_equal(drv->alloc_write(img, 10 * cs, ref + 10 * cs, 200 * cs), 0);
	assert_int_equal(drv->map(img, 0, size, &e), 0);
	assert_int_equal(e.type, EXT_UNALLOC);
	assert_int_equal(e.len, 10 * cs);
	assert_int_equal(drv->map(img, 10 * cs + 7, size - 10 * cs - 7, &e), 0);
	assert_int_equal(e.type, EXT_DATA);
	assert_int_equal(e.len, 200 * cs - 7);
	uint64_t h0 = e.host_off - 7;
	assert_int_equal(drv->map(img, 50 * cs, size - 50 * cs, &e), 0);
	assert_int_equal(e.host_off, h0 + 40 * cs);
	assert_int_equal(e.len, 160 * cs);
	/* the run is capped by len */
	assert_int_equal(drv->map(img, 10 * cs, 3 * cs + 1, &e), 0);
	assert_int_equal(e.len, 3 * cs + 1);
	/* a separate allocation right after: not host-contiguous with the first
	 * run (an L2 table sits between), so a new run starts */
	tq_fill(ref + 210 * cs, 2 * cs, 210 * cs, 2);
	assert_int_equal(drv->alloc_write(img, 210 * cs, ref + 210 * cs, 2 * cs), 0);
	assert_int_equal(drv->map(img, 10 * cs, size - 10 * cs, &e), 0);
	assert_int_equal(e.type, EXT_DATA);
	assert_true(e.len == 200 * cs || e.len == 202 * cs);
	/* zero clusters merge into one EXT_ZERO run across tables */
	assert_int_equal(drv->zero_clusters(img, 300 * cs, 100 * cs), 0);
	assert_int_equal(drv->map(img, 212 * cs, size - 212 * cs, &e), 0);
	assert_int_equal(e.type, EXT_UNALLOC);
	assert_int_equal(e.len, 88 * cs);
	assert_int_equal(drv->map(img, 300 * cs, size - 300 * cs, &e), 0);
	assert_int_equal(e.type, EXT_ZERO);
	assert_int_equal(e.len, 100 * cs);
	assert_int_equal(drv->map(img, 400 * cs, size - 400 * cs, &e), 0);
	assert_int_equal(e.type, EXT_UNALLOC);
	assert_int_equal(e.len, size - 400 * cs);
	tq_expect_read(img, ref, 0, size);
	tq_close(img);
	tq_assert_clean("m");
	img = tq_open_ok("mem:m", false);
	tq_expect_read(img, ref, 0, size);
	assert_int_equal(drv->map(img, 10 * cs, size - 10 * cs, &e), 0);
	assert_int_equal(e.type, EXT_DATA);
	assert_int_equal(e.host_off, h0);
	tq_close(img);
	free(ref);
}

static void test_qcow2_map_hostile_l2_entries(void **state)
{
	uint8_t buf[65536];
	struct image *img;
	struct extent e;
	uint64_t l1_off, l2;
	uint8_t *c;
	size_t n;

	assert_int_equal(tq_create("mem:bad", 4 * TQ_MIB, 65536, 3, NULL, NULL), 0);
	img = tq_open_ok("mem:bad", true);
	memset(buf, 0x5a, sizeof(buf));
	assert_int_equal(drv->alloc_write(img, 0, buf, 65536), 0);
	assert_int_equal(drv->alloc_write(img, 2 * 65536, buf, 65536), 0);
	tq_close(img);
	c = tq_mem_copy("bad", &n);
	l1_off = tq_get64(c + 40);
	l2 = tq_get64(c + l1_off) & 0x00fffffffffffe00ULL;
	free(c);
	/* unaligned data cluster offset */
	tq_patch64("bad", l2 + 8, (1ULL << 63) | (n + 512));
	/* data cluster past EOF */
	tq_patch64("bad", l2 + 16, (1ULL << 63) | (1ULL << 40));
	img = tq_open_ok("mem:bad", false);
	assert_int_equal(drv->map(img, 0, img->size, &e), 0); /* cluster 0 stands */
	assert_int_equal(e.type, EXT_DATA);
	assert_int_equal(e.len, 65536);
	tq_capture();
	assert_int_equal(drv->map(img, 65536, 65536, &e), -EIO);
	assert_non_null(strstr(tq_captured(), "unaligned"));
	tq_capture();
	assert_int_equal(drv->map(img, 2 * 65536, 65536, &e), -EIO);
	assert_non_null(strstr(tq_captured(), "past the end"));
	assert_int_equal(drv->map(img, 3 * 65536, 65536, &e), 0);
	assert_int_equal(e.type, EXT_UNALLOC);
	tq_close(img);
	/* L1 entry pointing past EOF */
	tq_patch64("bad", l1_off, (1ULL << 63) | (1ULL << 30));
	img = tq_open_ok("mem:bad", false);
	tq_capture();
	assert_int_equal(drv->map(img, 0, 65536, &e), -EIO);
	tq_captured();
	tq_close(img);
}

/* A writable open refuses images whose clusters are referenced twice or past
 * the end of the file (in-place writes would corrupt metadata or other guest
 * data, or land on our own future allocations); read-only opens serve them. */
static void test_qcow2_hostile_overlaps_refused_rw(void **state)
{
	const uint64_t cs = 65536;
	uint8_t buf[65536], *c;
	uint64_t l1_off, l2, rct_off, rb, d0;
	struct image *img;
	struct extent e;
	size_t n;

	/* 1 GiB: two L1 entries, the second one free to patch */
	assert_int_equal(tq_create("mem:ov", 1024 * TQ_MIB, cs, 3, NULL, NULL), 0);
	img = tq_open_ok("mem:ov", true);
	memset(buf, 0x5a, sizeof(buf));
	assert_int_equal(drv->alloc_write(img, 0, buf, cs), 0);
	assert_int_equal(drv->alloc_write(img, 2 * cs, buf, cs), 0);
	tq_close(img);
	c = tq_mem_copy("ov", &n);
	l1_off = tq_get64(c + 40);
	rct_off = tq_get64(c + 48);
	rb = tq_get64(c + rct_off);
	l2 = tq_get64(c + l1_off) & 0x00fffffffffffe00ULL;
	d0 = tq_get64(c + l2) & 0x00fffffffffffe00ULL;
	assert_true(d0 && l2 && rb);

	const struct {
		uint64_t at, value;
		const char *needle;
	} cases[] = {
	    {l2 + 8, l1_off, "already in use"},	      /* guest cluster onto the L1 table */
	    {l2 + 8, rct_off, "already in use"},      /* ... onto the refcount table */
	    {l2 + 8, rb, "already in use"},	      /* ... onto a refcount block */
	    {l2 + 8, l2, "already in use"},	      /* ... onto its own L2 table */
	    {l2 + 8, d0, "already in use"},	      /* two guest clusters, one host cluster */
	    {l2 + 8, n + 4 * cs, "past the end"},     /* where our next allocation would go */
	    {rct_off + 8, l2, "overlaps"},	      /* a refcount block onto the L2 table */
	    {l1_off + 8, d0, "overlaps"},	      /* an L2 table onto guest data */
	    {l1_off + 8, n + 8 * cs, "past the end"}, /* an L2 table past the end */
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		/* refcount table entries carry no flags; L1/L2 entries COPIED */
		uint64_t v = cases[i].value | (cases[i].at == rct_off + 8 ? 0 : 1ULL << 63);

		assert_int_equal(fetch_mem_put("ov", c, n), 0);
		tq_patch64("ov", cases[i].at, v);
		tq_expect_refusal("mem:ov", true, -EINVAL, cases[i].needle);
		/* Read-only, the rest of the image is served. */
		img = tq_open_ok("mem:ov", false);
		assert_int_equal(drv->map(img, 0, cs, &e), 0);
		assert_int_equal(e.type, EXT_DATA);
		tq_close(img);
	}
	/* The intact image still opens writable. */
	assert_int_equal(fetch_mem_put("ov", c, n), 0);
	img = tq_open_ok("mem:ov", true);
	tq_close(img);
	free(c);
}

/* ==== allocation, refcounts, flush ==== */

static void tq_random_workload(const char *name, uint64_t size, uint32_t cs, unsigned ops,
			       unsigned seed, bool zeros)
{
	uint8_t *ref = calloc(1, size), *buf = malloc(16 * cs);
	uint64_t nclusters = (size + cs - 1) / cs;
	uint8_t *state = calloc(nclusters, 1); /* 0 unalloc, 1 data, 2 zero */
	struct image *img;
	char uri[64];

	snprintf(uri, sizeof(uri), "mem:%s", name);
	img = tq_open_ok(uri, true);
	srand(seed);
	for (unsigned i = 0; i < ops; i++) {
		uint64_t c = (uint64_t)rand() % nclusters, n = 1 + rand() % 16, k;

		n = SFS_MIN(n, nclusters - c);
		for (k = 0; k < n && state[c + k] != 1; k++)
			;
		n = k; /* only clusters that are not data yet */
		if (n == 0)
			continue;
		if (zeros && img->drv->zero_clusters && rand() % 4 == 0) {
			int r = drv->zero_clusters(img, c * cs, n * cs);

			if (r == -ENOTSUP)
				continue;
			assert_int_equal(r, 0);
			for (k = 0; k < n; k++) {
				state[c + k] = 2;
				memset(ref + (c + k) * cs, 0,
				       SFS_MIN((uint64_t)cs, size - (c + k) * cs));
			}
		} else {
			memset(buf, 0, n * cs);
			tq_fill(buf, SFS_MIN(n * cs, size - c * cs), c * cs, i + 1);
			assert_int_equal(drv->alloc_write(img, c * cs, buf, n * cs), 0);
			memcpy(ref + c * cs, buf, SFS_MIN(n * cs, size - c * cs));
			memset(state + c, 1, n);
		}
		if (rand() % 50 == 0)
			assert_int_equal(drv->flush(img), 0);
		if (rand() % 20 == 0) {
			uint64_t o = (uint64_t)rand() % size;
			tq_expect_read(img, ref, o, SFS_MIN(size - o, (uint64_t)3 * cs + 17));
		}
	}
	tq_expect_read(img, ref, 0, size);
	tq_close(img);
	tq_assert_clean(name);
	img = tq_open_ok(uri, false);
	tq_expect_read(img, ref, 0, size);
	tq_close(img);
	free(ref);
	free(buf);
	free(state);
}

static void test_qcow2_alloc_write_refcounts_exact(void **state)
{
	assert_int_equal(tq_create("mem:w", 32 * TQ_MIB, 65536, 3, NULL, NULL), 0);
	tq_random_workload("w", 32 * TQ_MIB, 65536, 300, 1, true);
	assert_int_equal(tq_create("mem:w2", 4 * TQ_MIB + 1000, 4096, 2, NULL, NULL), 0);
	tq_random_workload("w2", 4 * TQ_MIB + 1000, 4096, 400, 2, true);
}

static void test_qcow2_alloc_write_all_refcount_orders(void **state)
{
	for (unsigned order = 0; order <= 6; order++) {
		char name[16];

		snprintf(name, sizeof(name), "o%u", order);
		/* 512 B clusters: refcount blocks hold 64..4096 entries, so the
		 * table grows and is relocated several times */
		tq_build(name, 3, 9, order, 2 * TQ_MIB);
		tq_random_workload(name, 2 * TQ_MIB, 512, 600, 10 + order, true);
	}
}

static void test_qcow2_refcount_table_growth_512(void **state)
{
	/* order 6, 512 B clusters: one refcount block counts 64 clusters
	 * (32 KiB) and a one-cluster table 64 blocks (2 MiB of file). */
	const uint64_t size = 8 * TQ_MIB;
	uint8_t *ref = malloc(size);
	struct image *img;
	uint8_t *c;
	size_t n;

	tq_build("g", 3, 9, 6, size);
	c = tq_mem_copy("g", &n);
	uint64_t rct0 = tq_get64(c + 48);
	free(c);
	tq_fill(ref, size, 0, 7);
	img = tq_open_ok("mem:g", true);
	for (uint64_t off = 0; off < size; off += 64 * 1024)
		assert_int_equal(drv->alloc_write(img, off, ref + off, 64 * 1024), 0);
	tq_expect_read(img, ref, 0, size);
	tq_close(img);
	c = tq_mem_copy("g", &n);
	assert_true(tq_get64(c + 48) != rct0); /* relocated */
	assert_true(tq_get32(c + 56) >= 4);    /* > 8 MiB of file needs >= 4 clusters */
	assert_int_equal(tq_get64(c + 72), 0); /* never dirty */
	free(c);
	tq_assert_clean("g");
	img = tq_open_ok("mem:g", false);
	tq_expect_read(img, ref, 0, size);
	tq_close(img);
	free(ref);
}

static void test_qcow2_flush_write_failure_recovers(void **state)
{
	uint8_t buf[4 * 4096];
	struct image *img;

	assert_int_equal(tq_create("mem:f", 4 * TQ_MIB, 4096, 3, NULL, NULL), 0);
	img = tq_open_ok("mem:f", true);
	tq_fill(buf, sizeof(buf), 0, 3);
	assert_int_equal(drv->alloc_write(img, 0, buf, sizeof(buf)), 0);
	/* the data write of the next call fails: nothing may leak */
	assert_int_equal(fetch_mem_fail("f", FETCH_MEM_WRITE, 0, EIO), 0);
	tq_capture();
	assert_int_equal(drv->alloc_write(img, 8 * 4096, buf, sizeof(buf)), -EIO);
	/* metadata writes fail: flush reports it and keeps everything dirty */
	assert_int_equal(drv->flush(img), -EIO);
	tq_captured();
	assert_int_equal(fetch_mem_fail("f", 0, 0, 0), 0);
	tq_close(img);
	tq_assert_clean("f");
	img = tq_open_ok("mem:f", false);
	{
		uint8_t ref[16 * 4096] = {0};
		memcpy(ref, buf, sizeof(buf));
		tq_expect_read(img, ref, 0, sizeof(ref));
	}
	tq_close(img);
}

/* A full disk fails the guest write that needs the space, never the flush
 * of writes already acknowledged: new L2 tables and refcount blocks take
 * their space when allocated. Every acknowledged write then flushes and
 * reads back; the refcounts stay exact. */
static void test_qcow2_full_disk_fails_writes_not_flush(void **state)
{
	const uint32_t cs = 4096; /* a filesystem block: metadata gets blocks of its own */
	const uint64_t size = 1024 * TQ_MIB;
	uint64_t done[4096];
	unsigned n = 0, seed = 99;
	uint8_t buf[4096];
	struct image *img;
	int r = 0;

	assert_int_equal(tq_create("mem:full", size, cs, 3, NULL, NULL), 0);
	img = tq_open_ok("mem:full", true);
	assert_int_equal(fetch_mem_limit("full", 256 * 1024), 0);
	tq_capture();
	while (n < 4096) {
		/* scattered: most writes need a new L2 table */
		uint64_t off = (uint64_t)(rand_r(&seed) % (size / cs)) * cs;

		tq_fill(buf, cs, off, 7);
		r = drv->alloc_write(img, off, buf, cs);
		if (r < 0)
			break;
		done[n++] = off;
	}
	tq_captured();
	assert_int_equal(r, -ENOSPC);
	assert_true(n > 16);
	assert_int_equal(drv->flush(img), 0);
	tq_close(img);
	assert_int_equal(fetch_mem_limit("full", 0), 0);
	tq_assert_clean("full");
	img = tq_open_ok("mem:full", false);
	for (unsigned i = 0; i < n; i++) {
		uint8_t want[4096], got[4096];
		bool later = false;

		for (unsigned j = i + 1; j < n; j++)
			later |= done[j] == done[i];
		if (later)
			continue;
		tq_fill(want, cs, done[i], 7);
		assert_int_equal(tq_read(img, done[i], got, cs), 0);
		assert_memory_equal(got, want, cs);
	}
	tq_close(img);
}

/* Crash at every write: whatever prefix of writes reached the file, the
 * image has no corruption (leaks only) and every mapped cluster holds the
 * data written for it. */
static void test_qcow2_crash_order_only_leaks(void **state)
{
	const uint32_t cs = 512, per = 64; /* clusters per operation */
	const uint64_t size = 4 * TQ_MIB;
	uint8_t buf[64 * 512];
	bool completed = false, relocated = false;

	/* refcount_order 6: a one-cluster refcount table covers 2 MiB of file,
	 * so the table is relocated during the run; zero clusters with
	 * preallocation are overwritten, so deferred frees are exercised. */
	for (uint64_t k = 0; !completed; k++) {
		struct image *img;
		struct tq_check chk;
		uint8_t *c;
		size_t n;

		tq_build("cr", 3, 9, 6, size);
		img = tq_open_ok("mem:cr", true);
		assert_int_equal(fetch_mem_fail("cr", FETCH_MEM_WRITE | FETCH_MEM_FLUSH, k, EIO),
				 0);
		completed = true;
		tq_capture();
		for (unsigned i = 0; i < 80; i++) {
			uint64_t gc = (uint64_t)i * per; /* distinct groups: never rewrite data */
			int r;

			tq_fill(buf, sizeof(buf), gc * cs, 0);
			if (i % 7 == 3)
				r = drv->zero_clusters(img, gc * cs, sizeof(buf));
			else
				r = drv->alloc_write(img, gc * cs, buf, sizeof(buf));
			if (r < 0)
				completed = false;
			if (i % 9 == 8 && drv->flush(img) < 0)
				completed = false;
		}
		/* data -> preallocated zero -> data again (the old cluster is freed) */
		for (unsigned i = 0; i < 80; i += 5) {
			uint64_t gc = (uint64_t)i * per;

			if (i % 7 == 3)
				continue;
			if (drv->zero_clusters(img, gc * cs, sizeof(buf)) < 0)
				completed = false;
			if (i % 3 == 0 && drv->flush(img) < 0)
				completed = false;
			tq_fill(buf, sizeof(buf), gc * cs, 0);
			if (drv->alloc_write(img, gc * cs, buf, sizeof(buf)) < 0)
				completed = false;
		}
		if (drv->flush(img) < 0)
			completed = false;
		tq_captured();
		tq_capture();
		tq_drop(img); /* crash: in-memory state lost */
		tq_captured();
		assert_int_equal(fetch_mem_fail("cr", 0, 0, 0), 0);
		tq_recount("cr", &chk);
		if (chk.corruptions)
			fprintf(stderr, "crash after %llu writes: %llu corruptions\n",
				(unsigned long long)k, (unsigned long long)chk.corruptions);
		assert_int_equal(chk.corruptions, 0);
		if (completed)
			assert_int_equal(chk.leaks, 0);
		/* every mapped cluster reads its pattern */
		c = tq_mem_copy("cr", &n);
		if (tq_get64(c + 48) != 512)
			relocated = true;
		img = tq_open_ok("mem:cr", false);
		for (uint64_t gc = 0; gc < size / cs; gc++) {
			struct extent e;
			uint8_t got[512], want[512];

			assert_int_equal(drv->map(img, gc * cs, cs, &e), 0);
			if (e.type != EXT_DATA)
				continue;
			assert_int_equal(tq_read(img, gc * cs, got, cs), 0);
			tq_fill(want, cs, gc * cs, 0);
			assert_memory_equal(got, want, cs);
		}
		tq_close(img);
		free(c);
		assert_true(k < 100000);
	}
	assert_true(relocated);
}

struct tq_thread {
	struct image *img;
	uint64_t first, count; /* clusters */
	uint32_t cs;
	int id;
	_Atomic int *stop;
};

static void *tq_writer(void *arg)
{
	struct tq_thread *t = arg;
	uint8_t *buf = malloc(4 * t->cs);

	for (uint64_t c = t->first; c < t->first + t->count; c += 4) {
		tq_fill(buf, 4 * t->cs, c * t->cs, 9);
		if (drv->alloc_write(t->img, c * t->cs, buf, 4 * t->cs) != 0)
			abort();
	}
	free(buf);
	return NULL;
}

static void *tq_flusher(void *arg)
{
	struct tq_thread *t = arg;

	while (!*t->stop)
		if (drv->flush(t->img) != 0)
			abort();
	return NULL;
}

static void *tq_reader(void *arg)
{
	struct tq_thread *t = arg;
	uint8_t *buf = malloc(t->cs), *want = malloc(t->cs);
	unsigned seed = 77;

	while (!*t->stop) {
		uint64_t c = rand_r(&seed) % (t->img->size / t->cs);
		struct extent e;

		if (drv->map(t->img, c * t->cs, t->cs, &e) != 0)
			abort();
		if (e.type == EXT_DATA) {
			/* published only after the data write completed */
			if (fetch_pread(t->img->file, buf, t->cs, e.host_off) != 0)
				abort();
			tq_fill(want, t->cs, c * t->cs, 9);
			if (memcmp(buf, want, t->cs) != 0)
				abort();
		}
	}
	free(buf);
	free(want);
	return NULL;
}

static void test_qcow2_concurrent_alloc_flush_map(void **state)
{
	const uint32_t cs = 512;
	const uint64_t size = 4 * TQ_MIB, per = size / cs / 4;
	struct tq_thread t[6];
	pthread_t th[6];
	_Atomic int stop = 0;
	struct image *img;
	uint8_t *ref = malloc(size);

	tq_build("cc", 3, 9, 4, size);
	img = tq_open_ok("mem:cc", true);
	for (int i = 0; i < 6; i++) {
		t[i] = (struct tq_thread){img, i * per, per, cs, i, &stop};
		assert_int_equal(pthread_create(&th[i], NULL,
						i < 4	 ? tq_writer
						: i == 4 ? tq_flusher
							 : tq_reader,
						&t[i]),
				 0);
	}
	for (int i = 0; i < 4; i++)
		pthread_join(th[i], NULL);
	stop = 1;
	pthread_join(th[4], NULL);
	pthread_join(th[5], NULL);
	tq_fill(ref, size, 0, 9);
	tq_expect_read(img, ref, 0, size);
	tq_close(img);
	tq_assert_clean("cc");
	img = tq_open_ok("mem:cc", false);
	tq_expect_read(img, ref, 0, size);
	tq_close(img);
	free(ref);
}

static void test_qcow2_cache_eviction_many_tables(void **state)
{
	/* 512 B clusters: one L2 table per 32 KiB of guest. 20000 tables is
	 * more than half the writable cache (pressure flushes) and more than the
	 * read-only cache (evictions on read). */
	const uint32_t cs = 512;
	const uint64_t stride = 32 * 1024, ntab = 20000, size = ntab * stride;
	uint8_t buf[512], want[512];
	struct image *img;

	assert_int_equal(tq_create("mem:ev", size, cs, 3, NULL, NULL), 0);
	img = tq_open_ok("mem:ev", true);
	for (uint64_t i = 0; i < ntab; i++) {
		tq_fill(buf, cs, i * stride + 3 * cs, 4);
		assert_int_equal(drv->alloc_write(img, i * stride + 3 * cs, buf, cs), 0);
	}
	for (uint64_t i = 0; i < ntab; i += 97) {
		tq_fill(want, cs, i * stride + 3 * cs, 4);
		assert_int_equal(tq_read(img, i * stride + 3 * cs, buf, cs), 0);
		assert_memory_equal(buf, want, cs);
	}
	tq_close(img);
	tq_assert_clean("ev");
	img = tq_open_ok("mem:ev", false);
	for (int pass = 0; pass < 2; pass++) {
		for (uint64_t i = 0; i < ntab; i++) {
			struct extent e;

			assert_int_equal(drv->map(img, i * stride, stride, &e), 0);
			assert_int_equal(e.type, EXT_UNALLOC);
			assert_int_equal(e.len, 3 * cs);
			tq_fill(want, cs, i * stride + 3 * cs, 4);
			assert_int_equal(tq_read(img, i * stride + 3 * cs, buf, cs), 0);
			assert_memory_equal(buf, want, cs);
		}
	}
	tq_close(img);
}

/* Random corruption of the metadata never crashes (run under ASan): opens
 * fail cleanly or reads and writes return errors. */
static void test_qcow2_hostile_random_corruption(void **state)
{
	const uint32_t cs = 512;
	const uint64_t size = 2 * TQ_MIB;
	uint8_t buf[4096], *base;
	size_t n;
	struct image *img;
	unsigned seed = 4242, opened = 0;

	tq_build("fz", 3, 9, 4, size);
	img = tq_open_ok("mem:fz", true);
	for (uint64_t off = 0; off < size; off += 37 * cs) {
		tq_fill(buf, cs, off, 1);
		assert_int_equal(drv->alloc_write(img, off, buf, cs), 0);
	}
	assert_int_equal(drv->zero_clusters(img, 5 * cs, 3 * cs), 0);
	tq_close(img);
	base = tq_mem_copy("fz", &n);
	tq_capture();
	for (int iter = 0; iter < 400; iter++) {
		uint8_t *d = malloc(n);
		int flips = 1 + rand_r(&seed) % 8;

		memcpy(d, base, n);
		for (int f = 0; f < flips; f++) {
			/* mostly metadata: header, tables (first 16 KiB), some anywhere */
			size_t at = rand_r(&seed) % 4 ? rand_r(&seed) % SFS_MIN(n, (size_t)16384)
						      : rand_r(&seed) % n;
			d[at] ^= (uint8_t)(1u << (rand_r(&seed) % 8));
			if (rand_r(&seed) % 4 == 0)
				d[at] = (uint8_t)rand_r(&seed);
		}
		assert_int_equal(fetch_mem_put("fz", d, n), 0);
		free(d);
		if (tq_open("mem:fz", iter % 2, &img) < 0)
			continue;
		opened++;
		for (int k = 0; k < 64; k++) {
			uint64_t off =
			    ((uint64_t)rand_r(&seed) << 20 ^ (uint64_t)rand_r(&seed)) % img->size;
			size_t len = (size_t)SFS_MIN((uint64_t)sizeof(buf), img->size - off);

			(void)tq_read(img, off, buf, len);
		}
		if (!img->read_only) {
			uint64_t off = (uint64_t)rand_r(&seed) % (img->size / img->cluster_size) *
				       img->cluster_size;
			struct extent e;

			memset(buf, 0xaa, sizeof(buf));
			if (img->cluster_size <= sizeof(buf) &&
			    drv->map(img, off, img->cluster_size, &e) == 0 && e.type != EXT_DATA)
				(void)drv->alloc_write(img, off, buf, img->cluster_size);
			(void)drv->flush(img);
		}
		tq_drop(img);
	}
	tq_captured();
	assert_true(opened > 50); /* the test must actually exercise reads */
	free(base);
}

/* ==== zero clusters ==== */

static void test_qcow2_zero_clusters(void **state)
{
	const uint32_t cs = 65536;
	uint8_t *buf = malloc(2 * cs), *ref = calloc(1, 8 * cs);
	struct image *img;
	struct extent e;

	assert_int_equal(tq_create("mem:z", 8 * cs, cs, 3, "base", "raw"), 0);
	img = tq_open_ok("mem:z", true);
	assert_int_equal(drv->zero_clusters(img, 0, 2 * cs), 0);
	assert_int_equal(drv->map(img, 0, 8 * cs, &e), 0);
	assert_int_equal(e.type, EXT_ZERO);
	assert_int_equal(e.len, 2 * cs);
	/* data cluster turned zero keeps its offset as preallocation */
	tq_fill(buf, 2 * cs, 4 * cs, 5);
	assert_int_equal(drv->alloc_write(img, 4 * cs, buf, 2 * cs), 0);
	assert_int_equal(drv->zero_clusters(img, 4 * cs, cs), 0);
	assert_int_equal(drv->map(img, 4 * cs, 4 * cs, &e), 0);
	assert_int_equal(e.type, EXT_ZERO);
	assert_int_equal(e.len, cs);
	memcpy(ref + 5 * cs, buf + cs, cs);
	tq_expect_read(img, ref, 0, 8 * cs);
	assert_int_equal(drv->flush(img), 0);
	tq_assert_clean("z"); /* preallocated zero cluster still counted */
	/* writing over the preallocated zero cluster releases the old one */
	tq_fill(buf, cs, 4 * cs, 6);
	assert_int_equal(drv->alloc_write(img, 4 * cs, buf, cs), 0);
	memcpy(ref + 4 * cs, buf, cs);
	tq_expect_read(img, ref, 0, 8 * cs);
	tq_close(img);
	tq_assert_clean("z");
	img = tq_open_ok("mem:z", false);
	tq_expect_read(img, ref, 0, 8 * cs);
	assert_int_equal(drv->zero_clusters(img, 0, cs), -EROFS);
	tq_close(img);
	/* v2: not supported */
	assert_int_equal(tq_create("mem:z2", 8 * cs, cs, 2, NULL, NULL), 0);
	img = tq_open_ok("mem:z2", true);
	assert_int_equal(drv->zero_clusters(img, 0, cs), -ENOTSUP);
	assert_int_equal(drv->alloc_write(img, 100, buf, cs), -EINVAL); /* unaligned */
	tq_close(img);
	free(buf);
	free(ref);
}

/* ==== compressed clusters ==== */

/* Compress one cluster the way QEMU does (raw deflate, window 12). */
static size_t tq_deflate(const uint8_t *in, size_t len, uint8_t *out, size_t outlen)
{
	z_stream z;
	size_t n;

	memset(&z, 0, sizeof(z));
	assert_int_equal(
	    deflateInit2(&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY), Z_OK);
	z.next_in = (uint8_t *)in;
	z.avail_in = (uInt)len;
	z.next_out = out;
	z.avail_out = (uInt)outlen;
	assert_int_equal(deflate(&z, Z_FINISH), Z_STREAM_END);
	n = outlen - z.avail_out;
	deflateEnd(&z);
	return n;
}

static void test_qcow2_compressed_read(void **state)
{
	const uint32_t cs = 65536, cbits = 16;
	uint8_t *clu = malloc(cs), *comp = malloc(2 * cs), *got = malloc(cs);
	struct image *img;
	struct extent e;
	uint64_t l2, coff, entry, nsec;
	size_t clen, n;
	uint8_t *c;

	for (uint32_t i = 0; i < cs; i++)
		clu[i] = (uint8_t)((i / 300) * 7 + (i % 13 == 0));
	clen = tq_deflate(clu, cs, comp, 2 * cs);
	assert_true(clen < cs);
	assert_int_equal(tq_create("mem:cz", 4 * cs, cs, 3, NULL, NULL), 0);
	img = tq_open_ok("mem:cz", true);
	assert_int_equal(drv->alloc_write(img, 0, clu, cs), 0); /* gives us an L2 table */
	tq_close(img);
	c = tq_mem_copy("cz", &n);
	l2 = tq_get64(c + tq_get64(c + 40)) & 0x00fffffffffffe00ULL;
	free(c);
	/* compressed data at an unaligned offset past EOF + 100 */
	coff = n + 100;
	tq_patch("cz", coff, comp, clen);
	nsec = (coff + clen - 1) / 512 - coff / 512; /* additional sectors */
	entry = (1ULL << 62) | (nsec << (62 - (cbits - 8))) | coff;
	tq_patch64("cz", l2 + 8, entry);
	img = tq_open_ok("mem:cz", false);
	assert_int_equal(drv->map(img, cs, 3 * cs, &e), 0);
	assert_int_equal(e.type, EXT_COMPRESSED);
	assert_int_equal(e.len, cs); /* one cluster per compressed run */
	assert_int_equal(drv->read_compressed(img, cs, &e, got, cs), 0);
	assert_memory_equal(got, clu, cs);
	/* partial reads at odd offsets */
	assert_int_equal(drv->map(img, cs + 70001 - 65536, 1000, &e), 0);
	assert_int_equal(e.type, EXT_COMPRESSED);
	assert_int_equal(drv->read_compressed(img, cs + 4465, &e, got, 1000), 0);
	assert_memory_equal(got, clu + 4465, 1000);
	assert_int_equal(tq_read(img, cs - 10, got, 20000), 0);
	assert_memory_equal(got + 10, clu, 20000 - 10);
	tq_close(img);
	/* truncated compressed data: -EIO, not a crash */
	tq_patch64("cz", l2 + 8, (1ULL << 62) | (0ULL << (62 - (cbits - 8))) | coff);
	img = tq_open_ok("mem:cz", false);
	assert_int_equal(drv->map(img, cs, cs, &e), 0);
	tq_capture();
	assert_int_equal(drv->read_compressed(img, cs, &e, got, cs), -EIO);
	tq_captured();
	tq_close(img);
	/* garbage data */
	memset(comp, 0xff, 1024);
	tq_patch("cz", coff, comp, 1024);
	tq_patch64("cz", l2 + 8, entry);
	img = tq_open_ok("mem:cz", false);
	assert_int_equal(drv->map(img, cs, cs, &e), 0);
	tq_capture();
	assert_int_equal(drv->read_compressed(img, cs, &e, got, cs), -EIO);
	tq_captured();
	tq_close(img);
	/* offset past EOF */
	tq_patch64("cz", l2 + 8, (1ULL << 62) | (1ULL << 40));
	img = tq_open_ok("mem:cz", false);
	assert_int_equal(drv->map(img, cs, cs, &e), 0);
	tq_capture();
	assert_int_equal(drv->read_compressed(img, cs, &e, got, cs), -EIO);
	assert_non_null(strstr(tq_captured(), "past the end"));
	tq_close(img);
	free(clu);
	free(comp);
	free(got);
}

/* ==== set_backing ==== */

static void test_qcow2_set_backing(void **state)
{
	struct image *img;
	uint8_t *c, buf[8192];
	size_t n;
	char longname[700];

	assert_int_equal(tq_create("mem:sb", 16 * TQ_MIB, 8192, 3, "old-base.qcow2", "qcow2"), 0);
	img = tq_open_ok("mem:sb", true);
	tq_fill(buf, sizeof(buf), 0, 1);
	assert_int_equal(drv->alloc_write(img, 0, buf, sizeof(buf)), 0);
	/* an unknown header extension must survive */
	assert_int_equal(drv->set_backing(img, "new/base.raw", "raw"), 0);
	assert_string_equal(img->backing_name, "new/base.raw");
	assert_string_equal(img->backing_fmt, "raw");
	tq_close(img);
	tq_assert_clean("sb");
	img = tq_open_ok("mem:sb", true);
	assert_string_equal(img->backing_name, "new/base.raw");
	assert_string_equal(img->backing_fmt, "raw");
	assert_int_equal(drv->set_backing(img, NULL, NULL), 0);
	assert_null(img->backing_name);
	assert_null(img->backing_fmt);
	tq_close(img);
	c = tq_mem_copy("sb", &n);
	assert_int_equal(tq_get64(c + 8), 0);
	assert_int_equal(tq_get32(c + 16), 0);
	assert_int_equal(tq_get32(c + 112), 0x6803f857); /* feature table kept */
	assert_null(memmem(c, 8192, "base", 4));	 /* no stale name left */
	free(c);
	img = tq_open_ok("mem:sb", true);
	assert_null(img->backing_name);
	tq_expect_read(img, buf, 0, sizeof(buf));
	/* a long name still fits in an 8 KiB header cluster */
	memset(longname, 'n', sizeof(longname) - 1);
	longname[sizeof(longname) - 1] = 0;
	assert_int_equal(drv->set_backing(img, longname, "qcow2"), 0);
	assert_string_equal(img->backing_name, longname);
	tq_close(img);
	img = tq_open_ok("mem:sb", false);
	assert_string_equal(img->backing_name, longname);
	assert_int_equal(drv->set_backing(img, "x", "raw"), -EROFS);
	tq_close(img);

	/* 512 B header cluster: 600 bytes do not fit */
	assert_int_equal(tq_create("mem:sb5", TQ_MIB, 512, 3, "b", "raw"), 0);
	img = tq_open_ok("mem:sb5", true);
	longname[600] = 0;
	tq_capture();
	assert_true(drv->set_backing(img, longname, "raw") < 0);
	assert_non_null(strstr(tq_captured(), "does not fit"));
	assert_string_equal(img->backing_name, "b"); /* unchanged */
	tq_close(img);
	img = tq_open_ok("mem:sb5", false);
	assert_string_equal(img->backing_name, "b");
	assert_string_equal(img->backing_fmt, "raw");
	tq_close(img);
}

static void test_qcow2_set_backing_keeps_unknown_extension(void **state)
{
	struct image *img;
	uint8_t *c, ext[24] = {0x12, 0x34, 0x56, 0x78, 0, 0, 0, 13};
	size_t n;

	memcpy(ext + 8, "hello, world!", 13);
	/* v2 image: header 72 bytes, then our crafted extension list */
	assert_int_equal(tq_create("mem:uk", TQ_MIB, 65536, 2, "base", "raw"), 0);
	c = tq_mem_copy("uk", &n);
	memmove(c + 72 + 24, c + 72, 200);
	memcpy(c + 72, ext, 24);
	tq_put64(c + 8, tq_get64(c + 8) + 24);
	assert_int_equal(fetch_mem_put("uk", c, n), 0);
	free(c);
	img = tq_open_ok("mem:uk", true);
	assert_string_equal(img->backing_name, "base");
	assert_int_equal(drv->set_backing(img, "base2", NULL), 0);
	assert_null(img->backing_fmt);
	tq_close(img);
	c = tq_mem_copy("uk", &n);
	assert_non_null(memmem(c, 512, ext, 24));
	free(c);
	img = tq_open_ok("mem:uk", false);
	assert_string_equal(img->backing_name, "base2");
	assert_null(img->backing_fmt);
	tq_close(img);
}

/* ==== qemu-img as an oracle ==== */

static char tq_dir[64];

static bool tq_have_qemu(void)
{
	return system("qemu-img --version >/dev/null 2>&1") == 0 &&
	       system("qemu-io --version >/dev/null 2>&1") == 0;
}

static int tq_sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int tq_sh(const char *fmt, ...)
{
	char cmd[4096];
	va_list ap;
	int st;

	va_start(ap, fmt);
	vsnprintf(cmd, sizeof(cmd), fmt, ap);
	va_end(ap);
	st = system(cmd);
	return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static int tq_qemu_setup(void **state)
{
	if (!tq_have_qemu())
		return 0;
	strcpy(tq_dir, "/tmp/test-qcow2-XXXXXX");
	assert_non_null(mkdtemp(tq_dir));
	return 0;
}

static int tq_qemu_teardown(void **state)
{
	if (tq_dir[0])
		tq_sh("rm -rf '%s'", tq_dir);
	tq_dir[0] = 0;
	return 0;
}

#define TQ_NEED_QEMU()                                                                             \
	do {                                                                                       \
		if (!tq_dir[0]) {                                                                  \
			print_message("qemu-img/qemu-io not found: skipped\n");                    \
			skip();                                                                    \
		}                                                                                  \
	} while (0)

static uint8_t *tq_read_file(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	uint8_t *d;
	long n;

	assert_non_null(f);
	fseek(f, 0, SEEK_END);
	n = ftell(f);
	fseek(f, 0, SEEK_SET);
	d = malloc(n ? (size_t)n : 1);
	assert_int_equal(fread(d, 1, (size_t)n, f), (size_t)n);
	fclose(f);
	*len = (size_t)n;
	return d;
}

/* Open a file image with our driver and compare all of it with a raw file. */
static void tq_compare_with_raw(const char *img_path, const char *raw_path)
{
	size_t rn;
	uint8_t *raw = tq_read_file(raw_path, &rn);
	struct image *img = tq_open_ok(img_path, false);

	assert_int_equal(img->size, rn);
	tq_expect_read(img, raw, 0, rn);
	tq_close(img);
	free(raw);
}

static void tq_qemu_check_clean(const char *path)
{
	int r = tq_sh("qemu-img check -q '%s'", path);

	if (r != 0)
		tq_sh("qemu-img check '%s' >&2", path);
	assert_int_equal(r, 0);
}

/* Images written by qemu-io read back byte for byte, across versions,
 * cluster sizes, refcount widths, compression and zero clusters. */
static void test_qcow2_qemu_images_read(void **state)
{
	static const struct {
		const char *opts;
	} cases[] = {
	    {"compat=0.10,cluster_size=65536"},
	    {"compat=1.1,cluster_size=512,refcount_bits=1"},
	    {"compat=1.1,cluster_size=4096,refcount_bits=64"},
	    {"compat=1.1,cluster_size=2M,refcount_bits=8"},
	    {"compat=1.1,cluster_size=65536"},
	};
	char raw[256], q[256], qc[256];

	TQ_NEED_QEMU();
	snprintf(raw, sizeof(raw), "%s/ref.raw", tq_dir);
	/* raw reference: data, holes and a zero area, odd size */
	assert_int_equal(tq_sh("qemu-img create -q -f raw '%s' 9437697 && "
			       "qemu-io -f raw -c 'write -P 0x11 0 1M' -c 'write -P 0x22 3M 70k' "
			       "-c 'write -P 0x33 5000000 1234567' -c 'write -P 0 7M 128k' "
			       "-c 'write -P 0x44 9437000 697' '%s' >/dev/null",
			       raw, raw),
			 0);
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		snprintf(q, sizeof(q), "%s/q%zu.qcow2", tq_dir, i);
		snprintf(qc, sizeof(qc), "%s/qc%zu.qcow2", tq_dir, i);
		assert_int_equal(tq_sh("qemu-img convert -f raw -O qcow2 -o %s '%s' '%s'",
				       cases[i].opts, raw, q),
				 0);
		tq_compare_with_raw(q, raw);
		/* compressed */
		assert_int_equal(tq_sh("qemu-img convert -c -f raw -O qcow2 -o %s '%s' '%s'",
				       cases[i].opts, raw, qc),
				 0);
		tq_compare_with_raw(qc, raw);
		/* zero clusters (v3 only): write -z over data gives preallocated zeros */
		if (strstr(cases[i].opts, "1.1")) {
			assert_int_equal(
			    tq_sh("qemu-io -f qcow2 -c 'write -z 0 64k' "
				  "-c 'write -z -u 3M 64k' '%s' >/dev/null && "
				  "qemu-io -f raw -c 'write -z 0 64k' -c 'write -z 3M 64k' "
				  "'%s' >/dev/null",
				  q, raw),
			    0);
			tq_compare_with_raw(q, raw);
			/* restore the reference for the next case */
			assert_int_equal(tq_sh("qemu-io -f raw -c 'write -P 0x11 0 64k' "
					       "-c 'write -P 0x22 3M 64k' '%s' >/dev/null",
					       raw),
					 0);
		}
	}
}

/* Our map agrees with `qemu-img map`. */
static void test_qcow2_qemu_map_agrees(void **state)
{
	char q[256], out[256], line[512];
	struct image *img;
	FILE *f;
	unsigned lines = 0;

	TQ_NEED_QEMU();
	snprintf(q, sizeof(q), "%s/map.qcow2", tq_dir);
	snprintf(out, sizeof(out), "%s/map.json", tq_dir);
	assert_int_equal(tq_sh("qemu-img create -q -f qcow2 -o cluster_size=4096 '%s' 8M && "
			       "qemu-io -f qcow2 -c 'write -P 1 0 64k' -c 'write -P 2 1M 4k' "
			       "-c 'write -z 2M 64k' -c 'write -P 3 4M 1M' -c 'write -z 4M 8k' "
			       "-c 'write -c -P 4 6M 4k' '%s' >/dev/null && "
			       "qemu-img map --output=json '%s' > '%s'",
			       q, q, q, out),
			 0);
	img = tq_open_ok(q, false);
	f = fopen(out, "r");
	assert_non_null(f);
	while (fgets(line, sizeof(line), f)) {
		unsigned long long start, length, offset = 0;
		char *p;
		bool data, zero, present, has_off;

		if (!(p = strstr(line, "\"start\":")) || sscanf(p, "\"start\": %llu", &start) != 1)
			continue;
		assert_int_equal(sscanf(strstr(line, "\"length\":"), "\"length\": %llu", &length),
				 1);
		data = strstr(line, "\"data\": true") != NULL;
		zero = strstr(line, "\"zero\": true") != NULL;
		present = strstr(line, "\"present\": true") != NULL;
		has_off = (p = strstr(line, "\"offset\":")) != NULL;
		if (has_off)
			sscanf(p, "\"offset\": %llu", &offset);
		for (uint64_t pos = start; pos < start + length;) {
			struct extent e;

			assert_int_equal(drv->map(img, pos, start + length - pos, &e), 0);
			if (data && has_off) {
				assert_int_equal(e.type, EXT_DATA);
				assert_int_equal(e.host_off, offset + (pos - start));
			} else if (data) {
				assert_int_equal(e.type, EXT_COMPRESSED);
			} else if (zero && present) {
				assert_int_equal(e.type, EXT_ZERO);
			} else {
				assert_int_equal(e.type, EXT_UNALLOC);
			}
			pos += e.len;
		}
		lines++;
	}
	fclose(f);
	assert_true(lines >= 6);
	tq_close(img);
}

/* Images we write pass `qemu-img check` and `qemu-img compare`. */
static void test_qcow2_qemu_check_after_our_writes(void **state)
{
	static const char *cases[] = {
	    "compat=1.1,cluster_size=65536",
	    "compat=0.10,cluster_size=4096",
	    "compat=1.1,cluster_size=512,refcount_bits=1",
	    "compat=1.1,cluster_size=512,refcount_bits=64",
	    "compat=1.1,cluster_size=512,refcount_bits=2",
	    "compat=1.1,cluster_size=2M,refcount_bits=32",
	};
	const uint64_t size = 24 * TQ_MIB + 4096;
	char q[256], raw[256];
	uint8_t *ref = calloc(1, size);

	TQ_NEED_QEMU();
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct image *img;
		uint32_t cs;
		FILE *f;

		snprintf(q, sizeof(q), "%s/w%zu.qcow2", tq_dir, i);
		snprintf(raw, sizeof(raw), "%s/w%zu.raw", tq_dir, i);
		assert_int_equal(tq_sh("qemu-img create -q -f qcow2 -o %s '%s' %llu", cases[i], q,
				       (unsigned long long)size),
				 0);
		memset(ref, 0, size);
		img = tq_open_ok(q, true);
		cs = img->cluster_size;
		srand((unsigned)i);
		for (int k = 0; k < 200; k++) {
			uint64_t nc = (size + cs - 1) / cs;
			uint64_t c = (uint64_t)rand() % nc, n = 1 + (uint64_t)rand() % 8, j;
			uint8_t *buf;

			n = SFS_MIN(n, nc - c);
			for (j = 0; j < n; j++) {
				struct extent e;
				assert_int_equal(drv->map(img, (c + j) * cs, cs, &e), 0);
				if (e.type == EXT_DATA)
					break;
			}
			if ((n = j) == 0)
				continue;
			if (img->drv->zero_clusters && rand() % 5 == 0 &&
			    drv->zero_clusters(img, c * cs, n * cs) == 0) {
				memset(ref + c * cs, 0, SFS_MIN(n * cs, size - c * cs));
				continue;
			}
			buf = calloc(1, n * cs);
			tq_fill(buf, SFS_MIN(n * cs, size - c * cs), c * cs, (unsigned)k);
			assert_int_equal(drv->alloc_write(img, c * cs, buf, n * cs), 0);
			memcpy(ref + c * cs, buf, SFS_MIN(n * cs, size - c * cs));
			free(buf);
		}
		tq_close(img);
		f = fopen(raw, "wb");
		assert_int_equal(fwrite(ref, 1, size, f), size);
		fclose(f);
		tq_qemu_check_clean(q);
		assert_int_equal(tq_sh("qemu-img compare -q -f qcow2 -F raw '%s' '%s'", q, raw), 0);
		assert_int_equal(tq_sh("qemu-img info '%s' | grep -q 'corrupt: true'", q), 1);
	}
	free(ref);
}

/* Overwriting compressed and preallocated-zero clusters of a qemu image
 * keeps refcounts exact. */
static void test_qcow2_qemu_overwrite_compressed_and_zero(void **state)
{
	char q[256], raw[256];
	struct image *img;
	uint8_t *buf = malloc(65536);
	FILE *f;

	TQ_NEED_QEMU();
	snprintf(q, sizeof(q), "%s/cz.qcow2", tq_dir);
	snprintf(raw, sizeof(raw), "%s/cz.raw", tq_dir);
	assert_int_equal(
	    tq_sh("qemu-img create -q -f raw '%s' 4M && "
		  "qemu-io -f raw -c 'write -P 0x61 0 2M' '%s' >/dev/null && "
		  "qemu-img convert -c -f raw -O qcow2 '%s' '%s' && "
		  "qemu-io -f qcow2 -c 'write -P 0x62 2M 1M' -c 'write -z 2M 128k' '%s' "
		  ">/dev/null",
		  raw, raw, raw, q, q),
	    0);
	img = tq_open_ok(q, true);
	for (uint64_t off = 0; off < 4 * TQ_MIB; off += 65536) {
		struct extent e;

		assert_int_equal(drv->map(img, off, 65536, &e), 0);
		if (e.type == EXT_DATA || off % (3 * 65536) == 65536)
			continue; /* leave some compressed clusters alone */
		tq_fill(buf, 65536, off, 1);
		assert_int_equal(drv->alloc_write(img, off, buf, 65536), 0);
	}
	tq_close(img);
	tq_qemu_check_clean(q);
	/* reference: rebuild what we wrote over the qemu contents */
	assert_int_equal(tq_sh("qemu-io -f raw -c 'write -P 0x62 2M 1M' -c 'write -z 2M 128k' '%s' "
			       ">/dev/null",
			       raw),
			 0);
	{
		size_t rn;
		uint8_t *r = tq_read_file(raw, &rn);
		struct image *ro = tq_open_ok(q, false);

		for (uint64_t off = 0; off < rn; off += 65536) {
			bool kept = off % (3 * 65536) == 65536;
			bool was_data = off >= 2 * TQ_MIB + 128 * 1024 && off < 3 * TQ_MIB;

			if (!kept && !was_data)
				tq_fill(r + off, 65536, off, 1);
		}
		tq_expect_read(ro, r, 0, rn);
		tq_close(ro);
		f = fopen(raw, "wb");
		assert_int_equal(fwrite(r, 1, rn, f), rn);
		fclose(f);
		free(r);
	}
	assert_int_equal(tq_sh("qemu-img compare -q -f qcow2 -F raw '%s' '%s'", q, raw), 0);
	free(buf);
}

/* create() matches `qemu-img create` byte for byte and passes check. */
static void test_qcow2_qemu_create_matches(void **state)
{
	static const struct {
		uint64_t size;
		uint32_t cs;
		int version;
		const char *bname, *bfmt;
	} cases[] = {
	    {1ULL << 30, 65536, 3, "base.raw", "raw"},
	    {1ULL << 30, 65536, 2, "base.raw", "raw"},
	    {10ULL << 30, 512, 3, NULL, NULL},
	    {100ULL << 20, 2u << 20, 3, "base.raw", "raw"},
	    {12345678, 4096, 3, NULL, NULL},
	};
	char a[256], b[256];

	TQ_NEED_QEMU();
	assert_int_equal(tq_sh("qemu-img create -q -f raw '%s/base.raw' 1M", tq_dir), 0);
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		size_t na, nb;
		uint8_t *da, *db;

		snprintf(a, sizeof(a), "%s/ours%zu.qcow2", tq_dir, i);
		snprintf(b, sizeof(b), "%s/theirs%zu.qcow2", tq_dir, i);
		unlink(a);
		assert_int_equal(tq_create(a, cases[i].size, cases[i].cs, cases[i].version,
					   cases[i].bname, cases[i].bfmt),
				 0);
		assert_int_equal(
		    tq_sh("cd '%s' && qemu-img create -q -f qcow2 -o compat=%s,cluster_size=%u "
			  "%s%s%s%s '%s' %llu",
			  tq_dir, cases[i].version == 2 ? "0.10" : "1.1", cases[i].cs,
			  cases[i].bname ? "-b " : "", cases[i].bname ? cases[i].bname : "",
			  cases[i].bfmt ? " -F " : "", cases[i].bfmt ? cases[i].bfmt : "", b,
			  (unsigned long long)cases[i].size),
		    0);
		tq_qemu_check_clean(a);
		assert_int_equal(tq_sh("qemu-img compare -q '%s' '%s'", a, b), 0);
		da = tq_read_file(a, &na);
		db = tq_read_file(b, &nb);
		assert_int_equal(
		    tq_sh("cd '%s' && qemu-img info --output=json '%s' | grep -v "
			  "actual-size | grep -v filename | grep -v dirty > a.json && "
			  "qemu-img info --output=json '%s' | grep -v actual-size | "
			  "grep -v filename | grep -v dirty > b.json && "
			  "{ cmp -s a.json b.json || { diff a.json b.json >&2; false; }; }",
			  tq_dir, a, b),
		    0);
		if (cases[i].cs >= 4096) {
			/* and so is the whole layout for usual cluster sizes (with
			 * 512 B clusters QEMU drops the feature table and lays out a
			 * multi-block refcount structure differently) */
			assert_int_equal(na, nb);
			assert_memory_equal(da, db, na);
		}
		free(da);
		free(db);
	}
}

/* A writer killed at a random moment (no flush, like kill -9) leaves an
 * image with at most leaks. */
static void test_qcow2_qemu_killed_writer_only_leaks(void **state)
{
	char q[256];

	TQ_NEED_QEMU();
	for (int round = 0; round < 6; round++) {
		pid_t pid;
		int st, r;

		snprintf(q, sizeof(q), "%s/kill%d.qcow2", tq_dir, round);
		assert_int_equal(
		    tq_sh("qemu-img create -q -f qcow2 -o cluster_size=512 '%s' 16M", q), 0);
		pid = fork();
		assert_true(pid >= 0);
		if (pid == 0) {
			struct image *img;
			uint8_t buf[2048];

			if (tq_open(q, true, &img) < 0)
				_exit(1);
			for (int i = 0; i < 400 + round * 300; i++) {
				uint64_t off = ((uint64_t)(i * 7919) % 8000) * 2048;

				tq_fill(buf, sizeof(buf), off, 0);
				struct extent e;
				if (drv->map(img, off, 2048, &e) == 0 && e.type != EXT_DATA &&
				    drv->alloc_write(img, off, buf, sizeof(buf)) != 0)
					_exit(2);
				if (i % 97 == 0)
					drv->flush(img);
			}
			_exit(0); /* no flush, no close */
		}
		assert_int_equal(waitpid(pid, &st, 0), pid);
		assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
		r = tq_sh("qemu-img check -q '%s' 2>/dev/null", q);
		assert_true(r == 0 || r == 3); /* 3 = leaks only */
		assert_int_equal(tq_sh("qemu-img check -q -r leaks '%s' >/dev/null 2>&1", q), 0);
		tq_qemu_check_clean(q);
	}
}

/* Our writes on top of an image that has a backing file and a backing
 * format: qemu-img sees the same guest bytes. */
static void test_qcow2_qemu_overlay_with_backing(void **state)
{
	char base[256], top[256], flat[256];
	struct image *img;
	uint8_t *buf = malloc(65536);

	TQ_NEED_QEMU();
	snprintf(base, sizeof(base), "%s/ob-base.qcow2", tq_dir);
	snprintf(top, sizeof(top), "%s/ob-top.qcow2", tq_dir);
	snprintf(flat, sizeof(flat), "%s/ob-flat.raw", tq_dir);
	assert_int_equal(tq_sh("qemu-img create -q -f qcow2 '%s' 4M && "
			       "qemu-io -f qcow2 -c 'write -P 0x77 0 4M' '%s' >/dev/null && "
			       "qemu-img create -q -f qcow2 -b ob-base.qcow2 -F qcow2 '%s'",
			       base, base, top),
			 0);
	img = tq_open_ok(top, true);
	assert_string_equal(img->backing_name, "ob-base.qcow2");
	assert_string_equal(img->backing_fmt, "qcow2");
	tq_fill(buf, 65536, 65536, 3);
	assert_int_equal(drv->alloc_write(img, 65536, buf, 65536), 0);
	assert_int_equal(drv->zero_clusters(img, 3 * 65536, 65536), 0);
	tq_close(img);
	tq_qemu_check_clean(top);
	assert_int_equal(tq_sh("qemu-img convert -O raw '%s' '%s'", top, flat), 0);
	{
		size_t n;
		uint8_t *d = tq_read_file(flat, &n);
		uint8_t *want = malloc(n);

		memset(want, 0x77, n);
		memcpy(want + 65536, buf, 65536);
		memset(want + 3 * 65536, 0, 65536);
		assert_memory_equal(d, want, n);
		free(d);
		free(want);
	}
	/* rebase to nothing via set_backing: qemu-img info agrees */
	img = tq_open_ok(top, true);
	assert_int_equal(drv->set_backing(img, NULL, NULL), 0);
	tq_close(img);
	assert_int_equal(tq_sh("qemu-img info '%s' | grep -q 'backing file'", top), 1);
	tq_qemu_check_clean(top);
	img = tq_open_ok(top, true);
	assert_int_equal(drv->set_backing(img, "ob-base.qcow2", "qcow2"), 0);
	tq_close(img);
	assert_int_equal(tq_sh("qemu-img info '%s' | grep -q 'backing file format: qcow2'", top),
			 0);
	tq_qemu_check_clean(top);
	free(buf);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test_setup(test_qcow2_probe_magic, tq_setup),
	    cmocka_unit_test_setup(test_qcow2_create_v3_opens, tq_setup),
	    cmocka_unit_test_setup(test_qcow2_create_v2_opens, tq_setup),
	    cmocka_unit_test_setup(test_qcow2_create_no_backing, tq_setup),
	    cmocka_unit_test_setup(test_qcow2_create_large_l1_many_refblocks, tq_setup),
	    cmocka_unit_test_setup(test_qcow2_create_rejects_bad_options, tq_setup),
	    cmocka_unit_test_setup(test_qcow2_header_refusals, tq_setup),
	    cmocka_unit_test_setup(test_qcow2_header_dirty_corrupt_snapshots, tq_setup),
	    cmocka_unit_test_setup(test_qcow2_header_autoclear_cleared_on_rw, tq_setup),
	    cmocka_unit_test_setup(test_qcow2_header_v2_and_v3_104, tq_setup),
	    cmocka_unit_test_setup(test_qcow2_header_v2_name_right_after_header, tq_setup),
	    cmocka_unit_test_setup(test_qcow2_map_runs_merge, tq_setup),
	    cmocka_unit_test_setup(test_qcow2_map_hostile_l2_entries, tq_setup),
	    cmocka_unit_test_setup(test_qcow2_hostile_overlaps_refused_rw, tq_setup),
	    cmocka_unit_test_setup(test_qcow2_alloc_write_refcounts_exact, tq_setup),
	    cmocka_unit_test_setup(test_qcow2_alloc_write_all_refcount_orders, tq_setup),
	    cmocka_unit_test_setup(test_qcow2_refcount_table_growth_512, tq_setup),
	    cmocka_unit_test_setup(test_qcow2_flush_write_failure_recovers, tq_setup),
	    cmocka_unit_test_setup(test_qcow2_full_disk_fails_writes_not_flush, tq_setup),
	    cmocka_unit_test_setup(test_qcow2_crash_order_only_leaks, tq_setup),
	    cmocka_unit_test_setup(test_qcow2_concurrent_alloc_flush_map, tq_setup),
	    cmocka_unit_test_setup(test_qcow2_cache_eviction_many_tables, tq_setup),
	    cmocka_unit_test_setup(test_qcow2_hostile_random_corruption, tq_setup),
	    cmocka_unit_test_setup(test_qcow2_zero_clusters, tq_setup),
	    cmocka_unit_test_setup(test_qcow2_compressed_read, tq_setup),
	    cmocka_unit_test_setup(test_qcow2_set_backing, tq_setup),
	    cmocka_unit_test_setup(test_qcow2_set_backing_keeps_unknown_extension, tq_setup),
	    cmocka_unit_test(test_qcow2_qemu_images_read),
	    cmocka_unit_test(test_qcow2_qemu_map_agrees),
	    cmocka_unit_test(test_qcow2_qemu_check_after_our_writes),
	    cmocka_unit_test(test_qcow2_qemu_overwrite_compressed_and_zero),
	    cmocka_unit_test(test_qcow2_qemu_create_matches),
	    cmocka_unit_test(test_qcow2_qemu_killed_writer_only_leaks),
	    cmocka_unit_test(test_qcow2_qemu_overlay_with_backing),
	};
	int r;

	tq_qemu_setup(NULL);
	r = cmocka_run_group_tests(tests, NULL, NULL);
	tq_qemu_teardown(NULL);
	fetch_mem_reset();
	return r;
}
