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

/* What one round of write-back takes from the tables, under the lock. */
struct qcow2_snap {
	struct qcow2_wbs rb, rt, l2, l1; /* refcount blocks and table, L2, L1 */
	struct qcow2_range *frees;	 /* pending frees, applied once durable */
	size_t n_frees;
	bool moved;	 /* the refcount table was relocated: rewrite the header */
	uint8_t hdr[12]; /* new refcount_table_offset and _clusters, big-endian */
};

/* (1) Snapshot the dirty tables and take the pending frees.
 * Takes p->lock. */
static int qcow2_flush_snapshot(struct qcow2_priv *p, struct qcow2_snap *sn)
{
	struct lru_node *n;
	int r = 0;

	pthread_mutex_lock(&p->lock);
	lru_list_for_each (n, &p->dirty) {
		struct qcow2_meta *e = qcow2_meta_of(n);

		r = qcow2_wbs_add(e->refblock ? &sn->rb : &sn->l2, e->node.key, e->buf, p->cs, e);
		if (r < 0)
			break;
	}
	sn->moved = p->rct_moved;
	if (r == 0 && p->rct)
		r = qcow2_snap_table(&sn->rt, p->rct, p->rct_entries, p->rct_dirty, sn->moved,
				     p->rct_offset);
	if (r == 0)
		r = qcow2_snap_table(&sn->l1, p->l1, p->l1_size, p->l1_dirty, false, p->l1_offset);
	if (sn->moved) {
		qcow2_put64(sn->hdr, p->rct_offset);
		qcow2_put32(sn->hdr + 8, p->rct_clusters);
		p->rct_moved = false;
	}
	sn->frees = p->frees;
	sn->n_frees = p->n_frees;
	p->frees = NULL;
	p->n_frees = p->cap_frees = 0;
	pthread_mutex_unlock(&p->lock);
	return r;
}

/* (2) Data first, (3) refcounts, (4) L2 then L1, with the syncs between
 * them that the crash order needs. Takes no lock. */
static int qcow2_flush_write(struct image *img, struct qcow2_snap *sn)
{
	int r = fetch_flush(img->file);

	if (r == 0)
		r = qcow2_wbs_write(img, &sn->rb);
	if (r == 0 && sn->rt.n) {
		r = fetch_flush(img->file);
		if (r == 0)
			r = qcow2_wbs_write(img, &sn->rt);
		if (r == 0 && sn->moved) {
			r = fetch_flush(img->file);
			if (r == 0)
				r = fetch_pwrite(img->file, sn->hdr, sizeof(sn->hdr),
						 QCOW2_HDR_RCT_OFFSET);
		}
	}
	if (r == 0 && (sn->rb.n || sn->rt.n))
		r = fetch_flush(img->file);
	if (r == 0)
		r = qcow2_wbs_write(img, &sn->l2);
	if (r == 0 && sn->l1.n) {
		if (sn->l2.n)
			r = fetch_flush(img->file);
		if (r == 0)
			r = qcow2_wbs_write(img, &sn->l1);
	}
	if (r == 0 && (sn->l2.n || sn->l1.n))
		r = fetch_flush(img->file);
	return r;
}

/* Done: mark what we wrote clean (unless changed since the snapshot), then
 * release what is now unreferenced. Takes p->lock. */
static int qcow2_flush_done(struct image *img, struct qcow2_snap *sn)
{
	struct qcow2_priv *p = img->priv;
	int r = 0;

	pthread_mutex_lock(&p->lock);
	for (int k = 0; k < 2; k++) {
		struct qcow2_wbs *w = k ? &sn->l2 : &sn->rb;

		for (size_t i = 0; i < w->n; i++) {
			struct qcow2_meta *e = w->v[i].e;

			if (e->mod_gen == w->v[i].gen)
				qcow2_cache_clean(p, e);
		}
	}
	p->wb_gen++;
	for (size_t i = 0; i < sn->n_frees; i++) {
		int fr = qcow2_free_now(img, sn->frees[i].off, sn->frees[i].len);

		if (fr < 0 && r == 0)
			r = fr;
	}
	pthread_mutex_unlock(&p->lock);
	return r;
}

/* A round failed: keep everything dirty for the next attempt.
 * Takes p->lock. */
static void qcow2_flush_redirty(struct image *img, struct qcow2_snap *sn)
{
	struct qcow2_priv *p = img->priv;

	pthread_mutex_lock(&p->lock);
	for (size_t i = 0; i < sn->rt.n && p->rct; i++) {
		uint64_t idx = (sn->rt.v[i].off - p->rct_offset) / 8;

		if (sn->rt.v[i].off >= p->rct_offset && idx < p->rct_entries)
			for (uint64_t k = 0; k < sn->rt.v[i].len / 8 && idx + k < p->rct_entries;
			     k++)
				qcow2_rct_mark(p, idx + k);
	}
	for (size_t i = 0; i < sn->l1.n; i++)
		for (uint64_t k = 0; k < sn->l1.v[i].len / 8; k++)
			qcow2_l1_mark(p, (sn->l1.v[i].off - p->l1_offset) / 8 + k);
	if (sn->moved)
		p->rct_moved = true;
	for (size_t i = 0; i < sn->n_frees; i++)
		if (qcow2_free_later(p, sn->frees[i].off, sn->frees[i].len) < 0)
			qcow2_err(img, "out of memory: cluster %#llx will leak",
				  (unsigned long long)sn->frees[i].off);
	pthread_mutex_unlock(&p->lock);
}

/* One round of the ordered write-back. *again is set when frees were
 * applied, which dirtied refcount blocks that need another round. */
static int qcow2_flush_round(struct image *img, bool *again)
{
	struct qcow2_snap sn = {0};
	int r;

	*again = false;
	r = qcow2_flush_snapshot(img->priv, &sn);
	if (r == 0)
		r = qcow2_flush_write(img, &sn);
	if (r == 0) {
		r = qcow2_flush_done(img, &sn);
		*again = sn.n_frees > 0;
	} else {
		qcow2_flush_redirty(img, &sn);
	}
	free(sn.frees);
	qcow2_wbs_free(&sn.rb);
	qcow2_wbs_free(&sn.rt);
	qcow2_wbs_free(&sn.l2);
	qcow2_wbs_free(&sn.l1);
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
