/* streamfs: unit tests for the guest-facing disk layer (block/disk.c).
 *
 * Every test builds its chain in memory: a random raw "mem:base", an
 * optional qcow2 "mem:mid", and an overlay "mem:ovl" created with
 * image_create(). Tests that depend on the overlay format run once per
 * format (qcow2 and qed), with the format passed as the cmocka state.
 * Results are checked against a byte model of what the guest must see,
 * and allocation against the overlay driver's own map().
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "disk.h"
#include "fetch.h"
#include "image.h"
#include "util.h"

/* A seam for deterministic race tests: the real range locks, compiled
 * in here with rangelock_lock renamed, so this file's rangelock_lock()
 * (below) runs a one-shot hook first. disk.c then lands between "read the
 * chain" and "take the lock" exactly when a test wants a guest write
 * there. All four rangelock symbols are defined by this object, so the
 * linker never pulls block/rangelock.o out of libstreamfs.a. */
#define rangelock_lock td_real_rangelock_lock
#include "../block/rangelock.c"
#undef rangelock_lock

int rangelock_lock(struct rangelock *rl, uint64_t off, uint64_t len);

/* Called (and disarmed) at the first lock of [off, ...) with off == td_hook_off. */
static void (*td_hook)(uint64_t off, uint64_t len);
static uint64_t td_hook_off;
/* Every lock taken since the last reset, for the alignment test. */
static uint64_t td_locks[64][2];
static int td_nlocks;
static pthread_mutex_t td_lock_log = PTHREAD_MUTEX_INITIALIZER;

int rangelock_lock(struct rangelock *rl, uint64_t off, uint64_t len)
{
	void (*h)(uint64_t, uint64_t) = NULL;

	pthread_mutex_lock(&td_lock_log);
	if (td_nlocks < 64) {
		td_locks[td_nlocks][0] = off;
		td_locks[td_nlocks][1] = len;
	}
	td_nlocks++;
	if (td_hook && off == td_hook_off) {
		h = td_hook;
		td_hook = NULL;
	}
	pthread_mutex_unlock(&td_lock_log);
	if (h)
		h(off, len);
	return td_real_rangelock_lock(rl, off, len);
}

static void td_arm(uint64_t off, void (*fn)(uint64_t, uint64_t))
{
	pthread_mutex_lock(&td_lock_log);
	td_hook_off = off;
	td_hook = fn;
	td_nlocks = 0;
	pthread_mutex_unlock(&td_lock_log);
}

#define TD_CS	    4096u
#define TD_NCLUST   11u
#define TD_TAIL	    1536u /* the last cluster is partial */
#define TD_SIZE	    ((TD_NCLUST - 1) * TD_CS + TD_TAIL)
#define TD_OVL	    "mem:ovl"
#define TD_BASE_URI "mem:base"
#define TD_MID_URI  "mem:mid"

/* ---- helpers ---- */

static const char *td_fmt(void **state)
{
	return (const char *)*state;
}

static void td_random(uint8_t *buf, size_t len, uint32_t seed)
{
	uint32_t x = seed * 2654435761u + 0x9e3779b9u;

	for (size_t i = 0; i < len; i++) {
		x ^= x << 13;
		x ^= x >> 17;
		x ^= x << 5;
		buf[i] = (uint8_t)(x >> 7);
	}
}

/* A deterministic, never-all-same pattern for guest writes. */
static void td_pattern(uint8_t *buf, size_t len, uint32_t tag)
{
	td_random(buf, len, 0x51ed27u ^ (tag * 7919u));
}

static uint8_t *td_xmalloc(size_t len)
{
	uint8_t *p = malloc(len ? len : 1);

	assert_non_null(p);
	return p;
}

/* Put a random raw backing "base" of size bytes; returns a copy. */
static uint8_t *td_put_base(size_t size, uint32_t seed)
{
	uint8_t *b = td_xmalloc(size);

	td_random(b, size, seed);
	assert_int_equal(fetch_mem_put("base", b, size), 0);
	return b;
}

static void td_create(const char *uri, const char *fmt, uint64_t size, const char *backing,
		      const char *backing_fmt)
{
	struct image_create_opts o = {
	    .size = size,
	    .cluster_size = TD_CS,
	    .backing_name = backing,
	    .backing_fmt = backing_fmt,
	};

	assert_int_equal(image_create(uri, fmt, &o), 0);
}

static struct disk *td_open(const char *uri, bool cor, bool ro)
{
	struct image *top = NULL;
	struct disk *d = NULL;

	assert_int_equal(image_open_chain(uri, NULL, ro ? 0 : IMAGE_RDWR, NULL, &top), 0);
	assert_non_null(top);
	assert_int_equal(disk_new(top, cor, ro, &d), 0);
	return d;
}

/* Base of TD_SIZE random bytes, overlay of format fmt over it, opened. */
static struct disk *td_setup_2(const char *fmt, bool cor, uint8_t **base)
{
	*base = td_put_base(TD_SIZE, 1);
	td_create(TD_OVL, fmt, TD_SIZE, TD_BASE_URI, "raw");
	return td_open(TD_OVL, cor, false);
}

static enum extent_type td_type(struct image *img, uint64_t off)
{
	struct extent ext;
	uint64_t len = SFS_MIN((uint64_t)img->cluster_size, img->size - off);

	assert_int_equal(img->drv->map(img, off, len, &ext), 0);
	assert_true(ext.len > 0 && ext.len <= len);
	return ext.type;
}

/* Check the allocation state of each overlay cluster: pattern has one
 * letter per cluster, D = data, Z = zero, U = unallocated. */
static void td_assert_map(struct image *img, const char *pattern)
{
	char got[64] = {0};
	uint64_t n = SFS_DIV_ROUND_UP(img->size, img->cluster_size);

	assert_true(n < sizeof(got));
	for (uint64_t c = 0; c < n; c++) {
		switch (td_type(img, c * img->cluster_size)) {
		case EXT_DATA:
			got[c] = 'D';
			break;
		case EXT_ZERO:
			got[c] = 'Z';
			break;
		case EXT_UNALLOC:
			got[c] = 'U';
			break;
		default:
			got[c] = 'C';
			break;
		}
	}
	assert_string_equal(got, pattern);
}

/* The bytes the overlay file holds for an EXT_DATA cluster run. */
static void td_overlay_bytes(struct image *img, uint64_t off, void *buf, size_t len)
{
	struct extent ext;

	assert_int_equal(img->drv->map(img, off, len, &ext), 0);
	assert_int_equal(ext.type, EXT_DATA);
	assert_true(ext.len >= len);
	assert_int_equal(fetch_pread(img->file, buf, len, ext.host_off), 0);
}

/* Read the whole disk through disk_read in uneven chunks. */
static uint8_t *td_read_all(struct disk *d)
{
	uint64_t size = d->top->size, off = 0;
	uint8_t *b = td_xmalloc(size);
	size_t step = 3001;

	while (off < size) {
		size_t n = (size_t)SFS_MIN((uint64_t)step, size - off);
		assert_int_equal(disk_read(d, b + off, n, off), 0);
		off += n;
		step = step * 7 % 9973 + 1;
	}
	return b;
}

static void td_assert_disk(struct disk *d, const uint8_t *expect)
{
	uint8_t *b = td_read_all(d);

	assert_memory_equal(b, expect, d->top->size);
	free(b);
}

/* Through the chain, without copy-on-read. */
static void td_assert_image(struct image *img, const uint8_t *expect)
{
	uint8_t *b = td_xmalloc(img->size);

	assert_int_equal(image_pread(img, b, img->size, 0), 0);
	assert_memory_equal(b, expect, img->size);
	free(b);
}

/* Open uri afresh (read-only) and compare every byte; backing is the
 * expected backing filename of the top (NULL = none). */
static void td_assert_reopen(const char *uri, const uint8_t *expect, uint64_t size,
			     const char *backing)
{
	struct image *top = NULL;

	assert_int_equal(image_open_chain(uri, NULL, 0, NULL, &top), 0);
	assert_int_equal(top->size, size);
	if (backing) {
		assert_non_null(top->backing);
		assert_string_equal(top->backing->filename, backing);
		assert_non_null(top->backing_name);
	} else {
		assert_null(top->backing);
		assert_null(top->backing_name);
	}
	td_assert_image(top, expect);
	image_close_chain(top);
}

static size_t td_mem_len(const char *name)
{
	const void *p;
	size_t len;

	assert_int_equal(fetch_mem_get(name, &p, &len), 0);
	return len;
}

static void td_unfail(const char *name)
{
	assert_int_equal(fetch_mem_fail(name, 0, 0, 0), 0);
}

static int td_setup(void **state)
{
	fetch_mem_reset();
	return 0;
}

static void td_zr_release(void);

static int td_teardown(void **state)
{
	td_zr_release();
	td_arm(UINT64_MAX, NULL);
	fetch_mem_reset();
	return 0;
}

/* ---- reads and copy-on-read ---- */

static void test_disk_read_equals_backing(void **state)
{
	uint8_t *base, buf[100];
	struct disk *d = td_setup_2(td_fmt(state), false, &base);

	assert_int_equal(d->top->size, TD_SIZE);
	assert_int_equal(d->top->cluster_size, TD_CS);
	td_assert_disk(d, base);
	/* Reads that start or end mid-cluster and cross boundaries. */
	assert_int_equal(disk_read(d, buf, sizeof(buf), TD_CS - 50), 0);
	assert_memory_equal(buf, base + TD_CS - 50, sizeof(buf));
	assert_int_equal(disk_read(d, buf, sizeof(buf), TD_SIZE - sizeof(buf)), 0);
	assert_memory_equal(buf, base + TD_SIZE - sizeof(buf), sizeof(buf));
	assert_int_equal(disk_read(d, buf, 0, TD_SIZE), 0);
	/* Past the end is refused, not clamped. */
	assert_int_equal(disk_read(d, buf, 2, TD_SIZE - 1), -EINVAL);
	assert_int_equal(disk_read(d, buf, 1, UINT64_MAX), -EINVAL);
	assert_int_equal(atomic_load(&d->stats.guest_read), TD_SIZE + 2 * sizeof(buf));
	td_assert_map(d->top, "UUUUUUUUUUU");
	assert_int_equal(disk_close(d), 0);
	free(base);
}

static void test_disk_cor_allocates_read_clusters(void **state)
{
	uint8_t *base, buf[300], host[TD_CS];
	struct disk *d = td_setup_2(td_fmt(state), true, &base);

	assert_true(d->copy_on_read);
	/* Inside cluster 2. */
	assert_int_equal(disk_read(d, buf, 100, 2 * TD_CS + 10), 0);
	assert_memory_equal(buf, base + 2 * TD_CS + 10, 100);
	td_assert_map(d->top, "UUDUUUUUUUU");
	assert_int_equal(atomic_load(&d->stats.cor_bytes), TD_CS);
	/* The overlay holds the whole cluster, not only the bytes read. */
	td_overlay_bytes(d->top, 2 * TD_CS, host, TD_CS);
	assert_memory_equal(host, base + 2 * TD_CS, TD_CS);
	/* Across the boundary of clusters 4 and 5. */
	assert_int_equal(disk_read(d, buf, 300, 5 * TD_CS - 150), 0);
	assert_memory_equal(buf, base + 5 * TD_CS - 150, 300);
	td_assert_map(d->top, "UUDUDDUUUUU");
	assert_int_equal(atomic_load(&d->stats.cor_bytes), 3 * TD_CS);
	/* A read spanning allocated and unallocated clusters. */
	assert_int_equal(disk_read(d, buf, 300, 3 * TD_CS - 100), 0);
	assert_memory_equal(buf, base + 3 * TD_CS - 100, 300);
	td_assert_map(d->top, "UUDDDDUUUUU");
	/* Copied clusters are served from the overlay: the backing can fail. */
	assert_int_equal(fetch_mem_fail("base", FETCH_MEM_READ, 0, EIO), 0);
	assert_int_equal(disk_read(d, buf, 300, 2 * TD_CS + 1000), 0);
	assert_memory_equal(buf, base + 2 * TD_CS + 1000, 300);
	td_unfail("base");
	/* Survives a reopen without the backing. */
	assert_int_equal(disk_close(d), 0);
	{
		struct image *top;
		assert_int_equal(image_open_chain(TD_OVL, NULL, IMAGE_NO_BACKING, NULL, &top), 0);
		td_assert_map(top, "UUDDDDUUUUU");
		td_overlay_bytes(top, 2 * TD_CS, host, TD_CS);
		assert_memory_equal(host, base + 2 * TD_CS, TD_CS);
		td_overlay_bytes(top, 5 * TD_CS, host, TD_CS);
		assert_memory_equal(host, base + 5 * TD_CS, TD_CS);
		image_close_chain(top);
	}
	free(base);
}

static void test_disk_cor_at_image_end(void **state)
{
	uint8_t *base, buf[TD_TAIL], host[TD_CS];
	struct disk *d = td_setup_2(td_fmt(state), true, &base);

	assert_int_equal(disk_read(d, buf, 10, TD_SIZE - 10), 0);
	assert_memory_equal(buf, base + TD_SIZE - 10, 10);
	td_assert_map(d->top, "UUUUUUUUUUD");
	assert_int_equal(atomic_load(&d->stats.cor_bytes), TD_TAIL);
	td_overlay_bytes(d->top, (TD_NCLUST - 1) * TD_CS, host, TD_TAIL);
	assert_memory_equal(host, base + (TD_NCLUST - 1) * TD_CS, TD_TAIL);
	td_assert_disk(d, base);
	assert_int_equal(disk_close(d), 0);
	td_assert_reopen(TD_OVL, base, TD_SIZE, TD_BASE_URI);
	free(base);
}

static void test_disk_cor_off_does_not_allocate(void **state)
{
	uint8_t *base;
	struct disk *d = td_setup_2(td_fmt(state), false, &base);
	size_t len0 = td_mem_len("ovl");

	assert_false(d->copy_on_read);
	td_assert_disk(d, base);
	td_assert_map(d->top, "UUUUUUUUUUU");
	assert_int_equal(atomic_load(&d->stats.cor_bytes), 0);
	assert_int_equal(disk_close(d), 0);
	assert_int_equal(td_mem_len("ovl"), len0);

	/* copy_on_read requested but the disk is read-only: no allocation. */
	d = td_open(TD_OVL, true, true);
	assert_false(d->copy_on_read);
	td_assert_disk(d, base);
	td_assert_map(d->top, "UUUUUUUUUUU");
	assert_int_equal(disk_close(d), 0);
	assert_int_equal(td_mem_len("ovl"), len0);
	free(base);
}

/* ---- writes ---- */

/* Write len bytes of pattern tag at off through the disk and the model. */
static void td_write(struct disk *d, uint8_t *model, uint64_t off, size_t len, uint32_t tag)
{
	uint8_t *b = td_xmalloc(len);

	td_pattern(b, len, tag);
	assert_int_equal(disk_write(d, b, len, off), 0);
	memcpy(model + off, b, len);
	free(b);
}

static void test_disk_write_within_cluster(void **state)
{
	uint8_t *base, *model;
	struct disk *d = td_setup_2(td_fmt(state), false, &base);

	model = td_xmalloc(TD_SIZE);
	memcpy(model, base, TD_SIZE);
	td_write(d, model, TD_CS + 100, 50, 1);
	td_assert_map(d->top, "UDUUUUUUUUU");
	td_assert_disk(d, model);
	/* Untouched bytes of the written cluster are the backing's. */
	assert_memory_equal(model + TD_CS, base + TD_CS, 100);
	assert_memory_equal(model + TD_CS + 150, base + TD_CS + 150, TD_CS - 150);
	/* Rewrite inside the now allocated cluster, overlapping the first write. */
	td_write(d, model, TD_CS + 120, 1000, 2);
	td_assert_map(d->top, "UDUUUUUUUUU");
	td_assert_disk(d, model);
	/* One byte at the very start and end of a cluster. */
	td_write(d, model, 3 * TD_CS, 1, 3);
	td_write(d, model, 4 * TD_CS - 1, 1, 4);
	td_assert_map(d->top, "UDUDUUUUUUU");
	td_assert_disk(d, model);
	assert_int_equal(atomic_load(&d->stats.guest_written), 1052);
	assert_int_equal(disk_close(d), 0);
	td_assert_reopen(TD_OVL, model, TD_SIZE, TD_BASE_URI);
	free(model);
	free(base);
}

static void test_disk_write_across_clusters(void **state)
{
	uint8_t *base, *model;
	struct disk *d = td_setup_2(td_fmt(state), false, &base);

	model = td_xmalloc(TD_SIZE);
	memcpy(model, base, TD_SIZE);
	/* From 7 bytes before the end of cluster 1 to 13 bytes into cluster 3. */
	td_write(d, model, 2 * TD_CS - 7, TD_CS + 20, 10);
	td_assert_map(d->top, "UDDDUUUUUUU");
	td_assert_disk(d, model);
	/* Mixed run: allocated cluster 3, then unallocated 4 and 5. */
	td_write(d, model, 3 * TD_CS + 500, 2 * TD_CS + 100, 11);
	td_assert_map(d->top, "UDDDDDUUUUU");
	td_assert_disk(d, model);
	/* Unallocated 0, allocated 1..5, unallocated 6, aligned start, odd end. */
	td_write(d, model, 0, 6 * TD_CS + 1, 12);
	td_assert_map(d->top, "DDDDDDDUUUU");
	td_assert_disk(d, model);
	assert_memory_equal(model + 6 * TD_CS + 1, base + 6 * TD_CS + 1, TD_CS - 1);
	assert_int_equal(disk_close(d), 0);
	td_assert_reopen(TD_OVL, model, TD_SIZE, TD_BASE_URI);
	free(model);
	free(base);
}

static void test_disk_write_at_image_end(void **state)
{
	uint8_t *base, *model, host[TD_CS];
	struct disk *d = td_setup_2(td_fmt(state), false, &base);
	const uint64_t last = (TD_NCLUST - 1) * TD_CS;

	model = td_xmalloc(TD_SIZE);
	memcpy(model, base, TD_SIZE);
	/* The last 100 bytes of the partial last cluster. */
	td_write(d, model, TD_SIZE - 100, 100, 20);
	td_assert_map(d->top, "UUUUUUUUUUD");
	td_assert_disk(d, model);
	td_overlay_bytes(d->top, last, host, TD_TAIL);
	assert_memory_equal(host, model + last, TD_TAIL);
	/* From cluster 9 to the very end, crossing into the partial cluster. */
	td_write(d, model, last - 10, 10 + TD_TAIL, 21);
	td_assert_map(d->top, "UUUUUUUUUDD");
	td_assert_disk(d, model);
	/* Exactly the last byte. */
	td_write(d, model, TD_SIZE - 1, 1, 22);
	td_assert_disk(d, model);
	assert_int_equal(disk_close(d), 0);
	td_assert_reopen(TD_OVL, model, TD_SIZE, TD_BASE_URI);
	free(model);
	free(base);
}

/* disk_zero: partial clusters are written, whole ones become zero clusters
 * (or, when they hold data, are zeroed in place); the backing is hidden,
 * the result survives a reopen and the stream job leaves it alone. */
static void test_disk_zero_ranges(void **state)
{
	uint8_t *base, *model;
	struct disk *d = td_setup_2(td_fmt(state), false, &base);
	uint64_t copied = 0;
	uint8_t *buf = td_xmalloc(4 * TD_CS);

	model = td_xmalloc(TD_SIZE);
	memcpy(model, base, TD_SIZE);
	td_write(d, model, 4 * TD_CS, TD_CS, 1); /* cluster 4: data */
	/* From the middle of cluster 1 to the middle of cluster 5. */
	assert_int_equal(disk_zero(d, TD_CS + 100, 4 * TD_CS), 0);
	memset(model + TD_CS + 100, 0, 4 * TD_CS);
	td_assert_map(d->top, "UDZZDDUUUUU");
	td_assert_disk(d, model);
	/* Inside one cluster, and a single byte. */
	assert_int_equal(disk_zero(d, 7 * TD_CS + 5, 10), 0);
	memset(model + 7 * TD_CS + 5, 0, 10);
	assert_int_equal(disk_zero(d, 0, 1), 0);
	model[0] = 0;
	/* The partial last cluster, from its start to the image end. */
	assert_int_equal(disk_zero(d, (TD_NCLUST - 1) * TD_CS, TD_TAIL), 0);
	memset(model + (TD_NCLUST - 1) * TD_CS, 0, TD_TAIL);
	td_assert_map(d->top, "DDZZDDUDUUZ");
	td_assert_disk(d, model);
	/* Bounds. */
	assert_int_equal(disk_zero(d, TD_SIZE - 1, 2), -EINVAL);
	assert_int_equal(disk_zero(d, UINT64_MAX, 2), -EINVAL);
	assert_int_equal(disk_zero(d, 5, 0), 0);
	/* The job copies the rest and leaves the zeros zero. */
	assert_int_equal(disk_populate(d, NULL, 0, TD_SIZE, buf, 4 * TD_CS, &copied), 0);
	td_assert_disk(d, model);
	assert_int_equal(disk_close(d), 0);
	td_assert_reopen(TD_OVL, model, TD_SIZE, TD_BASE_URI);
	/* Read-only. */
	d = td_open(TD_OVL, false, true);
	assert_int_equal(disk_zero(d, 0, TD_CS), -EROFS);
	assert_int_equal(disk_close(d), 0);
	free(buf);
	free(model);
	free(base);
}

static void test_disk_write_past_size_enospc(void **state)
{
	uint8_t *base, buf[16] = {1, 2, 3};
	struct disk *d = td_setup_2(td_fmt(state), false, &base);

	assert_int_equal(disk_write(d, buf, 2, TD_SIZE - 1), -ENOSPC);
	assert_int_equal(disk_write(d, buf, 1, TD_SIZE), -ENOSPC);
	assert_int_equal(disk_write(d, buf, 16, TD_SIZE + TD_CS), -ENOSPC);
	assert_int_equal(disk_write(d, buf, 16, UINT64_MAX - 8), -ENOSPC);
	td_assert_map(d->top, "UUUUUUUUUUU");
	td_assert_disk(d, base);
	assert_int_equal(atomic_load(&d->stats.guest_written), 0);
	/* The boundary itself is fine. */
	assert_int_equal(disk_write(d, buf, 1, TD_SIZE - 1), 0);
	base[TD_SIZE - 1] = buf[0];
	td_assert_disk(d, base);
	assert_int_equal(disk_close(d), 0);
	free(base);
}

/* A format with no overlay support (raw) is never the writable top: every
 * write would fail. Read-only it is served; the overlay over it (fmt) is
 * writable as usual. */
static void test_image_raw_top_rdwr_refused(void **state)
{
	struct image *img = NULL;
	uint8_t *base;

	base = td_put_base(TD_SIZE, 1);
	assert_int_equal(image_open_one(TD_BASE_URI, NULL, IMAGE_RDWR, &img), -EMEDIUMTYPE);
	assert_null(img);
	assert_int_equal(image_open_one(TD_BASE_URI, "raw", IMAGE_RDWR, &img), -EMEDIUMTYPE);
	assert_int_equal(image_open_chain(TD_BASE_URI, NULL, IMAGE_RDWR, NULL, &img), -EMEDIUMTYPE);
	assert_null(img);
	assert_int_equal(td_mem_len("base"), TD_SIZE);

	assert_int_equal(image_open_chain(TD_BASE_URI, NULL, 0, NULL, &img), 0);
	assert_string_equal(img->drv->name, "raw");
	assert_true(img->read_only);
	image_close_chain(img);

	td_create(TD_OVL, td_fmt(state), TD_SIZE, TD_BASE_URI, "raw");
	assert_int_equal(image_open_chain(TD_OVL, NULL, IMAGE_RDWR, NULL, &img), 0);
	assert_false(img->read_only);
	image_close_chain(img);
	free(base);
}

/* An empty file is no disk: refused in every mode and format, as the top
 * and as a backing, and nothing is written into it. */
static void test_image_empty_file_refused(void **state)
{
	const char *fmts[] = {NULL, "raw", "qcow2", "qed"};
	struct image *img = NULL;

	assert_int_equal(fetch_mem_put("empty", NULL, 0), 0);
	for (size_t i = 0; i < sizeof(fmts) / sizeof(fmts[0]); i++) {
		assert_int_equal(image_open_one("mem:empty", fmts[i], 0, &img), -EINVAL);
		assert_int_equal(image_open_one("mem:empty", fmts[i], IMAGE_RDWR, &img), -EINVAL);
		assert_int_equal(image_open_chain("mem:empty", fmts[i], 0, NULL, &img), -EINVAL);
		assert_null(img);
	}
	assert_int_equal(td_mem_len("empty"), 0);

	td_create(TD_OVL, td_fmt(state), TD_SIZE, "mem:empty", "raw");
	assert_int_equal(image_open_chain(TD_OVL, NULL, IMAGE_RDWR, NULL, &img), -EINVAL);
	assert_null(img);
	/* Without the chain the overlay itself opens. */
	assert_int_equal(image_open_chain(TD_OVL, NULL, IMAGE_RDWR | IMAGE_NO_BACKING, NULL, &img),
			 0);
	image_close_chain(img);
}

static void test_disk_read_only_erofs(void **state)
{
	uint8_t *base, buf[64] = {0}, scratch[TD_CS];
	const void *p;
	uint8_t *before;
	size_t len0, len1;
	uint64_t copied = 99;
	struct image *top;
	struct disk *d = NULL;

	base = td_put_base(TD_SIZE, 1);
	td_create(TD_OVL, td_fmt(state), TD_SIZE, TD_BASE_URI, "raw");

	/* Writable image, read-only disk. */
	assert_int_equal(image_open_chain(TD_OVL, NULL, IMAGE_RDWR, NULL, &top), 0);
	assert_int_equal(disk_new(top, true, true, &d), 0);
	assert_true(d->read_only);
	assert_false(d->copy_on_read);
	assert_int_equal(disk_write(d, buf, sizeof(buf), 0), -EROFS);
	assert_int_equal(disk_write(d, buf, sizeof(buf), TD_SIZE), -EROFS);
	assert_int_equal(disk_populate(d, NULL, 0, TD_SIZE, scratch, sizeof(scratch), &copied),
			 -EROFS);
	assert_int_equal(copied, 0);
	assert_int_equal(disk_rebase(d, NULL), -EROFS);
	assert_non_null(d->top->backing);
	td_assert_disk(d, base);
	td_assert_map(d->top, "UUUUUUUUUUU");
	assert_int_equal(atomic_load(&d->stats.guest_written), 0);
	assert_int_equal(disk_close(d), 0);

	/* Read-only image: the disk is read-only whatever was asked, and the
	 * overlay's bytes do not change. */
	assert_int_equal(fetch_mem_get("ovl", &p, &len0), 0);
	before = td_xmalloc(len0);
	memcpy(before, p, len0);
	assert_int_equal(image_open_chain(TD_OVL, NULL, 0, NULL, &top), 0);
	assert_int_equal(disk_new(top, true, false, &d), 0);
	assert_true(d->read_only);
	assert_false(d->copy_on_read);
	assert_int_equal(disk_write(d, buf, sizeof(buf), 100), -EROFS);
	assert_int_equal(disk_populate(d, NULL, 0, TD_SIZE, scratch, sizeof(scratch), &copied),
			 -EROFS);
	assert_int_equal(disk_rebase(d, NULL), -EROFS);
	assert_int_equal(disk_flush(d), 0);
	td_assert_disk(d, base);
	assert_int_equal(disk_close(d), 0);
	assert_int_equal(fetch_mem_get("ovl", &p, &len1), 0);
	assert_int_equal(len1, len0);
	assert_memory_equal(p, before, len0);
	td_assert_reopen(TD_OVL, base, TD_SIZE, TD_BASE_URI);
	free(before);
	free(base);
}

/* ---- populate, rebase, find_layer ---- */

static void test_disk_populate_copies_everything(void **state)
{
	uint8_t *base, *buf = td_xmalloc(4 * TD_CS);
	uint64_t copied = 0;
	struct disk *d = td_setup_2(td_fmt(state), false, &base);

	assert_int_equal(disk_populate(d, NULL, 0, TD_SIZE, buf, 4 * TD_CS, &copied), 0);
	assert_int_equal(copied, TD_SIZE);
	assert_int_equal(atomic_load(&d->stats.stream_copied), TD_SIZE);
	assert_int_equal(atomic_load(&d->stats.stream_present), 0);
	td_assert_map(d->top, "DDDDDDDDDDD");
	td_assert_disk(d, base);
	/* Again: nothing left to copy, everything counted as present. */
	assert_int_equal(disk_populate(d, NULL, 0, TD_SIZE, buf, 4 * TD_CS, &copied), 0);
	assert_int_equal(copied, 0);
	assert_int_equal(atomic_load(&d->stats.stream_present), TD_SIZE);
	/* The overlay alone now holds every byte. */
	assert_int_equal(disk_rebase(d, NULL), 0);
	assert_null(d->top->backing);
	assert_null(d->top->backing_name);
	td_assert_disk(d, base);
	assert_int_equal(disk_close(d), 0);
	td_assert_reopen(TD_OVL, base, TD_SIZE, NULL);
	free(buf);
	free(base);
}

static void test_disk_populate_partial_ranges_and_guest_data(void **state)
{
	uint8_t *base, *model, *buf = td_xmalloc(2 * TD_CS);
	uint64_t copied = 0;
	struct disk *d = td_setup_2(td_fmt(state), false, &base);

	model = td_xmalloc(TD_SIZE);
	memcpy(model, base, TD_SIZE);
	td_write(d, model, 3 * TD_CS + 5, 10, 30);
	/* A range of three clusters, one of them already allocated. */
	assert_int_equal(disk_populate(d, NULL, 2 * TD_CS, 3 * TD_CS, buf, 2 * TD_CS, &copied), 0);
	assert_int_equal(copied, 2 * TD_CS);
	td_assert_map(d->top, "UUDDDUUUUUU");
	/* A length past the end is clamped to the size. */
	assert_int_equal(
	    disk_populate(d, NULL, 9 * TD_CS, 100 * (uint64_t)TD_CS, buf, 2 * TD_CS, &copied), 0);
	assert_int_equal(copied, TD_CS + TD_TAIL);
	td_assert_map(d->top, "UUDDDUUUUDD");
	td_assert_disk(d, model);
	assert_int_equal(disk_close(d), 0);
	td_assert_reopen(TD_OVL, model, TD_SIZE, TD_BASE_URI);
	free(model);
	free(buf);
	free(base);
}

static void test_disk_populate_rejects_bad_args(void **state)
{
	uint8_t *base, *buf = td_xmalloc(3 * TD_CS);
	uint64_t copied = 77;
	struct disk *d = td_setup_2(td_fmt(state), false, &base);

	assert_int_equal(disk_populate(d, NULL, 100, TD_CS, buf, TD_CS, &copied), -EINVAL);
	assert_int_equal(copied, 0);
	assert_int_equal(disk_populate(d, NULL, 0, TD_CS, buf, TD_CS / 2, &copied), -EINVAL);
	assert_int_equal(disk_populate(d, NULL, 0, TD_CS, buf, TD_CS + 512, &copied), -EINVAL);
	td_assert_map(d->top, "UUUUUUUUUUU");
	/* Beyond the end: nothing to do. */
	assert_int_equal(disk_populate(d, NULL, 20 * TD_CS, TD_CS, buf, TD_CS, &copied), 0);
	assert_int_equal(copied, 0);
	td_assert_map(d->top, "UUUUUUUUUUU");
	assert_int_equal(disk_close(d), 0);
	free(buf);
	free(base);
}

/* Regression (found by this test): disk_populate computed
 * end = SFS_MIN(off + len, size), which wraps when off + len overflows, so
 * len = UINT64_MAX copied nothing and reported success. Either the range is
 * clamped (copy to the end) or refused with -EINVAL; silently doing nothing
 * is wrong. */
static void test_disk_populate_len_overflow(void **state)
{
	uint8_t *base, *buf = td_xmalloc(4 * TD_CS);
	uint64_t copied = 0;
	struct disk *d = td_setup_2(td_fmt(state), false, &base);
	int r;

	r = disk_populate(d, NULL, TD_CS, UINT64_MAX, buf, 4 * TD_CS, &copied);
	free(buf);
	free(base);
	if (r == 0) {
		uint64_t c = copied;
		char map[16];
		for (uint64_t i = 0; i < TD_NCLUST; i++)
			map[i] = td_type(d->top, i * TD_CS) == EXT_DATA ? 'D' : 'U';
		map[TD_NCLUST] = '\0';
		assert_int_equal(disk_close(d), 0);
		assert_int_equal(c, TD_SIZE - TD_CS);
		assert_string_equal(map, "UDDDDDDDDDD");
	} else {
		assert_int_equal(disk_close(d), 0);
		assert_int_equal(r, -EINVAL);
	}
}

/* mid: a qcow2 image without backing holding data only in clusters 2 and 5
 * and a zero cluster at 7; the rest are holes. Returns the guest view. */
static uint8_t *td_make_holey_mid(void)
{
	uint8_t *model = calloc(1, TD_SIZE);
	struct disk *m;

	assert_non_null(model);
	td_create(TD_MID_URI, "qcow2", TD_SIZE, NULL, NULL);
	m = td_open(TD_MID_URI, false, false);
	td_write(m, model, 2 * TD_CS, TD_CS, 40);
	td_write(m, model, 5 * TD_CS + 10, 20, 41);
	assert_int_equal(m->top->drv->zero_clusters(m->top, 7 * TD_CS, TD_CS), 0);
	td_assert_map(m->top, "UUDUUDUZUUU");
	assert_int_equal(disk_close(m), 0);
	return model;
}

static void test_disk_populate_skips_holes(void **state)
{
	uint8_t *model, *buf = td_xmalloc(8 * TD_CS);
	uint64_t copied = 0;
	struct disk *d;

	model = td_make_holey_mid();
	td_create(TD_OVL, td_fmt(state), TD_SIZE, TD_MID_URI, "qcow2");
	d = td_open(TD_OVL, false, false);
	td_assert_disk(d, model);
	assert_int_equal(disk_populate(d, NULL, 0, TD_SIZE, buf, 8 * TD_CS, &copied), 0);
	assert_int_equal(copied, 2 * TD_CS);
	/* Holes and zeros of the whole chain stay unallocated. */
	td_assert_map(d->top, "UUDUUDUUUUU");
	assert_int_equal(atomic_load(&d->stats.stream_copied), 2 * TD_CS);
	assert_int_equal(atomic_load(&d->stats.stream_zero), TD_SIZE - 2 * TD_CS);
	assert_int_equal(atomic_load(&d->stats.stream_present), 0);
	assert_int_equal(disk_rebase(d, NULL), 0);
	assert_null(d->top->backing);
	td_assert_disk(d, model);
	assert_int_equal(disk_close(d), 0);
	td_assert_reopen(TD_OVL, model, TD_SIZE, NULL);
	free(buf);
	free(model);
}

/* base (raw, random) <- mid (qcow2) <- ovl (fmt). mid holds data in
 * clusters 1, 3 (partial write), 5-6 (one write across them), 10 (the
 * partial last cluster) and a zero cluster at 8. Returns the guest view. */
static uint8_t *td_make_3level(const char *fmt, uint8_t **basep)
{
	uint8_t *base = td_put_base(TD_SIZE, 2), *model = td_xmalloc(TD_SIZE);
	struct disk *m;

	memcpy(model, base, TD_SIZE);
	td_create(TD_MID_URI, "qcow2", TD_SIZE, TD_BASE_URI, "raw");
	m = td_open(TD_MID_URI, false, false);
	td_write(m, model, TD_CS, TD_CS, 50);
	td_write(m, model, 3 * TD_CS + 100, 200, 51);
	td_write(m, model, 6 * TD_CS - 300, 600, 52);
	td_write(m, model, TD_SIZE - 10, 10, 53);
	assert_int_equal(m->top->drv->zero_clusters(m->top, 8 * TD_CS, TD_CS), 0);
	memset(model + 8 * TD_CS, 0, TD_CS);
	td_assert_map(m->top, "UDUDUDDUZUD");
	assert_int_equal(disk_close(m), 0);
	td_create(TD_OVL, fmt, TD_SIZE, TD_MID_URI, "qcow2");
	*basep = base;
	return model;
}

static void test_disk_populate_respects_base_then_rebase(void **state)
{
	uint8_t *base, *model, *buf = td_xmalloc(4 * TD_CS);
	uint64_t copied = 0;
	struct image *lb;
	struct disk *d;

	model = td_make_3level(td_fmt(state), &base);
	d = td_open(TD_OVL, false, false);
	td_assert_disk(d, model);
	lb = disk_find_layer(d, TD_BASE_URI);
	assert_non_null(lb);
	assert_ptr_equal(lb, image_layer(d->top, 2));
	assert_int_equal(disk_populate(d, lb, 0, TD_SIZE, buf, 4 * TD_CS, &copied), 0);
	/* Only mid's data: clusters 1, 3, 5, 6 and the partial last one. */
	assert_int_equal(copied, 4 * TD_CS + TD_TAIL);
	/* mid's zero cluster must hide base's data after the rebase. */
	td_assert_map(d->top, "UDUDUDDUZUD");
	assert_int_equal(atomic_load(&d->stats.stream_zero), TD_CS);
	assert_int_equal(atomic_load(&d->stats.stream_present), TD_SIZE - 5 * TD_CS - TD_TAIL);
	/* Data below base was not copied. */
	td_assert_disk(d, model);

	assert_int_equal(disk_rebase(d, lb), 0);
	assert_ptr_equal(d->top->backing, lb);
	assert_non_null(d->top->backing_name);
	assert_string_equal(d->top->backing_name, TD_BASE_URI);
	assert_non_null(d->top->backing_fmt);
	assert_string_equal(d->top->backing_fmt, "raw");
	assert_int_equal(lb->depth, 1);
	assert_null(lb->backing);
	assert_null(disk_find_layer(d, TD_MID_URI));
	assert_ptr_equal(disk_find_layer(d, TD_BASE_URI), lb);
	td_assert_disk(d, model);
	assert_int_equal(disk_close(d), 0);
	/* A fresh open follows the new header: ovl <- base, same bytes. */
	td_assert_reopen(TD_OVL, model, TD_SIZE, TD_BASE_URI);
	{
		struct image *top;
		assert_int_equal(image_open_chain(TD_OVL, NULL, 0, NULL, &top), 0);
		assert_null(top->backing->backing);
		assert_string_equal(top->backing->drv->name, "raw");
		image_close_chain(top);
	}
	free(buf);
	free(model);
	free(base);
}

static void test_disk_populate_whole_chain_then_rebase_null(void **state)
{
	uint8_t *base, *model, *buf = td_xmalloc(4 * TD_CS);
	uint64_t copied = 0;
	struct disk *d;

	model = td_make_3level(td_fmt(state), &base);
	d = td_open(TD_OVL, false, false);
	assert_int_equal(disk_populate(d, NULL, 0, TD_SIZE, buf, 4 * TD_CS, &copied), 0);
	/* Everything but mid's zero cluster, which is zero in the chain. */
	assert_int_equal(copied, TD_SIZE - TD_CS);
	td_assert_map(d->top, "DDDDDDDDUDD");
	assert_int_equal(disk_rebase(d, NULL), 0);
	assert_null(d->top->backing);
	assert_null(d->top->backing_name);
	assert_null(disk_find_layer(d, TD_BASE_URI));
	td_assert_disk(d, model);
	assert_int_equal(disk_close(d), 0);
	td_assert_reopen(TD_OVL, model, TD_SIZE, NULL);
	free(buf);
	free(model);
	free(base);
}

static void test_disk_rebase_failure_keeps_chain(void **state)
{
	uint8_t *base, *buf = td_xmalloc(4 * TD_CS);
	uint64_t copied = 0;
	struct disk *d = td_setup_2(td_fmt(state), false, &base);
	struct image *b = d->top->backing;

	assert_int_equal(disk_populate(d, NULL, 0, TD_SIZE, buf, 4 * TD_CS, &copied), 0);
	assert_int_equal(disk_flush(d), 0);
	assert_int_equal(fetch_mem_fail("ovl", FETCH_MEM_WRITE | FETCH_MEM_FLUSH, 0, EIO), 0);
	assert_true(disk_rebase(d, NULL) < 0);
	assert_ptr_equal(d->top->backing, b);
	assert_non_null(d->top->backing_name);
	assert_string_equal(d->top->backing_name, TD_BASE_URI);
	assert_ptr_equal(disk_find_layer(d, TD_BASE_URI), b);
	td_unfail("ovl");
	td_assert_disk(d, base);
	assert_int_equal(disk_rebase(d, NULL), 0);
	assert_null(d->top->backing);
	assert_int_equal(disk_close(d), 0);
	td_assert_reopen(TD_OVL, base, TD_SIZE, NULL);
	free(buf);
	free(base);
}

static void test_disk_find_layer_by_name(void **state)
{
	uint8_t *base, *model;
	struct disk *d;

	model = td_make_3level(td_fmt(state), &base);
	d = td_open(TD_OVL, false, false);
	assert_ptr_equal(disk_find_layer(d, TD_MID_URI), image_layer(d->top, 1));
	assert_ptr_equal(disk_find_layer(d, TD_BASE_URI), image_layer(d->top, 2));
	assert_string_equal(disk_find_layer(d, TD_BASE_URI)->drv->name, "raw");
	/* The top is not a valid base; unknown names are not found. */
	assert_null(disk_find_layer(d, TD_OVL));
	assert_null(disk_find_layer(d, "mem:nope"));
	assert_null(disk_find_layer(d, ""));
	assert_int_equal(disk_close(d), 0);
	free(model);
	free(base);
}

/* ---- concurrency ---- */

#define TC_WRITERS 3
#define TC_STRIPE  1500
#define TC_GAP	   300
#define TC_NSTRIPE 13 /* 13 * 1800 = 23400 bytes: clusters 0..5 */
#define TC_REGION  (6 * TD_CS)
#define TC_ITERS   400

struct tc_ctx {
	struct disk *d;
	const uint8_t *base;
	uint8_t *model; /* writer k updates only the bytes of its stripes */
	_Atomic int writers_left;
	_Atomic int failures;
	int id;
};

struct tc_arg {
	struct tc_ctx *c;
	int id;
};

static bool tc_in_gap(uint64_t off)
{
	return off >= (uint64_t)TC_NSTRIPE * (TC_STRIPE + TC_GAP) ||
	       off % (TC_STRIPE + TC_GAP) >= TC_STRIPE;
}

static void *tc_writer(void *opaque)
{
	struct tc_arg *a = opaque;
	struct tc_ctx *c = a->c;
	uint32_t rnd = 1234u + (uint32_t)a->id * 977u;
	uint8_t buf[TC_STRIPE];

	for (int it = 0; it < TC_ITERS; it++) {
		int j;
		uint64_t s, e, so;

		rnd = rnd * 1103515245u + 12345u;
		j = a->id + TC_WRITERS * (int)((rnd >> 8) % ((TC_NSTRIPE + TC_WRITERS - 1 - a->id) /
							     TC_WRITERS));
		so = (uint64_t)j * (TC_STRIPE + TC_GAP);
		rnd = rnd * 1103515245u + 12345u;
		s = (rnd >> 8) % TC_STRIPE;
		rnd = rnd * 1103515245u + 12345u;
		e = s + 1 + (rnd >> 8) % (TC_STRIPE - s);
		td_pattern(buf, (size_t)(e - s), (uint32_t)(a->id * 100000 + it));
		if (disk_write(c->d, buf, (size_t)(e - s), so + s) != 0) {
			atomic_fetch_add(&c->failures, 1);
			break;
		}
		memcpy(c->model + so + s, buf, (size_t)(e - s));
	}
	atomic_fetch_sub(&c->writers_left, 1);
	return NULL;
}

/* Reads random ranges (copy-on-read) and checks the bytes nobody writes. */
static void *tc_reader(void *opaque)
{
	struct tc_arg *a = opaque;
	struct tc_ctx *c = a->c;
	uint32_t rnd = 99u + (uint32_t)a->id;
	uint8_t buf[3 * TD_CS];

	while (atomic_load(&c->writers_left) > 0) {
		uint64_t s, n;

		rnd = rnd * 1103515245u + 12345u;
		s = (rnd >> 8) % TC_REGION;
		rnd = rnd * 1103515245u + 12345u;
		n = 1 + (rnd >> 8) % SFS_MIN((uint64_t)sizeof(buf), TC_REGION - s);
		if (disk_read(c->d, buf, (size_t)n, s) != 0) {
			atomic_fetch_add(&c->failures, 1);
			break;
		}
		for (uint64_t i = 0; i < n; i++) {
			if (tc_in_gap(s + i) && buf[i] != c->base[s + i]) {
				atomic_fetch_add(&c->failures, 1);
				return NULL;
			}
		}
	}
	return NULL;
}

static void *tc_populater(void *opaque)
{
	struct tc_arg *a = opaque;
	struct tc_ctx *c = a->c;
	uint8_t *buf = malloc(2 * TD_CS);
	uint64_t copied;

	if (!buf) {
		atomic_fetch_add(&c->failures, 1);
		return NULL;
	}
	while (atomic_load(&c->writers_left) > 0) {
		uint64_t off = (uint64_t)(a->id % 3) * TD_CS;
		if (disk_populate(c->d, NULL, off, TC_REGION - off, buf, 2 * TD_CS, &copied) != 0) {
			atomic_fetch_add(&c->failures, 1);
			break;
		}
	}
	free(buf);
	return NULL;
}

static void test_disk_concurrent_read_write_populate(void **state)
{
	for (int round = 0; round < 16; round++) {
		struct tc_ctx c = {0};
		struct tc_arg args[TC_WRITERS + 3];
		pthread_t th[TC_WRITERS + 3];
		uint8_t *base;
		int n = 0;

		fetch_mem_reset();
		/* Rounds alternate copy-on-read and plain reads. */
		c.d = td_setup_2(td_fmt(state), round % 2 == 0, &base);
		c.base = base;
		c.model = td_xmalloc(TD_SIZE);
		memcpy(c.model, base, TD_SIZE);
		atomic_store(&c.writers_left, TC_WRITERS);
		for (int i = 0; i < TC_WRITERS + 3; i++)
			args[i] = (struct tc_arg){.c = &c, .id = i};
		for (int i = 0; i < TC_WRITERS; i++, n++)
			assert_int_equal(pthread_create(&th[n], NULL, tc_writer, &args[n]), 0);
		assert_int_equal(pthread_create(&th[n], NULL, tc_reader, &args[n]), 0);
		n++;
		assert_int_equal(pthread_create(&th[n], NULL, tc_reader, &args[n]), 0);
		n++;
		assert_int_equal(pthread_create(&th[n], NULL, tc_populater, &args[n]), 0);
		n++;
		for (int i = 0; i < n; i++)
			pthread_join(th[i], NULL);
		assert_int_equal(atomic_load(&c.failures), 0);
		/* Every owner's bytes are its last write; the rest is backing. */
		td_assert_disk(c.d, c.model);
		for (uint64_t i = 0; i < TD_SIZE; i++)
			if (tc_in_gap(i) && c.model[i] != base[i])
				fail_msg("model changed a gap byte at %llu", (unsigned long long)i);
		assert_int_equal(disk_close(c.d), 0);
		td_assert_reopen(TD_OVL, c.model, TD_SIZE, TD_BASE_URI);
		free(c.model);
		free(base);
	}
}

/* ---- deterministic races through the range-lock seam ---- */

static void test_disk_locks_cluster_aligned_ranges(void **state)
{
	uint8_t *base, buf[2 * TD_CS] = {0};
	struct disk *d = td_setup_2(td_fmt(state), true, &base);

	td_arm(UINT64_MAX, NULL);
	assert_int_equal(disk_write(d, buf, 50, TD_CS + 100), 0);
	assert_int_equal(disk_write(d, buf, TD_CS + 20, 2 * TD_CS - 7), 0);
	assert_int_equal(disk_write(d, buf, 10, TD_SIZE - 10), 0);
	assert_int_equal(disk_read(d, buf, 10, 5 * TD_CS + 1), 0); /* copy-on-read */
	assert_int_equal(disk_read(d, buf, 10, TD_CS + 1), 0);	   /* allocated: no lock */
	assert_int_equal(td_nlocks, 4);
	assert_int_equal(td_locks[0][0], TD_CS);
	assert_int_equal(td_locks[0][1], TD_CS);
	assert_int_equal(td_locks[1][0], TD_CS);
	assert_int_equal(td_locks[1][1], 3 * TD_CS);
	assert_int_equal(td_locks[2][0], (TD_NCLUST - 1) * TD_CS);
	assert_int_equal(td_locks[2][1], TD_CS);
	assert_int_equal(td_locks[3][0], 5 * TD_CS);
	assert_int_equal(td_locks[3][1], TD_CS);
	assert_int_equal(disk_close(d), 0);
	free(base);
}

/* The guest write that a hook performs "just before" disk.c takes a lock. */
static struct disk *td_race_d;
static uint8_t *td_race_model;
static uint64_t td_race_woff;
static size_t td_race_wlen;
static int td_race_r;

static void *td_race_thread(void *unused)
{
	uint8_t buf[TD_CS];

	td_pattern(buf, td_race_wlen, 90);
	td_race_r = disk_write(td_race_d, buf, td_race_wlen, td_race_woff);
	if (td_race_r == 0)
		memcpy(td_race_model + td_race_woff, buf, td_race_wlen);
	return NULL;
}

/* From another thread, as a FUSE worker would (disk.c's bounce buffers
 * are per thread), and finished before the hooked lock is taken. */
static void td_race_write(uint64_t off, uint64_t len)
{
	pthread_t t;

	assert_true(td_race_wlen <= TD_CS);
	assert_int_equal(pthread_create(&t, NULL, td_race_thread, NULL), 0);
	pthread_join(t, NULL);
}

static void td_race_setup(struct disk *d, uint8_t *model, uint64_t lock_off, uint64_t woff,
			  size_t wlen)
{
	td_race_d = d;
	td_race_model = model;
	td_race_woff = woff;
	td_race_wlen = wlen;
	td_race_r = 1;
	td_arm(lock_off, td_race_write);
}

static void test_disk_cor_race_guest_write_wins(void **state)
{
	uint8_t *base, *model, buf[3 * TD_CS], host[TD_CS];
	struct disk *d = td_setup_2(td_fmt(state), true, &base);

	model = td_xmalloc(TD_SIZE);
	memcpy(model, base, TD_SIZE);
	/* COR of cluster 3 read the backing; the guest writes it first. */
	td_race_setup(d, model, 3 * TD_CS, 3 * TD_CS + 10, 100);
	assert_int_equal(disk_read(d, buf, TD_CS, 3 * TD_CS), 0);
	assert_int_equal(td_race_r, 0);
	assert_memory_equal(buf, model + 3 * TD_CS, TD_CS);
	assert_memory_not_equal(buf, base + 3 * TD_CS, TD_CS);
	td_overlay_bytes(d->top, 3 * TD_CS, host, TD_CS);
	assert_memory_equal(host, model + 3 * TD_CS, TD_CS);
	assert_int_equal(atomic_load(&d->stats.cor_bytes), 0);
	td_assert_map(d->top, "UUUDUUUUUUU");
	/* COR of 6..8; the guest writes cluster 7 in between: 6 and 8 are
	 * copied, 7 keeps the guest's bytes, the read returns them. */
	td_race_setup(d, model, 6 * TD_CS, 7 * TD_CS + 4000, 50);
	assert_int_equal(disk_read(d, buf, 3 * TD_CS, 6 * TD_CS), 0);
	assert_int_equal(td_race_r, 0);
	assert_memory_equal(buf, model + 6 * TD_CS, 3 * TD_CS);
	td_assert_map(d->top, "UUUDUUDDDUU");
	assert_int_equal(atomic_load(&d->stats.cor_bytes), 2 * TD_CS);
	td_overlay_bytes(d->top, 7 * TD_CS, host, TD_CS);
	assert_memory_equal(host, model + 7 * TD_CS, TD_CS);
	td_assert_disk(d, model);
	assert_int_equal(disk_close(d), 0);
	td_assert_reopen(TD_OVL, model, TD_SIZE, TD_BASE_URI);
	free(model);
	free(base);
}

static void test_disk_populate_race_guest_write_wins(void **state)
{
	uint8_t *base, *model, *buf = td_xmalloc(4 * TD_CS);
	uint64_t copied = 0;
	struct disk *d = td_setup_2(td_fmt(state), false, &base);

	model = td_xmalloc(TD_SIZE);
	memcpy(model, base, TD_SIZE);
	/* The chunk [4, 8) was read from the backing; the guest writes 5. */
	td_race_setup(d, model, 4 * TD_CS, 5 * TD_CS + 1, 3000);
	assert_int_equal(disk_populate(d, NULL, 0, TD_SIZE, buf, 4 * TD_CS, &copied), 0);
	assert_int_equal(td_race_r, 0);
	assert_int_equal(copied, TD_SIZE - TD_CS);
	td_assert_map(d->top, "DDDDDDDDDDD");
	td_assert_disk(d, model);
	assert_int_equal(disk_rebase(d, NULL), 0);
	assert_int_equal(disk_close(d), 0);
	td_assert_reopen(TD_OVL, model, TD_SIZE, NULL);
	free(buf);
	free(model);
	free(base);
}

/* base (raw) <- mid (qcow2: zero clusters 2..5) <- ovl. */
static uint8_t *td_make_zero_mid(const char *fmt, uint8_t **basep)
{
	uint8_t *base = td_put_base(TD_SIZE, 3), *model = td_xmalloc(TD_SIZE);
	struct disk *m;

	memcpy(model, base, TD_SIZE);
	td_create(TD_MID_URI, "qcow2", TD_SIZE, TD_BASE_URI, "raw");
	m = td_open(TD_MID_URI, false, false);
	assert_int_equal(m->top->drv->zero_clusters(m->top, 2 * TD_CS, 4 * TD_CS), 0);
	memset(model + 2 * TD_CS, 0, 4 * TD_CS);
	td_assert_map(m->top, "UUZZZZUUUUU");
	assert_int_equal(disk_close(m), 0);
	td_create(TD_OVL, fmt, TD_SIZE, TD_MID_URI, "qcow2");
	*basep = base;
	return model;
}

/* Populate with a base over a run that is zero above base (mid's zero
 * clusters 2..5 hide base's data). A guest write lands in the run between
 * image_block_status() and the range lock of disk_populate_zero(). The
 * guest's cluster must keep its data and every OTHER cluster of the run
 * must still become a zero cluster; otherwise, after the rebase onto base,
 * the guest reads base's stale bytes where it must read zeros.
 *
 * Regression (found by this test): disk_populate_zero mapped only the first
 * extent of [pos, pos+n) under the lock, so a guest write landing inside the
 * run left the rest of it unallocated, showing base's data after
 * disk_rebase(). It now re-maps the whole run under the lock. */
/* What td_populate_zero_race holds, released by td_teardown when an
 * assertion fails midway (so ASan reports the bug, not a leak). */
static struct {
	struct disk *d;
	uint8_t *base, *model, *buf;
} td_zr;

static void td_zr_release(void)
{
	if (td_zr.d)
		disk_close(td_zr.d);
	free(td_zr.base);
	free(td_zr.model);
	free(td_zr.buf);
	memset(&td_zr, 0, sizeof(td_zr));
}

static void td_populate_zero_race(void **state, uint64_t woff, const char *want_map)
{
	uint64_t copied = 0;
	struct image *lb;

	td_zr.buf = td_xmalloc(8 * TD_CS);
	td_zr.model = td_make_zero_mid(td_fmt(state), &td_zr.base);
	td_zr.d = td_open(TD_OVL, false, false);
	lb = disk_find_layer(td_zr.d, TD_BASE_URI);
	assert_non_null(lb);
	td_race_setup(td_zr.d, td_zr.model, 2 * TD_CS, woff, 10);
	assert_int_equal(disk_populate(td_zr.d, lb, 0, TD_SIZE, td_zr.buf, 8 * TD_CS, &copied), 0);
	assert_int_equal(td_race_r, 0);
	assert_int_equal(copied, 0);
	td_assert_disk(td_zr.d, td_zr.model);
	td_assert_map(td_zr.d->top, want_map); /* fails here: the run's other clusters are 'U' */
	assert_int_equal(disk_rebase(td_zr.d, lb), 0);
	/* The guest's view must not change across the rebase. */
	td_assert_disk(td_zr.d, td_zr.model);
	assert_int_equal(disk_close(td_zr.d), 0);
	td_zr.d = NULL;
	td_assert_reopen(TD_OVL, td_zr.model, TD_SIZE, TD_BASE_URI);
	td_zr_release();
}

static void test_disk_populate_zero_race_first_cluster(void **state)
{
	td_populate_zero_race(state, 2 * TD_CS + 5, "UUDZZZUUUUU");
}

static void test_disk_populate_zero_race_middle_cluster(void **state)
{
	td_populate_zero_race(state, 4 * TD_CS + 5, "UUZZDZUUUUU");
}

/* ---- fault injection ---- */

static void test_disk_fault_overlay_write_eio(void **state)
{
	uint8_t *base, *model, buf[200];
	struct disk *d = td_setup_2(td_fmt(state), false, &base);
	int r;

	model = td_xmalloc(TD_SIZE);
	memcpy(model, base, TD_SIZE);
	assert_int_equal(fetch_mem_fail("ovl", FETCH_MEM_WRITE, 0, EIO), 0);
	td_pattern(buf, sizeof(buf), 60);
	assert_int_equal(disk_write(d, buf, 100, 2 * TD_CS + 50), -EIO);
	assert_int_equal(disk_write(d, buf, sizeof(buf), 4 * TD_CS - 100), -EIO);
	assert_int_equal(atomic_load(&d->stats.guest_written), 0);
	/* Nothing mapped that was not written: reads give the backing. */
	td_assert_map(d->top, "UUUUUUUUUUU");
	td_assert_disk(d, base);

	/* Copy-on-read that cannot write must not return or map wrong data. */
	d->copy_on_read = true;
	r = disk_read(d, buf, 100, 6 * TD_CS + 7);
	assert_true(r == 0 || r == -EIO);
	if (r == 0)
		assert_memory_equal(buf, base + 6 * TD_CS + 7, 100);
	td_assert_map(d->top, "UUUUUUUUUUU");
	d->copy_on_read = false;

	td_unfail("ovl");
	td_write(d, model, 2 * TD_CS + 50, 100, 61);
	td_assert_map(d->top, "UUDUUUUUUUU");
	td_assert_disk(d, model);
	assert_int_equal(disk_close(d), 0);
	td_assert_reopen(TD_OVL, model, TD_SIZE, TD_BASE_URI);
	free(model);
	free(base);
}

/* The overlay's writes fail after 'after' successful ones, for every
 * 'after' until a run gets through. A failed guest write leaves every
 * cluster that was unallocated before it exactly as it was (nothing mapped
 * that was not written); in clusters that were already allocated its bytes
 * are old or new (POSIX leaves them undefined after EIO, but never garbage).
 * After the fault clears, everything flushes and reopens right. */
static void test_disk_fault_overlay_write_sweep(void **state)
{
	static const struct {
		uint64_t off;
		size_t len;
	} ops[] = {
	    {TD_CS + 10, 100},		 /* partial cluster */
	    {3 * TD_CS - 5, TD_CS + 10}, /* across 2..3 */
	    {0, 0},			 /* flush */
	    {TD_CS + 50, 3 * TD_CS},	 /* allocated 1..3 then unallocated 4 */
	    {6 * TD_CS, 3 * TD_CS},	 /* three whole unallocated clusters */
	    {TD_SIZE - 30, 30},		 /* image end */
	    {0, 0},			 /* flush */
	};
	bool clean = false;

	for (uint64_t after = 0; after < 60 && !clean; after++) {
		uint8_t *base, *model, *buf = td_xmalloc(4 * TD_CS), *now = td_xmalloc(TD_SIZE);
		struct disk *d;
		int fails = 0;

		fetch_mem_reset();
		d = td_setup_2(td_fmt(state), false, &base);
		model = td_xmalloc(TD_SIZE);
		memcpy(model, base, TD_SIZE);
		assert_int_equal(fetch_mem_fail("ovl", FETCH_MEM_WRITE, after, EIO), 0);
		for (size_t i = 0; i < sizeof(ops) / sizeof(ops[0]); i++) {
			bool was_data[TD_NCLUST];
			int r;

			if (ops[i].len == 0) {
				if (disk_flush(d) < 0) {
					fails++;
					assert_true(atomic_load(&d->dirty));
				}
				continue;
			}
			for (uint64_t c = 0; c < TD_NCLUST; c++)
				was_data[c] = td_type(d->top, c * TD_CS) == EXT_DATA;
			td_pattern(buf, ops[i].len, (uint32_t)(after * 10 + i));
			r = disk_write(d, buf, ops[i].len, ops[i].off);
			assert_int_equal(image_pread(d->top, now, TD_SIZE, 0), 0);
			if (r == 0) {
				memcpy(model + ops[i].off, buf, ops[i].len);
			} else {
				assert_int_equal(r, -EIO);
				fails++;
				for (size_t k = 0; k < ops[i].len; k++) {
					uint64_t o = ops[i].off + k;
					if (was_data[o / TD_CS] && now[o] == buf[k])
						model[o] = buf[k];
				}
			}
			for (size_t k = 0; k < TD_SIZE; k++)
				if (now[k] != model[k])
					fail_msg(
					    "after=%llu op %zu r=%d: byte %zu differs (cluster "
					    "%zu was %s)",
					    (unsigned long long)after, i, r, k, k / TD_CS,
					    was_data[k / TD_CS] ? "data" : "unallocated");
		}
		td_unfail("ovl");
		clean = fails == 0;
		assert_int_equal(disk_flush(d), 0);
		td_assert_disk(d, model);
		assert_int_equal(disk_close(d), 0);
		td_assert_reopen(TD_OVL, model, TD_SIZE, TD_BASE_URI);
		free(now);
		free(model);
		free(buf);
		free(base);
	}
	assert_true(clean);
}

static void test_disk_fault_backing_read_eio(void **state)
{
	uint8_t *base, *model, buf[TD_CS], *pbuf = td_xmalloc(2 * TD_CS);
	uint64_t copied = 0;
	struct disk *d = td_setup_2(td_fmt(state), true, &base);

	model = td_xmalloc(TD_SIZE);
	memcpy(model, base, TD_SIZE);
	assert_int_equal(fetch_mem_fail("base", FETCH_MEM_READ, 0, EIO), 0);
	/* Copy-on-read: an error, and no cluster of garbage in the overlay. */
	assert_int_equal(disk_read(d, buf, 10, 3 * TD_CS + 1), -EIO);
	d->copy_on_read = false;
	assert_int_equal(disk_read(d, buf, 10, 3 * TD_CS + 1), -EIO);
	d->copy_on_read = true;
	/* A partial-cluster write needs the old bytes: it fails cleanly. */
	td_pattern(buf, 100, 70);
	assert_int_equal(disk_write(d, buf, 100, 5 * TD_CS + 20), -EIO);
	/* A whole-cluster write needs nothing from the backing. */
	td_write(d, model, 6 * TD_CS, TD_CS, 71);
	assert_int_equal(disk_populate(d, NULL, 0, TD_SIZE, pbuf, 2 * TD_CS, &copied), -EIO);
	td_assert_map(d->top, "UUUUUUDUUUU");
	assert_int_equal(atomic_load(&d->stats.cor_bytes), 0);
	/* Allocated data is still readable while the backing fails. */
	assert_int_equal(disk_read(d, buf, TD_CS, 6 * TD_CS), 0);
	assert_memory_equal(buf, model + 6 * TD_CS, TD_CS);
	td_unfail("base");
	td_assert_disk(d, model);
	assert_int_equal(disk_close(d), 0);
	td_assert_reopen(TD_OVL, model, TD_SIZE, TD_BASE_URI);
	free(pbuf);
	free(model);
	free(base);
}

/* The backing fails after N reads, for growing N: a whole-disk
 * copy-on-read either returns the right bytes or an error, and whatever
 * it copied into the overlay is the backing's data. */
static void test_disk_fault_backing_read_sweep(void **state)
{
	bool clean = false;

	for (uint64_t after = 0; after < 40 && !clean; after++) {
		uint8_t *base, *got = td_xmalloc(TD_SIZE), host[TD_CS];
		struct disk *d;
		int r;

		fetch_mem_reset();
		d = td_setup_2(td_fmt(state), true, &base);
		assert_int_equal(fetch_mem_fail("base", FETCH_MEM_READ, after, EIO), 0);
		r = disk_read(d, got, 5 * TD_CS, 2 * TD_CS - 100);
		if (r == 0)
			assert_memory_equal(got, base + 2 * TD_CS - 100, 5 * TD_CS);
		else
			assert_int_equal(r, -EIO);
		r = disk_read(d, got, TD_SIZE, 0);
		if (r == 0) {
			assert_memory_equal(got, base, TD_SIZE);
			clean = true;
		} else {
			assert_int_equal(r, -EIO);
		}
		for (uint64_t c = 0; c < TD_NCLUST; c++) {
			uint64_t off = c * TD_CS;
			size_t n = (size_t)SFS_MIN((uint64_t)TD_CS, TD_SIZE - off);

			if (td_type(d->top, off) != EXT_DATA)
				continue;
			td_overlay_bytes(d->top, off, host, n);
			assert_memory_equal(host, base + off, n);
		}
		td_unfail("base");
		td_assert_disk(d, base);
		assert_int_equal(disk_close(d), 0);
		free(got);
		free(base);
	}
	assert_true(clean);
}

static void test_disk_flush_failure_keeps_dirty(void **state)
{
	uint8_t *base, *model;
	struct disk *d = td_setup_2(td_fmt(state), false, &base);

	model = td_xmalloc(TD_SIZE);
	memcpy(model, base, TD_SIZE);
	assert_false(atomic_load(&d->dirty));
	td_write(d, model, 4 * TD_CS + 3, 333, 80);
	assert_true(atomic_load(&d->dirty));
	assert_int_equal(fetch_mem_fail("ovl", FETCH_MEM_FLUSH, 0, EIO), 0);
	assert_true(disk_flush(d) < 0);
	assert_true(atomic_load(&d->dirty));
	td_assert_disk(d, model);
	td_unfail("ovl");
	assert_int_equal(disk_flush(d), 0);
	assert_false(atomic_load(&d->dirty));
	assert_int_equal(disk_close(d), 0);
	td_assert_reopen(TD_OVL, model, TD_SIZE, TD_BASE_URI);
	free(model);
	free(base);
}

#define TD_BOTH(f)                                                                                 \
	{#f "(qcow2)", f, td_setup, td_teardown, (void *)"qcow2"},                                 \
	{                                                                                          \
#f "(qed)", f, td_setup, td_teardown, (void *)"qed"                                \
	}

/* ---- read-ahead and coalescing ---- */

#define TD_RA_SIZE (16u << 20)
#define TD_RA_MIN  (128u << 10) /* block/disk.c's DISK_RA_MIN */

/* A random raw base of size bytes and an overlay of format fmt over it. */
static struct disk *td_setup_ra(const char *fmt, bool cor, uint64_t size, uint8_t **base)
{
	*base = td_put_base(size, 3);
	td_create(TD_OVL, fmt, size, TD_BASE_URI, "raw");
	return td_open(TD_OVL, cor, false);
}

/* Requests the backing layer's byte source has served. */
static uint64_t td_backing_reads(struct disk *d)
{
	return atomic_load(&d->top->backing->file->stats.reads);
}

/* Read [off, off+len) in n-byte pieces; each must equal expect. */
static void td_read_seq(struct disk *d, const uint8_t *expect, uint64_t off, uint64_t len, size_t n)
{
	uint8_t *buf = td_xmalloc(n);

	for (uint64_t pos = off; pos < off + len; pos += n) {
		size_t k = (size_t)SFS_MIN((uint64_t)n, off + len - pos);

		assert_int_equal(disk_read(d, buf, k, pos), 0);
		assert_memory_equal(buf, expect + pos, k);
	}
	free(buf);
}

/* Every byte now comes from the overlay: the backing may fail. */
static void td_assert_all_copied(struct disk *d, const uint8_t *expect)
{
	assert_int_equal(fetch_mem_fail("base", FETCH_MEM_READ, 0, EIO), 0);
	td_assert_disk(d, expect);
	td_unfail("base");
}

static void test_disk_ra_sequential_reads_ramp_up(void **state)
{
	uint8_t *base;
	struct disk *d = td_setup_ra(td_fmt(state), true, TD_RA_SIZE, &base);
	uint64_t reads, n = TD_RA_SIZE / 4096;

	td_read_seq(d, base, 0, TD_RA_SIZE, 4096);
	reads = td_backing_reads(d);
	/* Cluster 0; cluster 1 and 128 KiB; windows of 256 KiB..4 MiB; two
	 * more of 4 MiB: 10, where one per read would be 4096. */
	assert_in_range(reads, 2, 12);
	assert_int_equal(atomic_load(&d->stats.cor_bytes) + atomic_load(&d->stats.readahead_bytes),
			 TD_RA_SIZE);
	assert_true(atomic_load(&d->stats.readahead_bytes) > TD_RA_SIZE - 16 * TD_CS);
	/* Each read either fetched (one 4 KiB cluster) or hit read-ahead. */
	assert_int_equal(atomic_load(&d->stats.readahead_hits), n - reads);
	td_assert_all_copied(d, base);
	assert_int_equal(disk_close(d), 0);
	td_assert_reopen(TD_OVL, base, TD_RA_SIZE, TD_BASE_URI);
	free(base);
}

static void test_disk_ra_random_reads_do_not_read_ahead(void **state)
{
	uint8_t *base, buf[4096];
	struct disk *d = td_setup_ra(td_fmt(state), true, TD_RA_SIZE, &base);
	uint64_t nclust = TD_RA_SIZE / TD_CS;

	/* Stride 1237 clusters: never the next cluster, never just behind. */
	for (uint64_t i = 1; i <= 300; i++) {
		uint64_t off = (i * 1237 % nclust) * TD_CS;

		assert_int_equal(disk_read(d, buf, sizeof(buf), off), 0);
		assert_memory_equal(buf, base + off, sizeof(buf));
	}
	assert_int_equal(td_backing_reads(d), 300);
	assert_int_equal(atomic_load(&d->top->backing->file->stats.bytes_read), 300 * TD_CS);
	assert_int_equal(atomic_load(&d->stats.readahead_bytes), 0);
	assert_int_equal(atomic_load(&d->stats.readahead_hits), 0);
	assert_int_equal(atomic_load(&d->stats.cor_bytes), 300 * TD_CS);
	assert_int_equal(disk_close(d), 0);
	free(base);
}

/* A far link (80 ms, 62.5 MB/s): a miss that starts no stream reads a
 * first window of 256 KiB past itself, so nearby reads that are not
 * contiguous (a booting guest's files) find their data there. */
static void test_disk_ra_first_window_nearby_reads(void **state)
{
	uint8_t *base, buf[8192];
	struct disk *d = td_setup_ra(td_fmt(state), true, TD_RA_SIZE, &base);
	uint64_t n = 0;

	assert_int_equal(disk_ra_first_window(d), 0); /* memory backing: no link */
	disk_ra_set_link(d, 0.080, 62.5e6);
	assert_int_equal(disk_ra_first_window(d), 256u << 10);
	/* 8 KiB every 96 KiB: never the offset a stream expects next. */
	for (uint64_t off = 0; off + sizeof(buf) <= 4u << 20; off += 96u << 10, n++) {
		assert_int_equal(disk_read(d, buf, sizeof(buf), off), 0);
		assert_memory_equal(buf, base + off, sizeof(buf));
	}
	/* One miss in three reads: the two after it were read ahead. */
	assert_in_range(td_backing_reads(d), n / 3, n / 3 + 2);
	assert_int_equal(disk_ra_first_window(d), 256u << 10);
	td_assert_disk(d, base);
	assert_int_equal(disk_close(d), 0);
	td_assert_reopen(TD_OVL, base, TD_RA_SIZE, TD_BASE_URI);
	free(base);
}

/* The same link, random reads: first windows stop paying and stop, but
 * for a probe now and then. */
static void test_disk_ra_first_window_stops_for_random_reads(void **state)
{
	uint64_t size = 64u << 20, nclust = size / TD_CS, bytes;
	uint8_t *base, buf[4096];
	struct disk *d = td_setup_ra(td_fmt(state), true, size, &base);

	disk_ra_set_link(d, 0.080, 62.5e6);
	for (uint64_t i = 1; i <= 300; i++) {
		uint64_t off = (i * 4937 % nclust) * TD_CS;

		assert_int_equal(disk_read(d, buf, sizeof(buf), off), 0);
		assert_memory_equal(buf, base + off, sizeof(buf));
	}
	assert_int_equal(disk_ra_first_window(d), 0);
	/* 8 to learn, then one in 16: at most about 27 windows of 256 KiB. */
	bytes = atomic_load(&d->top->backing->file->stats.bytes_read);
	assert_true(bytes <= 300 * TD_CS + 30 * (256u << 10));
	assert_true(bytes >= 300 * TD_CS + 8 * (128u << 10));
	assert_int_equal(disk_close(d), 0);
	free(base);
}

static void test_disk_ra_off_without_copy_on_read(void **state)
{
	uint8_t *base;
	struct disk *d = td_setup_ra(td_fmt(state), false, 1u << 20, &base);

	td_read_seq(d, base, 0, 1u << 20, 4096);
	assert_int_equal(td_backing_reads(d), (1u << 20) / 4096);
	assert_int_equal(atomic_load(&d->stats.readahead_bytes), 0);
	assert_int_equal(atomic_load(&d->stats.readahead_hits), 0);
	assert_int_equal(atomic_load(&d->stats.cor_bytes), 0);
	assert_int_equal(disk_close(d), 0);
	free(base);
}

static void test_disk_ra_two_interleaved_streams(void **state)
{
	uint8_t *base, buf[4096];
	struct disk *d = td_setup_ra(td_fmt(state), true, TD_RA_SIZE, &base);
	uint64_t half = TD_RA_SIZE / 2;

	for (uint64_t pos = 0; pos < half; pos += sizeof(buf)) {
		assert_int_equal(disk_read(d, buf, sizeof(buf), pos), 0);
		assert_memory_equal(buf, base + pos, sizeof(buf));
		assert_int_equal(disk_read(d, buf, sizeof(buf), half + pos), 0);
		assert_memory_equal(buf, base + half + pos, sizeof(buf));
	}
	/* Each stream ramps up on its own: 2 + 6 windows to cover 8 MiB;
	 * one per read would be 4096. */
	assert_in_range(td_backing_reads(d), 4, 2 * 10);
	assert_int_equal(atomic_load(&d->stats.cor_bytes) + atomic_load(&d->stats.readahead_bytes),
			 TD_RA_SIZE);
	td_assert_all_copied(d, base);
	assert_int_equal(disk_close(d), 0);
	free(base);
}

static void test_disk_ra_clamped_at_image_end(void **state)
{
	uint8_t *base;
	/* TD_SIZE ends in a partial cluster, far short of one window. */
	struct disk *d = td_setup_ra(td_fmt(state), true, TD_SIZE, &base);

	td_read_seq(d, base, 0, TD_SIZE, 1000);
	/* Cluster 0, then cluster 1 and everything to the end. */
	assert_int_equal(td_backing_reads(d), 2);
	assert_int_equal(atomic_load(&d->stats.readahead_bytes), TD_SIZE - 2 * TD_CS);
	td_assert_map(d->top, "DDDDDDDDDDD");
	td_assert_all_copied(d, base);
	assert_int_equal(disk_close(d), 0);
	td_assert_reopen(TD_OVL, base, TD_SIZE, TD_BASE_URI);
	free(base);
}

static void test_disk_ra_skips_holes(void **state)
{
	uint8_t *model = td_make_holey_mid();
	struct disk *d;

	td_create(TD_OVL, td_fmt(state), TD_SIZE, TD_MID_URI, "qcow2");
	d = td_open(TD_OVL, true, false);
	td_read_seq(d, model, 0, TD_SIZE, 4096);
	/* Only mid's data clusters, 2 and 5, were read ahead. */
	assert_int_equal(atomic_load(&d->stats.readahead_bytes), 2 * TD_CS);
	assert_int_equal(atomic_load(&d->stats.readahead_hits), 2);
	td_assert_disk(d, model);
	assert_int_equal(disk_close(d), 0);
	free(model);
}

/* A guest write lands in the read-ahead window between the backing read
 * and the commit: the overlay keeps the guest's bytes. */
static void test_disk_ra_race_guest_write_wins(void **state)
{
	uint8_t *base, *model, buf[TD_CS], host[TD_CS];
	struct disk *d = td_setup_ra(td_fmt(state), true, 1u << 20, &base);

	model = td_xmalloc(1u << 20);
	memcpy(model, base, 1u << 20);
	assert_int_equal(disk_read(d, buf, TD_CS, 0), 0);
	/* The read of cluster 1 reads ahead [2, 34) and locks from 1. */
	td_race_setup(d, model, TD_CS, 10 * TD_CS + 10, 100);
	assert_int_equal(disk_read(d, buf, TD_CS, TD_CS), 0);
	assert_int_equal(td_race_r, 0);
	assert_memory_equal(buf, base + TD_CS, TD_CS);
	assert_int_equal(atomic_load(&d->stats.readahead_bytes), TD_RA_MIN - TD_CS);
	td_overlay_bytes(d->top, 10 * TD_CS, host, TD_CS);
	assert_memory_equal(host, model + 10 * TD_CS, TD_CS);
	assert_memory_not_equal(host, base + 10 * TD_CS, TD_CS);
	/* Read-ahead data and the guest's write, all from the overlay. */
	assert_int_equal(fetch_mem_fail("base", FETCH_MEM_READ, 0, EIO), 0);
	td_read_seq(d, model, 0, 2 * TD_CS + TD_RA_MIN, 4096);
	td_unfail("base");
	td_assert_disk(d, model);
	assert_int_equal(disk_close(d), 0);
	td_assert_reopen(TD_OVL, model, 1u << 20, TD_BASE_URI);
	free(model);
	free(base);
}

/* Misses of one read split by allocated gaps under 64 KiB: one backing
 * read; the gaps keep the overlay's data. A gap of 64 KiB splits it. */
static void test_disk_coalesce_misses(void **state)
{
	uint8_t *base, *model, *buf = td_xmalloc(64 * TD_CS);
	struct disk *d = td_setup_ra(td_fmt(state), true, 1u << 20, &base);
	uint64_t r0;

	model = td_xmalloc(1u << 20);
	memcpy(model, base, 1u << 20);
	td_write(d, model, 2 * TD_CS + 7, 100, 60);
	td_write(d, model, 5 * TD_CS, 2 * TD_CS, 61);
	r0 = td_backing_reads(d);
	assert_int_equal(disk_read(d, buf, 9 * TD_CS - 20, 10), 0);
	assert_memory_equal(buf, model + 10, 9 * TD_CS - 20);
	assert_int_equal(td_backing_reads(d) - r0, 1);
	assert_int_equal(atomic_load(&d->stats.cor_bytes), 6 * TD_CS);
	/* A 16-cluster (64 KiB) gap: two backing reads. */
	td_write(d, model, 20 * TD_CS, 16 * TD_CS, 62);
	r0 = td_backing_reads(d);
	assert_int_equal(disk_read(d, buf, 18 * TD_CS, 19 * TD_CS), 0);
	assert_memory_equal(buf, model + 19 * TD_CS, 18 * TD_CS);
	assert_int_equal(td_backing_reads(d) - r0, 2);
	td_assert_disk(d, model);
	assert_int_equal(disk_close(d), 0);
	td_assert_reopen(TD_OVL, model, 1u << 20, TD_BASE_URI);
	free(buf);
	free(model);
	free(base);
}

/* Sequential readers (each read ahead over the whole small disk) beside
 * writers and the stream job: gap bytes read as the backing, every owner's
 * bytes as its last write. */
static void *tc_seq_reader(void *opaque)
{
	struct tc_arg *a = opaque;
	struct tc_ctx *c = a->c;
	uint8_t buf[700];

	for (uint64_t s = (uint64_t)a->id * 100; s < TD_SIZE; s += sizeof(buf)) {
		size_t n = (size_t)SFS_MIN((uint64_t)sizeof(buf), TD_SIZE - s);

		if (disk_read(c->d, buf, n, s) != 0) {
			atomic_fetch_add(&c->failures, 1);
			break;
		}
		for (size_t i = 0; i < n; i++) {
			if (tc_in_gap(s + i) && buf[i] != c->base[s + i]) {
				atomic_fetch_add(&c->failures, 1);
				return NULL;
			}
		}
	}
	return NULL;
}

static void test_disk_ra_concurrent_seq_read_write_populate(void **state)
{
	for (int round = 0; round < 64; round++) {
		struct tc_ctx c = {0};
		struct tc_arg args[TC_WRITERS + 3];
		pthread_t th[TC_WRITERS + 3];
		uint8_t *base;
		int n = 0;

		fetch_mem_reset();
		c.d = td_setup_2(td_fmt(state), true, &base);
		c.base = base;
		c.model = td_xmalloc(TD_SIZE);
		memcpy(c.model, base, TD_SIZE);
		atomic_store(&c.writers_left, TC_WRITERS);
		for (int i = 0; i < TC_WRITERS + 3; i++)
			args[i] = (struct tc_arg){.c = &c, .id = i};
		for (int i = 0; i < TC_WRITERS; i++, n++)
			assert_int_equal(pthread_create(&th[n], NULL, tc_writer, &args[n]), 0);
		assert_int_equal(pthread_create(&th[n], NULL, tc_seq_reader, &args[n]), 0);
		n++;
		assert_int_equal(pthread_create(&th[n], NULL, tc_seq_reader, &args[n]), 0);
		n++;
		if (round % 2) {
			assert_int_equal(pthread_create(&th[n], NULL, tc_populater, &args[n]), 0);
			n++;
		}
		for (int i = 0; i < n; i++)
			pthread_join(th[i], NULL);
		assert_int_equal(atomic_load(&c.failures), 0);
		td_assert_disk(c.d, c.model);
		assert_int_equal(disk_close(c.d), 0);
		td_assert_reopen(TD_OVL, c.model, TD_SIZE, TD_BASE_URI);
		free(c.model);
		free(base);
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    TD_BOTH(test_disk_read_equals_backing),
	    TD_BOTH(test_disk_cor_allocates_read_clusters),
	    TD_BOTH(test_disk_cor_at_image_end),
	    TD_BOTH(test_disk_cor_off_does_not_allocate),
	    TD_BOTH(test_disk_write_within_cluster),
	    TD_BOTH(test_disk_write_across_clusters),
	    TD_BOTH(test_disk_write_at_image_end),
	    TD_BOTH(test_disk_write_past_size_enospc),
	    TD_BOTH(test_disk_zero_ranges),
	    TD_BOTH(test_disk_read_only_erofs),
	    TD_BOTH(test_image_raw_top_rdwr_refused),
	    TD_BOTH(test_image_empty_file_refused),
	    TD_BOTH(test_disk_populate_copies_everything),
	    TD_BOTH(test_disk_populate_partial_ranges_and_guest_data),
	    TD_BOTH(test_disk_populate_rejects_bad_args),
	    TD_BOTH(test_disk_populate_len_overflow),
	    TD_BOTH(test_disk_populate_skips_holes),
	    TD_BOTH(test_disk_populate_respects_base_then_rebase),
	    TD_BOTH(test_disk_populate_whole_chain_then_rebase_null),
	    TD_BOTH(test_disk_rebase_failure_keeps_chain),
	    TD_BOTH(test_disk_find_layer_by_name),
	    TD_BOTH(test_disk_concurrent_read_write_populate),
	    TD_BOTH(test_disk_locks_cluster_aligned_ranges),
	    TD_BOTH(test_disk_cor_race_guest_write_wins),
	    TD_BOTH(test_disk_populate_race_guest_write_wins),
	    TD_BOTH(test_disk_populate_zero_race_first_cluster),
	    TD_BOTH(test_disk_populate_zero_race_middle_cluster),
	    TD_BOTH(test_disk_fault_overlay_write_eio),
	    TD_BOTH(test_disk_fault_overlay_write_sweep),
	    TD_BOTH(test_disk_fault_backing_read_eio),
	    TD_BOTH(test_disk_fault_backing_read_sweep),
	    TD_BOTH(test_disk_flush_failure_keeps_dirty),
	    TD_BOTH(test_disk_ra_sequential_reads_ramp_up),
	    TD_BOTH(test_disk_ra_random_reads_do_not_read_ahead),
	    TD_BOTH(test_disk_ra_first_window_nearby_reads),
	    TD_BOTH(test_disk_ra_first_window_stops_for_random_reads),
	    TD_BOTH(test_disk_ra_off_without_copy_on_read),
	    TD_BOTH(test_disk_ra_two_interleaved_streams),
	    TD_BOTH(test_disk_ra_clamped_at_image_end),
	    TD_BOTH(test_disk_ra_skips_holes),
	    TD_BOTH(test_disk_ra_race_guest_write_wins),
	    TD_BOTH(test_disk_coalesce_misses),
	    TD_BOTH(test_disk_ra_concurrent_seq_read_write_populate),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
