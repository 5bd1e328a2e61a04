/* streamfs: qcow2 format driver (versions 2 and 3), private header shared by
 * formats/qcow2*.c.
 *
 * Format reference: QEMU docs/interop/qcow2.txt. All on-disk numbers are
 * big-endian. Layout of the images we create (QEMU does the same):
 *
 *   cluster 0            header, header extensions, backing file name
 *   cluster 1..          refcount table (refcount_table_clusters clusters)
 *   next                 refcount block(s) covering the metadata
 *   next                 L1 table (l1_size * 8 bytes; the file may end inside it)
 *   appended later       data clusters, L2 tables, refcount blocks, a
 *                        relocated refcount table, in allocation order
 *
 *   guest offset -> L1 index | L2 index | offset in cluster
 *   L1 entry:  bit 63 COPIED, bits 9..55 L2 table offset
 *   L2 entry:  bit 63 COPIED, bit 62 COMPRESSED, bit 0 ZERO (v3),
 *              bits 9..55 host cluster offset (standard clusters)
 *
 * NOTES ON THE DESIGN
 * - Reads: map() walks L1/L2 and returns a run of one state. L2 tables and
 *   refcount blocks live in one cache of cluster-sized buffers kept in the
 *   on-disk layout, bounded by a byte budget (clean tables are evicted LRU).
 * - Writes are append-only: new clusters are always taken at the end of the
 *   file (p->next_free), never reused, so no freed cluster is ever handed out
 *   again while a lock-free reader might still pread it.
 * - Refcounts are kept exact in memory. A cluster that stops being referenced
 *   (a preallocated zero cluster or a compressed cluster overwritten by new
 *   data, the old refcount table after a relocation) is put on a "pending
 *   free" list and its refcount is decremented only after a flush has made
 *   the tables that no longer reference it durable. So the file never holds
 *   a reference to a cluster whose refcount on disk is lower: after a crash
 *   `qemu-img check` finds at most leaks. We never set the dirty bit.
 *
 * NOTES ON THE THREAD MODEL
 * - p->lock protects every table (L1, refcount table, the cache, pending
 *   frees, next_free). It is never held across data I/O; metadata loads drop
 *   it too (qcow2_cache_get retakes it and rechecks). Cache entries in use
 *   are pinned so they are not evicted while the lock is dropped.
 * - alloc_write() reserves its host range under the lock (bumping
 *   next_free and setting refcounts), writes the data unlocked, then takes
 *   the lock again to publish the L2 entries. A flush snapshots tables under
 *   the lock, so it can only see an L2 entry whose data pwrite completed.
 * - p->flush_lock serializes flushes and header rewrites (set_backing).
 *   Lock order: flush_lock before lock.
 *
 * CRASH ORDER: metadata reaches the file only in qcow2_flush(), in the order
 * written down in qcow2-flush.c, so a crash leaves at worst leaked clusters.
 *
 * THE FILES, one job each (after QEMU's block/qcow2*.c split):
 *   qcow2.c           driver table, probe, open/close, header parse and rewrite
 *   qcow2-check.c     validation at open: features, table bounds, overlap check
 *   qcow2-cache.c     the cache of L2 tables and refcount blocks
 *   qcow2-refcount.c  refcount entries and the append-only cluster allocator
 *   qcow2-cluster.c   guest mapping, compressed reads, allocating writes, zero clusters
 *   qcow2-flush.c     ordered write-back of dirty metadata (the crash order)
 *   qcow2-create.c    writing a new empty image
 */

#ifndef STREAMFS_QCOW2_H
#define STREAMFS_QCOW2_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "image.h"
#include "lru.h"
#include "util.h"

#define QCOW2_MAGIC	      0x514649fbU /* "QFI\xfb" */
#define QCOW2_V2_HEADER_BYTES 72	  /* in bytes */
#define QCOW2_V3_HEADER_BYTES 104	  /* in bytes, minimum */
#define QCOW2_OUR_HEADER_LEN  112	  /* in bytes: v3 header with compression_type */

#define QCOW2_MIN_CLUSTER_BITS	 9  /* 512 B */
#define QCOW2_MAX_CLUSTER_BITS	 21 /* 2 MiB, QEMU's limit */
#define QCOW2_MAX_REFCOUNT_ORDER 6
#define QCOW2_MAX_BACKING_NAME	 1023		     /* in bytes */
#define QCOW2_MAX_BACKING_FMT	 255		     /* in bytes */
#define QCOW2_MAX_L1_BYTES	 (32u * 1024 * 1024) /* QEMU's limit */
#define QCOW2_MAX_RCT_BYTES	 (8u * 1024 * 1024)  /* QEMU's limit */
#define QCOW2_MAX_HOST_OFFSET	 (1ULL << 56)	     /* in bytes: offset fields are bits 9..55 */

/* Header extension types */
#define QCOW2_EXT_END		  0x00000000U
#define QCOW2_EXT_BACKING_FMT	  0xe2792acaU
#define QCOW2_EXT_FEATURES	  0x6803f857U
#define QCOW2_EXT_BITMAPS	  0x23852875U
#define QCOW2_EXT_CRYPTO	  0x0537be77U
#define QCOW2_EXT_DATA_FILE	  0x44415441U
#define QCOW2_FEATURE_ENTRY_BYTES 48

/* incompatible_features bits */
#define QCOW2_INCOMPAT_DIRTY	   (1ULL << 0)
#define QCOW2_INCOMPAT_CORRUPT	   (1ULL << 1)
#define QCOW2_INCOMPAT_DATA_FILE   (1ULL << 2)
#define QCOW2_INCOMPAT_COMPRESSION (1ULL << 3)
#define QCOW2_INCOMPAT_EXTL2	   (1ULL << 4)
#define QCOW2_INCOMPAT_KNOWN	   0x1fULL

/* Table entry bits */
#define QCOW2_OFLAG_COPIED     (1ULL << 63)
#define QCOW2_OFLAG_COMPRESSED (1ULL << 62)
#define QCOW2_OFLAG_ZERO       (1ULL << 0)
#define QCOW2_OFFSET_MASK      0x00fffffffffffe00ULL /* L1/L2 offset bits 9..55 */
#define QCOW2_RCT_OFFSET_MASK  0xfffffffffffffe00ULL /* refcount table entry bits 9..63 */

/* Header field offsets (in bytes) */
#define QCOW2_HDR_BACKING_OFFSET 8
#define QCOW2_HDR_BACKING_SIZE	 16
#define QCOW2_HDR_RCT_OFFSET	 48
#define QCOW2_HDR_AUTOCLEAR	 88

#define QCOW2_CHUNK	     512u	  /* in bytes: dirty-tracking unit of L1/refcount table */
#define QCOW2_CACHE_RW	     (16u << 20)  /* in bytes: table cache budget, writable image */
#define QCOW2_CACHE_RO	     (4u << 20)	  /* in bytes: table cache budget, read-only image */
#define QCOW2_CACHE_OVERHEAD 128	  /* in bytes: struct + allocator, per entry */
#define QCOW2_CACHE_MIN	     8		  /* entries, whatever the cluster size */
#define QCOW2_ZBUF	     (64u * 1024) /* in bytes: compressed-read I/O chunk */
#define QCOW2_WRITE_CHUNK    (1u << 20)	  /* in bytes: zero-fill chunk in create() */

#define qcow2_err(img, fmt, ...) sfs_error("%s: qcow2: " fmt, qcow2_name(img), ##__VA_ARGS__)

/* One cached metadata cluster (L2 table or refcount block). */
struct qcow2_meta {
	struct lru_node node; /* key: host offset; on p->dirty, else on p->cache's LRU list */
	uint8_t *buf;	      /* cluster_size bytes, on-disk (big-endian) layout */
	bool refblock;	      /* refcount block, else L2 table */
	bool dirty;	      /* on p->dirty */
	int pins;	      /* users holding it across a lock drop */
	uint64_t mod_gen;     /* bumped on every change (flush compares it) */
};

/* A host byte range whose refcount drops once the next flush is durable. */
struct qcow2_range {
	uint64_t off, len; /* in bytes */
};

struct qcow2_priv {
	/* Immutable after open. */
	uint32_t version;
	uint32_t cluster_bits;
	uint32_t cs;	  /* cluster size in bytes */
	uint32_t l2_bits; /* log2 of L2 entries per table */
	uint32_t refcount_order;
	uint32_t rb_bits;     /* log2 of refcount entries per block */
	uint32_t csize_shift; /* compressed descriptor: sector count position */
	uint64_t csize_mask;
	uint64_t coff_mask;
	uint32_t header_length;
	uint64_t l1_offset;
	uint32_t l1_size; /* entries */
	uint64_t nb_snapshots;

	bool locks_init;
	pthread_mutex_t lock;	    /* protects everything below */
	pthread_mutex_t flush_lock; /* serializes flush and header rewrites */

	uint64_t *l1;	   /* CPU-endian; protected by lock */
	uint8_t *l1_dirty; /* one flag per QCOW2_CHUNK of the L1 table */

	uint64_t *rct; /* refcount table, CPU-endian (writable images only) */
	uint64_t rct_entries;
	uint64_t rct_offset;
	uint32_t rct_clusters;
	uint8_t *rct_dirty; /* one flag per QCOW2_CHUNK */
	bool rct_moved;	    /* relocated since the header was last written */

	uint64_t next_free; /* in bytes: where the next allocation goes */

	struct lru cache;      /* every entry; clean ones on its list, most recent first */
	struct lru_node dirty; /* dirty entries, most recently dirtied first */
	size_t max_meta, n_dirty;
	uint64_t wb_gen; /* bumped whenever a write-back completes */

	struct qcow2_range *frees;
	size_t n_frees, cap_frees;
};

/* Parsed header extensions. */
struct qcow2_exts {
	const uint8_t *features; /* feature name table, or NULL */
	uint32_t features_len;
	bool data_file;
	uint32_t end; /* first byte after the end-of-extensions marker */
};

/* The image's name for messages: the masked form (a backing URL may carry
 * a token); images opened without image_open_one() (create, unit tests)
 * have only a local path. */
static inline const char *qcow2_name(const struct image *img)
{
	if (img->display)
		return img->display;
	if (img->filename)
		return img->filename;
	return img->file && img->file->uri ? img->file->uri : "?";
}

static inline uint16_t qcow2_get16(const uint8_t *p)
{
	uint16_t v;
	memcpy(&v, p, sizeof(v));
	return be16toh(v);
}

static inline uint32_t qcow2_get32(const uint8_t *p)
{
	uint32_t v;
	memcpy(&v, p, sizeof(v));
	return be32toh(v);
}

static inline uint64_t qcow2_get64(const uint8_t *p)
{
	uint64_t v;
	memcpy(&v, p, sizeof(v));
	return be64toh(v);
}

static inline void qcow2_put16(uint8_t *p, uint16_t v)
{
	v = htobe16(v);
	memcpy(p, &v, sizeof(v));
}

static inline void qcow2_put32(uint8_t *p, uint32_t v)
{
	v = htobe32(v);
	memcpy(p, &v, sizeof(v));
}

static inline void qcow2_put64(uint8_t *p, uint64_t v)
{
	v = htobe64(v);
	memcpy(p, &v, sizeof(v));
}

/* ---- qcow2-cache.c: the metadata cache ---- */

/* Set up p->lock, p->flush_lock and an empty cache sized for a writable or
 * read-only image. Called at open, before the image is shared. */
int qcow2_init_cache(struct qcow2_priv *p, bool writable);
/* Free every cache entry, dirty or not, and the hash table. Called at close. */
void qcow2_cache_destroy(struct qcow2_priv *p);
/* The cache entry of a node of p->cache or p->dirty. */
static inline struct qcow2_meta *qcow2_meta_of(struct lru_node *n)
{
	return lru_entry(n, struct qcow2_meta, node);
}
/* The cached entry for host offset off, or NULL; not pinned, no LRU update.
 * Called with p->lock held. */
struct qcow2_meta *qcow2_cache_lookup(struct qcow2_priv *p, uint64_t off);
/* Get the metadata cluster at off, pinned (release with qcow2_cache_put).
 * Called with p->lock held; drops it while reading from the file. */
int qcow2_cache_get(struct image *img, uint64_t off, bool refblock, struct qcow2_meta **out);
/* Create a zeroed, dirty, pinned entry for a newly allocated cluster.
 * Called with p->lock held. */
int qcow2_cache_new(struct image *img, uint64_t off, bool refblock, struct qcow2_meta **out);
/* Unpin e (NULL is ignored). Called with p->lock held. */
void qcow2_cache_put(struct qcow2_meta *e);
/* Record a change to e: it moves to the dirty list. Called with p->lock held. */
void qcow2_cache_dirty(struct qcow2_priv *p, struct qcow2_meta *e);
/* e was written back: it moves to the LRU list. Called with p->lock held. */
void qcow2_cache_clean(struct qcow2_priv *p, struct qcow2_meta *e);
/* Read len bytes of metadata at off; bytes past the end of the file read as
 * zeros. Takes no lock. */
int qcow2_read_meta(struct image *img, uint64_t off, void *buf, size_t len);

/* ---- qcow2-refcount.c: refcounts and allocation (writable images) ---- */

/* Allocate n contiguous new clusters at the end of the file with refcount
 * 1; the first one's host offset goes to *host.
 * Called with p->lock held; may drop it. */
int qcow2_alloc_clusters(struct image *img, uint64_t n, uint64_t *host);
/* Decrement the refcounts of [off, off+len) now: only for clusters nothing
 * references any more. Called with p->lock held; may drop it. */
int qcow2_free_now(struct image *img, uint64_t off, uint64_t len);
/* Queue [off, off+len) to be freed after the next durable flush.
 * Called with p->lock held. */
int qcow2_free_later(struct qcow2_priv *p, uint64_t off, uint64_t len);
/* Write zeros over new metadata clusters, so that filling them later cannot
 * fail for lack of space. Called with p->lock held. */
int qcow2_prezero(struct image *img, uint64_t off, uint64_t len);
/* Mark refcount table entry idx for write-back. Called with p->lock held. */
void qcow2_rct_mark(struct qcow2_priv *p, uint64_t idx);

/* ---- qcow2-cluster.c: mapping, reads and writes of guest clusters ---- */

/* Mark L1 entry idx for write-back. Called with p->lock held. */
void qcow2_l1_mark(struct qcow2_priv *p, uint64_t idx);
/* image_driver.map: the run of one state at guest off. Takes p->lock. */
int qcow2_map(struct image *img, uint64_t off, uint64_t len, struct extent *ext);
/* image_driver.read_compressed: inflate part of one compressed cluster.
 * Takes no lock. */
int qcow2_read_compressed(struct image *img, uint64_t off, const struct extent *ext, void *buf,
			  size_t len);
/* image_driver.alloc_write: write whole clusters to new host clusters.
 * Takes p->lock (not across the data write); may flush. */
int qcow2_alloc_write(struct image *img, uint64_t off, const void *buf, size_t len);
/* image_driver.zero_clusters: make whole clusters read as zeros (v3).
 * Takes p->lock; may flush. */
int qcow2_zero_clusters(struct image *img, uint64_t off, uint64_t len);

/* ---- qcow2-flush.c: write-back ---- */

/* image_driver.flush: make every metadata change durable, in crash order.
 * Takes p->flush_lock, then p->lock (never across I/O). */
int qcow2_flush(struct image *img);

/* ---- qcow2-check.c: validation at open (single-threaded, no lock) ---- */

/* Refuse incompatible features we cannot honour (-ENOTSUP) or that are
 * inconsistent (-EINVAL); dirty/corrupt images only read-only. */
int qcow2_check_features(struct image *img, uint64_t incompat, uint32_t compression,
			 const struct qcow2_exts *x);
/* Check the L1 and refcount tables' sizes and places against the guest size
 * and the file; refuse writing to images with internal snapshots. */
int qcow2_check_layout(struct image *img, uint64_t size);
/* Before writing: no host cluster referenced twice or past the end of the
 * file. Reads every L2 table. */
int qcow2_check_refs(struct image *img, uint64_t fsize, uint64_t rct_bytes);

/* ---- qcow2.c: header ---- */

/* Build header cluster bytes [0, *used) into out (cs bytes, zeroed) from the
 * header fields in base (hlen bytes), extensions to keep verbatim and the
 * backing name/format. -ENAMETOOLONG or -ENOSPC if they do not fit. */
int qcow2_build_header(uint8_t *out, uint32_t cs, const uint8_t *base, uint32_t hlen,
		       const uint8_t *other_exts, uint32_t other_len, const char *name,
		       const char *fmt, uint32_t *used);

/* ---- qcow2-create.c ---- */

/* image_driver.create: write a new empty image to f. */
int qcow2_create(struct fetch_source *f, const struct image_create_opts *opts);
/* One creation option: compat=0.10|v2|1.1|v3 (qemu-img's spelling). */
int qcow2_create_option(struct image_create_opts *opts, const char *opt);

#endif /* STREAMFS_QCOW2_H */
