/* streamfs: QED format driver: the driver table, probe, open and close,
 * header parsing and rewriting. The layout, design and thread model are
 * described in qed.h.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "qed.h"

/* --- Helpers ------------------------------------------------------------- */

static void qed_mutex_init(pthread_mutex_t *m)
{
	pthread_mutexattr_t a;

	pthread_mutexattr_init(&a);
#ifndef NDEBUG
	pthread_mutexattr_settype(&a, PTHREAD_MUTEX_ERRORCHECK);
#endif
	pthread_mutex_init(m, &a);
	pthread_mutexattr_destroy(&a);
}

static void qed_header_from_disk(const struct qed_header_disk *d, struct qed_header *h)
{
	h->cluster_size = le32toh(d->cluster_size);
	h->table_size = le32toh(d->table_size);
	h->header_size = le32toh(d->header_size);
	h->features = le64toh(d->features);
	h->compat_features = le64toh(d->compat_features);
	h->autoclear_features = le64toh(d->autoclear_features);
	h->l1_table_offset = le64toh(d->l1_table_offset);
	h->image_size = le64toh(d->image_size);
	h->backing_filename_offset = le32toh(d->backing_filename_offset);
	h->backing_filename_size = le32toh(d->backing_filename_size);
}

void qed_header_to_disk(const struct qed_header *h, struct qed_header_disk *d)
{
	d->magic = htole32(QED_MAGIC);
	d->cluster_size = htole32(h->cluster_size);
	d->table_size = htole32(h->table_size);
	d->header_size = htole32(h->header_size);
	d->features = htole64(h->features);
	d->compat_features = htole64(h->compat_features);
	d->autoclear_features = htole64(h->autoclear_features);
	d->l1_table_offset = htole64(h->l1_table_offset);
	d->image_size = htole64(h->image_size);
	d->backing_filename_offset = htole32(h->backing_filename_offset);
	d->backing_filename_size = htole32(h->backing_filename_size);
}

static bool qed_table_size_ok(uint32_t ts)
{
	return SFS_IS_POW2(ts) && ts >= QED_MIN_TABLE_SIZE && ts <= QED_MAX_TABLE_SIZE;
}

/* Called with hdr_lock held (or single-threaded). */
int qed_write_header(struct fetch_source *f, const struct qed_header *h)
{
	struct qed_header_disk d;

	qed_header_to_disk(h, &d);
	return fetch_pwrite(f, &d, sizeof(d), 0);
}

/* --- Probe, open, close -------------------------------------------------- */

static int qed_probe(const uint8_t *buf, size_t len)
{
	uint32_t magic;

	if (len < QED_HEADER_BYTES)
		return 0;
	memcpy(&magic, buf, sizeof(magic));
	return le32toh(magic) == QED_MAGIC ? 100 : 0;
}

static void qed_free_tables(struct qed_priv *p)
{
	qed_cache_destroy(p);
	free(p->l1);
	p->l1 = NULL;
	free(p->fresh);
	p->fresh = NULL;
	if (p->init_locks) {
		pthread_mutex_destroy(&p->lock);
		pthread_mutex_destroy(&p->flush_lock);
		pthread_mutex_destroy(&p->hdr_lock);
		p->init_locks = false;
	}
}

/* Validate the header fields against a file of fsize bytes and set the
 * geometry in p. */
static int qed_parse_header(struct image *img, const struct qed_header_disk *d, uint64_t fsize)
{
	struct qed_priv *p = img->priv;
	struct qed_header *h = &p->hdr;
	uint64_t file_end, l2_span, hb;

	if (le32toh(d->magic) != QED_MAGIC) {
		qed_err(img, "bad magic (not a QED image)");
		return -EINVAL;
	}
	qed_header_from_disk(d, h);
	if (h->features & ~QED_FEATURE_MASK) {
		qed_err(img, "unsupported incompatible feature bits 0x%llx",
			(unsigned long long)(h->features & ~QED_FEATURE_MASK));
		return -ENOTSUP;
	}
	if (!qed_cluster_size_ok(h->cluster_size)) {
		qed_err(img, "invalid cluster size %u (must be a power of 2 in [%u, %u])",
			h->cluster_size, QED_MIN_CLUSTER_SIZE, QED_MAX_CLUSTER_SIZE);
		return -EINVAL;
	}
	if (!qed_table_size_ok(h->table_size)) {
		qed_err(img, "invalid table size %u clusters (must be a power of 2 in [%u, %u])",
			h->table_size, QED_MIN_TABLE_SIZE, QED_MAX_TABLE_SIZE);
		return -EINVAL;
	}
	p->cluster_size = h->cluster_size;
	p->cluster_bits = qed_log2(h->cluster_size);
	p->table_bytes = (uint64_t)h->cluster_size * h->table_size;
	p->table_bits = qed_log2(p->table_bytes / sizeof(uint64_t));
	p->slice_bytes = SFS_MIN(p->table_bytes, (uint64_t)QED_SLICE_MAX);
	p->slice_bits = qed_log2(p->slice_bytes / sizeof(uint64_t));
	file_end = SFS_ALIGN_DOWN(fsize, p->cluster_size);

	if (h->header_size == 0 || !sfs_mul_ok(h->header_size, h->cluster_size, &hb) ||
	    hb > file_end) {
		qed_err(img, "invalid header size %u clusters (file has %llu bytes)",
			h->header_size, (unsigned long long)fsize);
		return -EINVAL;
	}
	p->header_bytes = hb;
	if (h->image_size % QED_SECTOR) {
		qed_err(img, "image size %llu is not a multiple of %u",
			(unsigned long long)h->image_size, QED_SECTOR);
		return -EINVAL;
	}
	if (h->image_size > qed_max_image_size(h->cluster_size, h->table_size)) {
		qed_err(img, "image size %llu exceeds the %llu bytes the tables can address",
			(unsigned long long)h->image_size,
			(unsigned long long)qed_max_image_size(h->cluster_size, h->table_size));
		return -EINVAL;
	}
	if (!qed_range_ok(p, h->l1_table_offset, p->table_bytes, file_end)) {
		qed_err(img,
			"L1 table offset %llu is unaligned, inside the header or past the end of "
			"the file (%llu bytes)",
			(unsigned long long)h->l1_table_offset, (unsigned long long)fsize);
		return -EINVAL;
	}
	l2_span = (p->table_bytes / sizeof(uint64_t)) << p->cluster_bits;
	/* image_size may be close to 2^64: no rounding up by addition. */
	p->l1_entries = h->image_size / l2_span + (h->image_size % l2_span != 0);
	if (h->features & QED_F_BACKING_FILE) {
		uint64_t end = (uint64_t)h->backing_filename_offset + h->backing_filename_size;

		if (end > p->header_bytes) {
			qed_err(img,
				"backing file name (%u bytes at offset %u) lies outside the header "
				"(%llu bytes)",
				h->backing_filename_size, h->backing_filename_offset,
				(unsigned long long)p->header_bytes);
			return -EINVAL;
		}
		if (h->backing_filename_size > QED_MAX_BACKING_NAME) {
			qed_err(img, "backing file name too long (%u bytes, at most %u)",
				h->backing_filename_size, QED_MAX_BACKING_NAME);
			return -EINVAL;
		}
	}
	return 0;
}

static int qed_read_backing(struct image *img)
{
	struct qed_priv *p = img->priv;
	const struct qed_header *h = &p->hdr;
	char *name;
	int r;

	if (!(h->features & QED_F_BACKING_FILE))
		return 0;
	if (h->backing_filename_size == 0) {
		sfs_warn("%s: qed: empty backing file name; treating the image as having none",
			 qed_name(img));
		return 0;
	}
	name = malloc(h->backing_filename_size + 1);
	if (!name)
		return -ENOMEM;
	r = fetch_pread(img->file, name, h->backing_filename_size, h->backing_filename_offset);
	if (r < 0) {
		free(name);
		return r;
	}
	name[h->backing_filename_size] = '\0';
	if (strlen(name) != h->backing_filename_size) {
		qed_err(img, "backing file name contains a NUL byte");
		free(name);
		return -EINVAL;
	}
	img->backing_name = name;
	if (h->features & QED_F_BACKING_FORMAT_NO_PROBE) {
		img->backing_fmt = strdup("raw");
		if (!img->backing_fmt)
			return -ENOMEM;
	}
	return 0;
}

static int qed_read_l1(struct image *img)
{
	struct qed_priv *p = img->priv;
	int r;

	if (p->l1_entries == 0)
		return 0;
	p->l1 = malloc(p->l1_entries * sizeof(uint64_t));
	if (!p->l1)
		return -ENOMEM;
	r = fetch_pread(img->file, p->l1, p->l1_entries * sizeof(uint64_t), p->hdr.l1_table_offset);
	if (r < 0)
		return r;
	for (uint64_t i = 0; i < p->l1_entries; i++)
		p->l1[i] = le64toh(p->l1[i]);
	return 0;
}

/* Clear the need-check bit (everything must be durable already). Called
 * with hdr_lock held or single-threaded. */
static int qed_clear_need_check(struct image *img)
{
	struct qed_priv *p = img->priv;
	int r;

	p->hdr.features &= ~QED_F_NEED_CHECK;
	r = qed_write_header(img->file, &p->hdr);
	if (r == 0)
		r = fetch_flush(img->file);
	if (r < 0) {
		p->hdr.features |= QED_F_NEED_CHECK;
		qed_err(img, "cannot clear the need-check bit: %s", strerror(-r));
	}
	return r;
}

/* Unknown autoclear features are invalid once we write: clear them. */
static int qed_clear_autoclear(struct image *img)
{
	struct qed_priv *p = img->priv;
	int r;

	if (!(p->hdr.autoclear_features & ~QED_AUTOCLEAR_FEATURE_MASK))
		return 0;
	p->hdr.autoclear_features &= QED_AUTOCLEAR_FEATURE_MASK;
	r = qed_write_header(img->file, &p->hdr);
	if (r == 0)
		r = fetch_flush(img->file);
	return r;
}

/* Check the tables at open: always after an unclean close, and before we
 * write in place; a clean read-only image only has its L1 entries marked. */
static int qed_open_check(struct image *img, uint64_t file_end)
{
	struct qed_priv *p = img->priv;
	int r;

	if (p->hdr.features & QED_F_NEED_CHECK) {
		sfs_info("%s: qed: image was not closed cleanly; checking it", qed_name(img));
		return qed_check(img, file_end, img->read_only ? QED_CHECK_REFUSE : QED_CHECK_FIX);
	}
	/* Before we write in place, prove no cluster is referenced twice (a
	 * guest cluster on a table or on another guest cluster) and none lies
	 * past the end of the file. */
	if (!img->read_only) {
		r = qed_check(img, file_end, QED_CHECK_CLEAN);
		if (r < 0)
			return r;
	}
	qed_validate_l1(img, file_end);
	return 0;
}

/* A torn append from a crash: nothing references it. Truncate the file to
 * file_end, durably. */
static int qed_drop_partial_cluster(struct image *img, uint64_t file_end)
{
	int r;

	sfs_info("%s: qed: dropping a partial cluster at the end of the file", qed_name(img));
	r = fetch_truncate(img->file, file_end);
	if (r == 0)
		r = fetch_flush(img->file);
	if (r < 0)
		qed_err(img, "cannot truncate the file to %llu bytes: %s",
			(unsigned long long)file_end, strerror(-r));
	return r;
}

static int qed_do_open(struct image *img)
{
	struct qed_priv *p = img->priv;
	struct qed_header_disk d;
	uint64_t fsize = fetch_size(img->file), file_end;
	int r;

	if (fsize < QED_HEADER_BYTES) {
		qed_err(img, "file too small for a QED header (%llu bytes)",
			(unsigned long long)fsize);
		return -EINVAL;
	}
	r = fetch_pread(img->file, &d, sizeof(d), 0);
	if (r < 0)
		return r;
	r = qed_parse_header(img, &d, fsize);
	if (r < 0)
		return r;
	p->l1_offset = p->hdr.l1_table_offset;
	file_end = SFS_ALIGN_DOWN(fsize, p->cluster_size);
	r = qed_read_backing(img);
	if (r < 0)
		return r;
	r = qed_cache_init(p);
	if (r < 0)
		return r;
	r = qed_read_l1(img);
	if (r < 0)
		return r;

	if (!img->read_only) {
		r = qed_clear_autoclear(img);
		if (r < 0)
			return r;
	}
	r = qed_open_check(img, file_end);
	if (r < 0)
		return r;
	if (!img->read_only && fsize != file_end) {
		r = qed_drop_partial_cluster(img, file_end);
		if (r < 0)
			return r;
	}
	if (!img->read_only && (p->hdr.features & QED_F_NEED_CHECK)) {
		r = qed_clear_need_check(img);
		if (r < 0)
			return r;
	}
	p->alloc_end = file_end;
	p->dirty_max = SFS_MAX((uint64_t)QED_DIRTY_MAX, 4 * p->slice_bytes);
	img->size = p->hdr.image_size;
	img->cluster_size = p->hdr.cluster_size;
	return 0;
}

static int qed_open(struct image *img)
{
	struct qed_priv *p = img->priv;
	int r;

	qed_mutex_init(&p->lock);
	qed_mutex_init(&p->flush_lock);
	qed_mutex_init(&p->hdr_lock);
	p->init_locks = true;
	r = qed_do_open(img);
	if (r < 0) {
		qed_free_tables(p);
		free(img->backing_name);
		free(img->backing_fmt);
		img->backing_name = img->backing_fmt = NULL;
	}
	return r;
}

static void qed_close(struct image *img)
{
	struct qed_priv *p = img->priv;

	if (!img->read_only) {
		bool dirty;
		int r;

		pthread_mutex_lock(&p->lock);
		dirty = p->dirty_bytes || p->l1_lo < p->l1_hi;
		pthread_mutex_unlock(&p->lock);
		r = dirty ? qed_flush(img) : fetch_flush(img->file);
		pthread_mutex_lock(&p->hdr_lock);
		if (r == 0 && (p->hdr.features & QED_F_NEED_CHECK))
			qed_clear_need_check(img);
		else if (r < 0)
			qed_err(img, "metadata not flushed (%s); leaving the need-check bit set",
				strerror(-r));
		pthread_mutex_unlock(&p->hdr_lock);
	}
	qed_free_tables(p);
}

/* --- Header rewrite ------------------------------------------------------ */

static int qed_set_backing(struct image *img, const char *name, const char *fmt)
{
	struct qed_priv *p = img->priv;
	size_t namelen = name ? strlen(name) : 0;
	struct qed_header h;
	char *new_name = NULL, *new_fmt = NULL;
	bool raw = name && fmt && strcmp(fmt, "raw") == 0;
	uint8_t *buf;
	int r;

	if (img->read_only)
		return -EROFS;
	if (namelen > QED_MAX_BACKING_NAME || QED_HEADER_BYTES + namelen > p->header_bytes) {
		qed_err(img,
			"backing file name of %zu bytes does not fit in the header (%llu bytes)",
			namelen, (unsigned long long)p->header_bytes);
		return -ENAMETOOLONG;
	}
	if (name && namelen == 0) {
		qed_err(img, "empty backing file name");
		return -EINVAL;
	}
	if (name && !(new_name = strdup(name)))
		return -ENOMEM;
	if (raw && !(new_fmt = strdup("raw"))) {
		free(new_name);
		return -ENOMEM;
	}
	buf = calloc(1, QED_HEADER_BYTES + namelen);
	if (!buf) {
		free(new_name);
		free(new_fmt);
		return -ENOMEM;
	}
	r = qed_flush(img);
	if (r < 0)
		goto out;

	pthread_mutex_lock(&p->hdr_lock);
	h = p->hdr;
	h.features &= ~(QED_F_BACKING_FILE | QED_F_BACKING_FORMAT_NO_PROBE);
	h.backing_filename_offset = 0;
	h.backing_filename_size = 0;
	if (name) {
		h.features |= QED_F_BACKING_FILE;
		if (raw)
			h.features |= QED_F_BACKING_FORMAT_NO_PROBE;
		h.backing_filename_offset = QED_HEADER_BYTES;
		h.backing_filename_size = (uint32_t)namelen;
		memcpy(buf + QED_HEADER_BYTES, name, namelen);
	}
	qed_header_to_disk(&h, (struct qed_header_disk *)buf);
	r = fetch_pwrite(img->file, buf, QED_HEADER_BYTES + namelen, 0);
	if (r == 0)
		r = fetch_flush(img->file);
	if (r == 0)
		p->hdr = h;
	pthread_mutex_unlock(&p->hdr_lock);
	if (r < 0) {
		qed_err(img, "cannot rewrite the header: %s", strerror(-r));
		goto out;
	}
	free(img->backing_name);
	free(img->backing_fmt);
	img->backing_name = new_name;
	img->backing_fmt = new_fmt;
	new_name = new_fmt = NULL;
out:
	free(buf);
	free(new_name);
	free(new_fmt);
	return r;
}

const struct image_driver image_qed_driver = {
    .name = "qed",
    .priv_size = sizeof(struct qed_priv),
    .probe = qed_probe,
    .open = qed_open,
    .close = qed_close,
    .map = qed_map,
    .read_compressed = NULL,
    .alloc_write = qed_alloc_write,
    .zero_clusters = qed_zero_clusters,
    .flush = qed_flush,
    .set_backing = qed_set_backing,
    .create = qed_create,
};
