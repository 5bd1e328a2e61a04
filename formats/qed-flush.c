/* streamfs: QED write-back of dirty metadata, in crash order (qed.h).
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "qed.h"

struct qed_snap {
	uint64_t key, gen;
};

int qed_flush(struct image *img)
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
	for (size_t i = 0; i < nsnap; i++)
		qed_slice_clean(p, snap[i].key, snap[i].gen);
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
