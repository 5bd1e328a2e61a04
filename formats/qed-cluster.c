/* streamfs: QED guest clusters: mapping guest offsets to runs, allocating
 * writes (new L2 tables and data appended at the end of the file) and zero
 * clusters.
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "qed.h"

void qed_l1_mark(struct qed_priv *p, uint64_t i)
{
	if (p->l1_lo >= p->l1_hi) {
		p->l1_lo = i;
		p->l1_hi = i + 1;
	} else {
		p->l1_lo = SFS_MIN(p->l1_lo, i);
		p->l1_hi = SFS_MAX(p->l1_hi, i + 1);
	}
	p->l1_gen++;
}

/* --- Map ----------------------------------------------------------------- */

/* Start of the next aligned block (mask = block size - 1) after pos, or end
 * if that is not before end. Never overflows, even for guest sizes close to
 * 2^64. */
static uint64_t qed_next(uint64_t pos, uint64_t mask, uint64_t end)
{
	return (pos | mask) >= end - 1 ? end : (pos | mask) + 1;
}

int qed_map(struct image *img, uint64_t off, uint64_t len, struct extent *ext)
{
	struct qed_priv *p = img->priv;
	uint64_t end = off + len, pos = off, next_host = 0, first_host = 0;
	uint64_t cmask = p->cluster_size - 1, emask = (1ULL << p->table_bits) - 1;
	uint64_t smask = (1ULL << p->slice_bits) - 1;
	enum extent_type type = EXT_UNALLOC;
	bool first = true;
	int r = 0;

	pthread_mutex_lock(&p->lock);
	while (pos < end) {
		uint64_t c = pos >> p->cluster_bits;
		uint64_t l1i = c >> p->table_bits, l2i = c & emask;
		uint64_t t = p->l1[l1i];
		struct qed_slice *s;

		if (t == QED_L1_BAD) {
			if (first) {
				qed_err(img, "no valid L2 table for guest offset %llu",
					(unsigned long long)pos);
				r = -EIO;
			}
			break;
		}
		if (t == 0) {
			/* The whole table's span is unallocated. */
			if (!first && type != EXT_UNALLOC)
				break;
			type = EXT_UNALLOC;
			first = false;
			pos = qed_next(pos, (1ULL << (p->table_bits + p->cluster_bits)) - 1, end);
			continue;
		}
		r = qed_slice_get(img, t, l2i >> p->slice_bits, &s);
		if (r < 0) {
			if (!first)
				r = 0; /* return the run so far; the next call fails */
			break;
		}
		for (uint64_t j = l2i & smask; j <= smask && pos < end; j++) {
			uint64_t v = le64toh(s->e[j]);
			enum extent_type ct;

			if (v == QED_L2_UNALLOC)
				ct = EXT_UNALLOC;
			else if (v == QED_L2_ZERO)
				ct = EXT_ZERO;
			else if (v == QED_L2_BAD)
				goto bad;
			else
				ct = EXT_DATA;
			if (first) {
				type = ct;
				first_host = v;
				first = false;
			} else if (ct != type || (ct == EXT_DATA && v != next_host)) {
				goto done;
			}
			next_host = v + p->cluster_size;
			pos = qed_next(pos, cmask, end);
		}
	}
	goto done;
bad:
	if (first) {
		qed_err(img, "invalid L2 entry for guest offset %llu", (unsigned long long)pos);
		r = -EIO;
	}
done:
	pthread_mutex_unlock(&p->lock);
	if (r < 0)
		return r;
	ext->type = type;
	ext->len = SFS_MIN(pos, end) - off;
	ext->host_off = type == EXT_DATA ? first_host + (off & cmask) : 0;
	return 0;
}

/* --- Writes -------------------------------------------------------------- */

/* Set the need-check bit durably before the first allocation after open. */
static int qed_mark_dirty(struct image *img)
{
	struct qed_priv *p = img->priv;
	int r = 0;

	if (atomic_load(&p->need_check_set))
		return 0;
	pthread_mutex_lock(&p->hdr_lock);
	if (!atomic_load(&p->need_check_set)) {
		p->hdr.features |= QED_F_NEED_CHECK;
		r = qed_write_header(img->file, &p->hdr);
		if (r == 0)
			r = fetch_flush(img->file);
		if (r < 0) {
			p->hdr.features &= ~QED_F_NEED_CHECK;
			qed_err(img, "cannot set the need-check bit: %s", strerror(-r));
		} else {
			atomic_store(&p->need_check_set, true);
		}
	}
	pthread_mutex_unlock(&p->hdr_lock);
	return r;
}

static int qed_check_write(struct image *img, uint64_t off, uint64_t len)
{
	struct qed_priv *p = img->priv;
	uint64_t last, cmask = p->cluster_size - 1;

	if (img->read_only)
		return -EROFS;
	if (len == 0)
		return 0;
	/* Whole clusters, the last one may stick out past img->size (compare
	 * last bytes: the end may be 2^64). */
	if ((off | len) & cmask || !sfs_add_ok(off, len - 1, &last) || img->size == 0 ||
	    last > ((img->size - 1) | cmask)) {
		qed_err(img, "bad allocating write of %llu bytes at %llu", (unsigned long long)len,
			(unsigned long long)off);
		return -EINVAL;
	}
	return 0;
}

/* Before allocating: too many dirty slices? Flush them first, so memory
 * stays bounded and a failing flush fails the write before it changes
 * anything. */
static int qed_relieve(struct image *img)
{
	struct qed_priv *p = img->priv;
	bool over;

	pthread_mutex_lock(&p->lock);
	over = p->dirty_bytes > p->dirty_max;
	pthread_mutex_unlock(&p->lock);
	return over ? qed_flush(img) : 0;
}

/* Make sure every guest cluster in [c0, c0+n) has an L2 table, appending
 * new ones, then reserve data_len bytes after them at *data_off. Called
 * with p->lock held. */
static int qed_reserve(struct image *img, uint64_t c0, uint64_t n, uint64_t data_len,
		       uint64_t *data_off)
{
	struct qed_priv *p = img->priv;
	uint64_t first = c0 >> p->table_bits, last = (c0 + n - 1) >> p->table_bits;
	uint64_t need = 0, total, end;

	for (uint64_t i = first; i <= last; i++) {
		if (p->l1[i] == QED_L1_BAD) {
			qed_err(img, "cannot write at guest offset %llu: invalid L1 entry",
				(unsigned long long)(i << (p->table_bits + p->cluster_bits)));
			return -EIO;
		}
		if (p->l1[i] == 0)
			need++;
	}
	if (!sfs_mul_ok(need, p->table_bytes, &total) || !sfs_add_ok(total, data_len, &total) ||
	    !sfs_add_ok(p->alloc_end, total, &end) || end > QED_MAX_FILE_SIZE)
		return -EFBIG;
	/* New tables are consecutive at alloc_end. Write their zeros now,
	 * while this write can still fail: the flush that fills them must not
	 * be the first write into a sparse hole, or a full disk would fail it
	 * after the guest write was acknowledged. */
	if (need) {
		int r = fetch_write_zeros(img->file, p->alloc_end, need * p->table_bytes);

		if (r < 0) {
			qed_err(img, "cannot reserve space for L2 tables: %s", strerror(-r));
			return r;
		}
	}
	if (need && p->nfresh + need > p->fresh_cap) {
		size_t cap = SFS_MAX(p->fresh_cap * 2, p->nfresh + need + 16);
		uint64_t *nf = realloc(p->fresh, cap * sizeof(*nf));

		if (!nf)
			return -ENOMEM;
		p->fresh = nf;
		p->fresh_cap = cap;
	}
	for (uint64_t i = first; i <= last && need; i++) {
		struct qed_slice *s;
		uint64_t t = p->alloc_end;
		int r;

		if (p->l1[i] != 0)
			continue;
		/* The flush that publishes the table must extend the file
		 * over all of it: dirty its last slice now. A fresh table's
		 * slice is made without dropping the lock. */
		p->fresh[p->nfresh++] = t;
		r = qed_slice_get(img, t, p->table_bytes / p->slice_bytes - 1, &s);
		if (r < 0) {
			p->nfresh--;
			return r;
		}
		qed_slice_dirty(p, s);
		p->alloc_end += p->table_bytes;
		p->l1[i] = t;
		qed_l1_mark(p, i);
	}
	*data_off = p->alloc_end;
	p->alloc_end += data_len;
	return 0;
}

/* Point the L2 entries of guest clusters [c0, c0+n) at value, value+cs, ...
 * (step = cluster size) or all at value (step 0). Called with p->lock held;
 * every L1 entry in the range names a table. */
static int qed_set_entries(struct image *img, uint64_t c0, uint64_t n, uint64_t value,
			   uint64_t step)
{
	struct qed_priv *p = img->priv;
	uint64_t emask = (1ULL << p->table_bits) - 1, smask = (1ULL << p->slice_bits) - 1;
	uint64_t c = c0, cend = c0 + n;

	while (c < cend) {
		uint64_t l2i = c & emask;
		struct qed_slice *s;
		int r;

		r = qed_slice_get(img, p->l1[c >> p->table_bits], l2i >> p->slice_bits, &s);
		if (r < 0)
			return r;
		for (uint64_t j = l2i & smask; j <= smask && c < cend; j++, c++) {
			s->e[j] = htole64(value);
			value += step;
		}
		qed_slice_dirty(p, s);
	}
	return 0;
}

/* Common start of an allocating call: check the range, set need-check on
 * disk, make room in the table cache. Returns 1 to go on, 0 for an empty
 * range, or -errno. */
static int qed_begin_alloc(struct image *img, uint64_t off, uint64_t len)
{
	int r = qed_check_write(img, off, len);

	if (r < 0 || len == 0)
		return r;
	r = qed_mark_dirty(img);
	if (r == 0)
		r = qed_relieve(img);
	return r < 0 ? r : 1;
}

int qed_alloc_write(struct image *img, uint64_t off, const void *buf, size_t len)
{
	struct qed_priv *p = img->priv;
	uint64_t c0 = off >> p->cluster_bits, n = len >> p->cluster_bits, host;
	int r;

	r = qed_begin_alloc(img, off, len);
	if (r <= 0)
		return r;
	pthread_mutex_lock(&p->lock);
	r = qed_reserve(img, c0, n, len, &host);
	pthread_mutex_unlock(&p->lock);
	if (r < 0)
		return r;
	/* One pwrite for the whole request, unlocked. If it fails (a full
	 * disk), the range is handed back when nobody reserved after it, so
	 * a guest retrying writes does not grow the file; otherwise it is
	 * leaked (harmless, 'qemu-img check' calls it a leak). */
	r = fetch_pwrite(img->file, buf, len, host);
	if (r < 0) {
		qed_err(img, "cannot write %zu bytes of data at offset %llu: %s", len,
			(unsigned long long)host, strerror(-r));
		pthread_mutex_lock(&p->lock);
		if (p->alloc_end == host + len)
			p->alloc_end = host;
		pthread_mutex_unlock(&p->lock);
		return r;
	}
	pthread_mutex_lock(&p->lock);
	r = qed_set_entries(img, c0, n, host, p->cluster_size);
	pthread_mutex_unlock(&p->lock);
	return r;
}

int qed_zero_clusters(struct image *img, uint64_t off, uint64_t len)
{
	struct qed_priv *p = img->priv;
	uint64_t c0 = off >> p->cluster_bits, n = len >> p->cluster_bits, unused;
	int r;

	r = qed_begin_alloc(img, off, len);
	if (r <= 0)
		return r;
	pthread_mutex_lock(&p->lock);
	r = qed_reserve(img, c0, n, 0, &unused);
	if (r == 0)
		r = qed_set_entries(img, c0, n, QED_L2_ZERO, 0);
	pthread_mutex_unlock(&p->lock);
	return r;
}
