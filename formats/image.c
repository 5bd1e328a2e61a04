/* streamfs: the generic image layer: driver registry, probing, opening a
 * backing chain (relative names, recorded formats, loop and depth limits),
 * and reads through the chain. Copy-on-read and in-flight tracking are in
 * disk.c; this file never writes.
 *
 * THREAD MODEL: an open chain is immutable here (disk.c swaps backings under
 * its own lock), so image_pread and image_block_status may run from any
 * number of threads; drivers lock their own caches.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "image.h"
#include "util.h"

/* Probe order matters only for ties; raw always scores lowest. */
static const struct image_driver *image_drivers[] = {
    &image_qcow2_driver,
    &image_qed_driver,
    &image_raw_driver,
};

#define IMAGE_PROBE_BYTES 512

const struct image_driver *image_find_driver(const char *name)
{
	for (size_t i = 0; i < sizeof(image_drivers) / sizeof(image_drivers[0]); i++)
		if (strcmp(image_drivers[i]->name, name) == 0)
			return image_drivers[i];
	return NULL;
}

static int image_probe(struct fetch_source *f, const struct image_driver **out)
{
	uint8_t buf[IMAGE_PROBE_BYTES] = {0};
	size_t n = (size_t)SFS_MIN((uint64_t)sizeof(buf), fetch_size(f));
	int best = 0, r;

	r = fetch_pread(f, buf, n, 0);
	if (r < 0)
		return r;
	*out = &image_raw_driver;
	for (size_t i = 0; i < sizeof(image_drivers) / sizeof(image_drivers[0]); i++) {
		int score = image_drivers[i]->probe(buf, n);
		if (score > best) {
			best = score;
			*out = image_drivers[i];
		}
	}
	return 0;
}

static void image_free(struct image *img)
{
	if (!img)
		return;
	fetch_close(img->file);
	free(img->priv);
	free(img->filename);
	free(img->display);
	free(img->backing_name);
	free(img->backing_fmt);
	free(img);
}

int image_open_one(const char *uri, const char *fmt, int flags, struct image **out)
{
	const struct image_driver *drv = NULL;
	struct image *img;
	int r;

	img = calloc(1, sizeof(*img));
	if (!img)
		return -ENOMEM;
	img->read_only = !(flags & IMAGE_RDWR);
	img->filename = strdup(uri);
	img->display = fetch_display_uri(uri);
	if (!img->filename || !img->display) {
		r = -ENOMEM;
		goto fail;
	}
	if (fmt) {
		drv = image_find_driver(fmt);
		if (!drv) {
			sfs_error("%s: unknown image format '%s' (known: raw, qcow2, qed)",
				  img->display, fmt);
			r = -EINVAL;
			goto fail;
		}
	}
	r = fetch_open(uri, (img->read_only ? FETCH_RDONLY : FETCH_RDWR) | FETCH_LOCK, &img->file);
	if (r < 0)
		goto fail;
	if (fetch_size(img->file) == 0) {
		/* Every format has a header, and a raw disk of 0 bytes holds
		 * nothing: an empty file is a mistake (a failed download or
		 * copy), never a disk. */
		sfs_error("%s: the file is empty (0 bytes): not a disk image", img->display);
		r = -EINVAL;
		goto fail;
	}
	if (!drv) {
		r = image_probe(img->file, &drv);
		if (r < 0)
			goto fail;
	}
	img->drv = drv;
	if (!img->read_only && !drv->alloc_write) {
		/* Writes could only go into the image itself: refuse rather
		 * than mount a disk whose every write fails. */
		sfs_error("%s: a %s image is not an overlay and is not written in place; make "
			  "an overlay over it ('streamfs create -b %s -F %s OVERLAY') and mount "
			  "that, or serve it read-only (-o ro)",
			  img->display, drv->name, img->display, drv->name);
		r = -EMEDIUMTYPE;
		goto fail;
	}
	if (drv->priv_size) {
		img->priv = calloc(1, drv->priv_size);
		if (!img->priv) {
			r = -ENOMEM;
			goto fail;
		}
	}
	r = drv->open(img);
	if (r < 0)
		goto fail;
	if (img->cluster_size == 0 || !SFS_IS_POW2(img->cluster_size)) {
		sfs_error("%s: driver reported a bad cluster size", img->display);
		drv->close(img);
		r = -EINVAL;
		goto fail;
	}
	*out = img;
	return 0;
fail:
	image_free(img);
	return r;
}

/* Identity of a layer for loop detection: device+inode for files, the
 * string for URLs. */
struct image_id {
	dev_t dev;
	ino_t ino;
	const char *uri;
};

static void image_identify(const char *uri, struct image_id *id)
{
	struct stat st;

	memset(id, 0, sizeof(*id));
	id->uri = uri;
	if (stat(uri, &st) == 0) {
		id->dev = st.st_dev;
		id->ino = st.st_ino;
	}
}

static bool image_same(const struct image_id *a, const struct image_id *b)
{
	if (a->ino || b->ino)
		return a->ino == b->ino && a->dev == b->dev;
	return strcmp(a->uri, b->uri) == 0;
}

int image_open_chain(const char *uri, const char *fmt, int flags, const char *backing_override,
		     struct image **out)
{
	struct image_id ids[IMAGE_MAX_CHAIN];
	struct image *top = NULL, *cur;
	const char *name;
	int r;

	r = image_open_one(uri, fmt, flags & IMAGE_RDWR, &top);
	if (r < 0)
		return r;
	image_identify(top->filename, &ids[0]);
	if (backing_override) {
		free(top->backing_name);
		free(top->backing_fmt);
		top->backing_fmt = NULL;
		top->backing_name = strdup(backing_override);
		if (!top->backing_name) {
			r = -ENOMEM;
			goto fail;
		}
	}
	if (flags & IMAGE_NO_BACKING)
		goto done;
	for (cur = top; cur->backing_name; cur = cur->backing) {
		char *child_uri, *child_display;
		const char *child_fmt = cur->backing_fmt;
		struct image *child;
		int d = cur->depth + 1;

		if (d >= IMAGE_MAX_CHAIN) {
			sfs_error("%s: backing chain deeper than %d images", top->display,
				  IMAGE_MAX_CHAIN);
			r = -ELOOP;
			goto fail;
		}
		name = cur->backing_name;
		if (name[0] == '\0') {
			sfs_error("%s: empty backing file name", cur->display);
			r = -EINVAL;
			goto fail;
		}
		r = fetch_resolve_uri(cur->filename, name, &child_uri);
		if (r < 0)
			goto fail;
		child_display = fetch_display_uri(child_uri);
		if (!child_display) {
			free(child_uri);
			r = -ENOMEM;
			goto fail;
		}
		image_identify(child_uri, &ids[d]);
		for (int i = 0; i < d; i++) {
			if (image_same(&ids[i], &ids[d])) {
				sfs_error("%s: backing chain loops: '%s' is already in the chain",
					  cur->display, child_display);
				r = -ELOOP;
				break;
			}
		}
		if (r == 0 && !child_fmt)
			sfs_warn("%s: no backing format recorded for '%s'; probing it (record "
				 "one with -F to be safe)",
				 cur->display, child_display);
		if (r == 0) {
			r = image_open_one(child_uri, child_fmt, 0, &child);
			if (r < 0)
				sfs_error("%s: cannot open backing image '%s'", cur->display,
					  child_display);
		}
		free(child_display);
		if (r < 0) {
			free(child_uri);
			goto fail;
		}
		/* ids[d].uri must outlive the loop: point it at the child's copy. */
		ids[d].uri = child->filename;
		free(child_uri);
		child->depth = d;
		cur->backing = child;
	}
done:
	*out = top;
	return 0;
fail:
	image_close_chain(top);
	return r;
}

int image_close_chain(struct image *img)
{
	int r = 0;

	while (img) {
		struct image *next = img->backing;
		if (!img->read_only && img->drv->flush) {
			int fr = img->drv->flush(img);

			if (fr < 0 && r == 0) {
				sfs_error("%s: flush at close failed: %s", img->display,
					  strerror(-fr));
				r = fr;
			}
		}
		img->drv->close(img);
		image_free(img);
		img = next;
	}
	return r;
}

struct image *image_layer(struct image *img, int n)
{
	while (img && n-- > 0)
		img = img->backing;
	return img;
}

int image_read_extent(struct image *img, const struct extent *ext, void *buf, size_t len,
		      uint64_t off)
{
	struct image *b = img->backing;

	switch (ext->type) {
	case EXT_DATA:
		return fetch_pread(img->file, buf, len, ext->host_off);
	case EXT_ZERO:
		memset(buf, 0, len);
		return 0;
	case EXT_COMPRESSED:
		if (!img->drv->read_compressed)
			return -EIO;
		return img->drv->read_compressed(img, off, ext, buf, len);
	case EXT_UNALLOC:
	default:
		/* A shorter backing reads as zeros past its end. */
		if (b && off < b->size) {
			size_t in = (size_t)SFS_MIN((uint64_t)len, b->size - off);
			int r = image_pread(b, buf, in, off);
			if (in < len)
				memset((uint8_t *)buf + in, 0, len - in);
			return r;
		}
		memset(buf, 0, len);
		return 0;
	}
}

int image_pread(struct image *img, void *buf, size_t len, uint64_t off)
{
	uint8_t *b = buf;
	uint64_t end;
	int r;

	if (!sfs_add_ok(off, len, &end) || end > img->size)
		return -EINVAL;
	while (len > 0) {
		struct extent ext;

		r = img->drv->map(img, off, len, &ext);
		if (r < 0)
			return r;
		if (ext.len == 0 || ext.len > len) {
			sfs_error("%s: %s driver returned a bad extent", img->display,
				  img->drv->name);
			return -EIO;
		}
		r = image_read_extent(img, &ext, b, (size_t)ext.len, off);
		if (r < 0)
			return r;
		b += ext.len;
		off += ext.len;
		len -= (size_t)ext.len;
	}
	return 0;
}

int image_block_status(struct image *img, struct image *base, uint64_t off, uint64_t len,
		       uint64_t *pnum, int *depth, enum extent_type *type)
{
	struct image *cur;
	uint64_t n = len;
	int r;

	for (cur = img; cur && cur != base; cur = cur->backing) {
		struct extent ext;

		if (off >= cur->size) {
			/* A shorter backing reads as zeros past its end. */
			*pnum = n;
			*depth = -1;
			*type = EXT_ZERO;
			return 0;
		}
		n = SFS_MIN(n, cur->size - off);
		r = cur->drv->map(cur, off, n, &ext);
		if (r < 0)
			return r;
		if (ext.len == 0 || ext.len > n)
			return -EIO;
		n = ext.len;
		if (ext.type != EXT_UNALLOC) {
			*pnum = n;
			*depth = cur->depth - img->depth;
			*type = ext.type;
			return 0;
		}
	}
	*pnum = n;
	*depth = cur ? -2 : -1;
	*type = EXT_UNALLOC;
	return 0;
}

int image_create_option(const char *fmt, struct image_create_opts *opts, const char *opt)
{
	const struct image_driver *drv = image_find_driver(fmt);

	if (!drv || !drv->create) {
		sfs_error("cannot create images of format '%s' (use qcow2 or qed)", fmt);
		return -EINVAL;
	}
	if (!drv->create_option || drv->create_option(opts, opt) < 0) {
		sfs_error("%s images have no creation option '%s'", fmt, opt);
		return -EINVAL;
	}
	return 0;
}

int image_create(const char *path, const char *fmt, const struct image_create_opts *opts)
{
	const struct image_driver *drv = image_find_driver(fmt);
	struct fetch_source *f;
	int r;

	if (!drv || !drv->create) {
		sfs_error("cannot create images of format '%s' (use qcow2 or qed)", fmt);
		return -EINVAL;
	}
	r = fetch_open(path, FETCH_RDWR | FETCH_CREATE | FETCH_LOCK, &f);
	if (r < 0)
		return r;
	r = drv->create(f, opts);
	if (r == 0)
		r = fetch_flush(f);
	fetch_close(f);
	if (r < 0)
		unlink(path);
	return r;
}
