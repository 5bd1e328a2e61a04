/* streamfs: image formats and backing chains.
 *
 * An image is one layer: a format driver (raw, qcow2, qed) over a
 * fetch_source, with a pointer to its backing image (NULL at the base).
 * Drivers are small ops tables, one file each in formats/, registered in
 * formats/image.c. The generic chain walk lives in formats/image.c; the
 * guest-facing layer with copy-on-read and in-flight tracking lives in
 * block/disk.c (include/disk.h).
 *
 * THREAD MODEL
 * - map(), read_compressed() and reads of EXT_DATA host ranges may run
 *   concurrently with each other and with alloc_write()/zero_clusters() on
 *   OTHER guest ranges. Drivers protect their table caches with their own
 *   lock (never held across data I/O where avoidable).
 * - The caller (disk.c) guarantees that alloc_write()/zero_clusters() on a
 *   guest range never run concurrently with another allocating call that
 *   overlaps it (range locks), and that the range was mapped as not EXT_DATA
 *   under that lock.
 * - Once a guest cluster is EXT_DATA at some host offset it stays there
 *   (no discard, no snapshots), so a reader may pread a host range without
 *   holding any lock.
 *
 * CRASH ORDER (write-back metadata)
 * - alloc_write() writes the data to newly allocated host clusters, then
 *   updates the in-memory tables (refcounts, L2). Metadata reaches the file
 *   only in flush(), which (1) snapshots the dirty tables, (2) fdatasyncs the
 *   data, (3) writes refcount blocks and syncs, (4) writes L2 then L1 tables
 *   and syncs. A crash at any moment therefore never maps a cluster whose
 *   data is not on disk, and at worst leaks clusters.
 */
#ifndef STREAMFS_IMAGE_H
#define STREAMFS_IMAGE_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "fetch.h"

/* Deepest backing chain accepted (the overlay counts as one). */
#define IMAGE_MAX_CHAIN 64

/* image_open_chain() flags */
#define IMAGE_RDWR	 0x1 /* the top image is opened for writing (backings never are) */
#define IMAGE_NO_BACKING 0x2 /* do not open the backing chain */

enum extent_type {
	EXT_DATA,	/* bytes at host_off in this image's file */
	EXT_ZERO,	/* reads as zeros (zero cluster); do not look further down */
	EXT_UNALLOC,	/* not in this image: look at the backing (zeros at the base) */
	EXT_COMPRESSED, /* compressed cluster: read through drv->read_compressed */
};

/* A run of guest bytes with one state, starting at the offset passed to map(). */
struct extent {
	enum extent_type type;
	uint64_t len;	   /* > 0 and <= the length asked for */
	uint64_t host_off; /* EXT_DATA: file offset of the first byte;
			    * EXT_COMPRESSED: driver's cookie (e.g. the L2 entry) */
};

struct image;

/* Options for creating a new image. */
struct image_create_opts {
	uint64_t size;		  /* virtual size in bytes */
	uint32_t cluster_size;	  /* 0 = format default (64 KiB) */
	const char *backing_name; /* as it will be written to the header, or NULL */
	const char *backing_fmt;  /* "raw", "qcow2", "qed", or NULL */
	int version;		  /* qcow2: 2 or 3 (0 = 3) */
};

struct image_driver {
	const char *name; /* "raw", "qcow2", "qed" */
	size_t priv_size; /* zeroed bytes at img->priv */
	/* Score 0..100 for the first bytes of a file (0 = not this format). */
	int (*probe)(const uint8_t *buf, size_t len);
	/* Parse and validate the header from img->file. Set img->size,
	 * img->cluster_size, img->backing_name/backing_fmt (malloc'd or NULL).
	 * When img->read_only is false, prepare for writing (dirty/need-check
	 * bookkeeping). Return -errno after logging a message that names the
	 * file and the problem (-ENOTSUP for unsupported features, -EINVAL for
	 * corrupt headers). On failure, free everything (close is not called). */
	int (*open)(struct image *img);
	/* Release everything; the caller has called flush() first if writable.
	 * A writable image marks itself clean here (need-check bit cleared). */
	void (*close)(struct image *img);
	/* Describe the run starting at guest offset off (off < img->size,
	 * len > 0, off+len <= img->size). */
	int (*map)(struct image *img, uint64_t off, uint64_t len, struct extent *ext);
	/* Read [off, off+len) lying inside a compressed extent from map(). */
	int (*read_compressed)(struct image *img, uint64_t off, const struct extent *ext, void *buf,
			       size_t len);
	/* Write whole clusters: off is cluster-aligned, len is a multiple of
	 * cluster_size (the buffer is zero-padded past img->size). Every
	 * cluster in the range is currently not EXT_DATA. Allocate, write the
	 * data, then record the mapping (see CRASH ORDER). NULL = read-only format. */
	int (*alloc_write)(struct image *img, uint64_t off, const void *buf, size_t len);
	/* Make whole clusters read as zeros without allocating data (same
	 * alignment rules). -ENOTSUP if the format cannot (qcow2 v2). Optional. */
	int (*zero_clusters)(struct image *img, uint64_t off, uint64_t len);
	/* Durable barrier for data and metadata, in crash-safe order. */
	int (*flush)(struct image *img);
	/* Rewrite the backing reference: name NULL drops it. Atomic and
	 * durable on return (flushes first). Updates img->backing_name/fmt. */
	int (*set_backing)(struct image *img, const char *name, const char *fmt);
	/* Write a new empty image to f (already created, empty, writable).
	 * The driver checks opts against its own limits (cluster sizes,
	 * versions) and names them in its message. */
	int (*create)(struct fetch_source *f, const struct image_create_opts *opts);
	/* Apply one creation option "NAME=VALUE" (qemu-img's -o spelling) to
	 * opts; -EINVAL for one the format lacks. Optional. */
	int (*create_option)(struct image_create_opts *opts, const char *opt);
};

struct image {
	const struct image_driver *drv;
	void *priv;
	struct fetch_source *file; /* this layer's bytes */
	struct image *backing;	   /* NULL at the base */
	char *filename;		   /* resolved path or URL of this layer (malloc'd) */
	char *display;		   /* filename fit to show: secrets masked (fetch_display_uri) */
	uint64_t size;		   /* guest size in bytes */
	uint32_t cluster_size;	   /* allocation unit in bytes (raw: 64 KiB nominal) */
	char *backing_name;	   /* backing reference as stored in the header, or NULL */
	char *backing_fmt;	   /* backing format from the header, or NULL */
	bool read_only;
	int depth; /* 0 = top of the chain */
};

extern const struct image_driver image_raw_driver;
extern const struct image_driver image_qcow2_driver;
extern const struct image_driver image_qed_driver;

/* Find a driver by name ("raw", "qcow2", "qed"); NULL if unknown. */
const struct image_driver *image_find_driver(const char *name);

/* Open one layer (no backing). fmt NULL = probe. flags: IMAGE_RDWR. */
int image_open_one(const char *uri, const char *fmt, int flags, struct image **out);

/* Open uri and its whole backing chain. The top is writable with IMAGE_RDWR;
 * backings are always read-only. fmt NULL = probe the top. Each backing uses
 * the format recorded in its parent's header; only when none is recorded is
 * it probed. backing_override replaces the top's backing reference (NULL =
 * from the header). Loops and chains deeper than IMAGE_MAX_CHAIN are -ELOOP. */
int image_open_chain(const char *uri, const char *fmt, int flags, const char *backing_override,
		     struct image **out);

/* Close an image and its whole backing chain, flushing writable layers.
 * Returns the first flush error (the images are closed regardless). */
int image_close_chain(struct image *img);

/* Read guest bytes [off, off+len) of img as seen through its chain
 * (no copy-on-read; that is disk.c's job). Past img->size: -EINVAL. */
int image_pread(struct image *img, void *buf, size_t len, uint64_t off);

/* Read [off, off+len) lying inside the extent ext that map() returned for
 * img at off: its data, zeros, inflated data, or (EXT_UNALLOC) what the
 * backing chain holds there, zeros past a shorter backing's end. */
int image_read_extent(struct image *img, const struct extent *ext, void *buf, size_t len,
		      uint64_t off);

/* Where does the run starting at off live? Walks the chain from img down
 * to (but not into) 'base' (NULL = the whole chain). Sets *depth to the
 * layer index holding the data (0 = img), or -1 for zeros/holes in every
 * layer above base, or -2 for "not allocated above base" (read from base).
 * *pnum is the run length (<= len), *type the extent type in that layer. */
int image_block_status(struct image *img, struct image *base, uint64_t off, uint64_t len,
		       uint64_t *pnum, int *depth, enum extent_type *type);

/* Layer n of the chain (0 = img), or NULL. */
struct image *image_layer(struct image *img, int n);

/* Create a new image file at path with driver fmt. -EEXIST if it exists. */
int image_create(const char *path, const char *fmt, const struct image_create_opts *opts);
/* Apply creation option opt ("compat=0.10") of format fmt to opts: 0, or
 * -EINVAL after a message naming the format and the option. */
int image_create_option(const char *fmt, struct image_create_opts *opts, const char *opt);

#endif /* STREAMFS_IMAGE_H */
