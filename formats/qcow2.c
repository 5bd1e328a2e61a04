/* streamfs: qcow2 format driver (versions 2 and 3), read and write.
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
 * CRASH ORDER (see include/image.h): flush() = snapshot dirty tables,
 * fdatasync data, write refcount blocks, [sync, write refcount table
 * entries or a relocated table, sync, update the header], sync, write L2
 * tables, [sync], write L1 entries, sync. The bracketed syncs only happen
 * when new refcount blocks / L2 tables were linked in, so a table entry
 * never reaches the disk before the cluster it points to.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "image.h"
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
	uint64_t off;			/* host offset (the key) */
	uint8_t *buf;			/* cluster_size bytes, on-disk (big-endian) layout */
	bool refblock;			/* refcount block, else L2 table */
	bool dirty;			/* on p->dirty, else on p->lru */
	int pins;			/* users holding it across a lock drop */
	uint64_t mod_gen;		/* bumped on every change (flush compares it) */
	struct qcow2_meta *hnext;	/* hash chain */
	struct qcow2_meta *prev, *next; /* LRU (clean) or dirty list */
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

	struct qcow2_meta **hash;
	size_t hash_size;	 /* power of two */
	struct qcow2_meta lru;	 /* clean entries, most recent first */
	struct qcow2_meta dirty; /* dirty entries */
	size_t n_meta, max_meta, n_dirty;
	uint64_t wb_gen; /* bumped whenever a write-back completes */

	struct qcow2_range *frees;
	size_t n_frees, cap_frees;
};

static const char *qcow2_name(const struct image *img)
{
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

/* ---- refcount entries of any width (1..64 bits) ---- */

static uint64_t qcow2_rc_get(const struct qcow2_priv *p, const uint8_t *b, uint64_t i)
{
	switch (p->refcount_order) {
	case 0:
		return (b[i / 8] >> (i % 8)) & 1;
	case 1:
		return (b[i / 4] >> (2 * (i % 4))) & 3;
	case 2:
		return (b[i / 2] >> (4 * (i % 2))) & 15;
	case 3:
		return b[i];
	case 4:
		return qcow2_get16(b + 2 * i);
	case 5:
		return qcow2_get32(b + 4 * i);
	default:
		return qcow2_get64(b + 8 * i);
	}
}

static void qcow2_rc_set(const struct qcow2_priv *p, uint8_t *b, uint64_t i, uint64_t v)
{
	unsigned sh;

	switch (p->refcount_order) {
	case 0:
		sh = i % 8;
		b[i / 8] = (uint8_t)((b[i / 8] & ~(1u << sh)) | ((v & 1) << sh));
		break;
	case 1:
		sh = 2 * (i % 4);
		b[i / 4] = (uint8_t)((b[i / 4] & ~(3u << sh)) | ((v & 3) << sh));
		break;
	case 2:
		sh = 4 * (i % 2);
		b[i / 2] = (uint8_t)((b[i / 2] & ~(15u << sh)) | ((v & 15) << sh));
		break;
	case 3:
		b[i] = (uint8_t)v;
		break;
	case 4:
		qcow2_put16(b + 2 * i, (uint16_t)v);
		break;
	case 5:
		qcow2_put32(b + 4 * i, (uint32_t)v);
		break;
	default:
		qcow2_put64(b + 8 * i, v);
		break;
	}
}

/* ---- metadata cache ---- */

static void qcow2_list_del(struct qcow2_meta *e)
{
	e->prev->next = e->next;
	e->next->prev = e->prev;
	e->prev = e->next = e;
}

static void qcow2_list_add(struct qcow2_meta *head, struct qcow2_meta *e)
{
	e->next = head->next;
	e->prev = head;
	head->next->prev = e;
	head->next = e;
}

static size_t qcow2_hash_idx(const struct qcow2_priv *p, uint64_t off)
{
	return (size_t)((off >> p->cluster_bits) * 0x9e3779b97f4a7c15ULL >> 20) &
	       (p->hash_size - 1);
}

/* Called with p->lock held. */
static struct qcow2_meta *qcow2_cache_lookup(struct qcow2_priv *p, uint64_t off)
{
	struct qcow2_meta *e;

	for (e = p->hash[qcow2_hash_idx(p, off)]; e; e = e->hnext)
		if (e->off == off)
			return e;
	return NULL;
}

static void qcow2_cache_unhash(struct qcow2_priv *p, struct qcow2_meta *e)
{
	struct qcow2_meta **pp = &p->hash[qcow2_hash_idx(p, e->off)];

	while (*pp != e)
		pp = &(*pp)->hnext;
	*pp = e->hnext;
}

/* Drop clean, unpinned entries until there is room for one more.
 * Called with p->lock held. */
static void qcow2_cache_evict(struct qcow2_priv *p)
{
	struct qcow2_meta *e = p->lru.prev;

	while (p->n_meta >= p->max_meta && e != &p->lru) {
		struct qcow2_meta *prev = e->prev;

		if (e->pins == 0) {
			qcow2_list_del(e);
			qcow2_cache_unhash(p, e);
			free(e->buf);
			free(e);
			p->n_meta--;
		}
		e = prev;
	}
}

/* Insert buf (cluster_size bytes, ownership taken) as the entry for off,
 * pinned. Called with p->lock held. */
static struct qcow2_meta *qcow2_cache_insert(struct qcow2_priv *p, uint64_t off, uint8_t *buf,
					     bool refblock, bool dirty)
{
	struct qcow2_meta *e = calloc(1, sizeof(*e));
	size_t h;

	if (!e)
		return NULL;
	qcow2_cache_evict(p);
	e->off = off;
	e->buf = buf;
	e->refblock = refblock;
	e->pins = 1;
	e->dirty = dirty;
	h = qcow2_hash_idx(p, off);
	e->hnext = p->hash[h];
	p->hash[h] = e;
	qcow2_list_add(dirty ? &p->dirty : &p->lru, e);
	p->n_meta++;
	if (dirty)
		p->n_dirty++;
	return e;
}

static void qcow2_cache_put(struct qcow2_meta *e)
{
	if (e)
		e->pins--;
}

/* Record a change to e. Called with p->lock held. */
static void qcow2_cache_dirty(struct qcow2_priv *p, struct qcow2_meta *e)
{
	e->mod_gen++;
	if (!e->dirty) {
		qcow2_list_del(e);
		qcow2_list_add(&p->dirty, e);
		e->dirty = true;
		p->n_dirty++;
	}
}

/* Read len bytes of metadata at off; bytes past the end of the file read as
 * zeros (QEMU images may end inside their last table). */
static int qcow2_read_meta(struct image *img, uint64_t off, void *buf, size_t len)
{
	uint64_t fsize = fetch_size(img->file);
	size_t n;

	if (off >= fsize) {
		qcow2_err(img, "metadata at offset %#llx is past the end of the file",
			  (unsigned long long)off);
		return -EIO;
	}
	n = (size_t)SFS_MIN((uint64_t)len, fsize - off);
	if (n < len)
		memset((uint8_t *)buf + n, 0, len - n);
	return fetch_pread(img->file, buf, n, off);
}

/* Get the metadata cluster at off, pinned (release with qcow2_cache_put).
 * Called with p->lock held; drops it while reading from the file. */
static int qcow2_cache_get(struct image *img, uint64_t off, bool refblock, struct qcow2_meta **out)
{
	struct qcow2_priv *p = img->priv;
	struct qcow2_meta *e;
	uint8_t *buf;
	uint64_t gen;
	int r;

	if (off & (p->cs - 1)) {
		qcow2_err(img, "%s offset %#llx is not cluster aligned",
			  refblock ? "refcount block" : "L2 table", (unsigned long long)off);
		return -EIO;
	}
	for (;;) {
		e = qcow2_cache_lookup(p, off);
		if (e) {
			if (e->refblock != refblock) {
				qcow2_err(
				    img,
				    "cluster %#llx is used both as L2 table and refcount block",
				    (unsigned long long)off);
				return -EIO;
			}
			if (!e->dirty) { /* most recently used first */
				qcow2_list_del(e);
				qcow2_list_add(&p->lru, e);
			}
			e->pins++;
			*out = e;
			return 0;
		}
		buf = malloc(p->cs);
		if (!buf)
			return -ENOMEM;
		gen = p->wb_gen;
		pthread_mutex_unlock(&p->lock);
		r = qcow2_read_meta(img, off, buf, p->cs);
		pthread_mutex_lock(&p->lock);
		if (r < 0) {
			free(buf);
			return r;
		}
		/* Someone else loaded it meanwhile, or a write-back completed and our
		 * copy may predate it: use the cached one or read again. */
		if (qcow2_cache_lookup(p, off) || gen != p->wb_gen) {
			free(buf);
			continue;
		}
		e = qcow2_cache_insert(p, off, buf, refblock, false);
		if (!e) {
			free(buf);
			return -ENOMEM;
		}
		*out = e;
		return 0;
	}
}

/* Create a zeroed, dirty, pinned entry for a newly allocated cluster.
 * Called with p->lock held. */
static int qcow2_cache_new(struct image *img, uint64_t off, bool refblock, struct qcow2_meta **out)
{
	struct qcow2_priv *p = img->priv;
	uint8_t *buf;

	if (qcow2_cache_lookup(p, off)) {
		qcow2_err(img, "new cluster %#llx is already in use as metadata",
			  (unsigned long long)off);
		return -EIO;
	}
	buf = calloc(1, p->cs);
	if (!buf)
		return -ENOMEM;
	*out = qcow2_cache_insert(p, off, buf, refblock, true);
	if (!*out) {
		free(buf);
		return -ENOMEM;
	}
	(*out)->mod_gen = 1;
	return 0;
}

/* ---- refcounts and allocation (writable images) ---- */

static void qcow2_rct_mark(struct qcow2_priv *p, uint64_t idx)
{
	p->rct_dirty[idx * 8 / QCOW2_CHUNK] = 1;
}

static void qcow2_l1_mark(struct qcow2_priv *p, uint64_t idx)
{
	p->l1_dirty[idx * 8 / QCOW2_CHUNK] = 1;
}

/* Get the refcount block for refcount table index idx, pinned, or NULL in
 * *out if there is none. Called with p->lock held; may drop it. */
static int qcow2_get_refblock(struct image *img, uint64_t idx, struct qcow2_meta **out)
{
	struct qcow2_priv *p = img->priv;
	uint64_t off;

	*out = NULL;
	if (idx >= p->rct_entries)
		return 0;
	off = p->rct[idx] & QCOW2_RCT_OFFSET_MASK;
	if (!off)
		return 0;
	return qcow2_cache_get(img, off, true, out);
}

/* Decrement the refcount of every cluster overlapping [off, off+len) now.
 * Only for clusters nothing on disk or in memory references any more.
 * Called with p->lock held; may drop it. */
static int qcow2_free_now(struct image *img, uint64_t off, uint64_t len)
{
	struct qcow2_priv *p = img->priv;
	uint64_t c, first = off >> p->cluster_bits;
	uint64_t last = (off + len - 1) >> p->cluster_bits;
	uint64_t mask = (1ULL << p->rb_bits) - 1;
	int r = 0;

	for (c = first; c <= last; c++) {
		struct qcow2_meta *b;
		uint64_t v;

		r = qcow2_get_refblock(img, c >> p->rb_bits, &b);
		if (r < 0)
			return r;
		v = b ? qcow2_rc_get(p, b->buf, c & mask) : 0;
		if (v == 0) {
			qcow2_err(img, "refcount of cluster %#llx would drop below zero",
				  (unsigned long long)(c << p->cluster_bits));
			qcow2_cache_put(b);
			continue;
		}
		qcow2_rc_set(p, b->buf, c & mask, v - 1);
		qcow2_cache_dirty(p, b);
		qcow2_cache_put(b);
	}
	return r;
}

/* Queue [off, off+len) to be freed after the next durable flush.
 * Called with p->lock held. */
static int qcow2_free_later(struct qcow2_priv *p, uint64_t off, uint64_t len)
{
	if (p->n_frees == p->cap_frees) {
		size_t cap = p->cap_frees ? p->cap_frees * 2 : 16;
		struct qcow2_range *n = realloc(p->frees, cap * sizeof(*n));

		if (!n)
			return -ENOMEM;
		p->frees = n;
		p->cap_frees = cap;
	}
	p->frees[p->n_frees].off = off;
	p->frees[p->n_frees].len = len;
	p->n_frees++;
	return 0;
}

/* Host range [*off, *off+*len) occupied by a compressed cluster descriptor. */
static void qcow2_compressed_range(const struct qcow2_priv *p, uint64_t entry, uint64_t *off,
				   uint64_t *len)
{
	uint64_t nsec = ((entry >> p->csize_shift) & p->csize_mask) + 1;

	*off = entry & p->coff_mask;
	*len = nsec * 512 - (*off & 511);
}

/* The clusters an old L2 entry held, to be released once it is replaced. */
static int qcow2_release_entry(struct image *img, uint64_t entry)
{
	struct qcow2_priv *p = img->priv;
	uint64_t off, len;

	if (entry & QCOW2_OFLAG_COMPRESSED) {
		qcow2_compressed_range(p, entry, &off, &len);
		return qcow2_free_later(p, off, len);
	}
	off = entry & QCOW2_OFFSET_MASK;
	if (off)
		return qcow2_free_later(p, off, p->cs);
	return 0;
}

struct qcow2_pins {
	struct qcow2_meta **v;
	size_t n, cap;
};

static int qcow2_pins_add(struct qcow2_pins *ps, struct qcow2_meta *e)
{
	for (size_t i = 0; i < ps->n; i++) {
		if (ps->v[i] == e) {
			qcow2_cache_put(e);
			return 0;
		}
	}
	if (ps->n == ps->cap) {
		size_t cap = ps->cap ? ps->cap * 2 : 8;
		struct qcow2_meta **n = realloc(ps->v, cap * sizeof(*n));

		if (!n) {
			qcow2_cache_put(e);
			return -ENOMEM;
		}
		ps->v = n;
		ps->cap = cap;
	}
	ps->v[ps->n++] = e;
	return 0;
}

static void qcow2_pins_release(struct qcow2_pins *ps)
{
	for (size_t i = 0; i < ps->n; i++)
		qcow2_cache_put(ps->v[i]);
	free(ps->v);
}

/* Write zeros over new metadata clusters now, while the guest write that
 * needs them can still fail: the flush that later fills them must not be
 * the first write into a sparse hole, or a full disk would fail it after
 * the guest write was acknowledged. Called with p->lock held (rare: one L2
 * table per cluster_size/8 guest clusters). */
static int qcow2_prezero(struct image *img, uint64_t off, uint64_t len)
{
	int r = fetch_write_zeros(img->file, off, len);

	if (r < 0)
		qcow2_err(img, "cannot reserve space for metadata: %s", strerror(-r));
	return r;
}

/* Allocate n contiguous new clusters at the end of the file with refcount 1;
 * return the host offset of the first in *host. New refcount blocks (and a
 * relocated, bigger refcount table) needed to count them are placed right
 * before them, in the same reservation.
 * Called with p->lock held; may drop it to load refcount blocks, but the
 * plan is committed without dropping it. */
static int qcow2_alloc_clusters(struct image *img, uint64_t n, uint64_t *host)
{
	struct qcow2_priv *p = img->priv;
	struct qcow2_pins pins = {0};
	uint64_t s, end, m_rb, m_rct, first_idx, last_idx, idx, c, j;
	uint64_t mask = (1ULL << p->rb_bits) - 1;
	int r = 0;

	if (n == 0)
		return -EINVAL;
retry:
	/* Plan: find how many refcount blocks and table clusters we must add so
	 * that every cluster of the reservation (including them) is counted. */
	s = p->next_free >> p->cluster_bits;
	m_rb = m_rct = 0;
	for (;;) {
		uint64_t missing = 0, need_rct = 0, total = n;

		if (!sfs_add_ok(total, m_rb + m_rct, &total) || !sfs_add_ok(s, total, &end) ||
		    end > (QCOW2_MAX_HOST_OFFSET >> p->cluster_bits)) {
			qcow2_err(img, "image file would exceed the maximum qcow2 size");
			r = -ENOSPC;
			goto out;
		}
		first_idx = s >> p->rb_bits;
		last_idx = (end - 1) >> p->rb_bits;
		for (idx = first_idx; idx <= last_idx; idx++)
			if (idx >= p->rct_entries || !(p->rct[idx] & QCOW2_RCT_OFFSET_MASK))
				missing++;
		if (last_idx >= p->rct_entries) {
			uint64_t want = SFS_DIV_ROUND_UP((last_idx + 1) * 8, p->cs);

			need_rct = SFS_MAX(want, (uint64_t)p->rct_clusters * 2);
			if (need_rct * p->cs > QCOW2_MAX_RCT_BYTES)
				need_rct = SFS_MAX(want, QCOW2_MAX_RCT_BYTES / p->cs);
			if (need_rct * p->cs > QCOW2_MAX_RCT_BYTES) {
				qcow2_err(img, "refcount table would exceed %u bytes",
					  QCOW2_MAX_RCT_BYTES);
				r = -ENOSPC;
				goto out;
			}
		}
		if (missing == m_rb && need_rct == m_rct)
			break;
		m_rb = missing;
		m_rct = need_rct;
	}
	/* Pin the existing refcount blocks we will update; loading one drops
	 * the lock, after which the plan must be made again. */
	for (idx = first_idx; idx <= last_idx && idx < p->rct_entries; idx++) {
		uint64_t off = p->rct[idx] & QCOW2_RCT_OFFSET_MASK;
		struct qcow2_meta *b;
		bool cached;

		if (!off)
			continue;
		cached = qcow2_cache_lookup(p, off) != NULL;
		r = qcow2_cache_get(img, off, true, &b);
		if (r < 0)
			goto out;
		r = qcow2_pins_add(&pins, b);
		if (r < 0)
			goto out;
		if (!cached)
			goto retry;
	}
	/* Check that clusters past the end of the file are really free. */
	for (c = s; c < end; c++) {
		idx = c >> p->rb_bits;
		if (idx < p->rct_entries && (p->rct[idx] & QCOW2_RCT_OFFSET_MASK)) {
			struct qcow2_meta *b =
			    qcow2_cache_lookup(p, p->rct[idx] & QCOW2_RCT_OFFSET_MASK);

			if (qcow2_rc_get(p, b->buf, c & mask) != 0) {
				qcow2_err(img,
					  "cluster %#llx past the end of the file has a "
					  "refcount; run 'qemu-img check -r all'",
					  (unsigned long long)(c << p->cluster_bits));
				r = -EIO;
				goto out;
			}
		}
	}
	if (m_rb + m_rct) {
		r = qcow2_prezero(img, s << p->cluster_bits, (m_rb + m_rct) << p->cluster_bits);
		if (r < 0)
			goto out;
	}
	/* Commit (no lock drop from here). */
	if (m_rct) {
		uint64_t entries = m_rct * p->cs / 8;
		uint64_t *nt = calloc(entries, sizeof(*nt));
		uint8_t *nd = calloc(entries * 8 / QCOW2_CHUNK, 1);

		if (!nt || !nd) {
			free(nt);
			free(nd);
			r = -ENOMEM;
			goto out;
		}
		memcpy(nt, p->rct, p->rct_entries * sizeof(*nt));
		r = qcow2_free_later(p, p->rct_offset, (uint64_t)p->rct_clusters * p->cs);
		if (r < 0) {
			free(nt);
			free(nd);
			goto out;
		}
		free(p->rct);
		free(p->rct_dirty);
		p->rct = nt;
		p->rct_dirty = nd;
		p->rct_entries = entries;
		p->rct_offset = (s + m_rb) << p->cluster_bits;
		p->rct_clusters = (uint32_t)m_rct;
		p->rct_moved = true;
	}
	j = s;
	for (idx = first_idx; idx <= last_idx; idx++) {
		struct qcow2_meta *b;

		if (p->rct[idx] & QCOW2_RCT_OFFSET_MASK)
			continue;
		r = qcow2_cache_new(img, j << p->cluster_bits, true, &b);
		if (r == 0)
			r = qcow2_pins_add(&pins, b);
		if (r < 0)
			goto out; /* only on ENOMEM or corruption: tables stay consistent */
		p->rct[idx] = j << p->cluster_bits;
		qcow2_rct_mark(p, idx);
		j++;
	}
	for (c = s; c < end; c++) {
		struct qcow2_meta *b;

		idx = c >> p->rb_bits;
		b = qcow2_cache_lookup(p, p->rct[idx] & QCOW2_RCT_OFFSET_MASK);
		qcow2_rc_set(p, b->buf, c & mask, 1);
		if (c == s || (c & mask) == 0)
			qcow2_cache_dirty(p, b);
	}
	p->next_free = end << p->cluster_bits;
	*host = (s + m_rb + m_rct) << p->cluster_bits;
out:
	qcow2_pins_release(&pins);
	return r;
}

/* Get the L2 table for L1 index l1i, pinned. With alloc, an empty L1 entry
 * gets a new zeroed table; without, *out is NULL for an empty entry.
 * Called with p->lock held; may drop it. */
static int qcow2_get_l2(struct image *img, uint64_t l1i, bool alloc, struct qcow2_meta **out)
{
	struct qcow2_priv *p = img->priv;
	uint64_t off, host;
	int r;

	for (;;) {
		off = p->l1[l1i] & QCOW2_OFFSET_MASK;
		if (off)
			return qcow2_cache_get(img, off, false, out);
		if (!alloc) {
			*out = NULL;
			return 0;
		}
		r = qcow2_alloc_clusters(img, 1, &host);
		if (r < 0)
			return r;
		if (p->l1[l1i] & QCOW2_OFFSET_MASK) {
			/* Another thread linked one while we allocated. */
			r = qcow2_free_now(img, host, p->cs);
			if (r < 0)
				return r;
			continue;
		}
		r = qcow2_prezero(img, host, p->cs);
		if (r < 0) {
			qcow2_free_now(img, host, p->cs);
			return r;
		}
		r = qcow2_cache_new(img, host, false, out);
		if (r < 0)
			return r;
		p->l1[l1i] = host | QCOW2_OFLAG_COPIED;
		qcow2_l1_mark(p, l1i);
		return 0;
	}
}

/* ---- reading ---- */

static int qcow2_probe(const uint8_t *buf, size_t len)
{
	if (len >= 4 && qcow2_get32(buf) == QCOW2_MAGIC)
		return 100;
	return 0;
}

/* Classify one L2 entry of guest cluster gc; DATA entries are checked
 * against the file. Returns the type, or -EIO after logging. */
static int qcow2_classify(struct image *img, uint64_t gc, uint64_t entry, uint64_t *host, bool log)
{
	struct qcow2_priv *p = img->priv;
	uint64_t off, need, gstart;

	if (entry & QCOW2_OFLAG_COMPRESSED) {
		*host = entry;
		return EXT_COMPRESSED;
	}
	if (entry & QCOW2_OFLAG_ZERO) {
		*host = 0;
		return EXT_ZERO;
	}
	off = entry & QCOW2_OFFSET_MASK;
	if (!off) {
		*host = 0;
		return EXT_UNALLOC;
	}
	gstart = gc << p->cluster_bits;
	need = SFS_MIN((uint64_t)p->cs, img->size - gstart);
	if (off & (p->cs - 1)) {
		if (log)
			qcow2_err(
			    img, "L2 entry for guest offset %#llx points to unaligned offset %#llx",
			    (unsigned long long)gstart, (unsigned long long)off);
		return -EIO;
	}
	if (off + need > fetch_size(img->file)) {
		qcow2_err(img,
			  "L2 entry for guest offset %#llx points past the end of the file "
			  "(%#llx)",
			  (unsigned long long)gstart, (unsigned long long)off);
		return -EIO;
	}
	*host = off;
	return EXT_DATA;
}

static int qcow2_map(struct image *img, uint64_t off, uint64_t len, struct extent *ext)
{
	struct qcow2_priv *p = img->priv;
	uint64_t pos = off, end = off + len, acc = 0, next_host = 0;
	uint32_t table_bits = p->cluster_bits + p->l2_bits;
	int type = -1, r = 0;

	pthread_mutex_lock(&p->lock);
	while (pos < end) {
		uint64_t l1i = pos >> table_bits;
		uint64_t tend = SFS_MIN(end, (l1i + 1) << table_bits);
		struct qcow2_meta *t;

		if (l1i >= p->l1_size) {
			r = -EIO; /* cannot happen: open checked l1_size against the size */
			break;
		}
		r = qcow2_get_l2(img, l1i, false, &t);
		if (r < 0) {
			if (type >= 0)
				r = 0; /* the run so far stands; the error comes on the next call */
			break;
		}
		if (!t) {
			if (type >= 0 && type != EXT_UNALLOC)
				goto done;
			type = EXT_UNALLOC;
			acc += tend - pos;
			pos = tend;
			continue;
		}
		while (pos < tend) {
			uint64_t gc = pos >> p->cluster_bits;
			uint64_t i = gc & ((1ULL << p->l2_bits) - 1);
			uint64_t chunk = SFS_MIN(tend, (gc + 1) << p->cluster_bits) - pos;
			uint64_t host;
			int t_type =
			    qcow2_classify(img, gc, qcow2_get64(t->buf + 8 * i), &host, type < 0);

			if (t_type < 0) {
				if (type < 0)
					r = t_type; /* fail this cluster only; a run before it
						       stands */
				qcow2_cache_put(t);
				goto done;
			}
			if (type < 0) {
				type = t_type;
				ext->host_off =
				    t_type == EXT_COMPRESSED ? host : host + (pos & (p->cs - 1));
				next_host = host + p->cs;
			} else if (t_type != type || type == EXT_COMPRESSED ||
				   (type == EXT_DATA && host != next_host)) {
				qcow2_cache_put(t);
				goto done;
			} else {
				next_host += p->cs;
			}
			acc += chunk;
			pos += chunk;
		}
		qcow2_cache_put(t);
	}
done:
	pthread_mutex_unlock(&p->lock);
	if (r < 0)
		return r;
	ext->type = (enum extent_type)type;
	ext->len = acc;
	if (type != EXT_DATA && type != EXT_COMPRESSED)
		ext->host_off = 0;
	return 0;
}

static int qcow2_read_compressed(struct image *img, uint64_t off, const struct extent *ext,
				 void *buf, size_t len)
{
	struct qcow2_priv *p = img->priv;
	uint64_t coff, csize, fsize = fetch_size(img->file);
	uint64_t skip = off & (p->cs - 1), consumed = 0;
	uint8_t *in = NULL, *scratch = NULL;
	z_stream z;
	int r = 0, zr;

	if (ext->type != EXT_COMPRESSED || !(ext->host_off & QCOW2_OFLAG_COMPRESSED) ||
	    skip + len > p->cs)
		return -EINVAL;
	qcow2_compressed_range(p, ext->host_off, &coff, &csize);
	if (coff >= fsize) {
		qcow2_err(img,
			  "compressed cluster for guest offset %#llx starts past the end of "
			  "the file (%#llx)",
			  (unsigned long long)off, (unsigned long long)coff);
		return -EIO;
	}
	csize = SFS_MIN(csize, fsize - coff);
	in = malloc(QCOW2_ZBUF);
	scratch = skip ? malloc(QCOW2_ZBUF) : NULL;
	if (!in || (skip && !scratch)) {
		free(in);
		free(scratch);
		return -ENOMEM;
	}
	memset(&z, 0, sizeof(z));
	if (inflateInit2(&z, -12) != Z_OK) {
		free(in);
		free(scratch);
		return -ENOMEM;
	}
	/* Inflate the prefix we do not want into scratch, then the rest into buf. */
	while (skip > 0 || len > 0) {
		if (skip > 0) {
			z.next_out = scratch;
			z.avail_out = (uInt)SFS_MIN(skip, (uint64_t)QCOW2_ZBUF);
		} else {
			z.next_out = buf;
			z.avail_out = (uInt)len;
		}
		uInt before = z.avail_out;

		if (z.avail_in == 0 && consumed < csize) {
			size_t n = (size_t)SFS_MIN(csize - consumed, (uint64_t)QCOW2_ZBUF);

			r = fetch_pread(img->file, in, n, coff + consumed);
			if (r < 0)
				break;
			consumed += n;
			z.next_in = in;
			z.avail_in = (uInt)n;
		}
		zr = inflate(&z, Z_NO_FLUSH);
		uInt produced = before - z.avail_out;

		if (skip > 0) {
			skip -= produced;
		} else {
			buf = (uint8_t *)buf + produced;
			len -= produced;
		}
		if (skip == 0 && len == 0)
			break; /* output full: Z_OK, Z_STREAM_END or Z_BUF_ERROR all fine */
		if (zr == Z_STREAM_END || (zr != Z_OK && zr != Z_BUF_ERROR) ||
		    (produced == 0 && z.avail_in == 0 && consumed >= csize)) {
			qcow2_err(img, "compressed cluster for guest offset %#llx is corrupt (%s)",
				  (unsigned long long)off,
				  zr == Z_STREAM_END ? "too short"
				  : z.msg	     ? z.msg
						     : "truncated");
			r = -EIO;
			break;
		}
	}
	inflateEnd(&z);
	free(in);
	free(scratch);
	return r;
}

/* ---- open / close ---- */

static void qcow2_free_tables(struct qcow2_priv *p)
{
	if (p->hash) {
		for (size_t i = 0; i < p->hash_size; i++) {
			struct qcow2_meta *e = p->hash[i];

			while (e) {
				struct qcow2_meta *n = e->hnext;

				free(e->buf);
				free(e);
				e = n;
			}
		}
	}
	free(p->hash);
	free(p->l1);
	free(p->l1_dirty);
	free(p->rct);
	free(p->rct_dirty);
	free(p->frees);
}

static void qcow2_close(struct image *img)
{
	struct qcow2_priv *p = img->priv;

	if (!p)
		return;
	if (p->n_dirty || p->rct_moved)
		qcow2_err(img, "closing with unflushed metadata; the image may leak clusters");
	qcow2_free_tables(p);
	if (p->locks_init) {
		pthread_mutex_destroy(&p->lock);
		pthread_mutex_destroy(&p->flush_lock);
	}
	memset(p, 0, sizeof(*p)); /* img->priv itself belongs to the image layer */
}

/* Parsed header extensions. */
struct qcow2_exts {
	const uint8_t *features; /* feature name table, or NULL */
	uint32_t features_len;
	bool data_file;
	uint32_t end; /* first byte after the end-of-extensions marker */
};

static int qcow2_parse_exts(struct image *img, const uint8_t *hdr, uint32_t avail, uint32_t start,
			    uint32_t limit, struct qcow2_exts *x)
{
	uint32_t pos = start;

	memset(x, 0, sizeof(*x));
	while (pos + 8 <= limit) {
		uint32_t type = pos + 8 <= avail ? qcow2_get32(hdr + pos) : 0;
		uint32_t len = pos + 8 <= avail ? qcow2_get32(hdr + pos + 4) : 0;
		uint64_t next;

		if (type == QCOW2_EXT_END) {
			x->end = pos + 8;
			return 0;
		}
		next = (uint64_t)pos + 8 + SFS_ALIGN_UP((uint64_t)len, 8);
		if ((uint64_t)pos + 8 + len > limit || (uint64_t)pos + 8 + len > avail) {
			qcow2_err(img,
				  "header extension %#x at offset %u (length %u) overflows the "
				  "header area",
				  type, pos, len);
			return -EINVAL;
		}
		switch (type) {
		case QCOW2_EXT_BACKING_FMT: {
			if (len > QCOW2_MAX_BACKING_FMT || memchr(hdr + pos + 8, 0, len)) {
				qcow2_err(img, "invalid backing format extension (length %u)", len);
				return -EINVAL;
			}
			free(img->backing_fmt);
			img->backing_fmt = strndup((const char *)hdr + pos + 8, len);
			if (!img->backing_fmt)
				return -ENOMEM;
			break;
		}
		case QCOW2_EXT_FEATURES:
			x->features = hdr + pos + 8;
			x->features_len = len;
			break;
		case QCOW2_EXT_DATA_FILE:
			x->data_file = true;
			break;
		default: /* bitmaps, crypto header, unknown: ignored on read */
			break;
		}
		pos = (uint32_t)SFS_MIN(next, (uint64_t)limit);
	}
	x->end = pos; /* no end marker: the area ends at the limit */
	return 0;
}

/* Name of incompatible feature bit 'bit' from the image's own table. */
static void qcow2_feature_name(const struct qcow2_exts *x, uint32_t bit, char *out, size_t outlen)
{
	out[0] = 0;
	for (uint32_t i = 0; x->features && i + QCOW2_FEATURE_ENTRY_BYTES <= x->features_len;
	     i += QCOW2_FEATURE_ENTRY_BYTES) {
		const uint8_t *e = x->features + i;

		if (e[0] == 0 && e[1] == bit) {
			size_t n = strnlen((const char *)e + 2, QCOW2_FEATURE_ENTRY_BYTES - 2);

			n = SFS_MIN(n, outlen - 1);
			for (size_t k = 0; k < n; k++)
				out[k] =
				    (e[2 + k] >= 0x20 && e[2 + k] < 0x7f) ? (char)e[2 + k] : '?';
			out[n] = 0;
			return;
		}
	}
}

static int qcow2_check_features(struct image *img, uint64_t incompat, uint32_t compression,
				const struct qcow2_exts *x)
{
	char name[64];

	if ((incompat & QCOW2_INCOMPAT_DATA_FILE) || x->data_file) {
		qcow2_err(img, "external data file images are not supported");
		return -ENOTSUP;
	}
	if (incompat & QCOW2_INCOMPAT_EXTL2) {
		qcow2_err(img, "extended L2 entries (subclusters) are not supported");
		return -ENOTSUP;
	}
	if (incompat & QCOW2_INCOMPAT_COMPRESSION) {
		qcow2_err(img, "compression type %u (%s) is not supported, only zlib", compression,
			  compression == 1 ? "zstd" : "unknown");
		return -ENOTSUP;
	}
	if (compression != 0) {
		qcow2_err(img, "compression type %u set without its incompatible feature bit",
			  compression);
		return -EINVAL;
	}
	for (uint32_t bit = 0; bit < 64; bit++) {
		if (!(incompat & (1ULL << bit)) || ((1ULL << bit) & QCOW2_INCOMPAT_KNOWN))
			continue;
		qcow2_feature_name(x, bit, name, sizeof(name));
		qcow2_err(img, "unknown incompatible feature bit %u%s%s%s is set; not supported",
			  bit, name[0] ? " (" : "", name, name[0] ? ")" : "");
		return -ENOTSUP;
	}
	if ((incompat & QCOW2_INCOMPAT_DIRTY) && !img->read_only) {
		qcow2_err(img,
			  "image is dirty (refcounts may be inaccurate after a crash with lazy "
			  "refcounts); run 'qemu-img check -r all %s' before writing to it",
			  qcow2_name(img));
		return -ENOTSUP;
	}
	if ((incompat & QCOW2_INCOMPAT_CORRUPT) && !img->read_only) {
		qcow2_err(img,
			  "image is marked corrupt; it can only be opened read-only (run "
			  "'qemu-img check -r all %s' to repair it)",
			  qcow2_name(img));
		return -ENOTSUP;
	}
	return 0;
}

/* Validate a table at [off, off+bytes) against the file. */
static int qcow2_check_table(struct image *img, const char *what, uint64_t off, uint64_t bytes,
			     bool whole)
{
	struct qcow2_priv *p = img->priv;
	uint64_t end, fsize = fetch_size(img->file);

	if (off & (p->cs - 1)) {
		qcow2_err(img, "%s offset %#llx is not cluster aligned", what,
			  (unsigned long long)off);
		return -EINVAL;
	}
	if (off < p->cs) {
		qcow2_err(img, "%s offset %#llx overlaps the header cluster", what,
			  (unsigned long long)off);
		return -EINVAL;
	}
	if (!sfs_add_ok(off, bytes, &end) || (whole ? end > fsize : off >= fsize)) {
		qcow2_err(img, "%s (offset %#llx, %llu bytes) is past the end of the file", what,
			  (unsigned long long)off, (unsigned long long)bytes);
		return -EINVAL;
	}
	return 0;
}

static int qcow2_init_cache(struct qcow2_priv *p, bool writable)
{
	size_t budget = writable ? QCOW2_CACHE_RW : QCOW2_CACHE_RO;

	pthread_mutexattr_t attr;

	pthread_mutexattr_init(&attr);
#ifndef NDEBUG
	pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ERRORCHECK);
#endif
	if (pthread_mutex_init(&p->lock, &attr)) {
		pthread_mutexattr_destroy(&attr);
		return -ENOMEM;
	}
	if (pthread_mutex_init(&p->flush_lock, &attr)) {
		pthread_mutex_destroy(&p->lock);
		pthread_mutexattr_destroy(&attr);
		return -ENOMEM;
	}
	pthread_mutexattr_destroy(&attr);
	p->locks_init = true;
	/* Count the per-entry bookkeeping too: it matters with 512 B clusters. */
	p->max_meta = SFS_MAX(budget / (p->cs + QCOW2_CACHE_OVERHEAD), (size_t)QCOW2_CACHE_MIN);
	p->hash_size = 64;
	while (p->hash_size < p->max_meta * 2)
		p->hash_size *= 2;
	p->hash = calloc(p->hash_size, sizeof(*p->hash));
	if (!p->hash)
		return -ENOMEM;
	p->lru.prev = p->lru.next = &p->lru;
	p->dirty.prev = p->dirty.next = &p->dirty;
	return 0;
}

/* Read and check the header and tables. Called from qcow2_open only. */
/* Set bit c of bm; return its old value. */
static bool qcow2_bit_test_set(uint64_t *bm, uint64_t c)
{
	bool was = bm[c / 64] & (1ULL << (c % 64));

	bm[c / 64] |= 1ULL << (c % 64);
	return was;
}

/* Mark host clusters [off, off+len) as referenced; true if one already was.
 * Clusters past the end of the file (nclusters) are not tracked. */
static bool qcow2_mark_range(const struct qcow2_priv *p, uint64_t *bm, uint64_t nclusters,
			     uint64_t off, uint64_t len)
{
	uint64_t end = SFS_MIN(SFS_DIV_ROUND_UP(off + len, p->cs), nclusters);
	bool dup = false;

	for (uint64_t c = off >> p->cluster_bits; c < end; c++)
		dup |= qcow2_bit_test_set(bm, c);
	return dup;
}

/* Before we write to an image, prove that no host cluster is referenced
 * twice: a guest cluster mapped onto the header, the L1 or refcount table, a
 * refcount block, an L2 table or another guest cluster would have our
 * in-place writes corrupt metadata or other guest data (QEMU guards this
 * with its overlap checks on every write; we check once, at open, since
 * every cluster we allocate afterwards comes from past the end of the file
 * and is verified free). Also refuses L2 tables, refcount blocks and data
 * clusters past the end of the file, which our own allocations would
 * otherwise land on once the file grows. Compressed clusters may share host
 * clusters and are never written in place, so only their bounds are
 * checked. Costs one read of every L2 table. */
static int qcow2_check_refs(struct image *img, uint64_t fsize, uint64_t rct_bytes)
{
	struct qcow2_priv *p = img->priv;
	uint64_t nclusters = SFS_DIV_ROUND_UP(fsize, p->cs), bad = 0;
	uint64_t *bm = calloc(nclusters / 64 + 1, sizeof(uint64_t));
	uint8_t *l2 = malloc(p->cs);
	int r = 0;

	if (!bm || !l2) {
		r = -ENOMEM;
		goto out;
	}
#define QCOW2_REF_BAD(...)                                                                         \
	do {                                                                                       \
		if (bad++ < 8)                                                                     \
			qcow2_err(img, __VA_ARGS__);                                               \
	} while (0)
	qcow2_mark_range(p, bm, nclusters, 0, p->cs);
	if (qcow2_mark_range(p, bm, nclusters, p->l1_offset, (uint64_t)p->l1_size * 8))
		QCOW2_REF_BAD("L1 table overlaps other metadata");
	if (qcow2_mark_range(p, bm, nclusters, p->rct_offset, rct_bytes))
		QCOW2_REF_BAD("refcount table overlaps other metadata");
	for (uint64_t i = 0; i < p->rct_entries; i++) {
		uint64_t off = p->rct[i] & QCOW2_RCT_OFFSET_MASK;

		if (!off)
			continue;
		if (off + p->cs > fsize)
			QCOW2_REF_BAD("refcount block %llu at %#llx is past the end of the file",
				      (unsigned long long)i, (unsigned long long)off);
		else if (qcow2_mark_range(p, bm, nclusters, off, p->cs))
			QCOW2_REF_BAD("refcount block %llu at %#llx overlaps other metadata",
				      (unsigned long long)i, (unsigned long long)off);
	}
	for (uint64_t i = 0; i < p->l1_size; i++) {
		uint64_t t = p->l1[i] & QCOW2_OFFSET_MASK;

		if (!t)
			continue;
		if ((t & (p->cs - 1)) || t + p->cs > fsize) {
			QCOW2_REF_BAD(
			    "L2 table %llu at %#llx is unaligned or past the end of the file",
			    (unsigned long long)i, (unsigned long long)t);
			continue;
		}
		if (qcow2_mark_range(p, bm, nclusters, t, p->cs)) {
			QCOW2_REF_BAD("L2 table %llu at %#llx overlaps other metadata",
				      (unsigned long long)i, (unsigned long long)t);
			continue;
		}
		r = fetch_pread(img->file, l2, p->cs, t);
		if (r < 0)
			goto out;
		for (uint64_t j = 0; j < (1ULL << p->l2_bits); j++) {
			uint64_t e = qcow2_get64(l2 + 8 * j), off;
			uint64_t g = ((i << p->l2_bits) + j) << p->cluster_bits;

			/* Compressed data is read with bounds checks and never
			 * written in place; QEMU lets its sector count run past
			 * the end of the file. */
			if (e & QCOW2_OFLAG_COMPRESSED)
				continue;
			off = e & QCOW2_OFFSET_MASK;
			if (!off || g >= img->size)
				continue;
			/* Unaligned entries fail their reads (see classify). */
			if (off & (p->cs - 1))
				continue;
			if (off + SFS_MIN((uint64_t)p->cs, img->size - g) > fsize)
				QCOW2_REF_BAD("L2 entry for guest offset %#llx points past the end "
					      "of the file (%#llx)",
					      (unsigned long long)g, (unsigned long long)off);
			else if (qcow2_mark_range(p, bm, nclusters, off, p->cs))
				QCOW2_REF_BAD("guest offset %#llx is mapped to host cluster %#llx, "
					      "which is already in use",
					      (unsigned long long)g, (unsigned long long)off);
		}
	}
#undef QCOW2_REF_BAD
	if (bad) {
		qcow2_err(img,
			  "%llu overlapping or out-of-file references: the image is corrupt; "
			  "it can be opened read-only (-o ro), or repaired with 'qemu-img check "
			  "-r all' if QEMU can",
			  (unsigned long long)bad);
		r = -EINVAL;
	}
out:
	free(bm);
	free(l2);
	return r;
}

static int qcow2_do_open(struct image *img, struct qcow2_priv *p)
{
	uint8_t fixed[QCOW2_V3_HEADER_BYTES + 8] = {0};
	uint8_t *hdr = NULL;
	uint64_t fsize = fetch_size(img->file), size, bfoff, incompat = 0, autoclear = 0;
	uint64_t l2_cover, need_l1, rct_bytes;
	uint32_t bfsize, crypt, avail, limit, compression = 0;
	struct qcow2_exts x;
	int r;

	if (fsize < QCOW2_V2_HEADER_BYTES) {
		qcow2_err(img, "file too short for a qcow2 header (%llu bytes)",
			  (unsigned long long)fsize);
		return -EINVAL;
	}
	r = fetch_pread(img->file, fixed, (size_t)SFS_MIN((uint64_t)sizeof(fixed), fsize), 0);
	if (r < 0)
		return r;
	if (qcow2_get32(fixed) != QCOW2_MAGIC) {
		qcow2_err(img, "bad magic (not a qcow2 image)");
		return -EINVAL;
	}
	p->version = qcow2_get32(fixed + 4);
	if (p->version != 2 && p->version != 3) {
		qcow2_err(img, "unsupported version %u (only 2 and 3)", p->version);
		return -ENOTSUP;
	}
	bfoff = qcow2_get64(fixed + 8);
	bfsize = qcow2_get32(fixed + 16);
	p->cluster_bits = qcow2_get32(fixed + 20);
	size = qcow2_get64(fixed + 24);
	crypt = qcow2_get32(fixed + 32);
	p->l1_size = qcow2_get32(fixed + 36);
	p->l1_offset = qcow2_get64(fixed + 40);
	p->rct_offset = qcow2_get64(fixed + 48);
	p->rct_clusters = qcow2_get32(fixed + 56);
	p->nb_snapshots = qcow2_get32(fixed + 60);
	if (p->cluster_bits < QCOW2_MIN_CLUSTER_BITS || p->cluster_bits > QCOW2_MAX_CLUSTER_BITS) {
		qcow2_err(img, "cluster_bits %u out of the supported range %d..%d", p->cluster_bits,
			  QCOW2_MIN_CLUSTER_BITS, QCOW2_MAX_CLUSTER_BITS);
		return p->cluster_bits < QCOW2_MIN_CLUSTER_BITS ? -EINVAL : -ENOTSUP;
	}
	p->cs = 1u << p->cluster_bits;
	p->l2_bits = p->cluster_bits - 3;
	if (p->version == 2) {
		p->header_length = QCOW2_V2_HEADER_BYTES;
		p->refcount_order = 4;
	} else {
		if (fsize < QCOW2_V3_HEADER_BYTES) {
			qcow2_err(img, "file too short for a version 3 header");
			return -EINVAL;
		}
		incompat = qcow2_get64(fixed + 72);
		autoclear = qcow2_get64(fixed + 88);
		p->refcount_order = qcow2_get32(fixed + 96);
		p->header_length = qcow2_get32(fixed + 100);
		if (p->header_length < QCOW2_V3_HEADER_BYTES || p->header_length % 8 ||
		    p->header_length > p->cs || p->header_length > fsize) {
			qcow2_err(img, "invalid header_length %u", p->header_length);
			return -EINVAL;
		}
		if (p->header_length > QCOW2_V3_HEADER_BYTES)
			compression = fixed[104];
	}
	if (p->refcount_order > QCOW2_MAX_REFCOUNT_ORDER) {
		qcow2_err(img, "invalid refcount_order %u (maximum %d)", p->refcount_order,
			  QCOW2_MAX_REFCOUNT_ORDER);
		return -EINVAL;
	}
	p->rb_bits = p->cluster_bits + 3 - p->refcount_order;
	p->csize_shift = 62 - (p->cluster_bits - 8);
	p->csize_mask = (1ULL << (p->cluster_bits - 8)) - 1;
	p->coff_mask = (1ULL << p->csize_shift) - 1;

	/* Header cluster: extensions and backing name. */
	avail = (uint32_t)SFS_MIN((uint64_t)p->cs, fsize);
	hdr = malloc(p->cs);
	if (!hdr)
		return -ENOMEM;
	r = fetch_pread(img->file, hdr, avail, 0);
	if (r < 0)
		goto out;
	/* Extensions end where the backing name starts (old v2 images put the
	 * name right after the header, with no extension area at all). */
	limit = p->cs;
	if (bfoff && bfoff < limit)
		limit = (uint32_t)bfoff;
	r = qcow2_parse_exts(img, hdr, avail, p->header_length, limit, &x);
	if (r < 0)
		goto out;
	r = qcow2_check_features(img, incompat, compression, &x);
	if (r < 0)
		goto out;
	if (crypt != 0) {
		qcow2_err(img, "encrypted images (crypt_method %u, %s) are not supported", crypt,
			  crypt == 1   ? "AES"
			  : crypt == 2 ? "LUKS"
				       : "unknown");
		r = -ENOTSUP;
		goto out;
	}
	if (bfoff && bfsize) {
		uint64_t bend;

		if (bfsize > QCOW2_MAX_BACKING_NAME || !sfs_add_ok(bfoff, bfsize, &bend) ||
		    bend > p->cs || bend > avail || bfoff < p->header_length) {
			qcow2_err(img, "invalid backing file name (offset %llu, length %u)",
				  (unsigned long long)bfoff, bfsize);
			r = -EINVAL;
			goto out;
		}
		if (memchr(hdr + bfoff, 0, bfsize)) {
			qcow2_err(img, "backing file name contains a NUL byte");
			r = -EINVAL;
			goto out;
		}
		img->backing_name = strndup((const char *)hdr + bfoff, bfsize);
		if (!img->backing_name) {
			r = -ENOMEM;
			goto out;
		}
	} else {
		free(img->backing_fmt); /* a format without a name means nothing */
		img->backing_fmt = NULL;
	}

	/* L1 table: big enough for the virtual size, inside the file. */
	l2_cover = 1ULL << (p->cluster_bits + p->l2_bits); /* guest bytes per L2 table */
	need_l1 = size / l2_cover + (size % l2_cover != 0);
	if ((uint64_t)p->l1_size * 8 > QCOW2_MAX_L1_BYTES || need_l1 > p->l1_size) {
		qcow2_err(img, "L1 table size %u does not fit the virtual size %llu", p->l1_size,
			  (unsigned long long)size);
		r = -EINVAL;
		goto out;
	}
	if (p->l1_size) {
		r = qcow2_check_table(img, "L1 table", p->l1_offset, (uint64_t)p->l1_size * 8,
				      true);
		if (r < 0)
			goto out;
	}
	/* Refcount table. */
	if (p->rct_clusters == 0 || (uint64_t)p->rct_clusters * p->cs > QCOW2_MAX_RCT_BYTES) {
		qcow2_err(img, "invalid refcount table size (%u clusters)", p->rct_clusters);
		r = -EINVAL;
		goto out;
	}
	rct_bytes = (uint64_t)p->rct_clusters * p->cs;
	r = qcow2_check_table(img, "refcount table", p->rct_offset, rct_bytes, false);
	if (r < 0)
		goto out;
	if (p->l1_size && p->l1_offset < p->rct_offset + rct_bytes &&
	    p->rct_offset < p->l1_offset + (uint64_t)p->l1_size * 8) {
		qcow2_err(img, "L1 table and refcount table overlap");
		r = -EINVAL;
		goto out;
	}
	if (!img->read_only && p->nb_snapshots) {
		qcow2_err(img,
			  "image has %llu internal snapshot(s); writing to images with "
			  "snapshots is not supported (delete them with 'qemu-img snapshot -d')",
			  (unsigned long long)p->nb_snapshots);
		r = -ENOTSUP;
		goto out;
	}

	img->size = size;
	img->cluster_size = p->cs;
	r = qcow2_init_cache(p, !img->read_only);
	if (r < 0)
		goto out;
	p->l1 = calloc(SFS_MAX(p->l1_size, 1u), sizeof(*p->l1));
	p->l1_dirty = calloc(SFS_DIV_ROUND_UP((uint64_t)p->l1_size * 8, QCOW2_CHUNK) + 1, 1);
	if (!p->l1 || !p->l1_dirty) {
		r = -ENOMEM;
		goto out;
	}
	if (p->l1_size) {
		r = fetch_pread(img->file, p->l1, (size_t)p->l1_size * 8, p->l1_offset);
		if (r < 0)
			goto out;
		for (uint32_t i = 0; i < p->l1_size; i++)
			p->l1[i] = be64toh(p->l1[i]);
	}
	if (img->read_only)
		goto out;

	/* Writable: load the refcount table, clear autoclear bits. */
	p->rct_entries = rct_bytes / 8;
	p->rct = malloc(rct_bytes);
	p->rct_dirty = calloc(rct_bytes / QCOW2_CHUNK, 1);
	if (!p->rct || !p->rct_dirty) {
		r = -ENOMEM;
		goto out;
	}
	r = qcow2_read_meta(img, p->rct_offset, p->rct, rct_bytes);
	if (r < 0)
		goto out;
	for (uint64_t i = 0; i < p->rct_entries; i++) {
		p->rct[i] = be64toh(p->rct[i]);
		if (p->rct[i] & (p->cs - 1)) {
			qcow2_err(img, "refcount table entry %llu (%#llx) is not cluster aligned",
				  (unsigned long long)i, (unsigned long long)p->rct[i]);
			r = -EINVAL;
			goto out;
		}
	}
	r = qcow2_check_refs(img, fsize, rct_bytes);
	if (r < 0)
		goto out;
	if (autoclear) {
		uint8_t zero[8] = {0};

		/* We maintain none of them (bitmaps): clear them as QEMU does. */
		r = fetch_pwrite(img->file, zero, sizeof(zero), QCOW2_HDR_AUTOCLEAR);
		if (r == 0)
			r = fetch_flush(img->file);
		if (r < 0) {
			qcow2_err(img, "cannot clear autoclear feature bits: %s", strerror(-r));
			goto out;
		}
	}
	p->next_free = SFS_ALIGN_UP(fetch_size(img->file), p->cs);
out:
	free(hdr);
	return r;
}

static int qcow2_open(struct image *img)
{
	struct qcow2_priv *p = img->priv;
	int r;

	memset(p, 0, sizeof(*p));
	r = qcow2_do_open(img, p);
	if (r < 0) {
		if (p->locks_init) {
			pthread_mutex_destroy(&p->lock);
			pthread_mutex_destroy(&p->flush_lock);
		}
		qcow2_free_tables(p);
		memset(p, 0, sizeof(*p));
		free(img->backing_name);
		free(img->backing_fmt);
		img->backing_name = img->backing_fmt = NULL;
	}
	return r;
}

/* ---- writing ---- */

/* Flush when dirty tables take more than half the cache budget. */
static bool qcow2_flush_needed(struct qcow2_priv *p)
{
	return p->n_dirty * 2 > p->max_meta;
}

static int qcow2_flush(struct image *img);

/* Set the L2 entries of whole clusters [off, off+len) to host + i*cs (or to
 * 'entry' for every cluster when host is 0: zero clusters).
 * Called with p->lock held; may drop it. */
static int qcow2_update_l2(struct image *img, uint64_t off, uint64_t len, uint64_t host, bool zero)
{
	struct qcow2_priv *p = img->priv;
	uint32_t table_bits = p->cluster_bits + p->l2_bits;
	uint64_t pos = off, end = off + len;
	int r = 0;

	while (pos < end) {
		uint64_t l1i = pos >> table_bits;
		uint64_t tend = SFS_MIN(end, (l1i + 1) << table_bits);
		struct qcow2_meta *t;

		r = qcow2_get_l2(img, l1i, true, &t);
		if (r < 0)
			return r;
		for (; pos < tend; pos += p->cs) {
			uint64_t i = (pos >> p->cluster_bits) & ((1ULL << p->l2_bits) - 1);
			uint64_t old = qcow2_get64(t->buf + 8 * i), new;

			if (!zero) {
				new = (host + (pos - off)) | QCOW2_OFLAG_COPIED;
				if (old & (QCOW2_OFLAG_COMPRESSED | QCOW2_OFFSET_MASK))
					r = qcow2_release_entry(img, old);
			} else if (old & QCOW2_OFLAG_COMPRESSED) {
				new = QCOW2_OFLAG_ZERO;
				r = qcow2_release_entry(img, old);
			} else {
				/* Keep a data cluster as preallocation: readers may
				 * still be reading it without a lock. */
				new = old | QCOW2_OFLAG_ZERO;
			}
			if (r < 0)
				break;
			qcow2_put64(t->buf + 8 * i, new);
		}
		qcow2_cache_dirty(p, t);
		qcow2_cache_put(t);
		if (r < 0)
			return r;
	}
	return 0;
}

/* Make sure the L2 tables covering guest [off, off+len) exist (tables are
 * never freed), so that the update after the data write cannot fail for
 * lack of space, leaking the data clusters. Called with p->lock held. */
static int qcow2_ensure_l2(struct image *img, uint64_t off, uint64_t len)
{
	struct qcow2_priv *p = img->priv;
	uint32_t table_bits = p->cluster_bits + p->l2_bits;
	int r = 0;

	if (len == 0)
		return 0;
	for (uint64_t l1i = off >> table_bits; r == 0 && l1i <= (off + len - 1) >> table_bits;
	     l1i++) {
		struct qcow2_meta *t;

		r = qcow2_get_l2(img, l1i, true, &t);
		if (r == 0)
			qcow2_cache_put(t);
	}
	return r;
}

static int qcow2_check_write(struct image *img, uint64_t off, uint64_t len)
{
	struct qcow2_priv *p = img->priv;
	uint64_t end;

	if (img->read_only)
		return -EROFS;
	if ((off | len) & (p->cs - 1) || len == 0 || !sfs_add_ok(off, len, &end) ||
	    end > SFS_ALIGN_UP(img->size, p->cs))
		return -EINVAL;
	return 0;
}

static int qcow2_alloc_write(struct image *img, uint64_t off, const void *buf, size_t len)
{
	struct qcow2_priv *p = img->priv;
	uint64_t host;
	bool flush;
	int r;

	r = qcow2_check_write(img, off, len);
	if (r < 0)
		return r;
	pthread_mutex_lock(&p->lock);
	r = qcow2_ensure_l2(img, off, len);
	if (r == 0)
		r = qcow2_alloc_clusters(img, len >> p->cluster_bits, &host);
	pthread_mutex_unlock(&p->lock);
	if (r < 0)
		return r;

	r = fetch_pwrite(img->file, buf, len, host);

	pthread_mutex_lock(&p->lock);
	if (r < 0) {
		qcow2_err(img, "writing %zu bytes at %#llx: %s", len, (unsigned long long)host,
			  strerror(-r));
		qcow2_free_now(img, host, len); /* nothing references them */
	} else {
		r = qcow2_update_l2(img, off, len, host, false);
	}
	flush = qcow2_flush_needed(p);
	pthread_mutex_unlock(&p->lock);
	if (r == 0 && flush)
		r = qcow2_flush(img);
	return r;
}

static int qcow2_zero_clusters(struct image *img, uint64_t off, uint64_t len)
{
	struct qcow2_priv *p = img->priv;
	bool flush;
	int r;

	r = qcow2_check_write(img, off, len);
	if (r < 0)
		return r;
	if (p->version < 3)
		return -ENOTSUP;
	pthread_mutex_lock(&p->lock);
	r = qcow2_update_l2(img, off, len, 0, true);
	flush = qcow2_flush_needed(p);
	pthread_mutex_unlock(&p->lock);
	if (r == 0 && flush)
		r = qcow2_flush(img);
	return r;
}

/* One table write of a flush. */
struct qcow2_wb {
	uint64_t off;
	uint8_t *data;
	size_t len;
	struct qcow2_meta *e; /* cache entry, or NULL for L1/refcount table chunks */
	uint64_t gen;
};

struct qcow2_wbs {
	struct qcow2_wb *v;
	size_t n, cap;
};

static int qcow2_wbs_add(struct qcow2_wbs *w, uint64_t off, const void *src, size_t len,
			 struct qcow2_meta *e)
{
	uint8_t *d;

	if (w->n == w->cap) {
		size_t cap = w->cap ? w->cap * 2 : 16;
		struct qcow2_wb *n = realloc(w->v, cap * sizeof(*n));

		if (!n)
			return -ENOMEM;
		w->v = n;
		w->cap = cap;
	}
	d = malloc(len);
	if (!d)
		return -ENOMEM;
	memcpy(d, src, len);
	w->v[w->n] = (struct qcow2_wb){off, d, len, e, e ? e->mod_gen : 0};
	w->n++;
	return 0;
}

static void qcow2_wbs_free(struct qcow2_wbs *w)
{
	for (size_t i = 0; i < w->n; i++)
		free(w->v[i].data);
	free(w->v);
	memset(w, 0, sizeof(*w));
}

static int qcow2_wbs_write(struct image *img, struct qcow2_wbs *w)
{
	for (size_t i = 0; i < w->n; i++) {
		int r = fetch_pwrite(img->file, w->v[i].data, w->v[i].len, w->v[i].off);

		if (r < 0) {
			qcow2_err(img, "writing metadata at %#llx: %s",
				  (unsigned long long)w->v[i].off, strerror(-r));
			return r;
		}
	}
	return 0;
}

/* Snapshot the dirty chunks of a CPU-endian table into big-endian writes,
 * merging runs of adjacent chunks. Called with p->lock held. */
static int qcow2_snap_table(struct qcow2_wbs *w, const uint64_t *table, uint64_t entries,
			    uint8_t *dirty, bool all, uint64_t table_off)
{
	uint64_t nchunks = SFS_DIV_ROUND_UP(entries * 8, QCOW2_CHUNK);
	uint64_t per = QCOW2_CHUNK / 8;

	for (uint64_t c = 0; c < nchunks;) {
		uint64_t c2, first, last;
		uint64_t *tmp;
		int r;

		if (!all && !dirty[c]) {
			c++;
			continue;
		}
		for (c2 = c; c2 < nchunks && (all || dirty[c2]); c2++)
			dirty[c2] = 0;
		first = c * per;
		last = SFS_MIN(c2 * per, entries);
		tmp = malloc((last - first) * 8);
		if (!tmp)
			return -ENOMEM;
		for (uint64_t i = first; i < last; i++)
			tmp[i - first] = htobe64(table[i]);
		r = qcow2_wbs_add(w, table_off + first * 8, tmp, (last - first) * 8, NULL);
		free(tmp);
		if (r < 0)
			return r;
		c = c2;
	}
	return 0;
}

/* One round of the ordered write-back. *again is set when frees were
 * applied, which dirtied refcount blocks that need another round. */
static int qcow2_flush_round(struct image *img, bool *again)
{
	struct qcow2_priv *p = img->priv;
	struct qcow2_wbs rb = {0}, rt = {0}, l2 = {0}, l1 = {0};
	struct qcow2_range *frees = NULL;
	size_t n_frees = 0;
	bool moved;
	uint8_t hdr[12];
	struct qcow2_meta *e;
	int r = 0;

	*again = false;
	/* (1) Snapshot under the lock. */
	pthread_mutex_lock(&p->lock);
	for (e = p->dirty.next; e != &p->dirty && r == 0; e = e->next)
		r = qcow2_wbs_add(e->refblock ? &rb : &l2, e->off, e->buf, p->cs, e);
	moved = p->rct_moved;
	if (r == 0 && p->rct)
		r = qcow2_snap_table(&rt, p->rct, p->rct_entries, p->rct_dirty, moved,
				     p->rct_offset);
	if (r == 0)
		r = qcow2_snap_table(&l1, p->l1, p->l1_size, p->l1_dirty, false, p->l1_offset);
	if (moved) {
		qcow2_put64(hdr, p->rct_offset);
		qcow2_put32(hdr + 8, p->rct_clusters);
		p->rct_moved = false;
	}
	frees = p->frees;
	n_frees = p->n_frees;
	p->frees = NULL;
	p->n_frees = p->cap_frees = 0;
	pthread_mutex_unlock(&p->lock);
	if (r < 0)
		goto fail;

	/* (2) Data first, (3) refcounts, (4) L2 then L1. */
	r = fetch_flush(img->file);
	if (r == 0)
		r = qcow2_wbs_write(img, &rb);
	if (r == 0 && rt.n) {
		r = fetch_flush(img->file);
		if (r == 0)
			r = qcow2_wbs_write(img, &rt);
		if (r == 0 && moved) {
			r = fetch_flush(img->file);
			if (r == 0)
				r = fetch_pwrite(img->file, hdr, sizeof(hdr), QCOW2_HDR_RCT_OFFSET);
		}
	}
	if (r == 0 && (rb.n || rt.n))
		r = fetch_flush(img->file);
	if (r == 0)
		r = qcow2_wbs_write(img, &l2);
	if (r == 0 && l1.n) {
		if (l2.n)
			r = fetch_flush(img->file);
		if (r == 0)
			r = qcow2_wbs_write(img, &l1);
	}
	if (r == 0 && (l2.n || l1.n))
		r = fetch_flush(img->file);
	if (r < 0)
		goto fail;

	/* Done: mark what we wrote clean, then release what is now unreferenced. */
	pthread_mutex_lock(&p->lock);
	for (int k = 0; k < 2; k++) {
		struct qcow2_wbs *w = k ? &l2 : &rb;

		for (size_t i = 0; i < w->n; i++) {
			e = w->v[i].e;
			if (e->mod_gen == w->v[i].gen) {
				qcow2_list_del(e);
				qcow2_list_add(&p->lru, e);
				e->dirty = false;
				p->n_dirty--;
			}
		}
	}
	p->wb_gen++;
	for (size_t i = 0; i < n_frees; i++) {
		int fr = qcow2_free_now(img, frees[i].off, frees[i].len);

		if (fr < 0 && r == 0)
			r = fr;
	}
	*again = n_frees > 0;
	pthread_mutex_unlock(&p->lock);
	free(frees);
	goto out;
fail:
	/* Keep everything dirty for the next attempt. */
	pthread_mutex_lock(&p->lock);
	for (size_t i = 0; i < rt.n && p->rct; i++) {
		uint64_t idx = (rt.v[i].off - p->rct_offset) / 8;

		if (rt.v[i].off >= p->rct_offset && idx < p->rct_entries)
			for (uint64_t k = 0; k < rt.v[i].len / 8 && idx + k < p->rct_entries; k++)
				qcow2_rct_mark(p, idx + k);
	}
	for (size_t i = 0; i < l1.n; i++)
		for (uint64_t k = 0; k < l1.v[i].len / 8; k++)
			qcow2_l1_mark(p, (l1.v[i].off - p->l1_offset) / 8 + k);
	if (moved)
		p->rct_moved = true;
	for (size_t i = 0; i < n_frees; i++)
		if (qcow2_free_later(p, frees[i].off, frees[i].len) < 0)
			qcow2_err(img, "out of memory: cluster %#llx will leak",
				  (unsigned long long)frees[i].off);
	pthread_mutex_unlock(&p->lock);
	free(frees);
out:
	qcow2_wbs_free(&rb);
	qcow2_wbs_free(&rt);
	qcow2_wbs_free(&l2);
	qcow2_wbs_free(&l1);
	return r;
}

static int qcow2_flush(struct image *img)
{
	struct qcow2_priv *p = img->priv;
	bool again = true;
	int r = 0;

	if (img->read_only)
		return 0;
	pthread_mutex_lock(&p->flush_lock);
	for (int i = 0; again && i < 4 && r == 0; i++)
		r = qcow2_flush_round(img, &again);
	pthread_mutex_unlock(&p->flush_lock);
	return r;
}

/* ---- header rewriting and creation ---- */

/* Build header cluster bytes [0, *used) into out (cs bytes, zeroed):
 * 'base' holds the header fields (header_length bytes); other_exts/other_len
 * are extensions to keep verbatim. */
static int qcow2_build_header(uint8_t *out, uint32_t cs, const uint8_t *base, uint32_t hlen,
			      const uint8_t *other_exts, uint32_t other_len, const char *name,
			      const char *fmt, uint32_t *used)
{
	size_t nlen = name ? strlen(name) : 0;
	size_t flen = name && fmt ? strlen(fmt) : 0;
	uint64_t pos = hlen;

	if (nlen > QCOW2_MAX_BACKING_NAME || flen > QCOW2_MAX_BACKING_FMT)
		return -ENAMETOOLONG;
	if (pos + (flen ? 8 + SFS_ALIGN_UP(flen, 8) : 0) + other_len + 8 + nlen > cs)
		return -ENOSPC;
	memcpy(out, base, hlen);
	if (flen) {
		qcow2_put32(out + pos, QCOW2_EXT_BACKING_FMT);
		qcow2_put32(out + pos + 4, (uint32_t)flen);
		memcpy(out + pos + 8, fmt, flen);
		pos += 8 + SFS_ALIGN_UP(flen, 8);
	}
	if (other_len)
		memcpy(out + pos, other_exts, other_len);
	pos += other_len;
	memset(out + pos, 0, 8); /* end of extensions */
	pos += 8;
	qcow2_put64(out + QCOW2_HDR_BACKING_OFFSET, nlen ? pos : 0);
	qcow2_put32(out + QCOW2_HDR_BACKING_SIZE, (uint32_t)nlen);
	if (nlen)
		memcpy(out + pos, name, nlen);
	pos += nlen;
	*used = (uint32_t)pos;
	return 0;
}

static int qcow2_set_backing(struct image *img, const char *name, const char *fmt)
{
	struct qcow2_priv *p = img->priv;
	uint8_t *old = NULL, *out = NULL, *keep = NULL;
	uint32_t avail, pos, keep_len = 0, limit, used, old_used, hlen;
	uint64_t bfoff;
	char *nname = NULL, *nfmt = NULL;
	int r;

	if (img->read_only)
		return -EROFS;
	if (name && !*name)
		name = NULL;
	r = qcow2_flush(img);
	if (r < 0)
		return r;
	pthread_mutex_lock(&p->flush_lock);
	avail = (uint32_t)SFS_MIN((uint64_t)p->cs, fetch_size(img->file));
	old = calloc(1, p->cs);
	out = calloc(1, p->cs);
	keep = calloc(1, p->cs);
	nname = name ? strdup(name) : NULL;
	nfmt = name && fmt ? strdup(fmt) : NULL;
	if (!old || !out || !keep || (name && !nname) || (name && fmt && !nfmt)) {
		r = -ENOMEM;
		goto out;
	}
	r = fetch_pread(img->file, old, avail, 0);
	if (r < 0)
		goto out;
	hlen = p->header_length;
	bfoff = qcow2_get64(old + QCOW2_HDR_BACKING_OFFSET);
	old_used = hlen;
	limit = (bfoff && bfoff < p->cs) ? (uint32_t)bfoff : p->cs;
	/* Keep every extension but the backing format, verbatim and in order. */
	for (pos = hlen; pos + 8 <= limit && pos + 8 <= avail;) {
		uint32_t type = qcow2_get32(old + pos), len = qcow2_get32(old + pos + 4);
		uint32_t sz = 8 + (uint32_t)SFS_ALIGN_UP((uint64_t)len, 8);

		if (type == QCOW2_EXT_END) {
			pos += 8;
			break;
		}
		if ((uint64_t)pos + sz > limit) {
			qcow2_err(img, "header extension %#x overflows the header cluster", type);
			r = -EINVAL;
			goto out;
		}
		if (type != QCOW2_EXT_BACKING_FMT) {
			memcpy(keep + keep_len, old + pos, sz);
			keep_len += sz;
		}
		pos += sz;
	}
	old_used = pos;
	if (bfoff && bfoff < p->cs)
		old_used = (uint32_t)SFS_MAX((uint64_t)old_used,
					     bfoff + qcow2_get32(old + QCOW2_HDR_BACKING_SIZE));
	old_used = SFS_MIN(old_used, p->cs);
	r = qcow2_build_header(out, p->cs, old, hlen, keep, keep_len, name, fmt, &used);
	if (r < 0) {
		qcow2_err(img, "backing file name '%s' does not fit in the header cluster",
			  name ? name : "");
		goto out;
	}
	/* One write covering the old contents too, so no stale name remains. */
	r = fetch_pwrite(img->file, out, SFS_MAX(used, old_used), 0);
	if (r == 0)
		r = fetch_flush(img->file);
	if (r < 0) {
		qcow2_err(img, "rewriting the header: %s", strerror(-r));
		goto out;
	}
	free(img->backing_name);
	free(img->backing_fmt);
	img->backing_name = nname;
	img->backing_fmt = nfmt;
	nname = nfmt = NULL;
out:
	pthread_mutex_unlock(&p->flush_lock);
	free(old);
	free(out);
	free(keep);
	free(nname);
	free(nfmt);
	return r;
}

/* QEMU 7.2's feature name table, so our headers match `qemu-img create`. */
static const struct {
	uint8_t type, bit;
	const char *name;
} qcow2_feature_table[] = {
    {0, 0, "dirty bit"},	{0, 1, "corrupt bit"},	       {0, 2, "external data file"},
    {0, 3, "compression type"}, {0, 4, "extended L2 entries"}, {1, 0, "lazy refcounts"},
    {2, 0, "bitmaps"},		{2, 1, "raw external data"},
};

static int qcow2_create(struct fetch_source *f, const struct image_create_opts *opts)
{
	uint32_t cs = opts->cluster_size ? opts->cluster_size : 65536;
	uint32_t version = opts->version ? (uint32_t)opts->version : 3;
	uint32_t bits = 0, hlen, used, refcount_order = 4;
	uint64_t l2_cover, l1_size, l1_clusters, rt = 1, rb = 1, total, e_per_block, size;
	uint8_t base[QCOW2_OUR_HEADER_LEN] = {0};
	uint8_t *exts = NULL, *buf = NULL;
	uint32_t exts_len = 0;
	int r;

	if (!SFS_IS_POW2(cs) || cs < (1u << QCOW2_MIN_CLUSTER_BITS) ||
	    cs > (1u << QCOW2_MAX_CLUSTER_BITS)) {
		sfs_error("%s: qcow2: cluster size %u must be a power of two from 512 to 2M",
			  f->uri, cs);
		return -EINVAL;
	}
	if (version != 2 && version != 3) {
		sfs_error("%s: qcow2: version %u is not supported (2 or 3)", f->uri, version);
		return -EINVAL;
	}
	/* Like qemu-img, round the size up to whole sectors: QEMU cannot address
	 * a partial last sector. */
	if (!sfs_add_ok(opts->size, 511, &size)) {
		sfs_error("%s: qcow2: virtual size %llu is too large", f->uri,
			  (unsigned long long)opts->size);
		return -EINVAL;
	}
	size = SFS_ALIGN_DOWN(size, 512);
	while ((1u << bits) < cs)
		bits++;
	l2_cover = (uint64_t)cs * (cs / 8);
	l1_size = size / l2_cover + (size % l2_cover != 0);
	if (l1_size * 8 > QCOW2_MAX_L1_BYTES) {
		sfs_error("%s: qcow2: virtual size %llu is too large for %u-byte clusters", f->uri,
			  (unsigned long long)size, cs);
		return -EINVAL;
	}
	l1_clusters = SFS_DIV_ROUND_UP(l1_size * 8, cs);
	e_per_block = (uint64_t)cs * 8 >> refcount_order;
	for (;;) { /* refcount blocks and table big enough to count themselves */
		uint64_t rb2, rt2;

		total = 1 + rt + rb + l1_clusters;
		rb2 = SFS_DIV_ROUND_UP(total, e_per_block);
		rt2 = SFS_DIV_ROUND_UP(rb2 * 8, cs);
		if (rb2 == rb && rt2 == rt)
			break;
		rb = rb2;
		rt = rt2;
	}

	hlen = version == 3 ? QCOW2_OUR_HEADER_LEN : QCOW2_V2_HEADER_BYTES;
	qcow2_put32(base, QCOW2_MAGIC);
	qcow2_put32(base + 4, version);
	qcow2_put32(base + 20, bits);
	qcow2_put64(base + 24, size);
	qcow2_put32(base + 36, (uint32_t)l1_size);
	qcow2_put64(base + 40, (1 + rt + rb) * cs);
	qcow2_put64(base + 48, cs);
	qcow2_put32(base + 56, (uint32_t)rt);
	if (version == 3) {
		qcow2_put32(base + 96, refcount_order);
		qcow2_put32(base + 100, hlen);
		/* 104: compression_type 0 (zlib) and padding */
	}
	buf = calloc(1, SFS_MAX((uint64_t)cs, (uint64_t)QCOW2_WRITE_CHUNK));
	exts = calloc(1, cs);
	if (!buf || !exts) {
		r = -ENOMEM;
		goto out;
	}
	/* Like QEMU, only with clusters over 4 KiB: the table would leave no room
	 * for a backing name in small header clusters. */
	if (version == 3 && cs > 4096) {
		size_t n = sizeof(qcow2_feature_table) / sizeof(qcow2_feature_table[0]);

		qcow2_put32(exts, QCOW2_EXT_FEATURES);
		qcow2_put32(exts + 4, (uint32_t)(n * QCOW2_FEATURE_ENTRY_BYTES));
		for (size_t i = 0; i < n; i++) {
			uint8_t *e = exts + 8 + i * QCOW2_FEATURE_ENTRY_BYTES;

			e[0] = qcow2_feature_table[i].type;
			e[1] = qcow2_feature_table[i].bit;
			memcpy(e + 2, qcow2_feature_table[i].name,
			       strlen(qcow2_feature_table[i].name));
		}
		exts_len = 8 + (uint32_t)(n * QCOW2_FEATURE_ENTRY_BYTES);
	}
	r = qcow2_build_header(buf, cs, base, hlen, exts, exts_len, opts->backing_name,
			       opts->backing_fmt, &used);
	if (r < 0) {
		sfs_error("%s: qcow2: backing file name does not fit in the header cluster",
			  f->uri);
		goto out;
	}
	r = fetch_pwrite(f, buf, cs, 0);
	if (r < 0)
		goto out;
	/* Refcount table, then refcount blocks counting clusters [0, total). */
	for (uint64_t c = 0; c < rt; c++) {
		memset(buf, 0, cs);
		for (uint64_t i = 0; i < cs / 8; i++) {
			uint64_t idx = c * (cs / 8) + i;

			if (idx < rb)
				qcow2_put64(buf + 8 * i, (1 + rt + idx) * cs);
		}
		r = fetch_pwrite(f, buf, cs, (1 + c) * cs);
		if (r < 0)
			goto out;
	}
	for (uint64_t b = 0; b < rb; b++) {
		memset(buf, 0, cs);
		for (uint64_t i = 0; i < e_per_block; i++)
			if (b * e_per_block + i < total)
				qcow2_put16(buf + 2 * i, 1);
		r = fetch_pwrite(f, buf, cs, (1 + rt + b) * cs);
		if (r < 0)
			goto out;
	}
	/* Empty L1 table: the file ends right after it, as with qemu-img. */
	memset(buf, 0, SFS_MAX((uint64_t)cs, (uint64_t)QCOW2_WRITE_CHUNK));
	for (uint64_t done = 0; done < l1_size * 8;) {
		size_t n = (size_t)SFS_MIN(l1_size * 8 - done, (uint64_t)QCOW2_WRITE_CHUNK);

		r = fetch_pwrite(f, buf, n, (1 + rt + rb) * cs + done);
		if (r < 0)
			goto out;
		done += n;
	}
	r = fetch_flush(f);
out:
	if (r < 0)
		sfs_error("%s: qcow2: cannot create image: %s", f->uri, strerror(-r));
	free(buf);
	free(exts);
	return r;
}

const struct image_driver image_qcow2_driver = {
    .name = "qcow2",
    .priv_size = sizeof(struct qcow2_priv),
    .probe = qcow2_probe,
    .open = qcow2_open,
    .close = qcow2_close,
    .map = qcow2_map,
    .read_compressed = qcow2_read_compressed,
    .alloc_write = qcow2_alloc_write,
    .zero_clusters = qcow2_zero_clusters,
    .flush = qcow2_flush,
    .set_backing = qcow2_set_backing,
    .create = qcow2_create,
};
