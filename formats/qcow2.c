/* streamfs: qcow2 format driver (versions 2 and 3): the driver table, probe,
 * open/close, header parsing and the header rewrite of set_backing.
 *
 * This file is the driver's front door: it turns the on-disk header into
 * struct qcow2_priv (the layout and the locking rules are in qcow2.h) and
 * hands every other job to one file each: qcow2-check.c decides whether the
 * image is safe to open, qcow2-cluster.c serves map/read/write,
 * qcow2-flush.c makes metadata durable, qcow2-create.c writes new images.
 */

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2.h"

/* ---- probe, open, close ---- */

static int qcow2_probe(const uint8_t *buf, size_t len)
{
	if (len >= 4 && qcow2_get32(buf) == QCOW2_MAGIC)
		return 100;
	return 0;
}

static void qcow2_free_tables(struct qcow2_priv *p)
{
	qcow2_cache_destroy(p);
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

/* Header fields open() checks but struct qcow2_priv does not keep. */
struct qcow2_hdr_fields {
	uint64_t size;	      /* guest size, in bytes */
	uint64_t bfoff;	      /* backing file name offset, in bytes */
	uint32_t bfsize;      /* backing file name length, in bytes */
	uint32_t crypt;	      /* crypt_method */
	uint64_t incompat;    /* incompatible_features (v3) */
	uint64_t autoclear;   /* autoclear_features (v3) */
	uint32_t compression; /* compression_type (v3 with a longer header) */
};

/* Parse the fixed header fields into p and h, and derive the geometry. */
static int qcow2_parse_fixed(struct image *img, struct qcow2_priv *p, uint64_t fsize,
			     struct qcow2_hdr_fields *h)
{
	uint8_t fixed[QCOW2_V3_HEADER_BYTES + 8] = {0};
	int r;

	memset(h, 0, sizeof(*h));
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
	h->bfoff = qcow2_get64(fixed + 8);
	h->bfsize = qcow2_get32(fixed + 16);
	p->cluster_bits = qcow2_get32(fixed + 20);
	h->size = qcow2_get64(fixed + 24);
	h->crypt = qcow2_get32(fixed + 32);
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
		h->incompat = qcow2_get64(fixed + 72);
		h->autoclear = qcow2_get64(fixed + 88);
		p->refcount_order = qcow2_get32(fixed + 96);
		p->header_length = qcow2_get32(fixed + 100);
		if (p->header_length < QCOW2_V3_HEADER_BYTES || p->header_length % 8 ||
		    p->header_length > p->cs || p->header_length > fsize) {
			qcow2_err(img, "invalid header_length %u", p->header_length);
			return -EINVAL;
		}
		if (p->header_length > QCOW2_V3_HEADER_BYTES)
			h->compression = fixed[104];
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
	return 0;
}

/* Set img->backing_name from the avail bytes of the header cluster in hdr
 * (and drop a backing format that comes without a name). */
static int qcow2_read_backing_name(struct image *img, const struct qcow2_priv *p,
				   const uint8_t *hdr, uint32_t avail,
				   const struct qcow2_hdr_fields *h)
{
	uint64_t bend;

	if (!h->bfoff || !h->bfsize) {
		free(img->backing_fmt); /* a format without a name means nothing */
		img->backing_fmt = NULL;
		return 0;
	}
	if (h->bfsize > QCOW2_MAX_BACKING_NAME || !sfs_add_ok(h->bfoff, h->bfsize, &bend) ||
	    bend > p->cs || bend > avail || h->bfoff < p->header_length) {
		qcow2_err(img, "invalid backing file name (offset %llu, length %u)",
			  (unsigned long long)h->bfoff, h->bfsize);
		return -EINVAL;
	}
	if (memchr(hdr + h->bfoff, 0, h->bfsize)) {
		qcow2_err(img, "backing file name contains a NUL byte");
		return -EINVAL;
	}
	img->backing_name = strndup((const char *)hdr + h->bfoff, h->bfsize);
	return img->backing_name ? 0 : -ENOMEM;
}

/* Read the header cluster: extensions, feature bits, encryption, backing
 * name. */
static int qcow2_parse_header_cluster(struct image *img, struct qcow2_priv *p, uint64_t fsize,
				      const struct qcow2_hdr_fields *h)
{
	uint32_t avail = (uint32_t)SFS_MIN((uint64_t)p->cs, fsize), limit;
	uint8_t *hdr = malloc(p->cs);
	struct qcow2_exts x;
	int r;

	if (!hdr)
		return -ENOMEM;
	r = fetch_pread(img->file, hdr, avail, 0);
	if (r < 0)
		goto out;
	/* Extensions end where the backing name starts (old v2 images put the
	 * name right after the header, with no extension area at all). */
	limit = p->cs;
	if (h->bfoff && h->bfoff < limit)
		limit = (uint32_t)h->bfoff;
	r = qcow2_parse_exts(img, hdr, avail, p->header_length, limit, &x);
	if (r < 0)
		goto out;
	r = qcow2_check_features(img, h->incompat, h->compression, &x);
	if (r < 0)
		goto out;
	if (h->crypt != 0) {
		qcow2_err(img, "encrypted images (crypt_method %u, %s) are not supported", h->crypt,
			  h->crypt == 1	  ? "AES"
			  : h->crypt == 2 ? "LUKS"
					  : "unknown");
		r = -ENOTSUP;
		goto out;
	}
	r = qcow2_read_backing_name(img, p, hdr, avail, h);
out:
	free(hdr);
	return r;
}

/* Load the L1 table (CPU-endian) and its dirty map. */
static int qcow2_load_l1(struct image *img, struct qcow2_priv *p)
{
	int r;

	p->l1 = calloc(SFS_MAX(p->l1_size, 1u), sizeof(*p->l1));
	p->l1_dirty = calloc(SFS_DIV_ROUND_UP((uint64_t)p->l1_size * 8, QCOW2_CHUNK) + 1, 1);
	if (!p->l1 || !p->l1_dirty)
		return -ENOMEM;
	if (!p->l1_size)
		return 0;
	r = fetch_pread(img->file, p->l1, (size_t)p->l1_size * 8, p->l1_offset);
	if (r < 0)
		return r;
	for (uint32_t i = 0; i < p->l1_size; i++)
		p->l1[i] = be64toh(p->l1[i]);
	return 0;
}

/* Load the refcount table (CPU-endian) and its dirty map; writable images
 * only. */
static int qcow2_load_rct(struct image *img, struct qcow2_priv *p, uint64_t rct_bytes)
{
	int r;

	p->rct_entries = rct_bytes / 8;
	p->rct = malloc(rct_bytes);
	p->rct_dirty = calloc(rct_bytes / QCOW2_CHUNK, 1);
	if (!p->rct || !p->rct_dirty)
		return -ENOMEM;
	r = qcow2_read_meta(img, p->rct_offset, p->rct, rct_bytes);
	if (r < 0)
		return r;
	for (uint64_t i = 0; i < p->rct_entries; i++) {
		p->rct[i] = be64toh(p->rct[i]);
		if (p->rct[i] & (p->cs - 1)) {
			qcow2_err(img, "refcount table entry %llu (%#llx) is not cluster aligned",
				  (unsigned long long)i, (unsigned long long)p->rct[i]);
			return -EINVAL;
		}
	}
	return 0;
}

/* We maintain none of the autoclear features (bitmaps): clear them as QEMU
 * does, durably, before the first write. */
static int qcow2_clear_autoclear(struct image *img)
{
	uint8_t zero[8] = {0};
	int r = fetch_pwrite(img->file, zero, sizeof(zero), QCOW2_HDR_AUTOCLEAR);

	if (r == 0)
		r = fetch_flush(img->file);
	if (r < 0)
		qcow2_err(img, "cannot clear autoclear feature bits: %s", strerror(-r));
	return r;
}

/* Read and check the header and tables. Called from qcow2_open only. */
static int qcow2_do_open(struct image *img, struct qcow2_priv *p)
{
	uint64_t fsize = fetch_size(img->file), rct_bytes;
	struct qcow2_hdr_fields h;
	int r;

	r = qcow2_parse_fixed(img, p, fsize, &h);
	if (r == 0)
		r = qcow2_parse_header_cluster(img, p, fsize, &h);
	if (r == 0)
		r = qcow2_check_layout(img, h.size);
	if (r < 0)
		return r;
	img->size = h.size;
	img->cluster_size = p->cs;
	r = qcow2_init_cache(p, !img->read_only);
	if (r == 0)
		r = qcow2_load_l1(img, p);
	if (r < 0 || img->read_only)
		return r;

	/* Writable: load the refcount table, prove no cluster is referenced
	 * twice, clear autoclear bits. */
	rct_bytes = (uint64_t)p->rct_clusters * p->cs;
	r = qcow2_load_rct(img, p, rct_bytes);
	if (r == 0)
		r = qcow2_check_refs(img, fsize, rct_bytes);
	if (r == 0 && h.autoclear)
		r = qcow2_clear_autoclear(img);
	if (r == 0)
		p->next_free = SFS_ALIGN_UP(fetch_size(img->file), p->cs);
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

/* ---- header rewriting ---- */

/* Build header cluster bytes [0, *used) into out (cs bytes, zeroed):
 * 'base' holds the header fields (header_length bytes); other_exts/other_len
 * are extensions to keep verbatim. */
int qcow2_build_header(uint8_t *out, uint32_t cs, const uint8_t *base, uint32_t hlen,
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
    .create_option = qcow2_create_option,
};
