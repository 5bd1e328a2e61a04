/* streamfs: QED L2 slice cache.
 *
 * Slices of L2 tables (at most QED_SLICE_MAX bytes) are cached in their
 * on-disk (little-endian) layout, keyed by file offset, in one LRU index
 * (include/lru.h) bounded by QED_CACHE_BYTES. Clean slices are evicted
 * oldest first; dirty ones stay in place until qed-flush.c writes them back
 * and calls qed_slice_clean(). Loads drop p->lock for the read and recheck
 * afterwards: a flush that completed meanwhile (p->cache_seq) may have made
 * the read stale. Slices of fresh tables (allocated since the last flush)
 * are made zeroed without I/O. Everything here is called with p->lock held.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>

#include "qed.h"

#define QED_CACHE_BYTES (16u * 1024 * 1024) /* in bytes: slice cache budget */
#define QED_HASH_BITS	12		    /* log2 of the slice hash buckets */

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

/* Dirty slices stay: alloc_write() flushes when too many pile up. */
void qed_cache_shrink(struct qed_priv *p)
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

int qed_cache_init(struct qed_priv *p)
{
	/* Keys are slice offsets: hash them after dropping the bits below
	 * one slice. */
	return lru_init(&p->cache, (size_t)1 << QED_HASH_BITS, qed_log2(p->slice_bytes));
}

void qed_cache_destroy(struct qed_priv *p)
{
	lru_destroy(&p->cache, qed_cache_free_node);
}

void qed_slice_dirty(struct qed_priv *p, struct qed_slice *s)
{
	s->gen++;
	if (!s->dirty) {
		s->dirty = true;
		p->dirty_bytes += p->slice_bytes;
	}
}

void qed_slice_clean(struct qed_priv *p, uint64_t key, uint64_t gen)
{
	/* lru_find(), not qed_cache_find(): a write-back is not a use. */
	struct lru_node *n = lru_find(&p->cache, key);
	struct qed_slice *s = n ? qed_slice_of(n) : NULL;

	if (s && s->dirty && s->gen == gen) {
		s->dirty = false;
		p->dirty_bytes -= p->slice_bytes;
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

/* Called with p->lock held; may drop and retake it while reading. */
int qed_slice_get(struct image *img, uint64_t table, uint64_t slice_idx, struct qed_slice **out)
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
