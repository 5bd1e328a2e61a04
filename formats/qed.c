/* streamfs: QED format driver (QEMU Enhanced Disk), read and write.
 *
 * Format reference: QEMU docs/interop/qed_spec.txt. All on-disk numbers are
 * little-endian. Layout of the images we create (QEMU 7.2 does the same):
 *
 *   +-----------+--------------------+---------------------------------+
 *   | header    | L1 table           | L2 tables and data clusters,    |
 *   | cluster 0 | table_size clusters| appended in allocation order    |
 *   +-----------+--------------------+---------------------------------+
 *   The header struct (64 bytes) is followed by the backing file name.
 *
 *   guest offset -> | L1 index | L2 index | offset in cluster |
 *                     table_bits table_bits  cluster_bits
 *   L1 entry: file offset of an L2 table (0 = no table)
 *   L2 entry: file offset of a data cluster, 0 = unallocated (look at the
 *             backing file), 1 = zero cluster (reads as zeros)
 *
 * NOTES ON THE DESIGN
 * - create() makes only images QEMU opens: table size 4 (QEMU's default),
 *   8 or 16 when the guest needs them, 2 for 4 MiB clusters; clusters over
 *   4 MiB are refused (see qed_qemu_geometry_ok()). Open accepts every
 *   header the spec allows.
 * - Tables are table_size clusters (up to 1 GiB for legal but absurd
 *   headers), so the unit of caching is a "slice" of an L2 table of at most
 *   QED_SLICE_MAX bytes, kept in the on-disk (little-endian) layout, keyed by
 *   its file offset, in one LRU cache bounded by QED_CACHE_BYTES. Only the
 *   part of the L1 table that covers the guest size is held in memory.
 * - Writes are append-only: new L2 tables and data clusters are taken at
 *   the end of the file (p->alloc_end), never reused, so a lock-free reader
 *   may pread a mapped host range at any time.
 * - An L2 table allocated since the last flush is "fresh": its slices read
 *   as zeros without I/O (the file may not cover it yet). Its last slice is
 *   made dirty at once so the next flush extends the file over the whole
 *   table before the L1 entry naming it is written.
 * - Entries read from the file are validated when a slice is loaded; bad
 *   ones (unaligned, inside the header, past EOF) are replaced in memory by
 *   QED_L2_BAD and make reads of that cluster fail with -EIO. Bad L1 entries
 *   found at open become QED_L1_BAD likewise.
 * - The need-check feature bit is set (durably) before the first
 *   allocating write after open and cleared by close() once everything is
 *   flushed. An image opened with the bit set is checked first (as QEMU's
 *   qed-check.c does): invalid entries are dropped when writable and refused
 *   otherwise, double references are refused, leaks are only reported.
 *
 * NOTES ON THE THREAD MODEL
 * - p->lock protects the L1 copy, the slice cache, the fresh-table list and
 *   p->alloc_end. It is never held across data I/O; slice loads drop it and
 *   recheck (p->cache_seq tells them a flush may have made their copy stale).
 * - alloc_write() reserves new tables and ONE contiguous data range at the
 *   end of the file under the lock, writes the data unlocked with one
 *   pwrite, then takes the lock again to publish the L2 entries. A flush
 *   snapshots the tables under the lock, so it only ever sees an entry whose
 *   data pwrite has completed.
 * - p->flush_lock serializes flushes; p->hdr_lock serializes header
 *   rewrites (need-check bit, set_backing). Lock order: flush_lock before
 *   lock; hdr_lock is never held together with another lock.
 *
 * CRASH ORDER (see include/image.h): flush() = snapshot dirty slices and the
 * dirty L1 range, fdatasync (data), write L2 slices, fdatasync, write L1
 * entries, fdatasync. So a table entry never reaches the disk before what it
 * points to, and a crash leaves at worst leaked clusters.
 */
#include <assert.h>
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "bitset.h"
#include "image.h"
#include "lru.h"
#include "util.h"

#define QED_MAGIC	 0x00444551U /* "QED\0" read as a little-endian uint32 */
#define QED_HEADER_BYTES 64	     /* in bytes: the header struct */

/* features bits */
#define QED_F_BACKING_FILE	      0x01ULL /* the image has a backing file */
#define QED_F_NEED_CHECK	      0x02ULL /* consistency check needed before use */
#define QED_F_BACKING_FORMAT_NO_PROBE 0x04ULL /* backing file is raw, do not probe */
#define QED_FEATURE_MASK	      0x07ULL /* features we support */
#define QED_COMPAT_FEATURE_MASK	      0x00ULL
#define QED_AUTOCLEAR_FEATURE_MASK    0x00ULL

#define QED_MIN_CLUSTER_SIZE	 (4u * 1024)	     /* in bytes */
#define QED_MAX_CLUSTER_SIZE	 (64u * 1024 * 1024) /* in bytes */
#define QED_DEFAULT_CLUSTER_SIZE (64u * 1024)	     /* in bytes */
#define QED_MIN_TABLE_SIZE	 1		     /* in clusters */
#define QED_MAX_TABLE_SIZE	 16		     /* in clusters */
#define QED_DEFAULT_TABLE_SIZE	 4		     /* in clusters */
#define QED_MAX_BACKING_NAME	 4095		     /* in bytes: QEMU's PATH_MAX - 1 */
#define QED_SECTOR		 512		     /* in bytes: image_size granularity */
#define QED_MAX_FILE_SIZE	 (1ULL << 62)	     /* in bytes: fetch_pwrite's limit */

/* Special table entries */
#define QED_L2_UNALLOC 0ULL /* no data cluster: read the backing file */
#define QED_L2_ZERO    1ULL /* zero cluster */
#define QED_L2_BAD     2ULL /* in memory only: an invalid entry found on load */
#define QED_L1_BAD     1ULL /* in memory only: an invalid L1 entry found at open */

#define QED_SLICE_MAX	(64u * 1024)	    /* in bytes: largest unit of L2 caching */
#define QED_CACHE_BYTES (16u * 1024 * 1024) /* in bytes: slice cache budget */
#define QED_DIRTY_MAX	(8u * 1024 * 1024)  /* in bytes: dirty slices before a flush */
#define QED_HASH_BITS	12		    /* log2 of the slice hash buckets */
#define QED_ZERO_CHUNK	(64u * 1024)	    /* in bytes: zero-fill unit in create() */
#define QED_MAX_LOGGED	8		    /* per kind of problem found by the check */

/* Messages name the image in its masked form (a backing URL may carry a
 * token); images not opened by image_open_one() have only a local path. */
#define qed_name(img)	       ((img)->display ? (img)->display : (img)->filename)
#define qed_err(img, fmt, ...) sfs_error("%s: qed: " fmt, qed_name(img), ##__VA_ARGS__)

/* The on-disk header, little-endian, at offset 0. */
struct qed_header_disk {
	uint32_t magic;			  /* QED_MAGIC */
	uint32_t cluster_size;		  /* in bytes, power of 2 in [4 KiB, 64 MiB] */
	uint32_t table_size;		  /* L1/L2 table size, in clusters, power of 2 in [1, 16] */
	uint32_t header_size;		  /* header area, in clusters */
	uint64_t features;		  /* QED_F_* */
	uint64_t compat_features;	  /* none defined */
	uint64_t autoclear_features;	  /* none defined */
	uint64_t l1_table_offset;	  /* in bytes, cluster-aligned */
	uint64_t image_size;		  /* guest size in bytes, multiple of 512 */
	uint32_t backing_filename_offset; /* in bytes from the start of the file */
	uint32_t backing_filename_size;	  /* in bytes, not NUL-terminated */
} __attribute__((packed));

_Static_assert(sizeof(struct qed_header_disk) == QED_HEADER_BYTES, "QED header layout");

/* The header in CPU byte order (same fields). */
struct qed_header {
	uint32_t cluster_size, table_size, header_size;
	uint64_t features, compat_features, autoclear_features;
	uint64_t l1_table_offset, image_size;
	uint32_t backing_filename_offset, backing_filename_size;
};

/* One cached slice of an L2 table. */
struct qed_slice {
	struct lru_node node; /* key: file offset of the slice */
	uint64_t gen;	      /* bumped on every change (flush compares it) */
	bool dirty;	      /* differs from the file; never evicted */
	uint64_t *e;	      /* the entries, little-endian (same allocation) */
};

struct qed_priv {
	/* Geometry, constant after open. */
	uint64_t l1_offset; /* in bytes */
	uint32_t cluster_bits;
	uint64_t cluster_size; /* in bytes */
	uint64_t table_bytes;  /* in bytes */
	uint32_t table_bits;   /* log2(entries per table) */
	uint64_t slice_bytes;  /* in bytes */
	uint32_t slice_bits;   /* log2(entries per slice) */
	uint64_t header_bytes; /* header area, in bytes */
	uint64_t l1_entries;   /* L1 entries covering the guest size */
	uint64_t dirty_max;    /* dirty slice bytes that trigger a flush */

	pthread_mutex_t hdr_lock;
	struct qed_header hdr;	     /* protected by hdr_lock: as on disk */
	_Atomic bool need_check_set; /* we set the need-check bit on disk */

	pthread_mutex_t flush_lock; /* serializes flushes */

	pthread_mutex_t lock;
	uint64_t *l1;		  /* protected by lock: l1_entries, CPU order */
	uint64_t l1_lo, l1_hi;	  /* protected by lock: dirty L1 range [lo, hi) */
	uint64_t l1_gen;	  /* protected by lock: bumped on every L1 change */
	uint64_t alloc_end;	  /* protected by lock: next free file offset */
	struct lru cache;	  /* protected by lock: the slices, slice_bytes each */
	uint64_t dirty_bytes;	  /* protected by lock */
	uint64_t cache_seq;	  /* protected by lock: bumped when a flush cleans slices */
	uint64_t *fresh;	  /* protected by lock: offsets of fresh L2 tables */
	size_t nfresh, fresh_cap; /* protected by lock */
	bool init_locks;
};

/* --- Helpers ------------------------------------------------------------- */

static void qed_mutex_init(pthread_mutex_t *m)
{
	pthread_mutexattr_t a;

	pthread_mutexattr_init(&a);
#ifndef NDEBUG
	pthread_mutexattr_settype(&a, PTHREAD_MUTEX_ERRORCHECK);
#endif
	pthread_mutex_init(m, &a);
	pthread_mutexattr_destroy(&a);
}

static uint32_t qed_log2(uint64_t v)
{
	return (uint32_t)__builtin_ctzll(v);
}

static void qed_header_from_disk(const struct qed_header_disk *d, struct qed_header *h)
{
	h->cluster_size = le32toh(d->cluster_size);
	h->table_size = le32toh(d->table_size);
	h->header_size = le32toh(d->header_size);
	h->features = le64toh(d->features);
	h->compat_features = le64toh(d->compat_features);
	h->autoclear_features = le64toh(d->autoclear_features);
	h->l1_table_offset = le64toh(d->l1_table_offset);
	h->image_size = le64toh(d->image_size);
	h->backing_filename_offset = le32toh(d->backing_filename_offset);
	h->backing_filename_size = le32toh(d->backing_filename_size);
}

static void qed_header_to_disk(const struct qed_header *h, struct qed_header_disk *d)
{
	d->magic = htole32(QED_MAGIC);
	d->cluster_size = htole32(h->cluster_size);
	d->table_size = htole32(h->table_size);
	d->header_size = htole32(h->header_size);
	d->features = htole64(h->features);
	d->compat_features = htole64(h->compat_features);
	d->autoclear_features = htole64(h->autoclear_features);
	d->l1_table_offset = htole64(h->l1_table_offset);
	d->image_size = htole64(h->image_size);
	d->backing_filename_offset = htole32(h->backing_filename_offset);
	d->backing_filename_size = htole32(h->backing_filename_size);
}

static bool qed_cluster_size_ok(uint32_t cs)
{
	return SFS_IS_POW2(cs) && cs >= QED_MIN_CLUSTER_SIZE && cs <= QED_MAX_CLUSTER_SIZE;
}

static bool qed_table_size_ok(uint32_t ts)
{
	return SFS_IS_POW2(ts) && ts >= QED_MIN_TABLE_SIZE && ts <= QED_MAX_TABLE_SIZE;
}

/* log2 of the guest bytes the tables can address. */
static uint32_t qed_address_bits(uint32_t cs, uint32_t ts)
{
	return 2 * qed_log2((uint64_t)cs * ts / sizeof(uint64_t)) + qed_log2(cs);
}

/* Largest guest size the tables can address (saturates at UINT64_MAX). */
static uint64_t qed_max_image_size(uint32_t cs, uint32_t ts)
{
	uint32_t bits = qed_address_bits(cs, ts);

	return bits >= 64 ? UINT64_MAX : 1ULL << bits;
}

/* Can QEMU open an image of this geometry? Two bugs in QEMU's block/qed.c
 * and qed.h (7.2 and later) refuse legal headers: qed_max_image_size()
 * computes entries * entries * cluster_size in 64 bits, which wraps to 0
 * from 2^64 on ("QED image size is invalid" for any size), and
 * qed_check_table_offset() takes table size 1 for an overflow (offset +
 * (table_size - 1) * cluster_size <= offset: "QED table offset is invalid"). */
static bool qed_qemu_geometry_ok(uint32_t cs, uint32_t ts)
{
	return ts >= 2 && qed_address_bits(cs, ts) < 64;
}

/* Table sizes for a new image, in order of preference: QEMU's default,
 * larger ones for guests it cannot address, then 2 (for 4 MiB clusters). */
static const uint32_t qed_table_sizes[] = {QED_DEFAULT_TABLE_SIZE, 8, 16, 2};

/* Table size for a new image of size bytes that QEMU can open, or 0. */
static uint32_t qed_pick_table_size(uint32_t cs, uint64_t size)
{
	for (size_t i = 0; i < sizeof(qed_table_sizes) / sizeof(qed_table_sizes[0]); i++) {
		uint32_t ts = qed_table_sizes[i];

		if (qed_qemu_geometry_ok(cs, ts) && size <= qed_max_image_size(cs, ts))
			return ts;
	}
	return 0;
}

/* Largest guest size of a new image with clusters of cs bytes. */
static uint64_t qed_create_max_size(uint32_t cs)
{
	uint64_t max = 0;

	for (size_t i = 0; i < sizeof(qed_table_sizes) / sizeof(qed_table_sizes[0]); i++)
		if (qed_qemu_geometry_ok(cs, qed_table_sizes[i]))
			max = SFS_MAX(max, qed_max_image_size(cs, qed_table_sizes[i]));
	return max;
}

/* Largest cluster size QEMU opens (with table size 2). */
#define QED_QEMU_MAX_CLUSTER_SIZE (4u * 1024 * 1024) /* in bytes */

/* Write the header struct (not the backing name) at offset 0. Called with
 * hdr_lock held (or single-threaded). */
static int qed_write_header(struct fetch_source *f, const struct qed_header *h)
{
	struct qed_header_disk d;

	qed_header_to_disk(h, &d);
	return fetch_pwrite(f, &d, sizeof(d), 0);
}

/* Is off a valid start of an object of len bytes in a file whose usable
 * part ends at end (cluster-aligned, past the header area)? */
static bool qed_range_ok(const struct qed_priv *p, uint64_t off, uint64_t len, uint64_t end)
{
	uint64_t e;

	return (off & (p->cluster_size - 1)) == 0 && off >= p->header_bytes &&
	       sfs_add_ok(off, len, &e) && e <= end;
}

/* --- Slice cache (all called with p->lock held) -------------------------- */

#define qed_slice_of(n) lru_entry(n, struct qed_slice, node)

/* The cached slice at file offset key, now the most recently used; or NULL. */
static struct qed_slice *qed_cache_find(struct qed_priv *p, uint64_t key)
{
	struct lru_node *n = lru_find(&p->cache, key);

	if (!n)
		return NULL;
	lru_touch(&p->cache, n);
	return qed_slice_of(n);
}

static void qed_cache_remove(struct qed_priv *p, struct qed_slice *s)
{
	lru_remove(&p->cache, &s->node);
	if (s->dirty)
		p->dirty_bytes -= p->slice_bytes;
	free(s);
}

/* Evict clean slices, least recently used first, until under budget. Dirty
 * slices stay: alloc_write() flushes when too many pile up. */
static void qed_cache_shrink(struct qed_priv *p)
{
	struct lru_node *n = lru_oldest(&p->cache);

	while (p->cache.count * p->slice_bytes > QED_CACHE_BYTES && n) {
		struct lru_node *newer = lru_newer(&p->cache, n);

		if (!qed_slice_of(n)->dirty)
			qed_cache_remove(p, qed_slice_of(n));
		n = newer;
	}
}

/* Cache s as the slice at file offset key (not cached yet). */
static void qed_cache_insert(struct qed_priv *p, struct qed_slice *s, uint64_t key)
{
	lru_insert(&p->cache, &s->node, key);
	qed_cache_shrink(p);
}

static void qed_cache_free_node(struct lru_node *n)
{
	free(qed_slice_of(n));
}

static void qed_slice_dirty(struct qed_priv *p, struct qed_slice *s)
{
	s->gen++;
	if (!s->dirty) {
		s->dirty = true;
		p->dirty_bytes += p->slice_bytes;
	}
}

static bool qed_is_fresh(const struct qed_priv *p, uint64_t table)
{
	for (size_t i = 0; i < p->nfresh; i++)
		if (p->fresh[i] == table)
			return true;
	return false;
}

/* Replace the invalid entries of a slice just read from file offset key by
 * QED_L2_BAD, logging once per slice. 'end' bounds valid data clusters. */
static void qed_slice_validate(struct image *img, struct qed_slice *s, uint64_t key, uint64_t end)
{
	struct qed_priv *p = img->priv;
	uint64_t n = p->slice_bytes / sizeof(uint64_t), bad = 0, first = 0;

	for (uint64_t i = 0; i < n; i++) {
		uint64_t v = le64toh(s->e[i]);

		if (v == QED_L2_UNALLOC || v == QED_L2_ZERO)
			continue;
		if (!qed_range_ok(p, v, p->cluster_size, end)) {
			if (bad++ == 0)
				first = v;
			s->e[i] = htole64(QED_L2_BAD);
		}
	}
	if (bad)
		qed_err(img,
			"L2 table slice at offset %llu has %llu invalid entries (first: 0x%llx; "
			"unaligned or past the end of the file); reads there fail",
			(unsigned long long)key, (unsigned long long)bad,
			(unsigned long long)first);
}

/* Get the slice slice_idx of the L2 table at file offset table. Called with
 * p->lock held; may drop and retake it while reading. The slice is valid
 * until the lock is dropped or the next qed_slice_get(). */
static int qed_slice_get(struct image *img, uint64_t table, uint64_t slice_idx,
			 struct qed_slice **out)
{
	struct qed_priv *p = img->priv;
	uint64_t key = table + slice_idx * p->slice_bytes;

	for (;;) {
		struct qed_slice *s = qed_cache_find(p, key);
		uint64_t seq;
		int r;

		if (s) {
			*out = s;
			return 0;
		}
		s = calloc(1, sizeof(*s) + p->slice_bytes);
		if (!s)
			return -ENOMEM;
		s->e = (uint64_t *)(s + 1);
		if (qed_is_fresh(p, table)) {
			/* Not on disk yet: all entries unallocated. */
			qed_cache_insert(p, s, key);
			*out = s;
			return 0;
		}
		seq = p->cache_seq;
		pthread_mutex_unlock(&p->lock);
		r = fetch_pread(img->file, s->e, p->slice_bytes, key);
		if (r == 0)
			qed_slice_validate(img, s, key,
					   SFS_ALIGN_DOWN(fetch_size(img->file), p->cluster_size));
		pthread_mutex_lock(&p->lock);
		if (r < 0) {
			free(s);
			return r;
		}
		if (seq != p->cache_seq || qed_cache_find(p, key)) {
			/* A flush may have rewritten it, or another thread
			 * loaded it meanwhile: use the cached copy / reread. */
			free(s);
			continue;
		}
		qed_cache_insert(p, s, key);
		*out = s;
		return 0;
	}
}

static void qed_l1_mark(struct qed_priv *p, uint64_t i)
{
	if (p->l1_lo >= p->l1_hi) {
		p->l1_lo = i;
		p->l1_hi = i + 1;
	} else {
		p->l1_lo = SFS_MIN(p->l1_lo, i);
		p->l1_hi = SFS_MAX(p->l1_hi, i + 1);
	}
	p->l1_gen++;
}

/* --- Probe, open, close -------------------------------------------------- */

static int qed_probe(const uint8_t *buf, size_t len)
{
	uint32_t magic;

	if (len < QED_HEADER_BYTES)
		return 0;
	memcpy(&magic, buf, sizeof(magic));
	return le32toh(magic) == QED_MAGIC ? 100 : 0;
}

static void qed_free_tables(struct qed_priv *p)
{
	lru_destroy(&p->cache, qed_cache_free_node);
	free(p->l1);
	p->l1 = NULL;
	free(p->fresh);
	p->fresh = NULL;
	if (p->init_locks) {
		pthread_mutex_destroy(&p->lock);
		pthread_mutex_destroy(&p->flush_lock);
		pthread_mutex_destroy(&p->hdr_lock);
		p->init_locks = false;
	}
}

/* Validate the header fields against a file of fsize bytes and set the
 * geometry in p. */
static int qed_parse_header(struct image *img, const struct qed_header_disk *d, uint64_t fsize)
{
	struct qed_priv *p = img->priv;
	struct qed_header *h = &p->hdr;
	uint64_t file_end, l2_span, hb;

	if (le32toh(d->magic) != QED_MAGIC) {
		qed_err(img, "bad magic (not a QED image)");
		return -EINVAL;
	}
	qed_header_from_disk(d, h);
	if (h->features & ~QED_FEATURE_MASK) {
		qed_err(img, "unsupported incompatible feature bits 0x%llx",
			(unsigned long long)(h->features & ~QED_FEATURE_MASK));
		return -ENOTSUP;
	}
	if (!qed_cluster_size_ok(h->cluster_size)) {
		qed_err(img, "invalid cluster size %u (must be a power of 2 in [%u, %u])",
			h->cluster_size, QED_MIN_CLUSTER_SIZE, QED_MAX_CLUSTER_SIZE);
		return -EINVAL;
	}
	if (!qed_table_size_ok(h->table_size)) {
		qed_err(img, "invalid table size %u clusters (must be a power of 2 in [%u, %u])",
			h->table_size, QED_MIN_TABLE_SIZE, QED_MAX_TABLE_SIZE);
		return -EINVAL;
	}
	p->cluster_size = h->cluster_size;
	p->cluster_bits = qed_log2(h->cluster_size);
	p->table_bytes = (uint64_t)h->cluster_size * h->table_size;
	p->table_bits = qed_log2(p->table_bytes / sizeof(uint64_t));
	p->slice_bytes = SFS_MIN(p->table_bytes, (uint64_t)QED_SLICE_MAX);
	p->slice_bits = qed_log2(p->slice_bytes / sizeof(uint64_t));
	file_end = SFS_ALIGN_DOWN(fsize, p->cluster_size);

	if (h->header_size == 0 || !sfs_mul_ok(h->header_size, h->cluster_size, &hb) ||
	    hb > file_end) {
		qed_err(img, "invalid header size %u clusters (file has %llu bytes)",
			h->header_size, (unsigned long long)fsize);
		return -EINVAL;
	}
	p->header_bytes = hb;
	if (h->image_size % QED_SECTOR) {
		qed_err(img, "image size %llu is not a multiple of %u",
			(unsigned long long)h->image_size, QED_SECTOR);
		return -EINVAL;
	}
	if (h->image_size > qed_max_image_size(h->cluster_size, h->table_size)) {
		qed_err(img, "image size %llu exceeds the %llu bytes the tables can address",
			(unsigned long long)h->image_size,
			(unsigned long long)qed_max_image_size(h->cluster_size, h->table_size));
		return -EINVAL;
	}
	if (!qed_range_ok(p, h->l1_table_offset, p->table_bytes, file_end)) {
		qed_err(img,
			"L1 table offset %llu is unaligned, inside the header or past the end of "
			"the file (%llu bytes)",
			(unsigned long long)h->l1_table_offset, (unsigned long long)fsize);
		return -EINVAL;
	}
	l2_span = (p->table_bytes / sizeof(uint64_t)) << p->cluster_bits;
	/* image_size may be close to 2^64: no rounding up by addition. */
	p->l1_entries = h->image_size / l2_span + (h->image_size % l2_span != 0);
	if (h->features & QED_F_BACKING_FILE) {
		uint64_t end = (uint64_t)h->backing_filename_offset + h->backing_filename_size;

		if (end > p->header_bytes) {
			qed_err(img,
				"backing file name (%u bytes at offset %u) lies outside the header "
				"(%llu bytes)",
				h->backing_filename_size, h->backing_filename_offset,
				(unsigned long long)p->header_bytes);
			return -EINVAL;
		}
		if (h->backing_filename_size > QED_MAX_BACKING_NAME) {
			qed_err(img, "backing file name too long (%u bytes, at most %u)",
				h->backing_filename_size, QED_MAX_BACKING_NAME);
			return -EINVAL;
		}
	}
	return 0;
}

static int qed_read_backing(struct image *img)
{
	struct qed_priv *p = img->priv;
	const struct qed_header *h = &p->hdr;
	char *name;
	int r;

	if (!(h->features & QED_F_BACKING_FILE))
		return 0;
	if (h->backing_filename_size == 0) {
		sfs_warn("%s: qed: empty backing file name; treating the image as having none",
			 qed_name(img));
		return 0;
	}
	name = malloc(h->backing_filename_size + 1);
	if (!name)
		return -ENOMEM;
	r = fetch_pread(img->file, name, h->backing_filename_size, h->backing_filename_offset);
	if (r < 0) {
		free(name);
		return r;
	}
	name[h->backing_filename_size] = '\0';
	if (strlen(name) != h->backing_filename_size) {
		qed_err(img, "backing file name contains a NUL byte");
		free(name);
		return -EINVAL;
	}
	img->backing_name = name;
	if (h->features & QED_F_BACKING_FORMAT_NO_PROBE) {
		img->backing_fmt = strdup("raw");
		if (!img->backing_fmt)
			return -ENOMEM;
	}
	return 0;
}

static int qed_read_l1(struct image *img)
{
	struct qed_priv *p = img->priv;
	int r;

	if (p->l1_entries == 0)
		return 0;
	p->l1 = malloc(p->l1_entries * sizeof(uint64_t));
	if (!p->l1)
		return -ENOMEM;
	r = fetch_pread(img->file, p->l1, p->l1_entries * sizeof(uint64_t), p->hdr.l1_table_offset);
	if (r < 0)
		return r;
	for (uint64_t i = 0; i < p->l1_entries; i++)
		p->l1[i] = le64toh(p->l1[i]);
	return 0;
}

/* Mark the L1 entries that do not name a table inside the file. */
static void qed_validate_l1(struct image *img, uint64_t file_end)
{
	struct qed_priv *p = img->priv;
	uint64_t bad = 0;

	for (uint64_t i = 0; i < p->l1_entries; i++) {
		if (p->l1[i] == 0 || qed_range_ok(p, p->l1[i], p->table_bytes, file_end))
			continue;
		if (bad++ == 0)
			qed_err(img,
				"L1 entry %llu (0x%llx) is unaligned or past the end of the file; "
				"reads there fail",
				(unsigned long long)i, (unsigned long long)p->l1[i]);
		p->l1[i] = QED_L1_BAD;
	}
	if (bad > 1)
		qed_err(img, "%llu invalid L1 entries in all", (unsigned long long)bad);
}

enum qed_check_mode {
	QED_CHECK_FIX,	  /* need-check set, writable: drop invalid entries */
	QED_CHECK_REFUSE, /* need-check set, read-only: invalid entries fail the open */
	QED_CHECK_CLEAN,  /* clean, writable: invalid entries fail the open */
};

/* Consistency check, as for QED_F_NEED_CHECK (after QEMU's qed-check.c):
 * every table and data cluster lies inside the file, aligned, past the
 * header, and is referenced once. With QED_CHECK_FIX, invalid entries are
 * dropped and the fixed tables written back (L2 before L1, synced); with
 * QED_CHECK_REFUSE and QED_CHECK_CLEAN they make the open fail (a clean
 * image has none unless crafted, and an entry past the end of the file would
 * become valid once our appends reach it). A cluster referenced twice
 * cannot be repaired safely and always fails the open. Unreferenced clusters (leaks from a
 * crash) are only counted. */
static int qed_check(struct image *img, uint64_t file_end, enum qed_check_mode mode)
{
	bool fix = mode == QED_CHECK_FIX;
	struct qed_priv *p = img->priv;
	uint64_t nclusters = file_end >> p->cluster_bits;
	uint64_t table_clusters = p->table_bytes >> p->cluster_bits;
	uint64_t slices = p->table_bytes / p->slice_bytes;
	uint64_t n = p->slice_bytes / sizeof(uint64_t);
	uint64_t l1_first = p->hdr.l1_table_offset >> p->cluster_bits;
	uint64_t invalid = 0, doubles = 0, leaks = 0;
	uint64_t *buf = NULL;
	struct bitset bm;
	int r;

	/* qed_parse_header() proved the header area and the L1 table lie
	 * inside file_end: the bit set covers them. */
	assert(p->header_bytes <= file_end && l1_first + table_clusters <= nclusters);
	r = bitset_init(&bm, nclusters);
	buf = malloc(p->slice_bytes);
	if (r < 0 || !buf) {
		r = -ENOMEM;
		goto out;
	}
	bitset_test_and_set_range(&bm, 0, p->header_bytes >> p->cluster_bits);
	/* Per cluster: every cluster of the L1 table already taken counts. */
	for (uint64_t c = 0; c < table_clusters; c++)
		if (bitset_test_and_set(&bm, l1_first + c))
			doubles++;

	for (uint64_t i = 0; i < p->l1_entries; i++) {
		uint64_t t = p->l1[i];

		if (t == 0)
			continue;
		if (!qed_range_ok(p, t, p->table_bytes, file_end)) {
			if (invalid++ < QED_MAX_LOGGED)
				qed_err(img,
					"L1 entry %llu (0x%llx) is unaligned or past the end of "
					"the file",
					(unsigned long long)i, (unsigned long long)t);
			if (fix) {
				p->l1[i] = 0;
				qed_l1_mark(p, i);
			}
			continue;
		}
		if (bitset_test_and_set_range(&bm, t >> p->cluster_bits,
					      (t >> p->cluster_bits) + table_clusters)) {
			qed_err(img, "L2 table at offset %llu overlaps another table",
				(unsigned long long)t);
			doubles++;
			continue;
		}
		for (uint64_t s = 0; s < slices; s++) {
			uint64_t off = t + s * p->slice_bytes, fixed = 0;

			r = fetch_pread(img->file, buf, p->slice_bytes, off);
			if (r < 0)
				goto out;
			for (uint64_t j = 0; j < n; j++) {
				uint64_t v = le64toh(buf[j]);

				if (v == QED_L2_UNALLOC || v == QED_L2_ZERO)
					continue;
				if (!qed_range_ok(p, v, p->cluster_size, file_end)) {
					if (invalid++ < QED_MAX_LOGGED)
						qed_err(
						    img,
						    "L2 entry 0x%llx at offset %llu is unaligned "
						    "or past the end of the file",
						    (unsigned long long)v,
						    (unsigned long long)(off + j * 8));
					if (fix) {
						buf[j] = 0;
						fixed++;
					}
					continue;
				}
				if (bitset_test_and_set(&bm, v >> p->cluster_bits)) {
					if (doubles++ < QED_MAX_LOGGED)
						qed_err(
						    img,
						    "cluster at offset %llu is referenced twice",
						    (unsigned long long)v);
				}
			}
			if (fixed) {
				r = fetch_pwrite(img->file, buf, p->slice_bytes, off);
				if (r < 0)
					goto out;
			}
		}
	}
	leaks = bitset_count_clear(&bm);

	if (doubles) {
		qed_err(img,
			"%llu clusters referenced more than once: the image is corrupt and "
			"cannot be repaired",
			(unsigned long long)doubles);
		r = -EINVAL;
		goto out;
	}
	if (invalid && !fix) {
		qed_err(img, "%llu invalid table entries%s", (unsigned long long)invalid,
			mode == QED_CHECK_CLEAN
			    ? " in an image closed cleanly: it is corrupt; open it read-only "
			      "(-o ro) or repair it with 'qemu-img check -r all'"
			    : "; open the image writable once (or run 'qemu-img check -r all') "
			      "to drop them");
		r = -EINVAL;
		goto out;
	}
	if (invalid && fix)
		sfs_warn("%s: qed: dropped %llu invalid table entries (unsynced allocations)",
			 qed_name(img), (unsigned long long)invalid);
	if (leaks && mode != QED_CHECK_CLEAN)
		sfs_info("%s: qed: %llu leaked clusters (unreferenced space from an interrupted "
			 "write; harmless)",
			 qed_name(img), (unsigned long long)leaks);
	if (fix && invalid) {
		/* L2 fixes durable before the L1 ones. */
		r = fetch_flush(img->file);
		for (uint64_t i = p->l1_lo; r == 0 && i < p->l1_hi; i++) {
			uint64_t le = htole64(p->l1[i]);

			if (p->l1[i] == 0)
				r = fetch_pwrite(img->file, &le, sizeof(le),
						 p->l1_offset + i * sizeof(uint64_t));
		}
		p->l1_lo = p->l1_hi = 0;
		if (r == 0)
			r = fetch_flush(img->file);
	}
out:
	bitset_free(&bm);
	free(buf);
	return r;
}

/* Clear the need-check bit (everything must be durable already). Called
 * with hdr_lock held or single-threaded. */
static int qed_clear_need_check(struct image *img)
{
	struct qed_priv *p = img->priv;
	int r;

	p->hdr.features &= ~QED_F_NEED_CHECK;
	r = qed_write_header(img->file, &p->hdr);
	if (r == 0)
		r = fetch_flush(img->file);
	if (r < 0) {
		p->hdr.features |= QED_F_NEED_CHECK;
		qed_err(img, "cannot clear the need-check bit: %s", strerror(-r));
	}
	return r;
}

static int qed_do_open(struct image *img)
{
	struct qed_priv *p = img->priv;
	struct qed_header_disk d;
	uint64_t fsize = fetch_size(img->file), file_end;
	int r;

	if (fsize < QED_HEADER_BYTES) {
		qed_err(img, "file too small for a QED header (%llu bytes)",
			(unsigned long long)fsize);
		return -EINVAL;
	}
	r = fetch_pread(img->file, &d, sizeof(d), 0);
	if (r < 0)
		return r;
	r = qed_parse_header(img, &d, fsize);
	if (r < 0)
		return r;
	p->l1_offset = p->hdr.l1_table_offset;
	file_end = SFS_ALIGN_DOWN(fsize, p->cluster_size);
	r = qed_read_backing(img);
	if (r < 0)
		return r;
	/* Keys are slice offsets: hash them after dropping the bits below
	 * one slice. */
	r = lru_init(&p->cache, (size_t)1 << QED_HASH_BITS, qed_log2(p->slice_bytes));
	if (r < 0)
		return r;
	r = qed_read_l1(img);
	if (r < 0)
		return r;

	if (!img->read_only && (p->hdr.autoclear_features & ~QED_AUTOCLEAR_FEATURE_MASK)) {
		/* Unknown autoclear features are invalid once we write. */
		p->hdr.autoclear_features &= QED_AUTOCLEAR_FEATURE_MASK;
		r = qed_write_header(img->file, &p->hdr);
		if (r == 0)
			r = fetch_flush(img->file);
		if (r < 0)
			return r;
	}
	if (p->hdr.features & QED_F_NEED_CHECK) {
		sfs_info("%s: qed: image was not closed cleanly; checking it", qed_name(img));
		r = qed_check(img, file_end, img->read_only ? QED_CHECK_REFUSE : QED_CHECK_FIX);
		if (r < 0)
			return r;
	} else {
		/* Before we write in place, prove no cluster is referenced
		 * twice (a guest cluster on a table or on another guest
		 * cluster) and none lies past the end of the file. */
		if (!img->read_only) {
			r = qed_check(img, file_end, QED_CHECK_CLEAN);
			if (r < 0)
				return r;
		}
		qed_validate_l1(img, file_end);
	}
	if (!img->read_only && fsize != file_end) {
		/* A torn append from a crash: nothing references it. */
		sfs_info("%s: qed: dropping a partial cluster at the end of the file",
			 qed_name(img));
		r = fetch_truncate(img->file, file_end);
		if (r == 0)
			r = fetch_flush(img->file);
		if (r < 0) {
			qed_err(img, "cannot truncate the file to %llu bytes: %s",
				(unsigned long long)file_end, strerror(-r));
			return r;
		}
	}
	if (!img->read_only && (p->hdr.features & QED_F_NEED_CHECK)) {
		r = qed_clear_need_check(img);
		if (r < 0)
			return r;
	}
	p->alloc_end = file_end;
	p->dirty_max = SFS_MAX((uint64_t)QED_DIRTY_MAX, 4 * p->slice_bytes);
	img->size = p->hdr.image_size;
	img->cluster_size = p->hdr.cluster_size;
	return 0;
}

static int qed_open(struct image *img)
{
	struct qed_priv *p = img->priv;
	int r;

	qed_mutex_init(&p->lock);
	qed_mutex_init(&p->flush_lock);
	qed_mutex_init(&p->hdr_lock);
	p->init_locks = true;
	r = qed_do_open(img);
	if (r < 0) {
		qed_free_tables(p);
		free(img->backing_name);
		free(img->backing_fmt);
		img->backing_name = img->backing_fmt = NULL;
	}
	return r;
}

static int qed_flush(struct image *img);

static void qed_close(struct image *img)
{
	struct qed_priv *p = img->priv;

	if (!img->read_only) {
		bool dirty;
		int r;

		pthread_mutex_lock(&p->lock);
		dirty = p->dirty_bytes || p->l1_lo < p->l1_hi;
		pthread_mutex_unlock(&p->lock);
		r = dirty ? qed_flush(img) : fetch_flush(img->file);
		pthread_mutex_lock(&p->hdr_lock);
		if (r == 0 && (p->hdr.features & QED_F_NEED_CHECK))
			qed_clear_need_check(img);
		else if (r < 0)
			qed_err(img, "metadata not flushed (%s); leaving the need-check bit set",
				strerror(-r));
		pthread_mutex_unlock(&p->hdr_lock);
	}
	qed_free_tables(p);
}

/* --- Map ----------------------------------------------------------------- */

/* Start of the next aligned block (mask = block size - 1) after pos, or end
 * if that is not before end. Never overflows, even for guest sizes close to
 * 2^64. */
static uint64_t qed_next(uint64_t pos, uint64_t mask, uint64_t end)
{
	return (pos | mask) >= end - 1 ? end : (pos | mask) + 1;
}

static int qed_map(struct image *img, uint64_t off, uint64_t len, struct extent *ext)
{
	struct qed_priv *p = img->priv;
	uint64_t end = off + len, pos = off, next_host = 0, first_host = 0;
	uint64_t cmask = p->cluster_size - 1, emask = (1ULL << p->table_bits) - 1;
	uint64_t smask = (1ULL << p->slice_bits) - 1;
	enum extent_type type = EXT_UNALLOC;
	bool first = true;
	int r = 0;

	pthread_mutex_lock(&p->lock);
	while (pos < end) {
		uint64_t c = pos >> p->cluster_bits;
		uint64_t l1i = c >> p->table_bits, l2i = c & emask;
		uint64_t t = p->l1[l1i];
		struct qed_slice *s;

		if (t == QED_L1_BAD) {
			if (first) {
				qed_err(img, "no valid L2 table for guest offset %llu",
					(unsigned long long)pos);
				r = -EIO;
			}
			break;
		}
		if (t == 0) {
			/* The whole table's span is unallocated. */
			if (!first && type != EXT_UNALLOC)
				break;
			type = EXT_UNALLOC;
			first = false;
			pos = qed_next(pos, (1ULL << (p->table_bits + p->cluster_bits)) - 1, end);
			continue;
		}
		r = qed_slice_get(img, t, l2i >> p->slice_bits, &s);
		if (r < 0) {
			if (!first)
				r = 0; /* return the run so far; the next call fails */
			break;
		}
		for (uint64_t j = l2i & smask; j <= smask && pos < end; j++) {
			uint64_t v = le64toh(s->e[j]);
			enum extent_type ct;

			if (v == QED_L2_UNALLOC)
				ct = EXT_UNALLOC;
			else if (v == QED_L2_ZERO)
				ct = EXT_ZERO;
			else if (v == QED_L2_BAD)
				goto bad;
			else
				ct = EXT_DATA;
			if (first) {
				type = ct;
				first_host = v;
				first = false;
			} else if (ct != type || (ct == EXT_DATA && v != next_host)) {
				goto done;
			}
			next_host = v + p->cluster_size;
			pos = qed_next(pos, cmask, end);
		}
	}
	goto done;
bad:
	if (first) {
		qed_err(img, "invalid L2 entry for guest offset %llu", (unsigned long long)pos);
		r = -EIO;
	}
done:
	pthread_mutex_unlock(&p->lock);
	if (r < 0)
		return r;
	ext->type = type;
	ext->len = SFS_MIN(pos, end) - off;
	ext->host_off = type == EXT_DATA ? first_host + (off & cmask) : 0;
	return 0;
}

/* --- Writes -------------------------------------------------------------- */

/* Set the need-check bit durably before the first allocation after open. */
static int qed_mark_dirty(struct image *img)
{
	struct qed_priv *p = img->priv;
	int r = 0;

	if (atomic_load(&p->need_check_set))
		return 0;
	pthread_mutex_lock(&p->hdr_lock);
	if (!atomic_load(&p->need_check_set)) {
		p->hdr.features |= QED_F_NEED_CHECK;
		r = qed_write_header(img->file, &p->hdr);
		if (r == 0)
			r = fetch_flush(img->file);
		if (r < 0) {
			p->hdr.features &= ~QED_F_NEED_CHECK;
			qed_err(img, "cannot set the need-check bit: %s", strerror(-r));
		} else {
			atomic_store(&p->need_check_set, true);
		}
	}
	pthread_mutex_unlock(&p->hdr_lock);
	return r;
}

static int qed_check_write(struct image *img, uint64_t off, uint64_t len)
{
	struct qed_priv *p = img->priv;
	uint64_t last, cmask = p->cluster_size - 1;

	if (img->read_only)
		return -EROFS;
	if (len == 0)
		return 0;
	/* Whole clusters, the last one may stick out past img->size (compare
	 * last bytes: the end may be 2^64). */
	if ((off | len) & cmask || !sfs_add_ok(off, len - 1, &last) || img->size == 0 ||
	    last > ((img->size - 1) | cmask)) {
		qed_err(img, "bad allocating write of %llu bytes at %llu", (unsigned long long)len,
			(unsigned long long)off);
		return -EINVAL;
	}
	return 0;
}

/* Before allocating: too many dirty slices? Flush them first, so memory
 * stays bounded and a failing flush fails the write before it changes
 * anything. */
static int qed_relieve(struct image *img)
{
	struct qed_priv *p = img->priv;
	bool over;

	pthread_mutex_lock(&p->lock);
	over = p->dirty_bytes > p->dirty_max;
	pthread_mutex_unlock(&p->lock);
	return over ? qed_flush(img) : 0;
}

/* Make sure every guest cluster in [c0, c0+n) has an L2 table, appending
 * new ones, then reserve data_len bytes after them at *data_off. Called
 * with p->lock held. */
static int qed_reserve(struct image *img, uint64_t c0, uint64_t n, uint64_t data_len,
		       uint64_t *data_off)
{
	struct qed_priv *p = img->priv;
	uint64_t first = c0 >> p->table_bits, last = (c0 + n - 1) >> p->table_bits;
	uint64_t need = 0, total, end;

	for (uint64_t i = first; i <= last; i++) {
		if (p->l1[i] == QED_L1_BAD) {
			qed_err(img, "cannot write at guest offset %llu: invalid L1 entry",
				(unsigned long long)(i << (p->table_bits + p->cluster_bits)));
			return -EIO;
		}
		if (p->l1[i] == 0)
			need++;
	}
	if (!sfs_mul_ok(need, p->table_bytes, &total) || !sfs_add_ok(total, data_len, &total) ||
	    !sfs_add_ok(p->alloc_end, total, &end) || end > QED_MAX_FILE_SIZE)
		return -EFBIG;
	/* New tables are consecutive at alloc_end. Write their zeros now,
	 * while this write can still fail: the flush that fills them must not
	 * be the first write into a sparse hole, or a full disk would fail it
	 * after the guest write was acknowledged. */
	if (need) {
		int r = fetch_write_zeros(img->file, p->alloc_end, need * p->table_bytes);

		if (r < 0) {
			qed_err(img, "cannot reserve space for L2 tables: %s", strerror(-r));
			return r;
		}
	}
	if (need && p->nfresh + need > p->fresh_cap) {
		size_t cap = SFS_MAX(p->fresh_cap * 2, p->nfresh + need + 16);
		uint64_t *nf = realloc(p->fresh, cap * sizeof(*nf));

		if (!nf)
			return -ENOMEM;
		p->fresh = nf;
		p->fresh_cap = cap;
	}
	for (uint64_t i = first; i <= last && need; i++) {
		struct qed_slice *s;
		uint64_t t = p->alloc_end;
		int r;

		if (p->l1[i] != 0)
			continue;
		/* The flush that publishes the table must extend the file
		 * over all of it: dirty its last slice now. A fresh table's
		 * slice is made without dropping the lock. */
		p->fresh[p->nfresh++] = t;
		r = qed_slice_get(img, t, p->table_bytes / p->slice_bytes - 1, &s);
		if (r < 0) {
			p->nfresh--;
			return r;
		}
		qed_slice_dirty(p, s);
		p->alloc_end += p->table_bytes;
		p->l1[i] = t;
		qed_l1_mark(p, i);
	}
	*data_off = p->alloc_end;
	p->alloc_end += data_len;
	return 0;
}

/* Point the L2 entries of guest clusters [c0, c0+n) at value, value+cs, ...
 * (step = cluster size) or all at value (step 0). Called with p->lock held;
 * every L1 entry in the range names a table. */
static int qed_set_entries(struct image *img, uint64_t c0, uint64_t n, uint64_t value,
			   uint64_t step)
{
	struct qed_priv *p = img->priv;
	uint64_t emask = (1ULL << p->table_bits) - 1, smask = (1ULL << p->slice_bits) - 1;
	uint64_t c = c0, cend = c0 + n;

	while (c < cend) {
		uint64_t l2i = c & emask;
		struct qed_slice *s;
		int r;

		r = qed_slice_get(img, p->l1[c >> p->table_bits], l2i >> p->slice_bits, &s);
		if (r < 0)
			return r;
		for (uint64_t j = l2i & smask; j <= smask && c < cend; j++, c++) {
			s->e[j] = htole64(value);
			value += step;
		}
		qed_slice_dirty(p, s);
	}
	return 0;
}

/* Common start of an allocating call: check the range, set need-check on
 * disk, make room in the table cache. Returns 1 to go on, 0 for an empty
 * range, or -errno. */
static int qed_begin_alloc(struct image *img, uint64_t off, uint64_t len)
{
	int r = qed_check_write(img, off, len);

	if (r < 0 || len == 0)
		return r;
	r = qed_mark_dirty(img);
	if (r == 0)
		r = qed_relieve(img);
	return r < 0 ? r : 1;
}

static int qed_alloc_write(struct image *img, uint64_t off, const void *buf, size_t len)
{
	struct qed_priv *p = img->priv;
	uint64_t c0 = off >> p->cluster_bits, n = len >> p->cluster_bits, host;
	int r;

	r = qed_begin_alloc(img, off, len);
	if (r <= 0)
		return r;
	pthread_mutex_lock(&p->lock);
	r = qed_reserve(img, c0, n, len, &host);
	pthread_mutex_unlock(&p->lock);
	if (r < 0)
		return r;
	/* One pwrite for the whole request, unlocked. If it fails (a full
	 * disk), the range is handed back when nobody reserved after it, so
	 * a guest retrying writes does not grow the file; otherwise it is
	 * leaked (harmless, 'qemu-img check' calls it a leak). */
	r = fetch_pwrite(img->file, buf, len, host);
	if (r < 0) {
		qed_err(img, "cannot write %zu bytes of data at offset %llu: %s", len,
			(unsigned long long)host, strerror(-r));
		pthread_mutex_lock(&p->lock);
		if (p->alloc_end == host + len)
			p->alloc_end = host;
		pthread_mutex_unlock(&p->lock);
		return r;
	}
	pthread_mutex_lock(&p->lock);
	r = qed_set_entries(img, c0, n, host, p->cluster_size);
	pthread_mutex_unlock(&p->lock);
	return r;
}

static int qed_zero_clusters(struct image *img, uint64_t off, uint64_t len)
{
	struct qed_priv *p = img->priv;
	uint64_t c0 = off >> p->cluster_bits, n = len >> p->cluster_bits, unused;
	int r;

	r = qed_begin_alloc(img, off, len);
	if (r <= 0)
		return r;
	pthread_mutex_lock(&p->lock);
	r = qed_reserve(img, c0, n, 0, &unused);
	if (r == 0)
		r = qed_set_entries(img, c0, n, QED_L2_ZERO, 0);
	pthread_mutex_unlock(&p->lock);
	return r;
}

/* --- Flush --------------------------------------------------------------- */

struct qed_snap {
	uint64_t key, gen;
};

static int qed_flush(struct image *img)
{
	struct qed_priv *p = img->priv;
	struct qed_snap *snap = NULL;
	uint8_t *bufs = NULL;
	uint64_t *l1buf = NULL, l1_lo = 0, l1_n = 0, l1_gen = 0;
	size_t nsnap = 0, nfresh;
	struct lru_node *n;
	int r = 0;

	if (img->read_only)
		return 0;
	pthread_mutex_lock(&p->flush_lock);

	/* (1) Snapshot the dirty slices and L1 range. */
	pthread_mutex_lock(&p->lock);
	if (p->dirty_bytes) {
		size_t ndirty = (size_t)(p->dirty_bytes / p->slice_bytes);

		snap = malloc(ndirty * sizeof(*snap));
		bufs = malloc(ndirty * p->slice_bytes);
		if (!snap || !bufs) {
			r = -ENOMEM;
			pthread_mutex_unlock(&p->lock);
			goto out;
		}
		lru_list_for_each(n, &p->cache.list)
		{
			struct qed_slice *s = qed_slice_of(n);

			if (nsnap == ndirty)
				break;
			if (!s->dirty)
				continue;
			snap[nsnap].key = n->key;
			snap[nsnap].gen = s->gen;
			memcpy(bufs + nsnap * p->slice_bytes, s->e, p->slice_bytes);
			nsnap++;
		}
	}
	if (p->l1_lo < p->l1_hi) {
		l1_lo = p->l1_lo;
		l1_n = p->l1_hi - p->l1_lo;
		l1_gen = p->l1_gen;
		l1buf = malloc(l1_n * sizeof(uint64_t));
		if (!l1buf) {
			r = -ENOMEM;
			pthread_mutex_unlock(&p->lock);
			goto out;
		}
		for (uint64_t i = 0; i < l1_n; i++)
			l1buf[i] = htole64(p->l1[l1_lo + i]);
	}
	nfresh = p->nfresh;
	pthread_mutex_unlock(&p->lock);

	/* (2) Data durable before anything points at it. */
	r = fetch_flush(img->file);
	/* (3) L2 slices, then sync. */
	for (size_t i = 0; i < nsnap && r == 0; i++)
		r = fetch_pwrite(img->file, bufs + i * p->slice_bytes, p->slice_bytes, snap[i].key);
	if (r == 0 && nsnap && l1_n)
		r = fetch_flush(img->file);
	/* (4) L1 entries, then sync. */
	if (r == 0 && l1_n) {
		r = fetch_pwrite(img->file, l1buf, l1_n * sizeof(uint64_t),
				 p->l1_offset + l1_lo * sizeof(uint64_t));
		if (r == 0)
			r = fetch_flush(img->file);
	} else if (r == 0 && nsnap) {
		r = fetch_flush(img->file);
	}
	if (r < 0) {
		qed_err(img, "flush failed: %s", strerror(-r));
		goto out;
	}

	/* Mark clean what did not change meanwhile. */
	pthread_mutex_lock(&p->lock);
	for (size_t i = 0; i < nsnap; i++) {
		struct qed_slice *s;

		/* lru_find(), not qed_cache_find(): a write-back is no use. */
		n = lru_find(&p->cache, snap[i].key);
		s = n ? qed_slice_of(n) : NULL;
		if (s && s->dirty && s->gen == snap[i].gen) {
			s->dirty = false;
			p->dirty_bytes -= p->slice_bytes;
		}
	}
	if (l1_n && p->l1_gen == l1_gen)
		p->l1_lo = p->l1_hi = 0;
	/* Tables published by this flush are covered by the file now. */
	if (nfresh) {
		memmove(p->fresh, p->fresh + nfresh, (p->nfresh - nfresh) * sizeof(*p->fresh));
		p->nfresh -= nfresh;
	}
	p->cache_seq++;
	qed_cache_shrink(p);
	pthread_mutex_unlock(&p->lock);
out:
	pthread_mutex_unlock(&p->flush_lock);
	free(snap);
	free(bufs);
	free(l1buf);
	return r;
}

/* --- Header rewrite and create ------------------------------------------- */

static int qed_set_backing(struct image *img, const char *name, const char *fmt)
{
	struct qed_priv *p = img->priv;
	size_t namelen = name ? strlen(name) : 0;
	struct qed_header h;
	char *new_name = NULL, *new_fmt = NULL;
	bool raw = name && fmt && strcmp(fmt, "raw") == 0;
	uint8_t *buf;
	int r;

	if (img->read_only)
		return -EROFS;
	if (namelen > QED_MAX_BACKING_NAME || QED_HEADER_BYTES + namelen > p->header_bytes) {
		qed_err(img,
			"backing file name of %zu bytes does not fit in the header (%llu bytes)",
			namelen, (unsigned long long)p->header_bytes);
		return -ENAMETOOLONG;
	}
	if (name && namelen == 0) {
		qed_err(img, "empty backing file name");
		return -EINVAL;
	}
	if (name && !(new_name = strdup(name)))
		return -ENOMEM;
	if (raw && !(new_fmt = strdup("raw"))) {
		free(new_name);
		return -ENOMEM;
	}
	buf = calloc(1, QED_HEADER_BYTES + namelen);
	if (!buf) {
		free(new_name);
		free(new_fmt);
		return -ENOMEM;
	}
	r = qed_flush(img);
	if (r < 0)
		goto out;

	pthread_mutex_lock(&p->hdr_lock);
	h = p->hdr;
	h.features &= ~(QED_F_BACKING_FILE | QED_F_BACKING_FORMAT_NO_PROBE);
	h.backing_filename_offset = 0;
	h.backing_filename_size = 0;
	if (name) {
		h.features |= QED_F_BACKING_FILE;
		if (raw)
			h.features |= QED_F_BACKING_FORMAT_NO_PROBE;
		h.backing_filename_offset = QED_HEADER_BYTES;
		h.backing_filename_size = (uint32_t)namelen;
		memcpy(buf + QED_HEADER_BYTES, name, namelen);
	}
	qed_header_to_disk(&h, (struct qed_header_disk *)buf);
	r = fetch_pwrite(img->file, buf, QED_HEADER_BYTES + namelen, 0);
	if (r == 0)
		r = fetch_flush(img->file);
	if (r == 0)
		p->hdr = h;
	pthread_mutex_unlock(&p->hdr_lock);
	if (r < 0) {
		qed_err(img, "cannot rewrite the header: %s", strerror(-r));
		goto out;
	}
	free(img->backing_name);
	free(img->backing_fmt);
	img->backing_name = new_name;
	img->backing_fmt = new_fmt;
	new_name = new_fmt = NULL;
out:
	free(buf);
	free(new_name);
	free(new_fmt);
	return r;
}

static int qed_create(struct fetch_source *f, const struct image_create_opts *opts)
{
	uint32_t cs = opts->cluster_size ? opts->cluster_size : QED_DEFAULT_CLUSTER_SIZE, ts;
	size_t namelen = opts->backing_name ? strlen(opts->backing_name) : 0;
	uint64_t table_bytes, size, done;
	struct qed_header h = {0};
	uint8_t *buf;
	int r = 0;

	if (!qed_cluster_size_ok(cs)) {
		sfs_error("%s: qed: cluster size %u must be a power of 2 in [%u, %u]", f->uri, cs,
			  QED_MIN_CLUSTER_SIZE, QED_MAX_CLUSTER_SIZE);
		return -EINVAL;
	}
	/* The spec allows up to 64 MiB, but an image QEMU cannot open is no
	 * use: refuse it here rather than after hours of streaming. */
	if (cs > QED_QEMU_MAX_CLUSTER_SIZE) {
		sfs_error("%s: qed: cluster size %u: QEMU cannot open QED images with clusters "
			  "over %u MiB (its image size limit overflows: 'QED image size is "
			  "invalid'); use -c 4M or less",
			  f->uri, cs, QED_QEMU_MAX_CLUSTER_SIZE >> 20);
		return -EINVAL;
	}
	/* Guest sizes are whole 512-byte sectors, as qemu-img rounds them. */
	size = opts->size;
	if (sfs_add_ok(opts->size, QED_SECTOR - 1, &size))
		size = SFS_ALIGN_DOWN(size, QED_SECTOR);
	ts = size < opts->size ? 0 : qed_pick_table_size(cs, size);
	if (ts == 0) {
		sfs_error("%s: qed: image size %llu is too large for cluster size %u (at most "
			  "%llu bytes)",
			  f->uri, (unsigned long long)opts->size, cs,
			  (unsigned long long)qed_create_max_size(cs));
		return -EINVAL;
	}
	table_bytes = (uint64_t)cs * ts;
	if (opts->backing_name &&
	    (namelen == 0 || namelen > QED_MAX_BACKING_NAME || QED_HEADER_BYTES + namelen > cs)) {
		sfs_error("%s: qed: backing file name of %zu bytes does not fit in the header",
			  f->uri, namelen);
		return -EINVAL;
	}
	h.cluster_size = cs;
	h.table_size = ts;
	h.header_size = 1;
	h.l1_table_offset = cs;
	h.image_size = size;
	if (opts->backing_name) {
		h.features |= QED_F_BACKING_FILE;
		if (opts->backing_fmt && strcmp(opts->backing_fmt, "raw") == 0)
			h.features |= QED_F_BACKING_FORMAT_NO_PROBE;
		h.backing_filename_offset = QED_HEADER_BYTES;
		h.backing_filename_size = (uint32_t)namelen;
	}
	buf = calloc(1, SFS_MAX((size_t)QED_ZERO_CHUNK, QED_HEADER_BYTES + namelen));
	if (!buf)
		return -ENOMEM;
	qed_header_to_disk(&h, (struct qed_header_disk *)buf);
	if (namelen)
		memcpy(buf + QED_HEADER_BYTES, opts->backing_name, namelen);
	r = fetch_pwrite(f, buf, QED_HEADER_BYTES + namelen, 0);
	/* The L1 table, all zeros; the file ends with it. */
	memset(buf, 0, QED_ZERO_CHUNK);
	for (done = 0; r == 0 && done < table_bytes; done += QED_ZERO_CHUNK) {
		uint64_t c = SFS_MIN((uint64_t)QED_ZERO_CHUNK, table_bytes - done);

		r = fetch_pwrite(f, buf, (size_t)c, cs + done);
	}
	free(buf);
	if (r < 0)
		sfs_error("%s: qed: cannot write the new image: %s", f->uri, strerror(-r));
	return r;
}

const struct image_driver image_qed_driver = {
    .name = "qed",
    .priv_size = sizeof(struct qed_priv),
    .probe = qed_probe,
    .open = qed_open,
    .close = qed_close,
    .map = qed_map,
    .read_compressed = NULL,
    .alloc_write = qed_alloc_write,
    .zero_clusters = qed_zero_clusters,
    .flush = qed_flush,
    .set_backing = qed_set_backing,
    .create = qed_create,
};
