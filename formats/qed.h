/* streamfs: QED format driver (QEMU Enhanced Disk), read and write: private
 * header shared by formats/qed*.c.
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
 *
 * THE FILES, one job each (as for qcow2, after QEMU's block/qed*.c):
 *   qed.c          driver table, probe, open/close, header parse and rewrite
 *   qed-cache.c    the L2 slice cache and fresh tables
 *   qed-check.c    validation at open: the consistency check, L1 entries
 *   qed-cluster.c  guest mapping, allocating writes, zero clusters
 *   qed-flush.c    ordered write-back of dirty metadata (the crash order)
 *   qed-create.c   writing a new empty image, geometry QEMU opens
 */

#ifndef STREAMFS_QED_H
#define STREAMFS_QED_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

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

#define QED_SLICE_MAX (64u * 1024)	 /* in bytes: largest unit of L2 caching */
#define QED_DIRTY_MAX (8u * 1024 * 1024) /* in bytes: dirty slices before a flush */

/* Messages name the image in its masked form (a backing URL may carry a
 * token); images not opened by image_open_one() have only a local path. */
#define qed_name(img) ((img)->display ? (img)->display : (img)->filename)

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

enum qed_check_mode {
	QED_CHECK_FIX,	  /* need-check set, writable: drop invalid entries */
	QED_CHECK_REFUSE, /* need-check set, read-only: invalid entries fail the open */
	QED_CHECK_CLEAN,  /* clean, writable: invalid entries fail the open */
};

/* The slice whose node n is (a node of p->cache). */
static inline struct qed_slice *qed_slice_of(struct lru_node *n)
{
	return lru_entry(n, struct qed_slice, node);
}

static inline uint32_t qed_log2(uint64_t v)
{
	return (uint32_t)__builtin_ctzll(v);
}

static inline bool qed_cluster_size_ok(uint32_t cs)
{
	return SFS_IS_POW2(cs) && cs >= QED_MIN_CLUSTER_SIZE && cs <= QED_MAX_CLUSTER_SIZE;
}

/* log2 of the guest bytes the tables can address. */
static inline uint32_t qed_address_bits(uint32_t cs, uint32_t ts)
{
	return 2 * qed_log2((uint64_t)cs * ts / sizeof(uint64_t)) + qed_log2(cs);
}

/* Largest guest size the tables can address (saturates at UINT64_MAX). */
static inline uint64_t qed_max_image_size(uint32_t cs, uint32_t ts)
{
	uint32_t bits = qed_address_bits(cs, ts);

	return bits >= 64 ? UINT64_MAX : 1ULL << bits;
}

/* Is off a valid start of an object of len bytes in a file whose usable
 * part ends at end (cluster-aligned, past the header area)? */
static inline bool qed_range_ok(const struct qed_priv *p, uint64_t off, uint64_t len, uint64_t end)
{
	uint64_t e;

	return (off & (p->cluster_size - 1)) == 0 && off >= p->header_bytes &&
	       sfs_add_ok(off, len, &e) && e <= end;
}

/* ---- qed.c: header ---- */

/* The header h in the on-disk layout. */
void qed_header_to_disk(const struct qed_header *h, struct qed_header_disk *d);
/* Write the header struct (not the backing name) at offset 0. Called with
 * hdr_lock held (or single-threaded). */
int qed_write_header(struct fetch_source *f, const struct qed_header *h);

/* ---- qed-cache.c: the L2 slice cache (p->lock held, but at open and close) ---- */

/* Set up an empty slice cache. Called at open, before the image is shared. */
int qed_cache_init(struct qed_priv *p);
/* Free every cached slice, dirty or not (a zeroed cache too). Called at close. */
void qed_cache_destroy(struct qed_priv *p);
/* Evict clean slices, least recently used first, until under budget. */
void qed_cache_shrink(struct qed_priv *p);
/* Record a change to s: dirty until a flush writes it back. */
void qed_slice_dirty(struct qed_priv *p, struct qed_slice *s);
/* The slice at file offset key was written back as it was at generation
 * gen: clean unless it changed since. */
void qed_slice_clean(struct qed_priv *p, uint64_t key, uint64_t gen);
/* Get the slice slice_idx of the L2 table at file offset table. May drop
 * and retake p->lock while reading. The slice is valid until the lock is
 * dropped or the next qed_slice_get(). */
int qed_slice_get(struct image *img, uint64_t table, uint64_t slice_idx, struct qed_slice **out);

/* ---- qed-check.c: validation at open (single-threaded, no lock) ---- */

/* Mark the L1 entries that do not name a table inside the file QED_L1_BAD. */
void qed_validate_l1(struct image *img, uint64_t file_end);
/* Consistency check of every table against a file of file_end bytes; see
 * enum qed_check_mode for what invalid entries do. */
int qed_check(struct image *img, uint64_t file_end, enum qed_check_mode mode);

/* ---- qed-cluster.c: mapping and writes of guest clusters ---- */

/* Mark L1 entry i for write-back. Called with p->lock held. */
void qed_l1_mark(struct qed_priv *p, uint64_t i);
/* image_driver.map: the run of one state at guest off. Takes p->lock. */
int qed_map(struct image *img, uint64_t off, uint64_t len, struct extent *ext);
/* image_driver.alloc_write: write whole clusters to new host clusters.
 * Takes p->lock (not across the data write); may flush. */
int qed_alloc_write(struct image *img, uint64_t off, const void *buf, size_t len);
/* image_driver.zero_clusters: make whole clusters read as zeros.
 * Takes p->lock; may flush. */
int qed_zero_clusters(struct image *img, uint64_t off, uint64_t len);

/* ---- qed-flush.c: write-back ---- */

/* image_driver.flush: make every metadata change durable, in crash order.
 * Takes p->flush_lock, then p->lock (never across I/O). */
int qed_flush(struct image *img);

/* ---- qed-create.c ---- */

/* image_driver.create: write a new empty image to f. */
int qed_create(struct fetch_source *f, const struct image_create_opts *opts);

#endif /* STREAMFS_QED_H */
