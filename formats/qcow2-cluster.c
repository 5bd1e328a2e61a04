/* streamfs: qcow2 guest cluster mapping: map, compressed reads, allocating
 * writes and zero clusters.
 *
 * Lookups walk L1 -> L2 (through qcow2-cache.c) and return a run of guest
 * clusters in one state. Writes follow the order of include/image.h:
 * reserve host clusters under p->lock (qcow2-refcount.c), write the data
 * with the lock dropped, then publish the new L2 entries under the lock;
 * the tables reach the disk only in qcow2_flush(). L2 tables are created
 * before the data write, so publishing cannot fail for lack of space.
 */

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "qcow2.h"

void qcow2_l1_mark(struct qcow2_priv *p, uint64_t idx)
{
	p->l1_dirty[idx * 8 / QCOW2_CHUNK] = 1;
}

/* Host range [*off, *off+*len) occupied by a compressed cluster descriptor. */
static void qcow2_compressed_range(const struct qcow2_priv *p, uint64_t entry, uint64_t *off,
				   uint64_t *len)
{
	uint64_t nsec = ((entry >> p->csize_shift) & p->csize_mask) + 1;

	*off = entry & p->coff_mask;
	*len = nsec * 512 - (*off & 511);
}

/* The clusters an old L2 entry held, to be released once it is replaced. */
static int qcow2_release_entry(struct image *img, uint64_t entry)
{
	struct qcow2_priv *p = img->priv;
	uint64_t off, len;

	if (entry & QCOW2_OFLAG_COMPRESSED) {
		qcow2_compressed_range(p, entry, &off, &len);
		return qcow2_free_later(p, off, len);
	}
	off = entry & QCOW2_OFFSET_MASK;
	if (off)
		return qcow2_free_later(p, off, p->cs);
	return 0;
}

/* Get the L2 table for L1 index l1i, pinned. With alloc, an empty L1 entry
 * gets a new zeroed table; without, *out is NULL for an empty entry.
 * Called with p->lock held; may drop it. */
static int qcow2_get_l2(struct image *img, uint64_t l1i, bool alloc, struct qcow2_meta **out)
{
	struct qcow2_priv *p = img->priv;
	uint64_t off, host;
	int r;

	for (;;) {
		off = p->l1[l1i] & QCOW2_OFFSET_MASK;
		if (off)
			return qcow2_cache_get(img, off, false, out);
		if (!alloc) {
			*out = NULL;
			return 0;
		}
		r = qcow2_alloc_clusters(img, 1, &host);
		if (r < 0)
			return r;
		if (p->l1[l1i] & QCOW2_OFFSET_MASK) {
			/* Another thread linked one while we allocated. */
			r = qcow2_free_now(img, host, p->cs);
			if (r < 0)
				return r;
			continue;
		}
		r = qcow2_prezero(img, host, p->cs);
		if (r < 0) {
			qcow2_free_now(img, host, p->cs);
			return r;
		}
		r = qcow2_cache_new(img, host, false, out);
		if (r < 0)
			return r;
		p->l1[l1i] = host | QCOW2_OFLAG_COPIED;
		qcow2_l1_mark(p, l1i);
		return 0;
	}
}

/* Classify one L2 entry of guest cluster gc; DATA entries are checked
 * against the file. Returns the type, or -EIO after logging. */
static int qcow2_classify(struct image *img, uint64_t gc, uint64_t entry, uint64_t *host, bool log)
{
	struct qcow2_priv *p = img->priv;
	uint64_t off, need, gstart;

	if (entry & QCOW2_OFLAG_COMPRESSED) {
		*host = entry;
		return EXT_COMPRESSED;
	}
	if (entry & QCOW2_OFLAG_ZERO) {
		*host = 0;
		return EXT_ZERO;
	}
	off = entry & QCOW2_OFFSET_MASK;
	if (!off) {
		*host = 0;
		return EXT_UNALLOC;
	}
	gstart = gc << p->cluster_bits;
	need = SFS_MIN((uint64_t)p->cs, img->size - gstart);
	if (off & (p->cs - 1)) {
		if (log)
			qcow2_err(
			    img, "L2 entry for guest offset %#llx points to unaligned offset %#llx",
			    (unsigned long long)gstart, (unsigned long long)off);
		return -EIO;
	}
	if (off + need > fetch_size(img->file)) {
		qcow2_err(img,
			  "L2 entry for guest offset %#llx points past the end of the file "
			  "(%#llx)",
			  (unsigned long long)gstart, (unsigned long long)off);
		return -EIO;
	}
	*host = off;
	return EXT_DATA;
}

int qcow2_map(struct image *img, uint64_t off, uint64_t len, struct extent *ext)
{
	struct qcow2_priv *p = img->priv;
	uint64_t pos = off, end = off + len, acc = 0, next_host = 0;
	uint32_t table_bits = p->cluster_bits + p->l2_bits;
	int type = -1, r = 0;

	pthread_mutex_lock(&p->lock);
	while (pos < end) {
		uint64_t l1i = pos >> table_bits;
		uint64_t tend = SFS_MIN(end, (l1i + 1) << table_bits);
		struct qcow2_meta *t;

		if (l1i >= p->l1_size) {
			r = -EIO; /* cannot happen: open checked l1_size against the size */
			break;
		}
		r = qcow2_get_l2(img, l1i, false, &t);
		if (r < 0) {
			if (type >= 0)
				r = 0; /* the run so far stands; the error comes on the next call */
			break;
		}
		if (!t) {
			if (type >= 0 && type != EXT_UNALLOC)
				goto done;
			type = EXT_UNALLOC;
			acc += tend - pos;
			pos = tend;
			continue;
		}
		while (pos < tend) {
			uint64_t gc = pos >> p->cluster_bits;
			uint64_t i = gc & ((1ULL << p->l2_bits) - 1);
			uint64_t chunk = SFS_MIN(tend, (gc + 1) << p->cluster_bits) - pos;
			uint64_t host;
			int t_type =
			    qcow2_classify(img, gc, qcow2_get64(t->buf + 8 * i), &host, type < 0);

			if (t_type < 0) {
				if (type < 0)
					r = t_type; /* fail this cluster only; a run before it
						       stands */
				qcow2_cache_put(t);
				goto done;
			}
			if (type < 0) {
				type = t_type;
				ext->host_off =
				    t_type == EXT_COMPRESSED ? host : host + (pos & (p->cs - 1));
				next_host = host + p->cs;
			} else if (t_type != type || type == EXT_COMPRESSED ||
				   (type == EXT_DATA && host != next_host)) {
				qcow2_cache_put(t);
				goto done;
			} else {
				next_host += p->cs;
			}
			acc += chunk;
			pos += chunk;
		}
		qcow2_cache_put(t);
	}
done:
	pthread_mutex_unlock(&p->lock);
	if (r < 0)
		return r;
	ext->type = (enum extent_type)type;
	ext->len = acc;
	if (type != EXT_DATA && type != EXT_COMPRESSED)
		ext->host_off = 0;
	return 0;
}

int qcow2_read_compressed(struct image *img, uint64_t off, const struct extent *ext, void *buf,
			  size_t len)
{
	struct qcow2_priv *p = img->priv;
	uint64_t coff, csize, fsize = fetch_size(img->file);
	uint64_t skip = off & (p->cs - 1), consumed = 0;
	uint8_t *in = NULL, *scratch = NULL;
	z_stream z;
	int r = 0, zr;

	if (ext->type != EXT_COMPRESSED || !(ext->host_off & QCOW2_OFLAG_COMPRESSED) ||
	    skip + len > p->cs)
		return -EINVAL;
	qcow2_compressed_range(p, ext->host_off, &coff, &csize);
	if (coff >= fsize) {
		qcow2_err(img,
			  "compressed cluster for guest offset %#llx starts past the end of "
			  "the file (%#llx)",
			  (unsigned long long)off, (unsigned long long)coff);
		return -EIO;
	}
	csize = SFS_MIN(csize, fsize - coff);
	in = malloc(QCOW2_ZBUF);
	scratch = skip ? malloc(QCOW2_ZBUF) : NULL;
	if (!in || (skip && !scratch)) {
		free(in);
		free(scratch);
		return -ENOMEM;
	}
	memset(&z, 0, sizeof(z));
	if (inflateInit2(&z, -12) != Z_OK) {
		free(in);
		free(scratch);
		return -ENOMEM;
	}
	/* Inflate the prefix we do not want into scratch, then the rest into buf. */
	while (skip > 0 || len > 0) {
		if (skip > 0) {
			z.next_out = scratch;
			z.avail_out = (uInt)SFS_MIN(skip, (uint64_t)QCOW2_ZBUF);
		} else {
			z.next_out = buf;
			z.avail_out = (uInt)len;
		}
		uInt before = z.avail_out;

		if (z.avail_in == 0 && consumed < csize) {
			size_t n = (size_t)SFS_MIN(csize - consumed, (uint64_t)QCOW2_ZBUF);

			r = fetch_pread(img->file, in, n, coff + consumed);
			if (r < 0)
				break;
			consumed += n;
			z.next_in = in;
			z.avail_in = (uInt)n;
		}
		zr = inflate(&z, Z_NO_FLUSH);
		uInt produced = before - z.avail_out;

		if (skip > 0) {
			skip -= produced;
		} else {
			buf = (uint8_t *)buf + produced;
			len -= produced;
		}
		if (skip == 0 && len == 0)
			break; /* output full: Z_OK, Z_STREAM_END or Z_BUF_ERROR all fine */
		if (zr == Z_STREAM_END || (zr != Z_OK && zr != Z_BUF_ERROR) ||
		    (produced == 0 && z.avail_in == 0 && consumed >= csize)) {
			qcow2_err(img, "compressed cluster for guest offset %#llx is corrupt (%s)",
				  (unsigned long long)off,
				  zr == Z_STREAM_END ? "too short"
				  : z.msg	     ? z.msg
						     : "truncated");
			r = -EIO;
			break;
		}
	}
	inflateEnd(&z);
	free(in);
	free(scratch);
	return r;
}

/* ---- writing ---- */

/* Flush when dirty tables take more than half the cache budget. */
static bool qcow2_flush_needed(struct qcow2_priv *p)
{
	return p->n_dirty * 2 > p->max_meta;
}

/* Set the L2 entries of whole clusters [off, off+len) to host + i*cs (or to
 * 'entry' for every cluster when host is 0: zero clusters).
 * Called with p->lock held; may drop it. */
static int qcow2_update_l2(struct image *img, uint64_t off, uint64_t len, uint64_t host, bool zero)
{
	struct qcow2_priv *p = img->priv;
	uint32_t table_bits = p->cluster_bits + p->l2_bits;
	uint64_t pos = off, end = off + len;
	int r = 0;

	while (pos < end) {
		uint64_t l1i = pos >> table_bits;
		uint64_t tend = SFS_MIN(end, (l1i + 1) << table_bits);
		struct qcow2_meta *t;

		r = qcow2_get_l2(img, l1i, true, &t);
		if (r < 0)
			return r;
		for (; pos < tend; pos += p->cs) {
			uint64_t i = (pos >> p->cluster_bits) & ((1ULL << p->l2_bits) - 1);
			uint64_t old = qcow2_get64(t->buf + 8 * i), new;

			if (!zero) {
				new = (host + (pos - off)) | QCOW2_OFLAG_COPIED;
				if (old & (QCOW2_OFLAG_COMPRESSED | QCOW2_OFFSET_MASK))
					r = qcow2_release_entry(img, old);
			} else if (old & QCOW2_OFLAG_COMPRESSED) {
				new = QCOW2_OFLAG_ZERO;
				r = qcow2_release_entry(img, old);
			} else {
				/* Keep a data cluster as preallocation: readers may
				 * still be reading it without a lock. */
				new = old | QCOW2_OFLAG_ZERO;
			}
			if (r < 0)
				break;
			qcow2_put64(t->buf + 8 * i, new);
		}
		qcow2_cache_dirty(p, t);
		qcow2_cache_put(t);
		if (r < 0)
			return r;
	}
	return 0;
}

/* Make sure the L2 tables covering guest [off, off+len) exist (tables are
 * never freed), so that the update after the data write cannot fail for
 * lack of space, leaking the data clusters. Called with p->lock held. */
static int qcow2_ensure_l2(struct image *img, uint64_t off, uint64_t len)
{
	struct qcow2_priv *p = img->priv;
	uint32_t table_bits = p->cluster_bits + p->l2_bits;
	int r = 0;

	if (len == 0)
		return 0;
	for (uint64_t l1i = off >> table_bits; r == 0 && l1i <= (off + len - 1) >> table_bits;
	     l1i++) {
		struct qcow2_meta *t;

		r = qcow2_get_l2(img, l1i, true, &t);
		if (r == 0)
			qcow2_cache_put(t);
	}
	return r;
}

static int qcow2_check_write(struct image *img, uint64_t off, uint64_t len)
{
	struct qcow2_priv *p = img->priv;
	uint64_t end;

	if (img->read_only)
		return -EROFS;
	if ((off | len) & (p->cs - 1) || len == 0 || !sfs_add_ok(off, len, &end) ||
	    end > SFS_ALIGN_UP(img->size, p->cs))
		return -EINVAL;
	return 0;
}

int qcow2_alloc_write(struct image *img, uint64_t off, const void *buf, size_t len)
{
	struct qcow2_priv *p = img->priv;
	uint64_t host;
	bool flush;
	int r;

	r = qcow2_check_write(img, off, len);
	if (r < 0)
		return r;
	pthread_mutex_lock(&p->lock);
	r = qcow2_ensure_l2(img, off, len);
	if (r == 0)
		r = qcow2_alloc_clusters(img, len >> p->cluster_bits, &host);
	pthread_mutex_unlock(&p->lock);
	if (r < 0)
		return r;

	r = fetch_pwrite(img->file, buf, len, host);

	pthread_mutex_lock(&p->lock);
	if (r < 0) {
		qcow2_err(img, "writing %zu bytes at %#llx: %s", len, (unsigned long long)host,
			  strerror(-r));
		qcow2_free_now(img, host, len); /* nothing references them */
	} else {
		r = qcow2_update_l2(img, off, len, host, false);
	}
	flush = qcow2_flush_needed(p);
	pthread_mutex_unlock(&p->lock);
	if (r == 0 && flush)
		r = qcow2_flush(img);
	return r;
}

int qcow2_zero_clusters(struct image *img, uint64_t off, uint64_t len)
{
	struct qcow2_priv *p = img->priv;
	bool flush;
	int r;

	r = qcow2_check_write(img, off, len);
	if (r < 0)
		return r;
	if (p->version < 3)
		return -ENOTSUP;
	pthread_mutex_lock(&p->lock);
	r = qcow2_update_l2(img, off, len, 0, true);
	flush = qcow2_flush_needed(p);
	pthread_mutex_unlock(&p->lock);
	if (r == 0 && flush)
		r = qcow2_flush(img);
	return r;
}
