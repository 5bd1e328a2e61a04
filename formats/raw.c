/* streamfs: raw format driver. The guest view is the file itself; there is
 * no allocation metadata, so everything is EXT_DATA or, where the file has a
 * hole, EXT_ZERO. A raw image never has a backing file and is always opened
 * read-only: it has no alloc_write, so image_open_one() refuses it as a
 * writable top (-EMEDIUMTYPE). */
#include <errno.h>

#include "image.h"
#include "util.h"

/* Nominal allocation unit reported for a raw layer (it has none). */
#define RAW_CLUSTER_SIZE (64 * 1024) /* in bytes */

static int raw_probe(const uint8_t *buf, size_t len)
{
	return 1; /* anything is raw, as a last resort */
}

static int raw_open(struct image *img)
{
	img->size = fetch_size(img->file);
	img->cluster_size = RAW_CLUSTER_SIZE;
	return 0;
}

static void raw_close(struct image *img)
{
}

static int raw_map(struct image *img, uint64_t off, uint64_t len, struct extent *ext)
{
	bool data = true;
	uint64_t n = len;

	/* Holes read as zeros and need no copying. */
	fetch_extent(img->file, off, len, &data, &n);
	ext->type = data ? EXT_DATA : EXT_ZERO;
	ext->len = n;
	ext->host_off = off;
	return 0;
}

static int raw_flush(struct image *img)
{
	return fetch_flush(img->file);
}

const struct image_driver image_raw_driver = {
    .name = "raw",
    .probe = raw_probe,
    .open = raw_open,
    .close = raw_close,
    .map = raw_map,
    .flush = raw_flush,
};
