/* streamfs: byte sources ("fetch" layer).
 *
 * A fetch_source is a flat array of bytes named by a URI: a local file
 * ("/path" or "file:///path"), an HTTP(S) URL or an NBD export
 * ("nbd://host:port/export", "nbd+unix:///export?socket=path", "nbds://"). It knows bytes and URLs,
 * never clusters: image formats (formats/) sit on top of it.
 *
 * Each kind of source is one file in fetch/ ending in a designated
 * initializer of struct fetch_ops, listed by URI scheme in the one table in
 * fetch/fetch.c (fetch_schemes), which fetch_open() searches. This layer owns
 * URIs: what has a scheme, how a backing name resolves against its parent,
 * how a URL is shown.
 *
 * THREAD MODEL: all ops may be called concurrently from many threads on one
 * source (FUSE worker threads, the stream job). Implementations protect their
 * own state. The generic wrappers (fetch_pread & co) check bounds, so ops can
 * trust their arguments.
 */
#ifndef STREAMFS_FETCH_H
#define STREAMFS_FETCH_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* fetch_open() flags */
#define FETCH_RDONLY 0x0
#define FETCH_RDWR   0x1 /* open for writing (local files only) */
#define FETCH_CREATE 0x2 /* create; fail if it exists (with FETCH_RDWR) */
#define FETCH_LOCK                                                                                 \
	0x4 /* take an OFD lock: exclusive with RDWR, shared otherwise;                            \
	     * refuse with -EBUSY if another process holds a conflicting one */

struct fetch_source;

/* I/O classes. Network sources serve the guest first: a GUEST read never
 * waits for a connection held by the JOB class, and fetch_guest_inflight()
 * tells the job when to shrink what it has in flight. The class is a
 * property of the calling thread (fetch_set_thread_class). */
enum fetch_class {
	FETCH_CLASS_GUEST, /* guest I/O and everything that does not say otherwise */
	FETCH_CLASS_JOB,   /* background copying: the stream job's lanes */
};
#define FETCH_NCLASSES 2

/* Network statistics of one source, or of all network sources of the
 * process (fetch_net_totals). Counters count since open (or process start);
 * the figures over a window are NAN while unknown (no request yet). */
struct fetch_net_stats {
	uint64_t in_flight[FETCH_NCLASSES]; /* requests on the network now, by class */
	uint64_t waiting[FETCH_NCLASSES];   /* reads waiting for a connection now */
	uint64_t bytes[FETCH_NCLASSES];	    /* bytes read for each class (delivered) */
	uint64_t requests;		    /* requests sent (every attempt, retries too) */
	uint64_t retries;		    /* attempts repeated after a transient failure */
	uint64_t stalls;		    /* attempts aborted for lack of progress */
	uint64_t errors;		    /* reads that failed for good (after retries) */
	uint64_t connections;		    /* connections open now (idle or busy) */
	uint64_t latency_count;		    /* successful requests, since the start */
	double latency_sum_s;		    /* and their total duration, in seconds */
	double latency_p50_s;		    /* median duration of recent successful requests */
	double latency_p99_s;		    /* 99th percentile of the same */
	double rtt_s;			    /* round-trip time: see fetch/http.c */
	double rate_bytes_per_s;	    /* bytes/s received over the recent seconds */
	double xfer_rate_bytes_per_s;	    /* median body rate of recent large requests */
};

/* The state of one server of a source (fetch_get_mirrors). */
enum fetch_mirror_state {
	FETCH_MIRROR_UP,      /* in use */
	FETCH_MIRROR_DOWN,    /* failed or stalled: left alone for a while, then tried again */
	FETCH_MIRROR_REFUSED, /* served another version of the file: never used again */
};

/* One server of a source: its own URL or one of its mirrors. */
struct fetch_mirror {
	const char *display; /* the URL as shown (fetch_display_uri); valid until close */
	enum fetch_mirror_state state;
	uint64_t requests; /* attempts sent to it */
	uint64_t errors;   /* attempts that failed on it (then retried elsewhere or not) */
	uint64_t bytes;	   /* bytes it delivered */
};

struct fetch_ops {
	const char *scheme; /* the kind, in messages: "file", "http" (also serves "https") */
	bool network;	    /* bytes come over the network (counted in status) */
	size_t priv_size;   /* bytes of zeroed private state at s->priv */
	/* Open s->uri; set s->size. Log a clear message and return -errno on failure. */
	int (*open)(struct fetch_source *s, int flags);
	void (*close)(struct fetch_source *s);
	/* Read exactly len bytes at off (off+len <= s->size is guaranteed).
	 * All or -errno. */
	int (*pread)(struct fetch_source *s, void *buf, size_t len, uint64_t off);
	/* Write exactly len bytes at off, extending the source if needed.
	 * All or -errno. NULL for read-only kinds. */
	int (*pwrite)(struct fetch_source *s, const void *buf, size_t len, uint64_t off);
	/* Make all completed writes durable (fdatasync). NULL = nothing to do. */
	int (*flush)(struct fetch_source *s);
	/* Set the size (ftruncate). NULL for read-only kinds. */
	int (*truncate)(struct fetch_source *s, uint64_t size);
	/* Is [off, ...) data or a hole? Sets *data and the run length *pnum
	 * (<= len). Optional (NULL: all data); local files use SEEK_DATA. */
	int (*data_run)(struct fetch_source *s, uint64_t off, uint64_t len, bool *data,
			uint64_t *pnum);
	/* Hint: [off, off+len) will be read soon; start fetching it without
	 * waiting. Optional (local files: POSIX_FADV_WILLNEED). */
	void (*prefetch)(struct fetch_source *s, uint64_t off, uint64_t len);
	/* The source's version identity (an HTTP ETag or Last-Modified), ""
	 * if it has none. Optional (NULL: ""). */
	const char *(*validator)(struct fetch_source *s);
	/* Network statistics of s. Optional (network kinds only). */
	void (*net_stats)(struct fetch_source *s, struct fetch_net_stats *out);
	/* The same summed over every source of this kind the process opened,
	 * closed ones included. Optional (network kinds only). */
	void (*net_totals)(struct fetch_net_stats *out);
	/* Add a mirror: another URL serving the same bytes. Optional
	 * (network kinds only); see fetch_add_mirror. */
	int (*add_mirror)(struct fetch_source *s, const char *url);
	/* Fill up to max servers of s (its URL first) and return how many
	 * there are. Optional. */
	unsigned (*mirrors)(struct fetch_source *s, struct fetch_mirror *out, unsigned max);
};

/* Statistics kept by the generic wrappers; read with atomic loads. */
struct fetch_stats {
	_Atomic uint64_t bytes_read;
	_Atomic uint64_t bytes_written;
	_Atomic uint64_t reads;
	_Atomic uint64_t writes;
	_Atomic uint64_t flushes;
	_Atomic uint64_t errors;
};

struct fetch_source {
	const struct fetch_ops *ops;
	char *uri;	       /* as given to fetch_open (malloc'd) */
	_Atomic uint64_t size; /* current size in bytes; grows with pwrite */
	int flags;
	struct fetch_stats stats;
	void *priv;
};

/* Options that apply to network sources; set once before opening anything.
 * All strings may be NULL. */
struct fetch_options {
	const char *cacert;	    /* extra CA bundle file for TLS */
	const char *http_auth_file; /* file holding "Header: value" or "user:password" */
	unsigned pool_size;	    /* HTTP connections per source for the job (0 = default 8);
				     * guest reads may open 2 more (HTTP_GUEST_RESERVE) */
	unsigned connect_timeout;   /* seconds (0 = default 10) */
	unsigned io_timeout;	    /* seconds a request may stall before retry (0 = default 30) */
	unsigned retries;	    /* attempts per request for transient errors (0 = default 5) */
	int verbose;		    /* log every request */
};
void fetch_set_options(const struct fetch_options *opts);
const struct fetch_options *fetch_get_options(void);

/* The uri made fit to show (status files, messages): a local path as is;
 * for "scheme://" URLs the userinfo becomes "***@", every query value and
 * the fragment "***" ("https://h/x?token=***"): signed URLs carry their
 * secret in the query. Returns a malloc'd string or NULL (ENOMEM). */
char *fetch_display_uri(const char *uri) __attribute__((nonnull));

/* Is uri a local path ("/abs", "rel/x", even "a:b") rather than a URI with
 * a scheme fetch_open() acts on ("file:///x", "http://h/x", "nbd://h/x",
 * "mem:x", or an unsupported "ftp://h/x", refused there)? A "scheme:" prefix whose scheme
 * is unknown and not followed by "//" is part of a file name. */
bool fetch_uri_is_path(const char *uri) __attribute__((nonnull));

/* Resolve a backing name stored in an image header against the URI of the
 * image that names it, relative to that image's directory as QEMU does:
 *  - a name with a scheme ("https://h/b", "file:///b") or an absolute path
 *    ("/b") is returned as is;
 *  - against a URL parent, a relative name is a relative reference resolved
 *    per RFC 3986 (libcurl's CURLU): "http://h/d/img?sig=a/b" + "b.raw" gives
 *    "http://h/d/b.raw" (the parent's query and fragment are not inherited),
 *    "../b" gives "http://h/b";
 *  - against a path (or a file: or mem: URI) it is joined to the parent's
 *    directory unchanged: "/i/ovl" + "../b" gives "/i/../b".
 * Returns 0 and a malloc'd *out; -ENOMEM; -EINVAL for an empty name or one
 * that makes no URL (logged, naming both in their shown form). */
int fetch_resolve_uri(const char *parent, const char *name, char **out) __attribute__((nonnull));

/* Open the source named by uri ("/path", "rel/path", "file:///path",
 * "http://...", "https://...", "nbd://...", "nbds://...", "nbd+unix://..."). Returns 0 and *out, or
 * -errno after logging a message that names the uri; -EPROTONOSUPPORT for a scheme no source
 * serves. */
int fetch_open(const char *uri, int flags, struct fetch_source **out);
void fetch_close(struct fetch_source *s);

/* Read exactly len bytes at off. A range past the end of the source is an
 * error (-EIO, logged): image drivers must not read past EOF. */
int fetch_pread(struct fetch_source *s, void *buf, size_t len, uint64_t off);
/* Write exactly len bytes at off; -EROFS on read-only sources. */
int fetch_pwrite(struct fetch_source *s, const void *buf, size_t len, uint64_t off);
/* Write len zero bytes at off: reserves the space of a range that a later
 * flush fills, so that flush cannot be the one to hit a full disk. */
int fetch_write_zeros(struct fetch_source *s, uint64_t off, uint64_t len);
/* Durable barrier: every completed write is on stable storage on return. */
int fetch_flush(struct fetch_source *s);
int fetch_truncate(struct fetch_source *s, uint64_t size);
/* Read-ahead hint (see fetch_ops.prefetch); clamped, never fails. */
void fetch_prefetch(struct fetch_source *s, uint64_t off, uint64_t len);
/* The source's version identity for matching a boot trace: the remote's
 * ETag or Last-Modified; for a local file "size:S,mtime:SEC.NSEC" (a copy
 * with a new mtime counts as another version: conservative); "" if none.
 * Writes at most len bytes into buf and returns buf. */
const char *fetch_validator(struct fetch_source *s, char *buf, size_t len);
/* Data or hole at off (see fetch_ops.data_run); "all data" when unknown. */
int fetch_extent(struct fetch_source *s, uint64_t off, uint64_t len, bool *data, uint64_t *pnum);

/* Set the I/O class of the calling thread's reads (thread-local; a thread
 * that never calls this is FETCH_CLASS_GUEST). */
void fetch_set_thread_class(enum fetch_class c);
enum fetch_class fetch_get_thread_class(void);

/* GUEST-class reads of network sources in progress now, process-wide,
 * including those waiting for a connection: one atomic load, cheap enough
 * to poll per chunk. The stream job shrinks its depth while it is > 0. */
unsigned fetch_guest_inflight(void);

/* Mirrors: other URLs serving the same bytes as the HTTP(S) source s (a CDN
 * and the origin, two regions). Each is probed like s was at open and must
 * report the same size and validator (ETag, else Last-Modified; s must have
 * one), else it is refused with a message naming it: -EINVAL (another
 * version), or the probe's -errno. Reads then spread over the healthy
 * servers; one that fails or stalls is left alone for a while (5 s, doubling
 * up to 60 s, then one read tries it) and the read goes on at once on
 * another; one that later serves another version is refused for good. The
 * auth file's credentials go only to the origin of s's own URL.
 * -EOPNOTSUPP for a local source; -E2BIG past FETCH_MAX_MIRRORS. */
#define FETCH_MAX_MIRRORS 8
int fetch_add_mirror(struct fetch_source *s, const char *url) __attribute__((nonnull));
/* The servers of s, its own URL first, then its mirrors in the order added:
 * fills up to max entries and returns how many there are (1 without
 * mirrors, 0 for a local source). */
unsigned fetch_get_mirrors(struct fetch_source *s, struct fetch_mirror *out, unsigned max)
    __attribute__((nonnull(1)));
/* "up", "down", "refused". */
const char *fetch_mirror_state_name(enum fetch_mirror_state st);

/* Network statistics of s: 0, or -ENOTSUP for a local source. */
int fetch_net_stats(struct fetch_source *s, struct fetch_net_stats *out) __attribute__((nonnull));
/* Network statistics of the whole process: every network source opened so
 * far, closed ones included, so the counters never go backwards (a rebase
 * closes the HTTP layers it drops). All zero (and NAN) without any. */
void fetch_net_totals(struct fetch_net_stats *out) __attribute__((nonnull));

static inline bool fetch_is_network(const struct fetch_source *s)
{
	return s->ops->network;
}

static inline uint64_t fetch_size(struct fetch_source *s)
{
	return atomic_load(&s->size);
}

/* The in-memory source "mem:NAME" for unit tests and fuzzers (fetch/mem.c). */

/* Create or replace the in-memory file NAME with a copy of data[0..len). */
int fetch_mem_put(const char *name, const void *data, size_t len);
/* Borrow the current contents of NAME (valid until the next write/put). */
int fetch_mem_get(const char *name, const void **data, size_t *len);
/* Fault injection: after 'after' more successful calls of the kinds in
 * op_mask (FETCH_MEM_READ|WRITE|FLUSH), fail every such call with -err. */
#define FETCH_MEM_READ	1
#define FETCH_MEM_WRITE 2
#define FETCH_MEM_FLUSH 4
int fetch_mem_fail(const char *name, int op_mask, uint64_t after, int err);
/* Disk-full model: from now on, at most 'bytes' more of NAME's holes may be
 * written (in 4 KiB blocks; rewriting written blocks is free); a write
 * needing more fails with -ENOSPC. 0 lifts the limit. */
int fetch_mem_limit(const char *name, uint64_t bytes);
/* Drop every in-memory file. */
void fetch_mem_reset(void);

#endif /* STREAMFS_FETCH_H */
