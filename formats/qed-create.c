/* streamfs: QED image creation: a header and an empty L1 table, in a
 * geometry QEMU opens.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qed.h"

#define QED_ZERO_CHUNK (64u * 1024) /* in bytes: zero-fill unit in create() */

/* Can QEMU open an image of this geometry? Two bugs in QEMU's block/qed.c
 * and qed.h (7.2 and later) refuse legal headers: qed_max_image_size()
 * computes entries * entries * cluster_size in 64 bits, which wraps to 0
 * from 2^64 on ("QED image size is invalid" for any size), and
 * qed_check_table_offset() takes table size 1 for an overflow (offset +
 * (table_size - 1) * cluster_size <= offset: "QED table offset is invalid"). */
static bool qed_qemu_geometry_ok(uint32_t cs, uint32_t ts)
{
	return ts >= 2 && qed_address_bits(cs, ts) < 64;
}

/* Table sizes for a new image, in order of preference: QEMU's default,
 * larger ones for guests it cannot address, then 2 (for 4 MiB clusters). */
static const uint32_t qed_table_sizes[] = {QED_DEFAULT_TABLE_SIZE, 8, 16, 2};

/* Table size for a new image of size bytes that QEMU can open, or 0. */
static uint32_t qed_pick_table_size(uint32_t cs, uint64_t size)
{
	for (size_t i = 0; i < sizeof(qed_table_sizes) / sizeof(qed_table_sizes[0]); i++) {
		uint32_t ts = qed_table_sizes[i];

		if (qed_qemu_geometry_ok(cs, ts) && size <= qed_max_image_size(cs, ts))
			return ts;
	}
	return 0;
}

/* Largest guest size of a new image with clusters of cs bytes. */
static uint64_t qed_create_max_size(uint32_t cs)
{
	uint64_t max = 0;

	for (size_t i = 0; i < sizeof(qed_table_sizes) / sizeof(qed_table_sizes[0]); i++)
		if (qed_qemu_geometry_ok(cs, qed_table_sizes[i]))
			max = SFS_MAX(max, qed_max_image_size(cs, qed_table_sizes[i]));
	return max;
}

/* Largest cluster size QEMU opens (with table size 2). */
#define QED_QEMU_MAX_CLUSTER_SIZE (4u * 1024 * 1024) /* in bytes */

int qed_create(struct fetch_source *f, const struct image_create_opts *opts)
{
	uint32_t cs = opts->cluster_size ? opts->cluster_size : QED_DEFAULT_CLUSTER_SIZE, ts;
	size_t namelen = opts->backing_name ? strlen(opts->backing_name) : 0;
	uint64_t table_bytes, size, done;
	struct qed_header h = {0};
	uint8_t *buf;
	int r = 0;

	if (!qed_cluster_size_ok(cs)) {
		sfs_error("%s: qed: cluster size %u must be a power of 2 in [%u, %u]", f->uri, cs,
			  QED_MIN_CLUSTER_SIZE, QED_MAX_CLUSTER_SIZE);
		return -EINVAL;
	}
	/* The spec allows up to 64 MiB, but an image QEMU cannot open is no
	 * use: refuse it here rather than after hours of streaming. */
	if (cs > QED_QEMU_MAX_CLUSTER_SIZE) {
		sfs_error("%s: qed: cluster size %u: QEMU cannot open QED images with clusters "
			  "over %u MiB (its image size limit overflows: 'QED image size is "
			  "invalid'); use -c 4M or less",
			  f->uri, cs, QED_QEMU_MAX_CLUSTER_SIZE >> 20);
		return -EINVAL;
	}
	/* Guest sizes are whole 512-byte sectors, as qemu-img rounds them. */
	size = opts->size;
	if (sfs_add_ok(opts->size, QED_SECTOR - 1, &size))
		size = SFS_ALIGN_DOWN(size, QED_SECTOR);
	ts = size < opts->size ? 0 : qed_pick_table_size(cs, size);
	if (ts == 0) {
		sfs_error("%s: qed: image size %llu is too large for cluster size %u (at most "
			  "%llu bytes)",
			  f->uri, (unsigned long long)opts->size, cs,
			  (unsigned long long)qed_create_max_size(cs));
		return -EINVAL;
	}
	table_bytes = (uint64_t)cs * ts;
	if (opts->backing_name &&
	    (namelen == 0 || namelen > QED_MAX_BACKING_NAME || QED_HEADER_BYTES + namelen > cs)) {
		sfs_error("%s: qed: backing file name of %zu bytes does not fit in the header",
			  f->uri, namelen);
		return -EINVAL;
	}
	h.cluster_size = cs;
	h.table_size = ts;
	h.header_size = 1;
	h.l1_table_offset = cs;
	h.image_size = size;
	if (opts->backing_name) {
		h.features |= QED_F_BACKING_FILE;
		if (opts->backing_fmt && strcmp(opts->backing_fmt, "raw") == 0)
			h.features |= QED_F_BACKING_FORMAT_NO_PROBE;
		h.backing_filename_offset = QED_HEADER_BYTES;
		h.backing_filename_size = (uint32_t)namelen;
	}
	buf = calloc(1, SFS_MAX((size_t)QED_ZERO_CHUNK, QED_HEADER_BYTES + namelen));
	if (!buf)
		return -ENOMEM;
	qed_header_to_disk(&h, (struct qed_header_disk *)buf);
	if (namelen)
		memcpy(buf + QED_HEADER_BYTES, opts->backing_name, namelen);
	r = fetch_pwrite(f, buf, QED_HEADER_BYTES + namelen, 0);
	/* The L1 table, all zeros; the file ends with it. */
	memset(buf, 0, QED_ZERO_CHUNK);
	for (done = 0; r == 0 && done < table_bytes; done += QED_ZERO_CHUNK) {
		uint64_t c = SFS_MIN((uint64_t)QED_ZERO_CHUNK, table_bytes - done);

		r = fetch_pwrite(f, buf, (size_t)c, cs + done);
	}
	free(buf);
	if (r < 0)
		sfs_error("%s: qed: cannot write the new image: %s", f->uri, strerror(-r));
	return r;
}
