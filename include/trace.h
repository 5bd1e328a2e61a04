/* streamfs: boot traces: the order in which a guest first read data the
 * overlay did not have, recorded at run time and replayed as a prefetch.
 * FUSE-free and I/O-free: this module records, parses, renders and merges;
 * the callers read and write the files and fetch the ranges.
 *
 * THE TRACE FORMAT (version 1; stable: a change of meaning bumps the version)
 *
 *   streamfs-trace 1 size=BYTES cluster=BYTES validator=STRING
 *   # a comment
 *   OFFSET LENGTH
 *   OFFSET LENGTH
 *   ...
 *
 * Text, one item a line, lines end in "\n" ("\r\n" is accepted too).
 * - The first line is the header: the word "streamfs-trace", the version
 *   (decimal), then at most 14 KEY=VALUE fields, separated by spaces or
 *   tabs, each key at most once, in any order. Required: size= (the
 *   backing image's size in bytes, decimal), cluster= (the granule of the
 *   ranges in bytes: a power of two, at least TRACE_CLUSTER_MIN),
 *   validator= (the backing's identity: an HTTP ETag or Last-Modified, or
 *   for a local file something like "mtime:NS,ino:N"; it may be empty).
 *   Other keys (lower case letters, digits, '_' and '-') are ignored, so a
 *   writer may add information that does not change the meaning.
 * - The validator is opaque and may come from a hostile server, so it is
 *   stored %-encoded: bytes 0x21..0x7e other than '%' as they are, every
 *   other byte as %HH (upper case hex on output, either case on input). A
 *   decoded NUL is refused; at most TRACE_VALIDATOR_MAX bytes decoded.
 * - Every other line is blank, a comment (first non-blank character '#'),
 *   or a range: OFFSET and LENGTH in bytes, decimal digits only (no sign),
 *   separated by spaces or tabs, with nothing else on the line. LENGTH > 0;
 *   OFFSET is a multiple of the cluster; OFFSET + LENGTH is a multiple of
 *   the cluster or equal to size (the image's partial last cluster), and at
 *   most size.
 * - Ranges are listed in first-access order. Ranges may overlap or repeat:
 *   the parser keeps the first mention of each byte, dropping the parts of a
 *   later range already covered (a range may split into pieces, each in the
 *   later range's place), and joins consecutive ranges that touch. The
 *   result, struct trace, has disjoint ranges that each start where no
 *   earlier one ends; rendering it and parsing again gives the same trace.
 * - Limits, against hostile input: the text at most TRACE_MAX_TEXT bytes, a
 *   line at most TRACE_MAX_LINE bytes, at most TRACE_MAX_RANGES range
 *   lines, no NUL byte. Anything else is an error naming the line.
 *
 * MERGE ORDER. Merging traces of several boots of one image orders ranges
 * by how early in its own boot each was first read, measured in bytes: the
 * position of a range in trace k is the number of bytes listed before it
 * divided by the bytes listed in all of trace k (0 for the first range, just
 * under 1 for the last). Ranges of all inputs are ordered by that fraction
 * (ties: the earlier input, then the earlier range), a byte keeps the place
 * of its earliest mention, and the result is normalized as above. So each
 * byte sits at the earliest relative point any boot needed it, the order
 * within each input is kept, merging a trace with itself (or merging one
 * trace) gives it back, and a range only one boot read slots in where that
 * boot read it. Bytes rather than range counts because a boot that reads in
 * big sequential runs lists few ranges that each stand for a lot of time.
 *
 * THE RECORDER. trace_rec_note() is called on the guest read path for each
 * read the overlay could not serve. A sparse two-level bitmap (one bit per
 * cluster, leaves of TRACE_REC_LEAF_BITS bits allocated on first touch)
 * remembers what was noted: a repeat costs an atomic pointer load and a
 * bit test per cluster, without a lock; the mutex is taken only when a
 * cluster is seen for the first time, to append it (extending the last
 * range when adjacent, so a sequential read makes one line). Memory: the
 * leaf pointer table (at most TRACE_REC_MAX_CLUSTERS / TRACE_REC_LEAF_BITS
 * pointers, 8 KiB for a 2 TiB disk with 64 KiB clusters), 4 KiB per
 * 2 GiB region touched (64 KiB clusters), at most 1 bit per cluster of the
 * whole disk (4 MiB for 2 TiB at 64 KiB) if the guest touches all of it, and
 * 16 bytes per range up to max_ranges. A disk with more than
 * TRACE_REC_MAX_CLUSTERS clusters is recorded with a coarser granule (the
 * cluster doubled until it fits), which the header then names. Past
 * max_ranges ranges recording stops; the clusters not recorded are counted.
 */
#ifndef STREAMFS_TRACE_H
#define STREAMFS_TRACE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TRACE_MAGIC	       "streamfs-trace"
#define TRACE_VERSION	       1
#define TRACE_CLUSTER_MIN      512u		   /* bytes */
#define TRACE_VALIDATOR_MAX    1024u		   /* bytes, decoded */
#define TRACE_MAX_LINE	       4096u		   /* bytes, with the line end */
#define TRACE_MAX_RANGES       (1u << 20)	   /* range lines in a trace */
#define TRACE_MAX_TEXT	       (64u << 20)	   /* bytes of trace text */
#define TRACE_REC_MAX_CLUSTERS (UINT64_C(1) << 28) /* bits in a recorder's bitmap */
#define TRACE_REC_LEAF_BITS    (UINT64_C(1) << 15) /* bits per lazily allocated leaf */

/* A byte range of the backing image. */
struct trace_range {
	uint64_t off; /* in bytes, a multiple of the cluster */
	uint64_t len; /* in bytes, > 0 */
};

/* A parsed (normalized) trace: ranges disjoint, in first-access order, and
 * no range starts where the one before it ends. */
struct trace {
	uint64_t size;	       /* backing image size, in bytes */
	uint64_t cluster;      /* granule of the ranges, in bytes (power of two) */
	char *validator;       /* decoded, NUL-terminated, maybe "" */
	size_t n;	       /* number of ranges */
	struct trace_range *r; /* n ranges */
};

/* Free a trace (NULL is fine). */
void trace_free(struct trace *t);

/* Parse len bytes of trace text (not NUL-terminated; a NUL byte in it is an
 * error) into a normalized trace. Returns 0 and *out, or -EINVAL with a
 * message such as "line 3: offset 4096 is not a multiple of the cluster
 * size 65536" in err (errlen bytes, always NUL-terminated when errlen > 0),
 * or -ENOMEM. */
int trace_parse(const char *text, size_t len, struct trace **out, char *err, size_t errlen)
    __attribute__((nonnull(3)));

/* Whether t was recorded against a backing of this size and validator
 * (NULL means ""): both must be equal, byte for byte. A caller whose backing
 * has no validator passes "" and so accepts only a trace without one. */
bool trace_matches(const struct trace *t, uint64_t size, const char *validator)
    __attribute__((nonnull(1)));

/* Render t as text (the format above, header first, one range a line),
 * into a malloc'd NUL-terminated *buf of *len bytes (without the NUL).
 * Returns 0, -EINVAL (a validator over TRACE_VALIDATOR_MAX bytes) or
 * -ENOMEM. */
int trace_render(const struct trace *t, char **buf, size_t *len) __attribute__((nonnull));

/* Merge n >= 1 traces of the same image (see MERGE ORDER above) into a new
 * normalized trace. Every input must have the same size and validator
 * (else -EINVAL, with a message in err); the result's cluster is the
 * smallest of the inputs'. A result over TRACE_MAX_RANGES ranges is cut to
 * its first TRACE_MAX_RANGES (the latest-needed ranges go). Returns 0,
 * -EINVAL or -ENOMEM. */
int trace_merge(const struct trace *const *in, size_t n, struct trace **out, char *err,
		size_t errlen) __attribute__((nonnull(1, 3)));

/* The recorder. Thread-safe: trace_rec_note() may run in any number of
 * threads at once, and alongside the stats, snapshot and render calls. */
struct trace_rec;

/* A recorder for a backing of size bytes, noting cluster-sized granules
 * (a power of two >= TRACE_CLUSTER_MIN; coarsened for a disk of more than
 * TRACE_REC_MAX_CLUSTERS clusters), keeping at most max_ranges ranges
 * (0 or more than TRACE_MAX_RANGES: TRACE_MAX_RANGES, so a rendered trace
 * always parses). Returns 0 and *out, -EINVAL or -ENOMEM. */
int trace_rec_new(uint64_t size, uint64_t cluster, size_t max_ranges, struct trace_rec **out)
    __attribute__((nonnull));

/* Free the recorder (NULL is fine). No note may be running. */
void trace_rec_free(struct trace_rec *rec);

/* Note that the guest read [off, off + len) and the overlay did not have
 * it. The clusters it touches that were never noted are appended, in
 * order; the part past size is ignored. Cheap when nothing is new (no
 * lock). A NULL rec does nothing, so the read path can call it always. */
void trace_rec_note(struct trace_rec *rec, uint64_t off, uint64_t len);

/* The recorder's granule in bytes (the cluster, or a coarser one). */
uint64_t trace_rec_cluster(const struct trace_rec *rec) __attribute__((nonnull));

struct trace_rec_stats {
	uint64_t ranges;   /* ranges recorded */
	uint64_t clusters; /* clusters recorded */
	uint64_t dropped;  /* new clusters not recorded: max_ranges was reached */
};

/* Counters, consistent with each other. */
void trace_rec_stats(struct trace_rec *rec, struct trace_rec_stats *st) __attribute__((nonnull));

/* What was recorded so far, as a trace with this validator (NULL: "").
 * Returns 0 and *out, -EINVAL (validator too long) or -ENOMEM. */
int trace_rec_snapshot(struct trace_rec *rec, const char *validator, struct trace **out)
    __attribute__((nonnull(1, 3)));

/* trace_rec_snapshot() rendered as text (trace_render()), with a comment
 * line counting the dropped clusters if any: what control/trace serves. */
int trace_rec_render(struct trace_rec *rec, const char *validator, char **buf, size_t *len)
    __attribute__((nonnull(1, 3, 4)));

#endif /* STREAMFS_TRACE_H */
