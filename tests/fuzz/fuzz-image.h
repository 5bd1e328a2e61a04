/* streamfs fuzzing: shared body of the image-format harnesses. The input is
 * an image file; open it read-only with the given driver, walk its map and
 * read through it (bounded), then open it writable and write through the
 * disk layer (bounded). Any crash, sanitizer report or leak is a bug: the
 * formats must treat files as hostile. */
#include <stdint.h>
#include <string.h>

#include "disk.h"
#include "image.h"
#include "util.h"

#define FUZZ_MAX_RUNS 256	 /* map runs walked per input */
#define FUZZ_MAX_READ (1u << 20) /* bytes read per run */

static void fuzz_image(const char *fmt, const uint8_t *data, size_t size)
{
	static uint8_t buf[FUZZ_MAX_READ];
	struct image *img = NULL;
	struct disk *d = NULL;
	uint64_t off = 0;

	sfs_log_level = -1; /* quiet: hostile inputs log a lot */
	if (fetch_mem_put("fuzz", data, size) < 0)
		return;
	if (image_open_one("mem:fuzz", fmt, 0, &img) == 0) {
		for (int i = 0; i < FUZZ_MAX_RUNS && off < img->size; i++) {
			struct extent ext;
			uint64_t n;

			if (img->drv->map(img, off, img->size - off, &ext) < 0 || ext.len == 0)
				break;
			n = SFS_MIN(ext.len, (uint64_t)FUZZ_MAX_READ);
			image_pread(img, buf, (size_t)n, off);
			/* Jump far ahead too, so huge virtual sizes are sampled. */
			off += i % 2 ? ext.len : SFS_MAX(ext.len, img->size / 16);
		}
		image_close_chain(img);
		img = NULL;
	}
	/* Writable: a couple of guest writes and a flush through disk.c. */
	if (fetch_mem_put("fuzz", data, size) < 0)
		return;
	if (image_open_one("mem:fuzz", fmt, IMAGE_RDWR, &img) == 0 &&
	    disk_new(img, false, false, &d) == 0) {
		memset(buf, 0xa5, 4096);
		if (img->size >= 8192) {
			disk_write(d, buf, 4096, 0);
			disk_write(d, buf, 100, img->size / 2);
			disk_read(d, buf, 4096, img->size - 4096);
		}
		disk_close(d);
	} else if (img) {
		image_close_chain(img);
	}
	fetch_mem_reset();
}
