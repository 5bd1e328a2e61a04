/* streamfs fuzzing: shared body of the image-format harnesses (fuzz-qcow2.c,
 * fuzz-qed.c). Any crash, sanitizer report, leak or abort() here is a bug:
 * the formats must treat image files as hostile.
 *
 * One input is one image file, stored as "mem:fuzz" (fetch/mem.c):
 * 1. Read-only: open it with the given driver, walk map() over the first and
 *    the last FUZZ_WINDOW guest bytes (huge virtual sizes are only sampled),
 *    checking the map() contract, and read a bounded number of bytes of each
 *    run through image_pread(), aligned and unaligned (so compressed clusters
 *    are inflated with and without a skipped prefix).
 * 2. Writable, on the same bytes: zero_clusters() on one cluster, a few guest
 *    writes and a read through block/disk.c (cluster read-modify-write,
 *    allocation, refcounts), a flush, set_backing() (header rewrite over the
 *    hostile extension area), close (flush + need-check clear); then reopen
 *    the result read-only and walk it again: what we wrote must parse.
 *
 * SPARSE INPUTS. qcow2 with 64 KiB or 2 MiB clusters needs files of several
 * clusters (header, refcount table, L1 each in its own cluster), far above a
 * fuzzer's max_len. So an input starting with "SFZ1" is a sparse image:
 *   "SFZ1" | u32 LE file size | records { u32 LE offset | u16 LE len | bytes }
 * The file is zeros except for the records (clipped to the size, which is
 * capped at FUZZ_SPARSE_MAX). make-corpus.sh writes big seeds this way.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "disk.h"
#include "image.h"
#include "util.h"

#define FUZZ_WINDOW	 (4ULL << 20) /* guest bytes walked at each end */
#define FUZZ_MAX_RUNS	 64	      /* map() runs per window */
#define FUZZ_MAX_READ	 (64u << 10)  /* bytes read per run */
#define FUZZ_READ_BUDGET (256u << 10) /* bytes read per walk */
#define FUZZ_SPARSE_MAX	 (16u << 20)  /* largest sparse image, in bytes */
#define FUZZ_MAX_WRITE	 (256u << 10) /* largest input-chosen guest write */
#define FUZZ_FILE	 "fuzz"	      /* the mem: file */
#define FUZZ_NAME	 "mem:" FUZZ_FILE

static uint8_t fuzz_buf[FUZZ_MAX_READ + 4096];
static uint8_t fuzz_wbuf[FUZZ_MAX_WRITE];

static uint32_t fuzz_le32(const uint8_t *p)
{
	return p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Store the input as mem:fuzz, expanding a sparse ("SFZ1") input. */
static int fuzz_put(const uint8_t *data, size_t size)
{
	uint8_t *img;
	size_t fsize, pos = 8;
	int r;

	if (size < 8 || memcmp(data, "SFZ1", 4) != 0)
		return fetch_mem_put(FUZZ_FILE, data, size);
	fsize = SFS_MIN(fuzz_le32(data + 4), FUZZ_SPARSE_MAX);
	img = calloc(1, fsize + 1);
	if (!img)
		return -1;
	while (pos + 6 <= size) {
		uint32_t off = fuzz_le32(data + pos);
		size_t len = data[pos + 4] | (size_t)data[pos + 5] << 8;

		pos += 6;
		len = SFS_MIN(len, size - pos);
		if (off < fsize)
			memcpy(img + off, data + pos, SFS_MIN(len, fsize - off));
		pos += len;
	}
	r = fetch_mem_put(FUZZ_FILE, img, fsize);
	free(img);
	return r;
}

/* Walk map() over [start, end) and read some of each run. */
static void fuzz_walk(struct image *img, uint64_t start, uint64_t end, size_t *budget)
{
	uint64_t off = start;

	for (int i = 0; i < FUZZ_MAX_RUNS && off < end; i++) {
		struct extent ext;
		uint64_t n;

		if (img->drv->map(img, off, end - off, &ext) < 0) {
			/* A bad cluster: skip it, the rest may still map. */
			off = SFS_ALIGN_DOWN(off, img->cluster_size) + img->cluster_size;
			continue;
		}
		/* The contract of include/image.h; callers loop on it. */
		if (ext.len == 0 || ext.len > end - off)
			abort();
		if (ext.type != EXT_DATA && ext.type != EXT_ZERO && ext.type != EXT_UNALLOC &&
		    ext.type != EXT_COMPRESSED)
			abort();
		n = SFS_MIN(SFS_MIN(ext.len, (uint64_t)FUZZ_MAX_READ), (uint64_t)*budget);
		if (n) {
			image_pread(img, fuzz_buf, (size_t)n, off);
			*budget -= n;
		}
		if (ext.len > 1 && *budget >= 4096) {
			/* Unaligned, crossing into the next run when there is one. */
			uint64_t u = off + ext.len / 2 + 1;
			uint64_t ulen = SFS_MIN((uint64_t)img->cluster_size + 7, img->size - u);

			ulen = SFS_MIN(ulen, (uint64_t)4096);
			if (ulen && image_pread(img, fuzz_buf, (size_t)ulen, u) == 0)
				*budget -= ulen;
		}
		off += ext.len;
	}
}

static void fuzz_read_image(struct image *img)
{
	size_t budget = FUZZ_READ_BUDGET;

	fuzz_walk(img, 0, SFS_MIN(img->size, FUZZ_WINDOW), &budget);
	if (img->size > FUZZ_WINDOW)
		fuzz_walk(img, SFS_MAX(img->size - FUZZ_WINDOW, FUZZ_WINDOW), img->size, &budget);
	/* Out of range must be refused, not read. */
	if (image_pread(img, fuzz_buf, 1, img->size) != -EINVAL)
		abort();
}

/* Writes through the driver and block/disk.c on a writable copy. The
 * input's last 4 bytes (plan) choose the offset and length (up to 256 KiB:
 * many clusters, new L2 tables and refcount blocks) of one of the writes. */
static void fuzz_write_image(const char *fmt, uint32_t plan)
{
	struct image *img = NULL;
	struct disk *d = NULL;
	uint64_t cs, z, woff, wlen;
	struct extent ext;
	int r[8] = {0};

	if (image_open_one(FUZZ_NAME, fmt, IMAGE_RDWR, &img) < 0)
		return;
	cs = img->cluster_size;
	/* zero_clusters() wants whole clusters that are not EXT_DATA. */
	z = SFS_ALIGN_DOWN(img->size / 4, cs);
	if (img->drv->zero_clusters && z < img->size &&
	    img->drv->map(img, z, SFS_MIN(cs, img->size - z), &ext) == 0 && ext.type != EXT_DATA &&
	    ext.len == SFS_MIN(cs, img->size - z))
		img->drv->zero_clusters(img, z, cs);
	if (disk_new(img, true, false, &d) < 0) {
		image_close_chain(img);
		return;
	}
	memset(fuzz_buf, 0xa5, 8192);
	memset(fuzz_wbuf, 0x5a, sizeof(fuzz_wbuf));
	if (img->size >= 8192) {
		r[0] = disk_write(d, fuzz_buf, 4096, 0);
		woff = img->size / 256 * (plan & 0xff) + (plan >> 8 & 0xfff);
		wlen = 1 + (plan >> 20) * 64;
		if (woff < img->size)
			r[1] =
			    disk_write(d, fuzz_wbuf, (size_t)SFS_MIN(wlen, img->size - woff), woff);
		/* Crossing a cluster boundary near the end. */
		if (SFS_ALIGN_DOWN(img->size - 1, cs) >= 500)
			r[2] =
			    disk_write(d, fuzz_buf, 1000, SFS_ALIGN_DOWN(img->size - 1, cs) - 500);
		r[3] = disk_read(d, fuzz_buf, 4096, img->size - 4096);
		r[4] = disk_read(d, fuzz_buf, 3000, img->size / 3); /* copy-on-read */
	} else if (img->size > 0) {
		r[0] = disk_write(d, fuzz_buf, (size_t)SFS_MIN(img->size, 700ULL), 0);
	}
	r[5] = disk_flush(d);
	if (img->drv->set_backing)
		r[6] = img->drv->set_backing(img, "backing.qcow2", "qcow2");
	r[7] = disk_close(d);
	sfs_debug("fuzz: write %d %d %d, read %d %d, flush %d, set_backing %d, close %d", r[0],
		  r[1], r[2], r[3], r[4], r[5], r[6], r[7]);

	/* What we wrote must parse again. */
	if (image_open_one(FUZZ_NAME, fmt, 0, &img) == 0) {
		fuzz_read_image(img);
		image_close_chain(img);
	}
}

static void fuzz_image(const char *fmt, const uint8_t *data, size_t size)
{
	static int log_level = -2;
	struct image *img = NULL;

	if (log_level == -2) /* quiet, as hostile inputs log a lot; FUZZ_LOG=3 to debug */
		log_level = getenv("FUZZ_LOG") ? atoi(getenv("FUZZ_LOG")) : -1;
	sfs_log_level = log_level;
	if (fuzz_put(data, size) < 0)
		goto out;
	if (image_open_one(FUZZ_NAME, fmt, 0, &img) == 0) {
		fuzz_read_image(img);
		image_close_chain(img);
	}
	/* The read-only pass never writes mem:fuzz, so it is still the input. */
	fuzz_write_image(fmt, size >= 4 ? fuzz_le32(data + size - 4) : 0);
out:
	fetch_mem_reset();
}
