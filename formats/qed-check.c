/* streamfs: QED validation at open: the consistency check run before an
 * image is written (or when the need-check bit is set), and the marking of
 * bad L1 entries of a clean image opened read-only. Single-threaded: the
 * image is not shared yet.
 */
#include <assert.h>
#include <errno.h>
#include <stdlib.h>

#include "bitset.h"
#include "qed.h"

#define QED_MAX_LOGGED 8 /* per kind of problem found by the check */

void qed_validate_l1(struct image *img, uint64_t file_end)
{
	struct qed_priv *p = img->priv;
	uint64_t bad = 0;

	for (uint64_t i = 0; i < p->l1_entries; i++) {
		if (p->l1[i] == 0 || qed_range_ok(p, p->l1[i], p->table_bytes, file_end))
			continue;
		if (bad++ == 0)
			qed_err(img,
				"L1 entry %llu (0x%llx) is unaligned or past the end of the file; "
				"reads there fail",
				(unsigned long long)i, (unsigned long long)p->l1[i]);
		p->l1[i] = QED_L1_BAD;
	}
	if (bad > 1)
		qed_err(img, "%llu invalid L1 entries in all", (unsigned long long)bad);
}

/* State of one consistency check. */
struct qed_check_run {
	struct image *img;
	struct qed_priv *p;
	uint64_t file_end; /* in bytes: valid clusters end here */
	bool fix;	   /* drop invalid entries (QED_CHECK_FIX) */
	struct bitset bm;  /* host clusters referenced so far */
	uint64_t *buf;	   /* one L2 slice, as on disk */
	uint64_t invalid;  /* invalid table entries found */
	uint64_t doubles;  /* clusters found referenced again */
};

/* Check L2 entry j of the slice in c->buf, read from file offset off.
 * Returns true if it was dropped (invalid, and fixing). */
static bool qed_check_entry(struct qed_check_run *c, uint64_t off, uint64_t j)
{
	struct qed_priv *p = c->p;
	uint64_t v = le64toh(c->buf[j]);

	if (v == QED_L2_UNALLOC || v == QED_L2_ZERO)
		return false;
	if (!qed_range_ok(p, v, p->cluster_size, c->file_end)) {
		if (c->invalid++ < QED_MAX_LOGGED)
			qed_err(c->img,
				"L2 entry 0x%llx at offset %llu is unaligned or past the end of "
				"the file",
				(unsigned long long)v, (unsigned long long)(off + j * 8));
		if (c->fix)
			c->buf[j] = 0;
		return c->fix;
	}
	if (bitset_test_and_set(&c->bm, v >> p->cluster_bits)) {
		if (c->doubles++ < QED_MAX_LOGGED)
			qed_err(c->img, "cluster at offset %llu is referenced twice",
				(unsigned long long)v);
	}
	return false;
}

/* Check the L2 slice at file offset off, writing it back if fixed. */
static int qed_check_slice(struct qed_check_run *c, uint64_t off)
{
	struct qed_priv *p = c->p;
	uint64_t n = p->slice_bytes / sizeof(uint64_t), fixed = 0;
	int r;

	r = fetch_pread(c->img->file, c->buf, p->slice_bytes, off);
	if (r < 0)
		return r;
	for (uint64_t j = 0; j < n; j++)
		if (qed_check_entry(c, off, j))
			fixed++;
	if (fixed)
		r = fetch_pwrite(c->img->file, c->buf, p->slice_bytes, off);
	return r;
}

/* Check L1 entry i and the L2 table it names. */
static int qed_check_table(struct qed_check_run *c, uint64_t i)
{
	struct qed_priv *p = c->p;
	uint64_t t = p->l1[i], first = t >> p->cluster_bits;
	int r = 0;

	if (t == 0)
		return 0;
	if (!qed_range_ok(p, t, p->table_bytes, c->file_end)) {
		if (c->invalid++ < QED_MAX_LOGGED)
			qed_err(c->img,
				"L1 entry %llu (0x%llx) is unaligned or past the end of the file",
				(unsigned long long)i, (unsigned long long)t);
		if (c->fix) {
			p->l1[i] = 0;
			qed_l1_mark(p, i);
		}
		return 0;
	}
	if (bitset_test_and_set_range(&c->bm, first, first + (p->table_bytes >> p->cluster_bits))) {
		qed_err(c->img, "L2 table at offset %llu overlaps another table",
			(unsigned long long)t);
		c->doubles++;
		return 0;
	}
	for (uint64_t s = 0; r == 0 && s < p->table_bytes / p->slice_bytes; s++)
		r = qed_check_slice(c, t + s * p->slice_bytes);
	return r;
}

/* Report what the check found; -EINVAL if the open must fail. */
static int qed_check_verdict(const struct qed_check_run *c, enum qed_check_mode mode,
			     uint64_t leaks)
{
	struct image *img = c->img;

	if (c->doubles) {
		qed_err(img,
			"%llu clusters referenced more than once: the image is corrupt and "
			"cannot be repaired",
			(unsigned long long)c->doubles);
		return -EINVAL;
	}
	if (c->invalid && !c->fix) {
		qed_err(img, "%llu invalid table entries%s", (unsigned long long)c->invalid,
			mode == QED_CHECK_CLEAN
			    ? " in an image closed cleanly: it is corrupt; open it read-only "
			      "(-o ro) or repair it with 'qemu-img check -r all'"
			    : "; open the image writable once (or run 'qemu-img check -r all') "
			      "to drop them");
		return -EINVAL;
	}
	if (c->invalid && c->fix)
		sfs_warn("%s: qed: dropped %llu invalid table entries (unsynced allocations)",
			 qed_name(img), (unsigned long long)c->invalid);
	if (leaks && mode != QED_CHECK_CLEAN)
		sfs_info("%s: qed: %llu leaked clusters (unreferenced space from an interrupted "
			 "write; harmless)",
			 qed_name(img), (unsigned long long)leaks);
	return 0;
}

/* Write the L1 entries the check dropped, after the L2 fixes are durable. */
static int qed_check_write_l1(struct image *img)
{
	struct qed_priv *p = img->priv;
	int r = fetch_flush(img->file);

	for (uint64_t i = p->l1_lo; r == 0 && i < p->l1_hi; i++) {
		uint64_t le = htole64(p->l1[i]);

		if (p->l1[i] == 0)
			r = fetch_pwrite(img->file, &le, sizeof(le),
					 p->l1_offset + i * sizeof(uint64_t));
	}
	p->l1_lo = p->l1_hi = 0;
	if (r == 0)
		r = fetch_flush(img->file);
	return r;
}

/* Consistency check, as for QED_F_NEED_CHECK (after QEMU's qed-check.c):
 * every table and data cluster lies inside the file, aligned, past the
 * header, and is referenced once. With QED_CHECK_FIX, invalid entries are
 * dropped and the fixed tables written back (L2 before L1, synced); with
 * QED_CHECK_REFUSE and QED_CHECK_CLEAN they make the open fail (a clean
 * image has none unless crafted, and an entry past the end of the file would
 * become valid once our appends reach it). A cluster referenced twice
 * cannot be repaired safely and always fails the open. Unreferenced clusters
 * (leaks from a crash) are only counted. */
int qed_check(struct image *img, uint64_t file_end, enum qed_check_mode mode)
{
	struct qed_priv *p = img->priv;
	struct qed_check_run c = {
	    .img = img, .p = p, .file_end = file_end, .fix = mode == QED_CHECK_FIX};
	uint64_t nclusters = file_end >> p->cluster_bits;
	uint64_t table_clusters = p->table_bytes >> p->cluster_bits;
	uint64_t l1_first = p->hdr.l1_table_offset >> p->cluster_bits;
	int r;

	/* qed_parse_header() proved the header area and the L1 table lie
	 * inside file_end: the bit set covers them. */
	assert(p->header_bytes <= file_end && l1_first + table_clusters <= nclusters);
	r = bitset_init(&c.bm, nclusters);
	c.buf = malloc(p->slice_bytes);
	if (r < 0 || !c.buf) {
		r = -ENOMEM;
		goto out;
	}
	bitset_test_and_set_range(&c.bm, 0, p->header_bytes >> p->cluster_bits);
	/* Per cluster: every cluster of the L1 table already taken counts. */
	for (uint64_t i = 0; i < table_clusters; i++)
		if (bitset_test_and_set(&c.bm, l1_first + i))
			c.doubles++;
	for (uint64_t i = 0; r == 0 && i < p->l1_entries; i++)
		r = qed_check_table(&c, i);
	if (r == 0)
		r = qed_check_verdict(&c, mode, bitset_count_clear(&c.bm));
	if (r == 0 && c.fix && c.invalid)
		r = qed_check_write_l1(img);
out:
	bitset_free(&c.bm);
	free(c.buf);
	return r;
}
