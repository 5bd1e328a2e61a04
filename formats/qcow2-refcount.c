/* streamfs: qcow2 refcounts and the cluster allocator (writable images).
 *
 * Allocation is append-only: clusters are always taken at p->next_free,
 * past the end of the file, never reused, so a lock-free reader can never
 * see a cluster change under it. Refcounts are exact in memory; what new
 * clusters need to be counted (refcount blocks, a bigger refcount table) is
 * planned and placed in the same reservation. Clusters that stop being
 * referenced are queued (qcow2_free_later) and only decremented once a
 * flush has made the tables that dropped them durable (qcow2-flush.c).
 */

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2.h"

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

void qcow2_rct_mark(struct qcow2_priv *p, uint64_t idx)
{
	p->rct_dirty[idx * 8 / QCOW2_CHUNK] = 1;
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
int qcow2_free_now(struct image *img, uint64_t off, uint64_t len)
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
int qcow2_free_later(struct qcow2_priv *p, uint64_t off, uint64_t len)
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
int qcow2_prezero(struct image *img, uint64_t off, uint64_t len)
{
	int r = fetch_write_zeros(img->file, off, len);

	if (r < 0)
		qcow2_err(img, "cannot reserve space for metadata: %s", strerror(-r));
	return r;
}

/* A reservation of host clusters [s, end) at the end of the file: m_rb new
 * refcount blocks, then m_rct clusters of a relocated refcount table (if
 * any), then the clusters asked for. Refcount table entries first_idx to
 * last_idx count them all. */
struct qcow2_alloc_plan {
	uint64_t s, end, m_rb, m_rct, first_idx, last_idx;
};

/* Plan a reservation of n clusters: find how many refcount blocks and table
 * clusters we must add so that every cluster of the reservation (including
 * them) is counted. Called with p->lock held. */
static int qcow2_alloc_plan(struct image *img, uint64_t n, struct qcow2_alloc_plan *pl)
{
	struct qcow2_priv *p = img->priv;

	pl->s = p->next_free >> p->cluster_bits;
	pl->m_rb = pl->m_rct = 0;
	for (;;) {
		uint64_t missing = 0, need_rct = 0, total = n;

		if (!sfs_add_ok(total, pl->m_rb + pl->m_rct, &total) ||
		    !sfs_add_ok(pl->s, total, &pl->end) ||
		    pl->end > (QCOW2_MAX_HOST_OFFSET >> p->cluster_bits)) {
			qcow2_err(img, "image file would exceed the maximum qcow2 size");
			return -ENOSPC;
		}
		pl->first_idx = pl->s >> p->rb_bits;
		pl->last_idx = (pl->end - 1) >> p->rb_bits;
		for (uint64_t idx = pl->first_idx; idx <= pl->last_idx; idx++)
			if (idx >= p->rct_entries || !(p->rct[idx] & QCOW2_RCT_OFFSET_MASK))
				missing++;
		if (pl->last_idx >= p->rct_entries) {
			uint64_t want = SFS_DIV_ROUND_UP((pl->last_idx + 1) * 8, p->cs);

			need_rct = SFS_MAX(want, (uint64_t)p->rct_clusters * 2);
			if (need_rct * p->cs > QCOW2_MAX_RCT_BYTES)
				need_rct = SFS_MAX(want, QCOW2_MAX_RCT_BYTES / p->cs);
			if (need_rct * p->cs > QCOW2_MAX_RCT_BYTES) {
				qcow2_err(img, "refcount table would exceed %u bytes",
					  QCOW2_MAX_RCT_BYTES);
				return -ENOSPC;
			}
		}
		if (missing == pl->m_rb && need_rct == pl->m_rct)
			return 0;
		pl->m_rb = missing;
		pl->m_rct = need_rct;
	}
}

/* Check that the clusters of the reservation, past the end of the file, are
 * really free. Their refcount blocks are pinned (so cached).
 * Called with p->lock held. */
static int qcow2_alloc_check_free(struct image *img, const struct qcow2_alloc_plan *pl)
{
	struct qcow2_priv *p = img->priv;
	uint64_t mask = (1ULL << p->rb_bits) - 1;

	for (uint64_t c = pl->s; c < pl->end; c++) {
		uint64_t idx = c >> p->rb_bits;

		if (idx < p->rct_entries && (p->rct[idx] & QCOW2_RCT_OFFSET_MASK)) {
			struct qcow2_meta *b =
			    qcow2_cache_lookup(p, p->rct[idx] & QCOW2_RCT_OFFSET_MASK);

			if (qcow2_rc_get(p, b->buf, c & mask) != 0) {
				qcow2_err(img,
					  "cluster %#llx past the end of the file has a "
					  "refcount; run 'qemu-img check -r all'",
					  (unsigned long long)(c << p->cluster_bits));
				return -EIO;
			}
		}
	}
	return 0;
}

/* Switch to a bigger refcount table of m_rct clusters at host offset
 * new_off (its entries written by the next flush); the old table is freed
 * after that flush. Called with p->lock held. */
static int qcow2_rct_grow(struct qcow2_priv *p, uint64_t m_rct, uint64_t new_off)
{
	uint64_t entries = m_rct * p->cs / 8;
	uint64_t *nt = calloc(entries, sizeof(*nt));
	uint8_t *nd = calloc(entries * 8 / QCOW2_CHUNK, 1);
	int r = -ENOMEM;

	if (!nt || !nd)
		goto fail;
	memcpy(nt, p->rct, p->rct_entries * sizeof(*nt));
	r = qcow2_free_later(p, p->rct_offset, (uint64_t)p->rct_clusters * p->cs);
	if (r < 0)
		goto fail;
	free(p->rct);
	free(p->rct_dirty);
	p->rct = nt;
	p->rct_dirty = nd;
	p->rct_entries = entries;
	p->rct_offset = new_off;
	p->rct_clusters = (uint32_t)m_rct;
	p->rct_moved = true;
	return 0;
fail:
	free(nt);
	free(nd);
	return r;
}

/* Count the reservation: link the new refcount blocks (the first m_rb
 * clusters) into the refcount table, then set the refcount of every cluster
 * of [s, end) to 1. Called with p->lock held. */
static int qcow2_alloc_commit(struct image *img, const struct qcow2_alloc_plan *pl,
			      struct qcow2_pins *pins)
{
	struct qcow2_priv *p = img->priv;
	uint64_t mask = (1ULL << p->rb_bits) - 1, j = pl->s;
	int r;

	for (uint64_t idx = pl->first_idx; idx <= pl->last_idx; idx++) {
		struct qcow2_meta *b;

		if (p->rct[idx] & QCOW2_RCT_OFFSET_MASK)
			continue;
		r = qcow2_cache_new(img, j << p->cluster_bits, true, &b);
		if (r == 0)
			r = qcow2_pins_add(pins, b);
		if (r < 0)
			return r; /* only on ENOMEM or corruption: tables stay consistent */
		p->rct[idx] = j << p->cluster_bits;
		qcow2_rct_mark(p, idx);
		j++;
	}
	for (uint64_t c = pl->s; c < pl->end; c++) {
		uint64_t idx = c >> p->rb_bits;
		struct qcow2_meta *b = qcow2_cache_lookup(p, p->rct[idx] & QCOW2_RCT_OFFSET_MASK);

		qcow2_rc_set(p, b->buf, c & mask, 1);
		if (c == pl->s || (c & mask) == 0)
			qcow2_cache_dirty(p, b);
	}
	return 0;
}

/* Allocate n contiguous new clusters at the end of the file with refcount 1;
 * return the host offset of the first in *host. New refcount blocks (and a
 * relocated, bigger refcount table) needed to count them are placed right
 * before them, in the same reservation.
 * Called with p->lock held; may drop it to load refcount blocks, but the
 * plan is committed without dropping it. */
int qcow2_alloc_clusters(struct image *img, uint64_t n, uint64_t *host)
{
	struct qcow2_priv *p = img->priv;
	struct qcow2_pins pins = {0};
	struct qcow2_alloc_plan pl;
	int r = 0;

	if (n == 0)
		return -EINVAL;
retry:
	r = qcow2_alloc_plan(img, n, &pl);
	if (r < 0)
		goto out;
	/* Pin the existing refcount blocks we will update; loading one drops
	 * the lock, after which the plan must be made again. */
	for (uint64_t idx = pl.first_idx; idx <= pl.last_idx && idx < p->rct_entries; idx++) {
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
	r = qcow2_alloc_check_free(img, &pl);
	if (r == 0 && pl.m_rb + pl.m_rct)
		r = qcow2_prezero(img, pl.s << p->cluster_bits,
				  (pl.m_rb + pl.m_rct) << p->cluster_bits);
	if (r < 0)
		goto out;
	/* Commit (no lock drop from here). */
	if (pl.m_rct) {
		r = qcow2_rct_grow(p, pl.m_rct, (pl.s + pl.m_rb) << p->cluster_bits);
		if (r < 0)
			goto out;
	}
	r = qcow2_alloc_commit(img, &pl, &pins);
	if (r < 0)
		goto out;
	p->next_free = pl.end << p->cluster_bits;
	*host = (pl.s + pl.m_rb + pl.m_rct) << p->cluster_bits;
out:
	qcow2_pins_release(&pins);
	return r;
}
