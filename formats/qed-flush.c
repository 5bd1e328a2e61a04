/* streamfs: QED write-back of dirty metadata, in crash order (qed.h).
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "qed.h"

/* A dirty slice as snapshotted: its file offset and generation. */
struct qed_snap {
	uint64_t key, gen;
};

/* What one flush writes: copies taken under p->lock, written without it. */
struct qed_flush_snap {
	struct qed_snap *snap; /* the dirty slices */
	uint8_t *bufs;	       /* their entries, slice_bytes each */
	size_t nsnap;
	uint64_t *l1buf; /* the dirty L1 range, little-endian */
	uint64_t l1_lo, l1_n, l1_gen;
	size_t nfresh; /* fresh tables this flush publishes */
};

/* Copy every dirty slice, most recently used first. Called with p->lock
 * held. */
static int qed_flush_snap_slices(struct qed_priv *p, struct qed_flush_snap *sn)
{
	size_t ndirty = (size_t)(p->dirty_bytes / p->slice_bytes);
	struct lru_node *n;

	if (ndirty == 0)
		return 0;
	sn->snap = malloc(ndirty * sizeof(*sn->snap));
	sn->bufs = malloc(ndirty * p->slice_bytes);
	if (!sn->snap || !sn->bufs)
		return -ENOMEM;
	lru_list_for_each (n, &p->cache.list) {
		struct qed_slice *s = qed_slice_of(n);

		if (sn->nsnap == ndirty)
			break;
		if (!s->dirty)
			continue;
		sn->snap[sn->nsnap].key = n->key;
		sn->snap[sn->nsnap].gen = s->gen;
		memcpy(sn->bufs + sn->nsnap * p->slice_bytes, s->e, p->slice_bytes);
		sn->nsnap++;
	}
	return 0;
}

/* Copy the dirty L1 range. Called with p->lock held. */
static int qed_flush_snap_l1(struct qed_priv *p, struct qed_flush_snap *sn)
{
	if (p->l1_lo >= p->l1_hi)
		return 0;
	sn->l1_lo = p->l1_lo;
	sn->l1_n = p->l1_hi - p->l1_lo;
	sn->l1_gen = p->l1_gen;
	sn->l1buf = malloc(sn->l1_n * sizeof(uint64_t));
	if (!sn->l1buf)
		return -ENOMEM;
	for (uint64_t i = 0; i < sn->l1_n; i++)
		sn->l1buf[i] = htole64(p->l1[sn->l1_lo + i]);
	return 0;
}

/* (1) Snapshot the dirty slices and L1 range. Takes p->lock. */
static int qed_flush_snapshot(struct qed_priv *p, struct qed_flush_snap *sn)
{
	int r;

	pthread_mutex_lock(&p->lock);
	r = qed_flush_snap_slices(p, sn);
	if (r == 0)
		r = qed_flush_snap_l1(p, sn);
	sn->nfresh = p->nfresh;
	pthread_mutex_unlock(&p->lock);
	return r;
}

/* (2)-(4) Write the snapshot in crash order. Takes no lock. */
static int qed_flush_write(struct image *img, const struct qed_flush_snap *sn)
{
	struct qed_priv *p = img->priv;
	int r;

	/* (2) Data durable before anything points at it. */
	r = fetch_flush(img->file);
	/* (3) L2 slices, then sync. */
	for (size_t i = 0; i < sn->nsnap && r == 0; i++)
		r = fetch_pwrite(img->file, sn->bufs + i * p->slice_bytes, p->slice_bytes,
				 sn->snap[i].key);
	if (r == 0 && sn->nsnap && sn->l1_n)
		r = fetch_flush(img->file);
	/* (4) L1 entries, then sync. */
	if (r == 0 && sn->l1_n) {
		r = fetch_pwrite(img->file, sn->l1buf, sn->l1_n * sizeof(uint64_t),
				 p->l1_offset + sn->l1_lo * sizeof(uint64_t));
		if (r == 0)
			r = fetch_flush(img->file);
	} else if (r == 0 && sn->nsnap) {
		r = fetch_flush(img->file);
	}
	if (r < 0)
		qed_err(img, "flush failed: %s", strerror(-r));
	return r;
}

/* The snapshot is durable: mark clean what did not change meanwhile.
 * Takes p->lock. */
static void qed_flush_done(struct qed_priv *p, const struct qed_flush_snap *sn)
{
	pthread_mutex_lock(&p->lock);
	for (size_t i = 0; i < sn->nsnap; i++)
		qed_slice_clean(p, sn->snap[i].key, sn->snap[i].gen);
	if (sn->l1_n && p->l1_gen == sn->l1_gen)
		p->l1_lo = p->l1_hi = 0;
	/* Tables published by this flush are covered by the file now. */
	if (sn->nfresh) {
		memmove(p->fresh, p->fresh + sn->nfresh,
			(p->nfresh - sn->nfresh) * sizeof(*p->fresh));
		p->nfresh -= sn->nfresh;
	}
	p->cache_seq++;
	qed_cache_shrink(p);
	pthread_mutex_unlock(&p->lock);
}

int qed_flush(struct image *img)
{
	struct qed_priv *p = img->priv;
	struct qed_flush_snap sn = {0};
	int r;

	if (img->read_only)
		return 0;
	pthread_mutex_lock(&p->flush_lock);
	r = qed_flush_snapshot(p, &sn);
	if (r == 0)
		r = qed_flush_write(img, &sn);
	if (r == 0)
		qed_flush_done(p, &sn);
	pthread_mutex_unlock(&p->flush_lock);
	free(sn.snap);
	free(sn.bufs);
	free(sn.l1buf);
	return r;
}
