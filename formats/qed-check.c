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

/* Consistency check, as for QED_F_NEED_CHECK (after QEMU's qed-check.c):
 * every table and data cluster lies inside the file, aligned, past the
 * header, and is referenced once. With QED_CHECK_FIX, invalid entries are
 * dropped and the fixed tables written back (L2 before L1, synced); with
 * QED_CHECK_REFUSE and QED_CHECK_CLEAN they make the open fail (a clean
 * image has none unless crafted, and an entry past the end of the file would
 * become valid once our appends reach it). A cluster referenced twice
 * cannot be repaired safely and always fails the open. Unreferenced clusters (leaks from a
 * crash) are only counted. */
int qed_check(struct image *img, uint64_t file_end, enum qed_check_mode mode)
{
	bool fix = mode == QED_CHECK_FIX;
	struct qed_priv *p = img->priv;
	uint64_t nclusters = file_end >> p->cluster_bits;
	uint64_t table_clusters = p->table_bytes >> p->cluster_bits;
	uint64_t slices = p->table_bytes / p->slice_bytes;
	uint64_t n = p->slice_bytes / sizeof(uint64_t);
	uint64_t l1_first = p->hdr.l1_table_offset >> p->cluster_bits;
	uint64_t invalid = 0, doubles = 0, leaks = 0;
	uint64_t *buf = NULL;
	struct bitset bm;
	int r;

	/* qed_parse_header() proved the header area and the L1 table lie
	 * inside file_end: the bit set covers them. */
	assert(p->header_bytes <= file_end && l1_first + table_clusters <= nclusters);
	r = bitset_init(&bm, nclusters);
	buf = malloc(p->slice_bytes);
	if (r < 0 || !buf) {
		r = -ENOMEM;
		goto out;
	}
	bitset_test_and_set_range(&bm, 0, p->header_bytes >> p->cluster_bits);
	/* Per cluster: every cluster of the L1 table already taken counts. */
	for (uint64_t c = 0; c < table_clusters; c++)
		if (bitset_test_and_set(&bm, l1_first + c))
			doubles++;

	for (uint64_t i = 0; i < p->l1_entries; i++) {
		uint64_t t = p->l1[i];

		if (t == 0)
			continue;
		if (!qed_range_ok(p, t, p->table_bytes, file_end)) {
			if (invalid++ < QED_MAX_LOGGED)
				qed_err(img,
					"L1 entry %llu (0x%llx) is unaligned or past the end of "
					"the file",
					(unsigned long long)i, (unsigned long long)t);
			if (fix) {
				p->l1[i] = 0;
				qed_l1_mark(p, i);
			}
			continue;
		}
		if (bitset_test_and_set_range(&bm, t >> p->cluster_bits,
					      (t >> p->cluster_bits) + table_clusters)) {
			qed_err(img, "L2 table at offset %llu overlaps another table",
				(unsigned long long)t);
			doubles++;
			continue;
		}
		for (uint64_t s = 0; s < slices; s++) {
			uint64_t off = t + s * p->slice_bytes, fixed = 0;

			r = fetch_pread(img->file, buf, p->slice_bytes, off);
			if (r < 0)
				goto out;
			for (uint64_t j = 0; j < n; j++) {
				uint64_t v = le64toh(buf[j]);

				if (v == QED_L2_UNALLOC || v == QED_L2_ZERO)
					continue;
				if (!qed_range_ok(p, v, p->cluster_size, file_end)) {
					if (invalid++ < QED_MAX_LOGGED)
						qed_err(
						    img,
						    "L2 entry 0x%llx at offset %llu is unaligned "
						    "or past the end of the file",
						    (unsigned long long)v,
						    (unsigned long long)(off + j * 8));
					if (fix) {
						buf[j] = 0;
						fixed++;
					}
					continue;
				}
				if (bitset_test_and_set(&bm, v >> p->cluster_bits)) {
					if (doubles++ < QED_MAX_LOGGED)
						qed_err(
						    img,
						    "cluster at offset %llu is referenced twice",
						    (unsigned long long)v);
				}
			}
			if (fixed) {
				r = fetch_pwrite(img->file, buf, p->slice_bytes, off);
				if (r < 0)
					goto out;
			}
		}
	}
	leaks = bitset_count_clear(&bm);

	if (doubles) {
		qed_err(img,
			"%llu clusters referenced more than once: the image is corrupt and "
			"cannot be repaired",
			(unsigned long long)doubles);
		r = -EINVAL;
		goto out;
	}
	if (invalid && !fix) {
		qed_err(img, "%llu invalid table entries%s", (unsigned long long)invalid,
			mode == QED_CHECK_CLEAN
			    ? " in an image closed cleanly: it is corrupt; open it read-only "
			      "(-o ro) or repair it with 'qemu-img check -r all'"
			    : "; open the image writable once (or run 'qemu-img check -r all') "
			      "to drop them");
		r = -EINVAL;
		goto out;
	}
	if (invalid && fix)
		sfs_warn("%s: qed: dropped %llu invalid table entries (unsynced allocations)",
			 qed_name(img), (unsigned long long)invalid);
	if (leaks && mode != QED_CHECK_CLEAN)
		sfs_info("%s: qed: %llu leaked clusters (unreferenced space from an interrupted "
			 "write; harmless)",
			 qed_name(img), (unsigned long long)leaks);
	if (fix && invalid) {
		/* L2 fixes durable before the L1 ones. */
		r = fetch_flush(img->file);
		for (uint64_t i = p->l1_lo; r == 0 && i < p->l1_hi; i++) {
			uint64_t le = htole64(p->l1[i]);

			if (p->l1[i] == 0)
				r = fetch_pwrite(img->file, &le, sizeof(le),
						 p->l1_offset + i * sizeof(uint64_t));
		}
		p->l1_lo = p->l1_hi = 0;
		if (r == 0)
			r = fetch_flush(img->file);
	}
out:
	bitset_free(&bm);
	free(buf);
	return r;
}
