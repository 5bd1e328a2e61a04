/* streamfs: qcow2 metadata write-back (flush).
 *
 * CRASH ORDER (see include/image.h): flush() = snapshot dirty tables,
 * fdatasync data, write refcount blocks, [sync, write refcount table
 * entries or a relocated table, sync, update the header], sync, write L2
 * tables, [sync], write L1 entries, sync. The bracketed syncs only happen
 * when new refcount blocks / L2 tables were linked in, so a table entry
 * never reaches the disk before the cluster it points to. The snapshot is
 * taken under p->lock and written with it dropped; p->flush_lock keeps
 * flushes (and header rewrites) one at a time.
 */

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2.h"

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
	struct lru_node *n;
	int r = 0;

	*again = false;
	/* (1) Snapshot under the lock. */
	pthread_mutex_lock(&p->lock);
	lru_list_for_each(n, &p->dirty)
	{
		e = qcow2_meta_of(n);
		r = qcow2_wbs_add(e->refblock ? &rb : &l2, e->node.key, e->buf, p->cs, e);
		if (r < 0)
			break;
	}
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
			if (e->mod_gen == w->v[i].gen)
				qcow2_cache_clean(p, e);
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

int qcow2_flush(struct image *img)
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
