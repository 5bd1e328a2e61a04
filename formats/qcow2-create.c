/* streamfs: qcow2 image creation.
 *
 * Writes a new empty image laid out as `qemu-img create` does (header with
 * QEMU's feature name table, refcount table, refcount blocks counting the
 * metadata, an empty L1 table ending the file), so tools see the same file.
 * Works on a bare fetch_source: there is no struct image yet.
 */

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2.h"

/* QEMU 7.2's feature name table, so our headers match `qemu-img create`. */
static const struct {
	uint8_t type, bit;
	const char *name;
} qcow2_feature_table[] = {
    {0, 0, "dirty bit"},	{0, 1, "corrupt bit"},	       {0, 2, "external data file"},
    {0, 3, "compression type"}, {0, 4, "extended L2 entries"}, {1, 0, "lazy refcounts"},
    {2, 0, "bitmaps"},		{2, 1, "raw external data"},
};

/* Geometry of a new image: header cluster, rt refcount table clusters, rb
 * refcount blocks, then the L1 table; refcount order 4 (16 bits). */
struct qcow2_new_layout {
	uint32_t cs;	      /* cluster size, in bytes */
	uint32_t bits;	      /* log2(cs) */
	uint32_t version;     /* 2 or 3 */
	uint64_t size;	      /* guest size, in bytes (whole sectors) */
	uint64_t l1_size;     /* L1 entries */
	uint64_t rt, rb;      /* refcount table clusters, refcount blocks */
	uint64_t total;	      /* clusters in use: everything but the L1 tail */
	uint64_t e_per_block; /* refcount entries per block */
};

#define QCOW2_NEW_REFCOUNT_ORDER 4

/* Check the options and work out the layout. */
static int qcow2_create_layout(struct fetch_source *f, const struct image_create_opts *opts,
			       struct qcow2_new_layout *lay)
{
	uint32_t cs = opts->cluster_size ? opts->cluster_size : 65536;
	uint64_t l2_cover, l1_clusters, size;

	memset(lay, 0, sizeof(*lay));
	lay->version = opts->version ? (uint32_t)opts->version : 3;
	if (!SFS_IS_POW2(cs) || cs < (1u << QCOW2_MIN_CLUSTER_BITS) ||
	    cs > (1u << QCOW2_MAX_CLUSTER_BITS)) {
		sfs_error("%s: qcow2: cluster size %u must be a power of two from 512 to 2M",
			  f->uri, cs);
		return -EINVAL;
	}
	if (lay->version != 2 && lay->version != 3) {
		sfs_error("%s: qcow2: version %u is not supported (2 or 3)", f->uri, lay->version);
		return -EINVAL;
	}
	/* Like qemu-img, round the size up to whole sectors: QEMU cannot address
	 * a partial last sector. */
	if (!sfs_add_ok(opts->size, 511, &size)) {
		sfs_error("%s: qcow2: virtual size %llu is too large", f->uri,
			  (unsigned long long)opts->size);
		return -EINVAL;
	}
	size = SFS_ALIGN_DOWN(size, 512);
	while ((1u << lay->bits) < cs)
		lay->bits++;
	l2_cover = (uint64_t)cs * (cs / 8);
	lay->l1_size = size / l2_cover + (size % l2_cover != 0);
	if (lay->l1_size * 8 > QCOW2_MAX_L1_BYTES) {
		sfs_error("%s: qcow2: virtual size %llu is too large for %u-byte clusters", f->uri,
			  (unsigned long long)size, cs);
		return -EINVAL;
	}
	lay->cs = cs;
	lay->size = size;
	l1_clusters = SFS_DIV_ROUND_UP(lay->l1_size * 8, cs);
	lay->e_per_block = (uint64_t)cs * 8 >> QCOW2_NEW_REFCOUNT_ORDER;
	lay->rt = lay->rb = 1;
	for (;;) { /* refcount blocks and table big enough to count themselves */
		uint64_t rb2, rt2;

		lay->total = 1 + lay->rt + lay->rb + l1_clusters;
		rb2 = SFS_DIV_ROUND_UP(lay->total, lay->e_per_block);
		rt2 = SFS_DIV_ROUND_UP(rb2 * 8, cs);
		if (rb2 == lay->rb && rt2 == lay->rt)
			return 0;
		lay->rb = rb2;
		lay->rt = rt2;
	}
}

/* The header fields (QCOW2_OUR_HEADER_LEN bytes, zeroed) of the new image;
 * returns its header_length. */
static uint32_t qcow2_create_fields(const struct qcow2_new_layout *lay, uint8_t *base)
{
	uint32_t hlen = lay->version == 3 ? QCOW2_OUR_HEADER_LEN : QCOW2_V2_HEADER_BYTES;
	uint64_t cs = lay->cs;

	qcow2_put32(base, QCOW2_MAGIC);
	qcow2_put32(base + 4, lay->version);
	qcow2_put32(base + 20, lay->bits);
	qcow2_put64(base + 24, lay->size);
	qcow2_put32(base + 36, (uint32_t)lay->l1_size);
	qcow2_put64(base + 40, (1 + lay->rt + lay->rb) * cs);
	qcow2_put64(base + 48, cs);
	qcow2_put32(base + 56, (uint32_t)lay->rt);
	if (lay->version == 3) {
		qcow2_put32(base + 96, QCOW2_NEW_REFCOUNT_ORDER);
		qcow2_put32(base + 100, hlen);
		/* 104: compression_type 0 (zlib) and padding */
	}
	return hlen;
}

/* The feature name table extension into exts (cs bytes, zeroed); returns
 * its length, 0 when there is none. Like QEMU, only v3 with clusters over
 * 4 KiB: the table would leave no room for a backing name in small header
 * clusters. */
static uint32_t qcow2_create_features(const struct qcow2_new_layout *lay, uint8_t *exts)
{
	size_t n = sizeof(qcow2_feature_table) / sizeof(qcow2_feature_table[0]);

	if (lay->version != 3 || lay->cs <= 4096)
		return 0;
	qcow2_put32(exts, QCOW2_EXT_FEATURES);
	qcow2_put32(exts + 4, (uint32_t)(n * QCOW2_FEATURE_ENTRY_BYTES));
	for (size_t i = 0; i < n; i++) {
		uint8_t *e = exts + 8 + i * QCOW2_FEATURE_ENTRY_BYTES;

		e[0] = qcow2_feature_table[i].type;
		e[1] = qcow2_feature_table[i].bit;
		memcpy(e + 2, qcow2_feature_table[i].name, strlen(qcow2_feature_table[i].name));
	}
	return 8 + (uint32_t)(n * QCOW2_FEATURE_ENTRY_BYTES);
}

/* Write the refcount table, the refcount blocks counting clusters
 * [0, total), and the empty L1 table, which ends the file as with qemu-img.
 * buf holds max(cs, QCOW2_WRITE_CHUNK) bytes. */
static int qcow2_create_tables(struct fetch_source *f, const struct qcow2_new_layout *lay,
			       uint8_t *buf)
{
	uint64_t cs = lay->cs, rt = lay->rt, rb = lay->rb;
	int r;

	for (uint64_t c = 0; c < rt; c++) {
		memset(buf, 0, cs);
		for (uint64_t i = 0; i < cs / 8; i++) {
			uint64_t idx = c * (cs / 8) + i;

			if (idx < rb)
				qcow2_put64(buf + 8 * i, (1 + rt + idx) * cs);
		}
		r = fetch_pwrite(f, buf, cs, (1 + c) * cs);
		if (r < 0)
			return r;
	}
	for (uint64_t b = 0; b < rb; b++) {
		memset(buf, 0, cs);
		for (uint64_t i = 0; i < lay->e_per_block; i++)
			if (b * lay->e_per_block + i < lay->total)
				qcow2_put16(buf + 2 * i, 1);
		r = fetch_pwrite(f, buf, cs, (1 + rt + b) * cs);
		if (r < 0)
			return r;
	}
	memset(buf, 0, SFS_MAX(cs, (uint64_t)QCOW2_WRITE_CHUNK));
	for (uint64_t done = 0; done < lay->l1_size * 8;) {
		size_t n = (size_t)SFS_MIN(lay->l1_size * 8 - done, (uint64_t)QCOW2_WRITE_CHUNK);

		r = fetch_pwrite(f, buf, n, (1 + rt + rb) * cs + done);
		if (r < 0)
			return r;
		done += n;
	}
	return 0;
}

int qcow2_create(struct fetch_source *f, const struct image_create_opts *opts)
{
	struct qcow2_new_layout lay;
	uint8_t base[QCOW2_OUR_HEADER_LEN] = {0};
	uint8_t *exts = NULL, *buf = NULL;
	uint32_t hlen, used, exts_len;
	int r;

	r = qcow2_create_layout(f, opts, &lay);
	if (r < 0)
		return r;
	hlen = qcow2_create_fields(&lay, base);
	buf = calloc(1, SFS_MAX((uint64_t)lay.cs, (uint64_t)QCOW2_WRITE_CHUNK));
	exts = calloc(1, lay.cs);
	if (!buf || !exts) {
		r = -ENOMEM;
		goto out;
	}
	exts_len = qcow2_create_features(&lay, exts);
	r = qcow2_build_header(buf, lay.cs, base, hlen, exts, exts_len, opts->backing_name,
			       opts->backing_fmt, &used);
	if (r < 0) {
		sfs_error("%s: qcow2: backing file name does not fit in the header cluster",
			  f->uri);
		goto out;
	}
	r = fetch_pwrite(f, buf, lay.cs, 0);
	if (r == 0)
		r = qcow2_create_tables(f, &lay, buf);
	if (r == 0)
		r = fetch_flush(f);
out:
	if (r < 0)
		sfs_error("%s: qcow2: cannot create image: %s", f->uri, strerror(-r));
	free(buf);
	free(exts);
	return r;
}

int qcow2_create_option(struct image_create_opts *opts, const char *opt)
{
	/* qemu-img's names for the two header versions. */
	if (strcmp(opt, "compat=0.10") == 0 || strcmp(opt, "compat=v2") == 0)
		opts->version = 2;
	else if (strcmp(opt, "compat=1.1") == 0 || strcmp(opt, "compat=v3") == 0)
		opts->version = 3;
	else
		return -EINVAL;
	return 0;
}
