/* streamfs: qcow2 metadata cache: L2 tables and refcount blocks.
 *
 * Both kinds of table are cached as cluster-sized buffers in their on-disk
 * (big-endian) layout, keyed by host offset, in one cache bounded by a byte
 * budget. Clean entries sit on an LRU list and are evicted oldest first;
 * dirty entries sit on p->dirty until qcow2-flush.c writes them back and
 * calls qcow2_cache_clean(). Users pin an entry (qcow2_cache_get/new) so
 * that it survives while p->lock is dropped, and unpin with qcow2_cache_put.
 * Loads drop the lock for the read and recheck afterwards: a write-back
 * that completed meanwhile (p->wb_gen) may have made the read stale.
 */

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2.h"

/* Called with p->lock held. */
struct qcow2_meta *qcow2_cache_lookup(struct qcow2_priv *p, uint64_t off)
{
	struct lru_node *n = lru_find(&p->cache, off);

	return n ? qcow2_meta_of(n) : NULL;
}

/* Drop clean, unpinned entries until there is room for one more.
 * Called with p->lock held. */
static void qcow2_cache_evict(struct qcow2_priv *p)
{
	struct lru_node *n = lru_oldest(&p->cache);

	while (p->cache.count >= p->max_meta && n) {
		struct lru_node *newer = lru_newer(&p->cache, n);
		struct qcow2_meta *e = qcow2_meta_of(n);

		if (e->pins == 0) {
			lru_remove(&p->cache, n);
			free(e->buf);
			free(e);
		}
		n = newer;
	}
}

/* Insert buf (cluster_size bytes, ownership taken) as the entry for off,
 * pinned. Called with p->lock held. */
static struct qcow2_meta *qcow2_cache_insert(struct qcow2_priv *p, uint64_t off, uint8_t *buf,
					     bool refblock, bool dirty)
{
	struct qcow2_meta *e = calloc(1, sizeof(*e));

	if (!e)
		return NULL;
	qcow2_cache_evict(p);
	e->buf = buf;
	e->refblock = refblock;
	e->pins = 1;
	e->dirty = dirty;
	lru_insert(&p->cache, &e->node, off);
	if (dirty) {
		lru_list_move(&p->dirty, &e->node);
		p->n_dirty++;
	}
	return e;
}

void qcow2_cache_put(struct qcow2_meta *e)
{
	if (e)
		e->pins--;
}

/* Record a change to e. Called with p->lock held. */
void qcow2_cache_dirty(struct qcow2_priv *p, struct qcow2_meta *e)
{
	e->mod_gen++;
	if (!e->dirty) {
		lru_list_move(&p->dirty, &e->node);
		e->dirty = true;
		p->n_dirty++;
	}
}

/* Record that e's contents (as of its mod_gen) are on disk: it becomes
 * evictable again. Called with p->lock held. */
void qcow2_cache_clean(struct qcow2_priv *p, struct qcow2_meta *e)
{
	lru_touch(&p->cache, &e->node);
	e->dirty = false;
	p->n_dirty--;
}

/* Read len bytes of metadata at off; bytes past the end of the file read as
 * zeros (QEMU images may end inside their last table). */
int qcow2_read_meta(struct image *img, uint64_t off, void *buf, size_t len)
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
int qcow2_cache_get(struct image *img, uint64_t off, bool refblock, struct qcow2_meta **out)
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
			if (!e->dirty) /* most recently used first */
				lru_touch(&p->cache, &e->node);
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
int qcow2_cache_new(struct image *img, uint64_t off, bool refblock, struct qcow2_meta **out)
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

int qcow2_init_cache(struct qcow2_priv *p, bool writable)
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
	lru_list_init(&p->dirty);
	return lru_init(&p->cache, SFS_MAX(p->max_meta * 2, (size_t)64), p->cluster_bits);
}

static void qcow2_cache_free_entry(struct lru_node *n)
{
	struct qcow2_meta *e = qcow2_meta_of(n);

	free(e->buf);
	free(e);
}

/* Free every entry, dirty or not, and the hash table. */
void qcow2_cache_destroy(struct qcow2_priv *p)
{
	lru_destroy(&p->cache, qcow2_cache_free_entry);
}
