/* streamfs: qcow2 validation at open: feature bits, table bounds and the
 * overlap check before writing.
 *
 * Images are untrusted input. Everything here runs once, at open, before
 * any other thread can see the image, so no lock is taken: it refuses
 * features we cannot honour, tables outside the file, and (writable
 * images only) any host cluster referenced twice, since our in-place
 * writes would then corrupt metadata or other guest data.
 */

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "bitset.h"
#include "qcow2.h"

/* Name of incompatible feature bit 'bit' from the image's own table. */
static void qcow2_feature_name(const struct qcow2_exts *x, uint32_t bit, char *out, size_t outlen)
{
	out[0] = 0;
	for (uint32_t i = 0; x->features && i + QCOW2_FEATURE_ENTRY_BYTES <= x->features_len;
	     i += QCOW2_FEATURE_ENTRY_BYTES) {
		const uint8_t *e = x->features + i;

		if (e[0] == 0 && e[1] == bit) {
			size_t n = strnlen((const char *)e + 2, QCOW2_FEATURE_ENTRY_BYTES - 2);

			n = SFS_MIN(n, outlen - 1);
			for (size_t k = 0; k < n; k++)
				out[k] =
				    (e[2 + k] >= 0x20 && e[2 + k] < 0x7f) ? (char)e[2 + k] : '?';
			out[n] = 0;
			return;
		}
	}
}

int qcow2_check_features(struct image *img, uint64_t incompat, uint32_t compression,
			 const struct qcow2_exts *x)
{
	char name[64];

	if ((incompat & QCOW2_INCOMPAT_DATA_FILE) || x->data_file) {
		qcow2_err(img, "external data file images are not supported");
		return -ENOTSUP;
	}
	if (incompat & QCOW2_INCOMPAT_EXTL2) {
		qcow2_err(img, "extended L2 entries (subclusters) are not supported");
		return -ENOTSUP;
	}
	if (incompat & QCOW2_INCOMPAT_COMPRESSION) {
		qcow2_err(img, "compression type %u (%s) is not supported, only zlib", compression,
			  compression == 1 ? "zstd" : "unknown");
		return -ENOTSUP;
	}
	if (compression != 0) {
		qcow2_err(img, "compression type %u set without its incompatible feature bit",
			  compression);
		return -EINVAL;
	}
	for (uint32_t bit = 0; bit < 64; bit++) {
		if (!(incompat & (1ULL << bit)) || ((1ULL << bit) & QCOW2_INCOMPAT_KNOWN))
			continue;
		qcow2_feature_name(x, bit, name, sizeof(name));
		qcow2_err(img, "unknown incompatible feature bit %u%s%s%s is set; not supported",
			  bit, name[0] ? " (" : "", name, name[0] ? ")" : "");
		return -ENOTSUP;
	}
	if ((incompat & QCOW2_INCOMPAT_DIRTY) && !img->read_only) {
		qcow2_err(img,
			  "image is dirty (refcounts may be inaccurate after a crash with lazy "
			  "refcounts); run 'qemu-img check -r all %s' before writing to it",
			  qcow2_name(img));
		return -ENOTSUP;
	}
	if ((incompat & QCOW2_INCOMPAT_CORRUPT) && !img->read_only) {
		qcow2_err(img,
			  "image is marked corrupt; it can only be opened read-only (run "
			  "'qemu-img check -r all %s' to repair it)",
			  qcow2_name(img));
		return -ENOTSUP;
	}
	return 0;
}

/* Validate a table at [off, off+bytes) against the file. */
static int qcow2_check_table(struct image *img, const char *what, uint64_t off, uint64_t bytes,
			     bool whole)
{
	struct qcow2_priv *p = img->priv;
	uint64_t end, fsize = fetch_size(img->file);

	if (off & (p->cs - 1)) {
		qcow2_err(img, "%s offset %#llx is not cluster aligned", what,
			  (unsigned long long)off);
		return -EINVAL;
	}
	if (off < p->cs) {
		qcow2_err(img, "%s offset %#llx overlaps the header cluster", what,
			  (unsigned long long)off);
		return -EINVAL;
	}
	if (!sfs_add_ok(off, bytes, &end) || (whole ? end > fsize : off >= fsize)) {
		qcow2_err(img, "%s (offset %#llx, %llu bytes) is past the end of the file", what,
			  (unsigned long long)off, (unsigned long long)bytes);
		return -EINVAL;
	}
	return 0;
}

/* Validate the L1 and refcount tables' sizes and places against the guest
 * size and the file, and refuse writing to images with snapshots. */
int qcow2_check_layout(struct image *img, uint64_t size)
{
	struct qcow2_priv *p = img->priv;
	uint64_t l2_cover, need_l1, rct_bytes;
	int r;

	/* L1 table: big enough for the virtual size, inside the file. */
	l2_cover = 1ULL << (p->cluster_bits + p->l2_bits); /* guest bytes per L2 table */
	need_l1 = size / l2_cover + (size % l2_cover != 0);
	if ((uint64_t)p->l1_size * 8 > QCOW2_MAX_L1_BYTES || need_l1 > p->l1_size) {
		qcow2_err(img, "L1 table size %u does not fit the virtual size %llu", p->l1_size,
			  (unsigned long long)size);
		return -EINVAL;
	}
	if (p->l1_size) {
		r = qcow2_check_table(img, "L1 table", p->l1_offset, (uint64_t)p->l1_size * 8,
				      true);
		if (r < 0)
			return r;
	}
	/* Refcount table. */
	if (p->rct_clusters == 0 || (uint64_t)p->rct_clusters * p->cs > QCOW2_MAX_RCT_BYTES) {
		qcow2_err(img, "invalid refcount table size (%u clusters)", p->rct_clusters);
		return -EINVAL;
	}
	rct_bytes = (uint64_t)p->rct_clusters * p->cs;
	r = qcow2_check_table(img, "refcount table", p->rct_offset, rct_bytes, false);
	if (r < 0)
		return r;
	if (p->l1_size && p->l1_offset < p->rct_offset + rct_bytes &&
	    p->rct_offset < p->l1_offset + (uint64_t)p->l1_size * 8) {
		qcow2_err(img, "L1 table and refcount table overlap");
		return -EINVAL;
	}
	if (!img->read_only && p->nb_snapshots) {
		qcow2_err(img,
			  "image has %llu internal snapshot(s); writing to images with "
			  "snapshots is not supported (delete them with 'qemu-img snapshot -d')",
			  (unsigned long long)p->nb_snapshots);
		return -ENOTSUP;
	}
	return 0;
}

/* Mark host clusters [off, off+len) as referenced; true if one already was.
 * Clusters past the end of the file (bm->nbits) are not tracked. */
static bool qcow2_mark_range(const struct qcow2_priv *p, struct bitset *bm, uint64_t off,
			     uint64_t len)
{
	uint64_t end = SFS_MIN(SFS_DIV_ROUND_UP(off + len, p->cs), bm->nbits);

	return bitset_test_and_set_range(bm, off >> p->cluster_bits, end);
}

/* Before we write to an image, prove that no host cluster is referenced
 * twice: a guest cluster mapped onto the header, the L1 or refcount table, a
 * refcount block, an L2 table or another guest cluster would have our
 * in-place writes corrupt metadata or other guest data (QEMU guards this
 * with its overlap checks on every write; we check once, at open, since
 * every cluster we allocate afterwards comes from past the end of the file
 * and is verified free). Also refuses L2 tables, refcount blocks and data
 * clusters past the end of the file, which our own allocations would
 * otherwise land on once the file grows. Compressed clusters may share host
 * clusters and are never written in place, so only their bounds are
 * checked. Costs one read of every L2 table. */
int qcow2_check_refs(struct image *img, uint64_t fsize, uint64_t rct_bytes)
{
	struct qcow2_priv *p = img->priv;
	uint64_t nclusters = SFS_DIV_ROUND_UP(fsize, p->cs), bad = 0;
	struct bitset bm;
	uint8_t *l2 = malloc(p->cs);
	int r = bitset_init(&bm, nclusters);

	if (r < 0 || !l2) {
		r = -ENOMEM;
		goto out;
	}
#define QCOW2_REF_BAD(...)                                                                         \
	do {                                                                                       \
		if (bad++ < 8)                                                                     \
			qcow2_err(img, __VA_ARGS__);                                               \
	} while (0)
	qcow2_mark_range(p, &bm, 0, p->cs);
	if (qcow2_mark_range(p, &bm, p->l1_offset, (uint64_t)p->l1_size * 8))
		QCOW2_REF_BAD("L1 table overlaps other metadata");
	if (qcow2_mark_range(p, &bm, p->rct_offset, rct_bytes))
		QCOW2_REF_BAD("refcount table overlaps other metadata");
	for (uint64_t i = 0; i < p->rct_entries; i++) {
		uint64_t off = p->rct[i] & QCOW2_RCT_OFFSET_MASK;

		if (!off)
			continue;
		if (off + p->cs > fsize)
			QCOW2_REF_BAD("refcount block %llu at %#llx is past the end of the file",
				      (unsigned long long)i, (unsigned long long)off);
		else if (qcow2_mark_range(p, &bm, off, p->cs))
			QCOW2_REF_BAD("refcount block %llu at %#llx overlaps other metadata",
				      (unsigned long long)i, (unsigned long long)off);
	}
	for (uint64_t i = 0; i < p->l1_size; i++) {
		uint64_t t = p->l1[i] & QCOW2_OFFSET_MASK;

		if (!t)
			continue;
		if ((t & (p->cs - 1)) || t + p->cs > fsize) {
			QCOW2_REF_BAD(
			    "L2 table %llu at %#llx is unaligned or past the end of the file",
			    (unsigned long long)i, (unsigned long long)t);
			continue;
		}
		if (qcow2_mark_range(p, &bm, t, p->cs)) {
			QCOW2_REF_BAD("L2 table %llu at %#llx overlaps other metadata",
				      (unsigned long long)i, (unsigned long long)t);
			continue;
		}
		r = fetch_pread(img->file, l2, p->cs, t);
		if (r < 0)
			goto out;
		for (uint64_t j = 0; j < (1ULL << p->l2_bits); j++) {
			uint64_t e = qcow2_get64(l2 + 8 * j), off;
			uint64_t g = ((i << p->l2_bits) + j) << p->cluster_bits;

			/* Compressed data is read with bounds checks and never
			 * written in place; QEMU lets its sector count run past
			 * the end of the file. */
			if (e & QCOW2_OFLAG_COMPRESSED)
				continue;
			off = e & QCOW2_OFFSET_MASK;
			if (!off || g >= img->size)
				continue;
			/* Unaligned entries fail their reads (see classify). */
			if (off & (p->cs - 1))
				continue;
			if (off + SFS_MIN((uint64_t)p->cs, img->size - g) > fsize)
				QCOW2_REF_BAD("L2 entry for guest offset %#llx points past the end "
					      "of the file (%#llx)",
					      (unsigned long long)g, (unsigned long long)off);
			else if (qcow2_mark_range(p, &bm, off, p->cs))
				QCOW2_REF_BAD("guest offset %#llx is mapped to host cluster %#llx, "
					      "which is already in use",
					      (unsigned long long)g, (unsigned long long)off);
		}
	}
#undef QCOW2_REF_BAD
	if (bad) {
		qcow2_err(img,
			  "%llu overlapping or out-of-file references: the image is corrupt; "
			  "it can be opened read-only (-o ro), or repaired with 'qemu-img check "
			  "-r all' if QEMU can",
			  (unsigned long long)bad);
		r = -EINVAL;
	}
out:
	bitset_free(&bm);
	free(l2);
	return r;
}
