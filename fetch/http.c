/* streamfs: HTTP(S) byte source over libcurl ("http://", "https://").
 *
 * Notes on the design
 *
 * Every pread is one ranged GET ("Range: bytes=a-b", inclusive end) on a
 * keep-alive connection taken from a small pool of CURL easy handles (after
 * nbdkit plugins/curl/pool.c). The callers (image drivers, the disk layer,
 * the stream job) already ask for large runs, so there is no cache here.
 * Reads larger than HTTP_SPLIT_MIN are cut into pieces fetched in parallel
 * on idle pool handles, never waiting for a busy one (waiting for a second
 * handle while holding one could deadlock two large readers).
 *
 * Consistency. open() probes with "Range: bytes=0-0" and requires 206 with
 * "Content-Range: bytes 0-0/TOTAL"; TOTAL is the size. A server answering
 * 200 (Range ignored) or "bytes 0-0/ *" is refused (-EOPNOTSUPP): it would
 * either send the whole file for every read or give no size. The validator
 * (ETag, else Last-Modified) is recorded, sent back as If-Match (strong ETag)
 * or If-Unmodified-Since, and compared on every response, together with the
 * Content-Range (start, end and total must match the request exactly) and
 * the body length (the write callback refuses a byte more than asked: the
 * server is not trusted). When the remote file changed (412, another
 * validator, another total size) the source becomes "changed": that read
 * and every later one fail with -EIO, and one message says why. Old and new
 * data are never mixed.
 *
 * Faults and the time bound. Transient failures (connect refused/reset,
 * timeouts, short bodies, 408, 429, 5xx) are retried with exponential
 * backoff (HTTP_BACKOFF_BASE_MS doubling, capped at HTTP_BACKOFF_MAX_MS);
 * 429 and 503 honour Retry-After up to HTTP_RETRY_AFTER_MAX_MS. An attempt
 * is a stall, aborted, when no byte arrives for io_timeout seconds
 * (connect_timeout + io_timeout before the first one: http_xferinfo_cb) or
 * when it averages under HTTP_LOW_SPEED_LIMIT bytes/s over io_timeout
 * (CURLOPT_LOW_SPEED_*). `retries` counts attempts, so a dead or stalled
 * server fails one request in at most
 *	retries * (connect_timeout + io_timeout) + (retries - 1) * backoff
 * with backoff <= HTTP_RETRY_AFTER_MAX_MS (defaults: 5 * (10 + 30) s +
 * 4 * 30 s = 320 s; a refused connection fails far sooner). A pread may
 * first wait for a free pool handle held by requests with the same bound
 * (a guest read only for one held by other guest reads: see the pool).
 * A server that keeps trickling faster than HTTP_LOW_SPEED_LIMIT is not a
 * stall. 4xx other than 408/429 fail at once: 404/410 -> -ENOENT,
 * 401/403/407 -> -EACCES; after the retries, stalls and timeouts give
 * -ETIMEDOUT, a refused connection -ECONNREFUSED, everything else (TLS
 * verification failures included) -EIO.
 *
 * Mirrors (fetch_add_mirror). A source may have up to FETCH_MAX_MIRRORS
 * more URLs serving the same bytes; with its own URL they are its servers
 * (http_endpoint, ep[0] is s->uri). Each mirror is probed like the URL at
 * open (redirects pinned, credentials only to the URL's origin) and must
 * report the same size and validator, else it is refused; a URL without a
 * validator takes no mirror, since nothing would tell versions apart. Every
 * request goes to the usable server with the fewest requests in flight,
 * ties in turn. A transient failure or a stall takes its server out for
 * HTTP_DOWN_MIN_MS, doubling up to HTTP_DOWN_MAX_MS each time the one
 * request let through when the period ends (its trial) fails too; the
 * failed request is retried at once on another usable server, and only
 * waits out the backoff when there is none. The checks of every response
 * apply to every server: one that serves another version (validator, size,
 * 412) is refused for good before any byte of it is taken, the request
 * goes elsewhere, and only when no server is left is the source "changed".
 * A guest read does not wait out a stall when another server is usable:
 * no byte for HTTP_FAILOVER_MIN_MS (or HTTP_FAILOVER_RTTS times the best
 * first-byte time seen, on a far link) and it moves on; the job keeps
 * io_timeout. A handle keeps one connection (CURLOPT_MAXCONNECTS 1) and
 * remembers its server; the pool hands out a handle connected to the
 * chosen server when it has one, so connections stay per server. Without
 * mirrors none of this changes anything: the one server is always used.
 *
 * Throughput, measured on loopback against nginx (tests/test-http.c with
 * STREAMFS_HTTP_BENCH=1G): sequential 4 MiB preads run at about the speed of
 * `curl -o /dev/null` and use less CPU. Splitting gains nothing on loopback
 * but about 4x for 32 MiB reads when the server caps each connection (nginx
 * limit_rate, as CDNs and object stores do), hence HTTP_SPLIT_MIN.
 *
 * The guest comes first. Every read has a class (fetch_set_thread_class):
 * the stream job's lanes are JOB, everything else is GUEST. JOB reads hold
 * at most pool_size handles; GUEST reads may open HTTP_GUEST_RESERVE more,
 * so while the job fills the pool a guest read still gets a connection at
 * once instead of queueing behind megabytes of stream data (it waits only
 * when other guest reads already hold the whole reserve, and then a
 * released handle goes to a waiting guest before any job). The default
 * pool of 8 lets the job's 8 lanes each have a connection: on a far link
 * one TCP connection's window caps its rate (2 MiB in flight over 80 ms is
 * about 26 MB/s), so filling 500 Mbit/s takes 3 busy connections and 8
 * leave room for lanes in slow start, in a retry or waiting on a slow
 * server. Split pieces take only idle handles below pool_size, never the
 * guest reserve.
 *
 * Statistics (fetch_net_stats, for control/status and control/metrics):
 * counters per source and process-wide (closed sources included, so they
 * never go backwards), plus a ring of the last HTTP_NET_SAMPLES successful
 * requests under a small lock, recorded once per request. From the ring:
 *  - latency p50/p99: duration of one successful attempt (headers sent to
 *    last byte; neither the wait for a handle nor retries, which are
 *    counted apart), nearest-rank percentiles;
 *  - RTT: the minimum of CURLINFO_STARTTRANSFER_TIME - PRETRANSFER_TIME,
 *    request sent to first response byte. It is known for every request,
 *    large ones too and on kept-alive connections (where the TCP connect
 *    time, pure RTT, is never measured again); it adds the server's think
 *    time and any queue on the path, and the minimum over many requests
 *    removes both;
 *  - link rate: bytes of the requests that ended in the last
 *    HTTP_RATE_WINDOW_NS, over the time since the earliest of them began
 *    (all classes; 0 when idle);
 *  - transfer rate: the median, over recent requests of at least
 *    HTTP_XFER_MIN_BYTES, of bytes over the time from first to last byte
 *    (at least 1 ms). Unlike the link rate it does not fall when requests
 *    are few and latency-bound (a booting guest): it is what one more
 *    request's extra bytes cost, which block/disk.c weighs against a
 *    round trip.
 *
 * Logging: with the verbose option every request is logged at info level
 * (method, range, status, bytes, time); STREAMFS_HTTP_DEBUG=1 logs the same
 * at warning level so it shows without -v. Never credentials.
 *
 * Security. TLS peer and host verification are always on; the cacert option
 * sets CAINFO (it replaces the default bundle, like curl --cacert). Only
 * http and https are allowed, also as redirect targets. Credentials come
 * only from options->http_auth_file or ~/.netrc, never from the URL (refused
 * at open), and are never logged; nor are query values (signed URLs carry
 * tokens there: fetch_display_uri masks them wherever a URL is shown), nor
 * is CURLOPT_VERBOSE ever set (it would print headers).
 *
 * Redirects are resolved once, at open, by hand (at most HTTP_MAX_REDIRECTS,
 * http/https only) and the final URL is pinned for every read; a redirect
 * seen later is an error. Doing it by hand rather than with
 * CURLOPT_FOLLOWLOCATION is what keeps credentials on their origin: libcurl
 * strips Authorization and Cookie on a cross-host redirect, but not a custom
 * header such as "Private-Token: ..." from the auth file. So the auth header
 * and user:password go only to the scheme+host+port of the given URL; once a
 * redirect leaves that origin they are dropped for good (a redirect to a
 * pre-signed URL on another host then works without them). Pinning also
 * keeps every read on the one server whose validator we recorded. The cost:
 * a pinned URL that expires later fails reads (403 -> -EACCES).
 *
 * NOTES ON THE THREAD MODEL
 * pread is called concurrently from many threads. A CURL easy handle belongs
 * to one thread at a time: http_get_conn() hands out a handle from the pool
 * (creating up to pool_size + HTTP_GUEST_RESERVE lazily, within the class
 * limits of http_may_take) and blocks on the condition variable of its
 * class when it may not take one; http_put_conn() returns it and wakes a
 * waiting guest first. The pool, its list and counters are protected by
 * http_priv.lock. Statistics counters are atomics; the sample rings are
 * protected by their http_net.lock (a leaf: nothing is taken under it).
 * DNS cache and TLS sessions are shared between the handles of one source
 * through a CURLSH with its own locks. Everything else in http_priv is
 * written only by open() and is read-only afterwards, except `changed`
 * (atomic, sticky). Servers: ep[i] is filled before it is published by
 * raising nep under lock (mirror_lock keeps adders one at a time) and is
 * read-only afterwards except its health fields (under lock) and its
 * counters (atomics). curl_global_init() runs once under pthread_once.
 */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>

#include "fetch.h"
#include "util.h"

#define HTTP_DEFAULT_POOL_SIZE	     8	/* connections for the job: one per stream lane */
#define HTTP_GUEST_RESERVE	     2	/* more connections only guest reads may open */
#define HTTP_DEFAULT_CONNECT_TIMEOUT 10 /* in seconds */
#define HTTP_DEFAULT_IO_TIMEOUT	     30 /* in seconds */
#define HTTP_DEFAULT_ATTEMPTS	     5
#define HTTP_MAX_POOL_SIZE	     64
#define HTTP_MAX_REDIRECTS	     5
#define HTTP_BACKOFF_BASE_MS	     250	  /* first retry delay, doubled each time */
#define HTTP_BACKOFF_MAX_MS	     8000	  /* cap on the exponential backoff */
#define HTTP_RETRY_AFTER_MAX_MS	     30000	  /* cap on a server's Retry-After */
#define HTTP_LOW_SPEED_LIMIT	     1024	  /* in bytes/s: slower for io_timeout = stalled */
#define HTTP_SPLIT_MIN		     (8u << 20)	  /* in bytes: larger reads are split */
#define HTTP_MAX_SPLIT		     8		  /* pieces of one split read */
#define HTTP_SPLIT_PIECE	     (4u << 20)	  /* in bytes: smallest piece of a split read */
#define HTTP_BUFFER_SIZE	     (512L << 10) /* in bytes: libcurl receive buffer */
#define HTTP_DISCARD_MAX	     (64u << 10)  /* in bytes of an error body before hanging up */
#define HTTP_VALIDATOR_MAX	     256	  /* in bytes, ETag / Last-Modified */
#define HTTP_AUTH_FILE_MAX	     8192	  /* in bytes */
#define HTTP_NET_SAMPLES	     256	  /* recent requests kept for latency/RTT/rate */
#define HTTP_XFER_MIN_BYTES	     (64u << 10)  /* requests that tell the transfer rate */
#define HTTP_RATE_WINDOW_NS	     (5ULL * 1000000000)     /* in ns: the link rate's window */
#define HTTP_MAX_ENDPOINTS	     (1 + FETCH_MAX_MIRRORS) /* the source's URL and its mirrors */
#define HTTP_DOWN_MIN_MS	     5000  /* a failed server is left alone this long first */
#define HTTP_DOWN_MAX_MS	     60000 /* doubling after each failed trial, up to this */
#define HTTP_FAILOVER_MIN_MS	     2000  /* guest: no byte for this long -> another server */
#define HTTP_FAILOVER_RTTS	     10	   /* ... or for this many round trips, if longer */

/* Facts from the headers of the last response (reset by each status line,
 * so 100-continue and the like leave nothing behind). */
struct http_resp {
	long status;
	char content_range[128];
	char etag[HTTP_VALIDATOR_MAX];
	char last_modified[HTTP_VALIDATOR_MAX];
	char content_encoding[64];
	long retry_after_ms; /* -1 if absent */
};

struct http_priv;

/* One server of the source: its own URL (ep[0]) or a mirror. */
struct http_endpoint {
	/* Set before it is published (http_priv.nep), read-only afterwards. */
	char *url;     /* pinned for every read (after redirects) */
	char *display; /* fetch_display_uri() of the URL given */
	bool creds;    /* credentials go to url (same origin as the source's URL) */
	struct curl_slist *read_headers; /* auth header (if creds) + If-Match */
	/* Health: protected by http_priv.lock. */
	enum fetch_mirror_state state;
	uint64_t down_until_ns; /* DOWN: left alone until then */
	unsigned down_ms;	/* the next down period */
	bool trial;		/* DOWN and over: one request is trying it */
	unsigned inflight;	/* requests on it now */
	/* Statistics. */
	_Atomic uint64_t requests, errors, bytes;
};

/* One successful request, for the figures over a window. */
struct http_sample {
	uint64_t start_ns, end_ns; /* of the attempt that succeeded */
	uint64_t bytes;
	uint64_t ttfb_ns; /* request sent -> first byte; UINT64_MAX if unknown */
};

/* Network statistics: one per source and one for the process. */
struct http_net {
	_Atomic uint64_t in_flight[FETCH_NCLASSES];
	_Atomic uint64_t waiting[FETCH_NCLASSES];
	_Atomic uint64_t bytes[FETCH_NCLASSES];
	_Atomic uint64_t requests, retries, stalls, errors, connections;
	pthread_mutex_t lock;
	uint64_t lat_count, lat_sum_ns;		   /* protected by lock */
	struct http_sample ring[HTTP_NET_SAMPLES]; /* protected by lock */
	unsigned ring_next, ring_len;		   /* protected by lock */
};

/* Every HTTP source the process opened, closed ones included. */
static struct http_net http_all = {.lock = PTHREAD_MUTEX_INITIALIZER};

/* Add n to counter f of both p's statistics and the process's. */
#define HTTP_NET_ADD(p, f, n)                                                                      \
	do {                                                                                       \
		atomic_fetch_add(&(p)->net.f, (n));                                                \
		atomic_fetch_add(&http_all.f, (n));                                                \
	} while (0)
#define HTTP_NET_SUB(p, f, n)                                                                      \
	do {                                                                                       \
		atomic_fetch_sub(&(p)->net.f, (n));                                                \
		atomic_fetch_sub(&http_all.f, (n));                                                \
	} while (0)

/* One request: owned by the thread holding the handle. */
struct http_req {
	struct http_priv *p;
	struct http_endpoint *ep; /* the server of this attempt (reads; NULL for a probe) */
	const char *url;
	const char *shown; /* a probe: its URL as shown in messages */
	bool creds;	   /* send the auth header / user:password */
	bool probe;	   /* open-time probe: learn the total size and validator */
	bool trial;	   /* this attempt is the trial of a server that was down */
	enum fetch_class cls;
	uint8_t *buf; /* destination of exactly len bytes */
	size_t len;
	uint64_t off;
	/* Per attempt. */
	size_t got;
	size_t discarded;
	bool checked;		    /* the headers of a 206 were verified */
	int err;		    /* -errno decided in a callback (fatal) */
	bool stalled;		    /* aborted: no byte for io_timeout */
	bool refused;		    /* its server served another version: refused */
	uint64_t first_limit_ns;    /* stall: no first byte after this long */
	uint64_t gap_limit_ns;	    /* stall: no further byte for this long */
	uint64_t start_ns, last_ns; /* attempt start, last byte received */
	uint64_t end_ns, ttfb_ns;   /* attempt end; request sent -> first byte */
	struct http_resp resp;
	uint64_t total; /* probe: total size from Content-Range */
	char why[256];	/* last failure, for the final message */
};

struct http_conn {
	CURL *curl;
	struct http_conn *next;	  /* protected by http_priv.lock (free list) */
	struct http_endpoint *ep; /* its connection is to this server (or NULL) */
	char errbuf[CURL_ERROR_SIZE];
};

struct http_priv {
	/* Set by open, read-only afterwards. */
	char *display; /* fetch_display_uri(uri), for messages */
	char *auth_header;
	char *userpwd;
	char origin[512]; /* scheme://host:port of s->uri: credentials go only there */
	char validator[HTTP_VALIDATOR_MAX];
	bool validator_is_etag;
	struct curl_slist *probe_headers; /* auth header only */
	uint64_t size;
	unsigned pool_size, attempts;
	long connect_timeout, io_timeout; /* in seconds */
	char *cacert;
	int verbose_level; /* log level of per-request messages; -1: none */
	CURLSH *share;
	pthread_mutex_t share_lock[CURL_LOCK_DATA_LAST];
	bool share_locks_init;

	pthread_mutex_t lock;
	pthread_cond_t cond_guest, cond_job; /* a handle may be free for that class */
	bool lock_init;
	struct http_conn *free_conns;  /* protected by lock */
	unsigned nconns;	       /* handles in existence; protected by lock */
	unsigned busy[FETCH_NCLASSES]; /* handles held, by class; protected by lock */
	unsigned guest_waiting;	       /* guest reads waiting; protected by lock */

	/* The servers: ep[0] is s->uri. Mirrors are appended (under
	 * mirror_lock, one adder at a time) and published by raising nep
	 * under lock; never removed before close. */
	struct http_endpoint ep[HTTP_MAX_ENDPOINTS];
	_Atomic unsigned nep;
	unsigned rr; /* round-robin start of the next pick; protected by lock */
	pthread_mutex_t mirror_lock;
	_Atomic uint64_t rtt_min_ns; /* fastest first byte seen: sizes the failover deadline */

	atomic_bool changed; /* sticky: the remote file changed */
	struct http_net net;
};

static pthread_once_t http_once = PTHREAD_ONCE_INIT;
static CURLcode http_global_rc;

static void http_global_init(void)
{
	http_global_rc = curl_global_init(CURL_GLOBAL_DEFAULT);
}

/* ---- Small helpers ---- */

static void http_share_lock(CURL *h, curl_lock_data data, curl_lock_access access, void *opaque)
{
	struct http_priv *p = opaque;

	pthread_mutex_lock(&p->share_lock[data]);
}

static void http_share_unlock(CURL *h, curl_lock_data data, void *opaque)
{
	struct http_priv *p = opaque;

	pthread_mutex_unlock(&p->share_lock[data]);
}

static void http_sleep_ms(long ms)
{
	struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};

	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

/* Copy value (not NUL-terminated, n bytes) into dst, trimmed of blanks. */
static void http_copy_trimmed(char *dst, size_t dstlen, const char *v, size_t n)
{
	while (n && (*v == ' ' || *v == '\t')) {
		v++;
		n--;
	}
	while (n && (v[n - 1] == '\r' || v[n - 1] == '\n' || v[n - 1] == ' ' || v[n - 1] == '\t'))
		n--;
	if (n >= dstlen)
		n = dstlen - 1;
	memcpy(dst, v, n);
	dst[n] = '\0';
}

/* Parse decimal digits at *pp into *out; false on no digits or overflow. */
static bool http_parse_u64(const char **pp, uint64_t *out)
{
	const char *q = *pp;
	uint64_t v = 0;

	if (!isdigit((unsigned char)*q))
		return false;
	while (isdigit((unsigned char)*q)) {
		if (!sfs_mul_ok(v, 10, &v) || !sfs_add_ok(v, (uint64_t)(*q - '0'), &v))
			return false;
		q++;
	}
	*pp = q;
	*out = v;
	return true;
}

/* Parse "bytes A-B/T" (T may be "*": *total = UINT64_MAX) or, with
 * first = NULL, "bytes * /T". Nothing may follow. */
static bool http_parse_content_range(const char *cr, uint64_t *first, uint64_t *last,
				     uint64_t *total)
{
	const char *q = cr;

	if (strncasecmp(q, "bytes", 5) != 0)
		return false;
	q += 5;
	if (*q != ' ')
		return false;
	while (*q == ' ')
		q++;
	if (first) {
		if (!http_parse_u64(&q, first) || *q++ != '-' || !http_parse_u64(&q, last) ||
		    *last < *first)
			return false;
	} else if (*q++ != '*') {
		return false;
	}
	if (*q++ != '/')
		return false;
	if (*q == '*' && first) {
		*total = UINT64_MAX;
		q++;
	} else if (!http_parse_u64(&q, total)) {
		return false;
	}
	return *q == '\0';
}

/* Retry-After: delta-seconds or an HTTP-date. Returns milliseconds or -1. */
static long http_parse_retry_after(const char *v)
{
	const char *q = v;
	uint64_t secs;
	time_t when;

	if (http_parse_u64(&q, &secs) && *q == '\0')
		return secs > HTTP_RETRY_AFTER_MAX_MS / 1000 ? HTTP_RETRY_AFTER_MAX_MS
							     : (long)secs * 1000;
	when = curl_getdate(v, NULL);
	if (when < 0)
		return -1;
	when -= time(NULL);
	if (when <= 0)
		return 0;
	return when > HTTP_RETRY_AFTER_MAX_MS / 1000 ? HTTP_RETRY_AFTER_MAX_MS : (long)when * 1000;
}

/* Append q[0..len) with the value of every "key=value" part masked
 * ("token=***"); a part without '=' is masked whole, empty values stay
 * empty. o has room for 3 * len + 1 bytes ("a" -> "***"). Returns the end. */
static char *http_mask_query(char *o, const char *q, size_t len)
{
	while (len) {
		size_t part = 0, eq;

		while (part < len && q[part] != '&')
			part++;
		for (eq = 0; eq < part && q[eq] != '='; eq++)
			;
		if (eq < part) {
			memcpy(o, q, eq + 1);
			o += eq + 1;
		}
		if (part > eq + 1 || (eq == part && part > 0)) {
			memcpy(o, "***", 3);
			o += 3;
		}
		q += part;
		len -= part;
		if (len) {
			*o++ = '&';
			q++;
			len--;
		}
	}
	*o = '\0';
	return o;
}

/* fetch_display_uri() for a string libcurl cannot parse (so it will never
 * be fetched, but it is still shown in messages). Err on the side of
 * hiding: everything before the last '@' ahead of the query is taken as
 * userinfo. */
static char *http_display_unparsed(const char *uri, size_t scheme_len)
{
	const char *rest = uri + scheme_len + 3, *at = NULL;
	size_t end = strcspn(rest, "?#"), len = strlen(uri);
	char *out = malloc(len * 3 + 8), *o = out;

	if (!out)
		return NULL;
	for (size_t i = 0; i < end; i++)
		if (rest[i] == '@')
			at = rest + i;
	memcpy(o, uri, scheme_len + 3);
	o += scheme_len + 3;
	if (at) {
		memcpy(o, "***", 3);
		o += 3;
		end -= (size_t)(at - rest);
		rest = at;
	}
	memcpy(o, rest, end);
	o += end;
	rest += end;
	if (*rest == '?') {
		size_t qlen = strcspn(rest + 1, "#");

		*o++ = '?';
		o = http_mask_query(o, rest + 1, qlen);
		rest += 1 + qlen;
	}
	if (*rest == '#') {
		memcpy(o, "#***", 4);
		o += 4;
	}
	*o = '\0';
	return out;
}

char *fetch_display_uri(const char *uri)
{
	size_t scheme_len = strspn(uri, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
					"0123456789+.-");
	char *part = NULL, *url = NULL, *out = NULL, *q = NULL;
	CURLU *u;

	/* Local paths and file: URLs carry no secrets and are shown as is. */
	if (scheme_len == 0 || strncmp(uri + scheme_len, "://", 3) != 0 ||
	    strncmp(uri, "file://", 7) == 0)
		return strdup(uri);
	u = curl_url();
	if (!u)
		return NULL;
	if (curl_url_set(u, CURLUPART_URL, uri, CURLU_NON_SUPPORT_SCHEME) != CURLUE_OK)
		goto fallback;
	if (curl_url_get(u, CURLUPART_USER, &part, 0) == CURLUE_OK ||
	    curl_url_get(u, CURLUPART_PASSWORD, &part, 0) == CURLUE_OK ||
	    curl_url_get(u, CURLUPART_OPTIONS, &part, 0) == CURLUE_OK) {
		/* "***@host" still tells the reader the URL held credentials. */
		if (curl_url_set(u, CURLUPART_USER, "***", 0) != CURLUE_OK ||
		    curl_url_set(u, CURLUPART_PASSWORD, NULL, 0) != CURLUE_OK ||
		    curl_url_set(u, CURLUPART_OPTIONS, NULL, 0) != CURLUE_OK)
			goto fallback;
	}
	curl_free(part);
	part = NULL;
	if (curl_url_get(u, CURLUPART_QUERY, &part, 0) == CURLUE_OK) {
		size_t len = strlen(part);

		q = malloc(len * 3 + 1);
		if (!q)
			goto out;
		http_mask_query(q, part, len);
		if (curl_url_set(u, CURLUPART_QUERY, q, 0) != CURLUE_OK)
			goto fallback;
	}
	curl_free(part);
	part = NULL;
	if (curl_url_get(u, CURLUPART_FRAGMENT, &part, 0) == CURLUE_OK &&
	    curl_url_set(u, CURLUPART_FRAGMENT, "***", 0) != CURLUE_OK)
		goto fallback;
	if (curl_url_get(u, CURLUPART_URL, &url, 0) != CURLUE_OK)
		goto fallback;
	out = strdup(url);
	goto out;
fallback:
	out = http_display_unparsed(uri, scheme_len);
out:
	curl_free(part);
	curl_free(url);
	free(q);
	curl_url_cleanup(u);
	return out;
}

/* Parse url into scheme, host and port (default port filled in); checks
 * the scheme is http or https and that there is no userinfo.
 * Returns 0 or -errno with *why set. */
static int http_url_origin(const char *url, char *origin, size_t len, const char **why)
{
	char *scheme = NULL, *host = NULL, *port = NULL, *user = NULL, *pass = NULL;
	CURLU *u = curl_url();
	int r = 0;

	if (!u)
		return -ENOMEM;
	if (curl_url_set(u, CURLUPART_URL, url, 0) != CURLUE_OK ||
	    curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
	    curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK ||
	    curl_url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT) != CURLUE_OK) {
		*why = "malformed URL";
		r = -EINVAL;
		goto out;
	}
	if (strcasecmp(scheme, "http") != 0 && strcasecmp(scheme, "https") != 0) {
		*why = "only http and https URLs are supported";
		r = -EPROTONOSUPPORT;
		goto out;
	}
	if (curl_url_get(u, CURLUPART_USER, &user, 0) == CURLUE_OK ||
	    curl_url_get(u, CURLUPART_PASSWORD, &pass, 0) == CURLUE_OK) {
		*why =
		    "credentials in the URL are not accepted (use an HTTP auth file or ~/.netrc)";
		r = -EINVAL;
		goto out;
	}
	snprintf(origin, len, "%s://%s:%s", scheme, host, port);
	for (char *c = origin; *c; c++)
		*c = (char)tolower((unsigned char)*c);
out:
	curl_free(scheme);
	curl_free(host);
	curl_free(port);
	curl_free(user);
	curl_free(pass);
	curl_url_cleanup(u);
	return r;
}

/* Read the credentials file: the first line that is neither empty nor a
 * comment is "Header-Name: value" (a colon then a blank) or "user:password".
 * Its contents are never logged. */
static int http_read_auth_file(struct http_priv *p, const char *path)
{
	char buf[HTTP_AUTH_FILE_MAX + 1];
	char *line, *save = NULL, *colon;
	struct stat st;
	ssize_t n;
	int fd, r = 0;

	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		r = -errno;
		sfs_error("HTTP auth file %s: %s", path, strerror(-r));
		return r;
	}
	if (fstat(fd, &st) == 0 && (st.st_mode & 0077))
		sfs_warn("HTTP auth file %s is readable by other users", path);
	n = read(fd, buf, HTTP_AUTH_FILE_MAX);
	if (n < 0) {
		r = -errno;
		sfs_error("HTTP auth file %s: %s", path, strerror(-r));
		goto out;
	}
	buf[n] = '\0';
	for (line = strtok_r(buf, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		size_t l = strlen(line);

		while (l && (line[l - 1] == '\r' || line[l - 1] == ' ' || line[l - 1] == '\t'))
			line[--l] = '\0';
		if (l && line[0] != '#')
			break;
	}
	colon = line ? strchr(line, ':') : NULL;
	if (!colon || colon == line || strchr(line, '\r')) {
		sfs_error("HTTP auth file %s: expected a line \"Header-Name: value\" or "
			  "\"user:password\"",
			  path);
		r = -EINVAL;
		goto out;
	}
	if (colon[1] == ' ' || colon[1] == '\t') {
		for (const char *c = line; c < colon; c++) {
			if (!isalnum((unsigned char)*c) && *c != '-' && *c != '_') {
				sfs_error("HTTP auth file %s: bad header name", path);
				r = -EINVAL;
				goto out;
			}
		}
		p->auth_header = strdup(line);
		if (!p->auth_header)
			r = -ENOMEM;
	} else {
		p->userpwd = strdup(line);
		if (!p->userpwd)
			r = -ENOMEM;
	}
out:
	explicit_bzero(buf, sizeof(buf));
	close(fd);
	return r;
}

/* ---- libcurl callbacks ---- */

static size_t http_header_cb(char *data, size_t size, size_t nmemb, void *opaque)
{
	struct http_req *rq = opaque;
	struct http_resp *h = &rq->resp;
	size_t n = size * nmemb;
	const char *colon;
	size_t name_len;
	char tmp[64];

	rq->last_ns = sfs_now_ns();

	if (n >= 5 && strncmp(data, "HTTP/", 5) == 0) {
		const char *sp = memchr(data, ' ', n);

		memset(h, 0, sizeof(*h));
		h->retry_after_ms = -1;
		h->status = sp ? strtol(sp + 1, NULL, 10) : 0;
		return n;
	}
	colon = memchr(data, ':', n);
	if (!colon)
		return n;
	name_len = (size_t)(colon - data);
	colon++;
#define HTTP_IS(name) (name_len == strlen(name) && strncasecmp(data, name, name_len) == 0)
	if (HTTP_IS("Content-Range")) {
		if (h->content_range[0]) /* two of them: make it unparsable */
			snprintf(h->content_range, sizeof(h->content_range), "(repeated)");
		else
			http_copy_trimmed(h->content_range, sizeof(h->content_range), colon,
					  n - (size_t)(colon - data));
	} else if (HTTP_IS("ETag")) {
		http_copy_trimmed(h->etag, sizeof(h->etag), colon, n - (size_t)(colon - data));
	} else if (HTTP_IS("Last-Modified")) {
		http_copy_trimmed(h->last_modified, sizeof(h->last_modified), colon,
				  n - (size_t)(colon - data));
	} else if (HTTP_IS("Content-Encoding")) {
		http_copy_trimmed(h->content_encoding, sizeof(h->content_encoding), colon,
				  n - (size_t)(colon - data));
	} else if (HTTP_IS("Retry-After")) {
		http_copy_trimmed(tmp, sizeof(tmp), colon, n - (size_t)(colon - data));
		h->retry_after_ms = http_parse_retry_after(tmp);
	}
#undef HTTP_IS
	return n;
}

/* The server of rq serves another version of the file than the one
 * recorded at open (this runs before any byte of the response is taken):
 * refuse it for good, saying so once. Once no server is left the source
 * is "changed" (sticky): every read fails. Old and new data are never
 * mixed. */
static void http_refuse(struct http_req *rq, const char *what, const char *old, const char *new)
{
	struct http_priv *p = rq->p;
	struct http_endpoint *e = rq->ep;
	unsigned n, left = 0;
	bool first;

	rq->refused = true;
	if (!e)
		return; /* a probe: its caller decides */
	pthread_mutex_lock(&p->lock);
	first = e->state != FETCH_MIRROR_REFUSED;
	e->state = FETCH_MIRROR_REFUSED;
	n = atomic_load(&p->nep);
	for (unsigned i = 0; i < n; i++)
		left += p->ep[i].state != FETCH_MIRROR_REFUSED;
	pthread_mutex_unlock(&p->lock);
	if (first && n > 1)
		sfs_error("%s: server %s now serves another version of the file (%s %s -> %s); "
			  "not using it any more%s",
			  p->display, e->display, what, old, new[0] ? new : "(none)",
			  left ? "" : "; no server left, every further read fails");
	if (!left && !atomic_exchange(&p->changed, true) && n <= 1)
		sfs_error("%s: URL changed on the server (%s %s -> %s); refusing to mix old and "
			  "new data, every further read fails",
			  p->display, what, old, new[0] ? new : "(none)");
}

/* Check the headers of a 206 before taking any of its body. */
static int http_check_206(struct http_req *rq)
{
	struct http_priv *p = rq->p;
	struct http_resp *h = &rq->resp;
	uint64_t first, last, total;

	if (h->content_encoding[0] && strcasecmp(h->content_encoding, "identity") != 0) {
		snprintf(rq->why, sizeof(rq->why), "server sent Content-Encoding \"%s\"",
			 h->content_encoding);
		return -EIO;
	}
	if (!http_parse_content_range(h->content_range, &first, &last, &total)) {
		snprintf(rq->why, sizeof(rq->why), "bad or missing Content-Range \"%s\"",
			 h->content_range);
		return -EIO;
	}
	if (rq->probe) {
		if (first != 0 || last != rq->len - 1) {
			snprintf(rq->why, sizeof(rq->why),
				 "Content-Range \"%s\" does not match the request",
				 h->content_range);
			return -EIO;
		}
		rq->total = total;
		return 0;
	}
	if (p->validator_is_etag && strcmp(h->etag, p->validator) != 0) {
		http_refuse(rq, "ETag", p->validator, h->etag);
		snprintf(rq->why, sizeof(rq->why), "URL changed on the server");
		return -EIO;
	}
	if (!p->validator_is_etag && p->validator[0] &&
	    strcmp(h->last_modified, p->validator) != 0) {
		http_refuse(rq, "Last-Modified", p->validator, h->last_modified);
		snprintf(rq->why, sizeof(rq->why), "URL changed on the server");
		return -EIO;
	}
	if (total != p->size) {
		char a[32], b[32];

		snprintf(a, sizeof(a), "%llu", (unsigned long long)p->size);
		snprintf(b, sizeof(b), "%llu", (unsigned long long)total);
		http_refuse(rq, "size", a, total == UINT64_MAX ? "*" : b);
		snprintf(rq->why, sizeof(rq->why), "URL changed on the server");
		return -EIO;
	}
	if (first != rq->off || last != rq->off + rq->len - 1) {
		snprintf(rq->why, sizeof(rq->why),
			 "server sent Content-Range \"%s\" for a request of bytes %llu-%llu",
			 h->content_range, (unsigned long long)rq->off,
			 (unsigned long long)(rq->off + rq->len - 1));
		return -EIO;
	}
	return 0;
}

static size_t http_write_cb(char *data, size_t size, size_t nmemb, void *opaque)
{
	struct http_req *rq = opaque;
	size_t n = size * nmemb;

	rq->last_ns = sfs_now_ns();
	if (rq->resp.status != 206) {
		/* An error page, or a 200 with the whole file: never copied.
		 * Read a small error body to keep the connection, else hang up. */
		rq->discarded += n;
		return rq->resp.status == 200 || rq->discarded > HTTP_DISCARD_MAX ? 0 : n;
	}
	if (!rq->checked) {
		rq->checked = true;
		rq->err = http_check_206(rq);
	}
	if (rq->err)
		return 0;
	if (n > rq->len - rq->got) {
		snprintf(rq->why, sizeof(rq->why), "server sent more than the %zu bytes asked for",
			 rq->len);
		rq->err = -EIO;
		return 0;
	}
	memcpy(rq->buf + rq->got, data, n);
	rq->got += n;
	return n;
}

/* Stall detector: abort when no byte came for io_timeout seconds (plus
 * connect_timeout before the first one), or for the shorter failover
 * deadline of a guest read that another server could serve (see
 * http_attempt). CURLOPT_LOW_SPEED_TIME alone
 * averages over a window of several seconds, so a burst followed by
 * silence would be noticed late. */
static int http_xferinfo_cb(void *opaque, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal,
			    curl_off_t ulnow)
{
	struct http_req *rq = opaque;
	uint64_t limit = rq->last_ns == rq->start_ns ? rq->first_limit_ns : rq->gap_limit_ns;

	if (sfs_now_ns() - rq->last_ns > limit) {
		rq->stalled = true;
		return 1;
	}
	return 0;
}

/* ---- Servers (the source's URL and its mirrors) ---- */

/* May a new request go to e now? A server that is down is left alone
 * until its period ends; then one request (its trial) tries it while the
 * others keep away. Called with p->lock held. */
static bool http_ep_usable(const struct http_endpoint *e, uint64_t now)
{
	return e->state == FETCH_MIRROR_UP ||
	       (e->state == FETCH_MIRROR_DOWN && now >= e->down_until_ns && !e->trial);
}

/* The server for a new request: among the usable ones other than avoid,
 * the one with the fewest requests in flight, ties taken in turn (from
 * p->rr) so that even one reader at a time spreads over all of them. NULL
 * if none. Called with p->lock held. */
static struct http_endpoint *http_ep_best(struct http_priv *p, const struct http_endpoint *avoid)
{
	unsigned n = atomic_load(&p->nep);
	struct http_endpoint *best = NULL;
	uint64_t now = sfs_now_ns();

	for (unsigned k = 0; k < n; k++) {
		struct http_endpoint *e = &p->ep[(p->rr + k) % n];

		if (e != avoid && http_ep_usable(e, now) && (!best || e->inflight < best->inflight))
			best = e;
	}
	return best;
}

/* http_ep_best(), and the next tie goes to the server after it. */
static struct http_endpoint *http_ep_pick(struct http_priv *p, const struct http_endpoint *avoid)
{
	struct http_endpoint *best = http_ep_best(p, avoid);

	if (best)
		p->rr = (unsigned)(best - p->ep + 1) % atomic_load(&p->nep);
	return best;
}

/* The server when none is usable: the one that comes back first, whatever
 * its period says (the caller has backed off already); NULL if every one
 * was refused. Called with p->lock held. */
static struct http_endpoint *http_ep_pick_any(struct http_priv *p)
{
	unsigned n = atomic_load(&p->nep);
	struct http_endpoint *best = NULL;

	for (unsigned i = 0; i < n; i++) {
		struct http_endpoint *e = &p->ep[i];

		if (e->state != FETCH_MIRROR_REFUSED &&
		    (!best || (e->state == FETCH_MIRROR_UP ? 0 : e->down_until_ns) <
				  (best->state == FETCH_MIRROR_UP ? 0 : best->down_until_ns)))
			best = e;
	}
	return best;
}

/* rq's next attempt goes to e. Called with p->lock held. */
static void http_ep_take(struct http_priv *p, struct http_endpoint *e, struct http_req *rq)
{
	rq->ep = e;
	rq->trial = e->state == FETCH_MIRROR_DOWN && !e->trial;
	if (rq->trial)
		e->trial = true;
	e->inflight++;
}

/* Undo http_ep_take(): rq goes nowhere after all. Called with p->lock
 * held. */
static void http_ep_untake(struct http_priv *p, struct http_req *rq)
{
	rq->ep->inflight--;
	if (rq->trial)
		rq->ep->trial = false;
	rq->ep = NULL;
	rq->trial = false;
}

/* rq's attempt on its server ended: r == 0 for success, else whether it
 * was transient. A transient failure (or a stall) takes the server out for
 * its down period, which doubles when the trial after it fails too; a
 * successful trial brings it back. Only with mirrors: alone, a server is
 * always tried. */
static void http_ep_done(struct http_priv *p, struct http_req *rq, int r, bool transient)
{
	struct http_endpoint *e = rq->ep;
	unsigned down_s = 0;
	bool back = false;

	if (!e)
		return;
	atomic_fetch_add(&e->requests, 1);
	if (r < 0)
		atomic_fetch_add(&e->errors, 1);
	pthread_mutex_lock(&p->lock);
	e->inflight--;
	if (rq->trial)
		e->trial = false;
	if (atomic_load(&p->nep) > 1 && e->state != FETCH_MIRROR_REFUSED) {
		if (r == 0 && rq->trial) {
			e->state = FETCH_MIRROR_UP;
			e->down_ms = HTTP_DOWN_MIN_MS;
			back = true;
		} else if (r < 0 && transient && (e->state == FETCH_MIRROR_UP || rq->trial)) {
			if (rq->trial)
				e->down_ms = SFS_MIN(e->down_ms * 2, (unsigned)HTTP_DOWN_MAX_MS);
			e->state = FETCH_MIRROR_DOWN;
			e->down_until_ns = sfs_now_ns() + (uint64_t)e->down_ms * 1000000;
			down_s = e->down_ms / 1000;
		}
	}
	pthread_mutex_unlock(&p->lock);
	rq->trial = false;
	if (back)
		sfs_info("%s: server %s is back", p->display, e->display);
	if (down_s)
		sfs_warn("%s: server %s: %s; using the others for %u s", p->display, e->display,
			 rq->why, down_s);
}

/* ---- Pool ---- */

static void http_conn_free(struct http_conn *c)
{
	if (!c)
		return;
	curl_easy_cleanup(c->curl);
	free(c);
}

static struct http_conn *http_conn_new(struct http_priv *p)
{
	struct http_conn *c = calloc(1, sizeof(*c));
	CURLcode rc = CURLE_OK;

	if (!c)
		return NULL;
	c->curl = curl_easy_init();
	if (!c->curl) {
		free(c);
		return NULL;
	}
#define HTTP_SET(opt, val)                                                                         \
	do {                                                                                       \
		if (rc == CURLE_OK)                                                                \
			rc = curl_easy_setopt(c->curl, opt, val);                                  \
	} while (0)
	HTTP_SET(CURLOPT_NOSIGNAL, 1L);
	HTTP_SET(CURLOPT_ERRORBUFFER, c->errbuf);
	HTTP_SET(CURLOPT_SHARE, p->share);
	HTTP_SET(CURLOPT_PROTOCOLS_STR, "http,https");
	HTTP_SET(CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
	/* Redirects are resolved by hand at open (see the top of the file). */
	HTTP_SET(CURLOPT_FOLLOWLOCATION, 0L);
	HTTP_SET(CURLOPT_MAXREDIRS, (long)HTTP_MAX_REDIRECTS);
	HTTP_SET(CURLOPT_UNRESTRICTED_AUTH, 0L);
	HTTP_SET(CURLOPT_SSL_VERIFYPEER, 1L);
	HTTP_SET(CURLOPT_SSL_VERIFYHOST, 2L);
	if (p->cacert)
		HTTP_SET(CURLOPT_CAINFO, p->cacert);
	HTTP_SET(CURLOPT_NETRC, (long)CURL_NETRC_OPTIONAL);
	HTTP_SET(CURLOPT_CONNECTTIMEOUT, p->connect_timeout);
	HTTP_SET(CURLOPT_LOW_SPEED_LIMIT, (long)HTTP_LOW_SPEED_LIMIT);
	HTTP_SET(CURLOPT_LOW_SPEED_TIME, p->io_timeout);
	HTTP_SET(CURLOPT_TCP_KEEPALIVE, 1L);
	/* One connection per handle: a handle moved to another server drops
	 * the old one instead of keeping it idle (see http_get_conn). */
	HTTP_SET(CURLOPT_MAXCONNECTS, 1L);
	HTTP_SET(CURLOPT_BUFFERSIZE, HTTP_BUFFER_SIZE);
	HTTP_SET(CURLOPT_USERAGENT, "streamfs/" STREAMFS_VERSION);
	HTTP_SET(CURLOPT_HEADERFUNCTION, http_header_cb);
	HTTP_SET(CURLOPT_WRITEFUNCTION, http_write_cb);
	HTTP_SET(CURLOPT_XFERINFOFUNCTION, http_xferinfo_cb);
	HTTP_SET(CURLOPT_NOPROGRESS, 0L);
#undef HTTP_SET
	if (rc != CURLE_OK) {
		sfs_error("%s: libcurl setup: %s", p->display, curl_easy_strerror(rc));
		http_conn_free(c);
		return NULL;
	}
	return c;
}

/* May a read of class cls take a handle now? first: the first handle of a
 * read, which may use the guest reserve; otherwise an extra piece of a split
 * read, which only takes what leaves the reserve untouched. A job never
 * takes a handle a waiting guest could have. Called with p->lock held. */
static bool http_may_take(struct http_priv *p, enum fetch_class cls, bool first)
{
	unsigned busy = p->busy[FETCH_CLASS_GUEST] + p->busy[FETCH_CLASS_JOB];

	if (cls == FETCH_CLASS_GUEST)
		return busy < p->pool_size + (first ? HTTP_GUEST_RESERVE : 0);
	if (p->guest_waiting)
		return false;
	if (!first)
		return busy < p->pool_size;
	return p->busy[FETCH_CLASS_JOB] < p->pool_size && busy < p->pool_size + HTTP_GUEST_RESERVE;
}

/* A handle was released (or never made): wake a waiting guest before any
 * job. One wakeup is enough: every waiter of a class waits for the same
 * condition, and a guest can use any released handle. Called with p->lock
 * held. */
static void http_wake(struct http_priv *p)
{
	if (p->guest_waiting)
		pthread_cond_signal(&p->cond_guest);
	else
		pthread_cond_signal(&p->cond_job);
}

/* Take an idle handle for a request to e (NULL: any): one already
 * connected to e (or to nothing yet), else a new one while there is room
 * for it, else any (it reconnects). NULL if none is idle and there is room. Called with
 * p->lock held. */
static struct http_conn *http_take_idle(struct http_priv *p, const struct http_endpoint *e)
{
	struct http_conn **pc = &p->free_conns, *c;

	while (*pc && e && (*pc)->ep != e && (*pc)->ep)
		pc = &(*pc)->next;
	if (!*pc) {
		if (p->nconns < p->pool_size + HTTP_GUEST_RESERVE)
			return NULL;
		pc = &p->free_conns;
	}
	c = *pc;
	*pc = c->next;
	return c;
}

/* Take a handle for a read of class cls: an idle one, or a new one, when
 * http_may_take() allows it; else (if wait) block until it does. first as
 * for http_may_take(). With rq, also choose the server of its first
 * attempt (http_ep_take), preferring a handle connected to it. NULL if none
 * (or out of memory). */
static struct http_conn *http_get_conn(struct http_priv *p, enum fetch_class cls, bool first,
				       bool wait, struct http_req *rq)
{
	struct http_conn *c = NULL;

	pthread_mutex_lock(&p->lock);
	for (;;) {
		if (http_may_take(p, cls, first)) {
			struct http_endpoint *e = NULL;

			if (rq) {
				e = http_ep_pick(p, NULL);
				if (!e)
					e = http_ep_pick_any(p);
				if (!e) /* all refused: the read fails as "changed" */
					e = &p->ep[0];
				http_ep_take(p, e, rq);
			}
			p->busy[cls]++;
			/* busy < the most handles there may be: an idle one
			 * exists, or room for a new one. */
			c = http_take_idle(p, e);
			if (c)
				break;
			p->nconns++;
			pthread_mutex_unlock(&p->lock);
			c = http_conn_new(p);
			pthread_mutex_lock(&p->lock);
			if (c) {
				HTTP_NET_ADD(p, connections, 1);
			} else {
				p->nconns--;
				p->busy[cls]--;
				if (rq)
					http_ep_untake(p, rq);
				http_wake(p);
			}
			break;
		}
		if (!wait)
			break;
		HTTP_NET_ADD(p, waiting[cls], 1);
		if (cls == FETCH_CLASS_GUEST) {
			p->guest_waiting++;
			pthread_cond_wait(&p->cond_guest, &p->lock);
			p->guest_waiting--;
		} else {
			pthread_cond_wait(&p->cond_job, &p->lock);
		}
		HTTP_NET_SUB(p, waiting[cls], 1);
	}
	pthread_mutex_unlock(&p->lock);
	return c;
}

static void http_put_conn(struct http_priv *p, struct http_conn *c, enum fetch_class cls)
{
	pthread_mutex_lock(&p->lock);
	c->next = p->free_conns;
	p->free_conns = c;
	p->busy[cls]--;
	http_wake(p);
	pthread_mutex_unlock(&p->lock);
}

/* ---- Statistics ---- */

/* Record a successful request in n's ring. */
static void http_net_sample(struct http_net *n, const struct http_sample *smp)
{
	pthread_mutex_lock(&n->lock);
	n->ring[n->ring_next] = *smp;
	n->ring_next = (n->ring_next + 1) % HTTP_NET_SAMPLES;
	if (n->ring_len < HTTP_NET_SAMPLES)
		n->ring_len++;
	n->lat_count++;
	n->lat_sum_ns += smp->end_ns - smp->start_ns;
	pthread_mutex_unlock(&n->lock);
}

static int http_cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

/* The nearest-rank q-quantile of the n sorted values v, in seconds. */
static double http_quantile_s(const uint64_t *v, unsigned n, unsigned percent)
{
	unsigned rank = (n * percent + 99) / 100; /* ceil(n * q), >= 1 for n >= 1 */

	return (double)v[rank ? rank - 1 : 0] / 1e9;
}

/* Fill out from n (fields the caller zeroed, NAN for unknown). */
static void http_net_read(struct http_net *n, struct fetch_net_stats *out)
{
	uint64_t lat[HTTP_NET_SAMPLES], xfer[HTTP_NET_SAMPLES], now, rtt = UINT64_MAX;
	uint64_t win_bytes = 0, win_start = UINT64_MAX;
	unsigned len, nx = 0;

	for (int c = 0; c < FETCH_NCLASSES; c++) {
		out->in_flight[c] = atomic_load(&n->in_flight[c]);
		out->waiting[c] = atomic_load(&n->waiting[c]);
		out->bytes[c] = atomic_load(&n->bytes[c]);
	}
	out->requests = atomic_load(&n->requests);
	out->retries = atomic_load(&n->retries);
	out->stalls = atomic_load(&n->stalls);
	out->errors = atomic_load(&n->errors);
	out->connections = atomic_load(&n->connections);

	pthread_mutex_lock(&n->lock);
	now = sfs_now_ns(); /* under the lock: no sample ends after it */
	len = n->ring_len;
	out->latency_count = n->lat_count;
	out->latency_sum_s = (double)n->lat_sum_ns / 1e9;
	for (unsigned i = 0; i < len; i++) {
		const struct http_sample *smp = &n->ring[i];

		lat[i] = smp->end_ns - smp->start_ns;
		rtt = SFS_MIN(rtt, smp->ttfb_ns);
		if (smp->bytes >= HTTP_XFER_MIN_BYTES && smp->ttfb_ns < lat[i])
			xfer[nx++] = (uint64_t)((double)smp->bytes * 1e9 /
						(double)SFS_MAX(lat[i] - smp->ttfb_ns, 1000000));
		if (now - smp->end_ns <= HTTP_RATE_WINDOW_NS) {
			win_bytes += smp->bytes;
			win_start = SFS_MIN(win_start, smp->start_ns);
		}
	}
	pthread_mutex_unlock(&n->lock);

	if (len == 0)
		return; /* nothing measured yet: the figures stay unknown */
	qsort(lat, len, sizeof(lat[0]), http_cmp_u64);
	out->latency_p50_s = http_quantile_s(lat, len, 50);
	out->latency_p99_s = http_quantile_s(lat, len, 99);
	if (rtt != UINT64_MAX)
		out->rtt_s = (double)rtt / 1e9;
	if (nx) {
		qsort(xfer, nx, sizeof(xfer[0]), http_cmp_u64);
		out->xfer_rate_bytes_per_s = (double)xfer[nx / 2];
	}
	out->rate_bytes_per_s = 0;
	if (win_bytes) {
		/* Over the time the bytes took to come, at most the window; a
		 * floor of 1 ms keeps one tiny request from claiming a huge rate. */
		uint64_t span = SFS_MIN(now - win_start, HTTP_RATE_WINDOW_NS);

		out->rate_bytes_per_s = (double)win_bytes / ((double)SFS_MAX(span, 1000000) / 1e9);
	}
}

static void http_net_stats(struct fetch_source *s, struct fetch_net_stats *out)
{
	struct http_priv *p = s->priv;

	http_net_read(&p->net, out);
}

static void http_net_totals(struct fetch_net_stats *out)
{
	http_net_read(&http_all, out);
}

/* ---- Requests ---- */

static bool http_curl_transient(CURLcode rc)
{
	switch (rc) {
	case CURLE_COULDNT_RESOLVE_HOST:
	case CURLE_COULDNT_CONNECT:
	case CURLE_OPERATION_TIMEDOUT:
	case CURLE_SEND_ERROR:
	case CURLE_RECV_ERROR:
	case CURLE_GOT_NOTHING:
	case CURLE_PARTIAL_FILE:
	case CURLE_SSL_CONNECT_ERROR:
	case CURLE_HTTP2:
	case CURLE_HTTP2_STREAM:
	case CURLE_HTTP3:
		return true;
	default:
		return false;
	}
}

static int http_curl_errno(CURLcode rc)
{
	switch (rc) {
	case CURLE_OPERATION_TIMEDOUT:
		return -ETIMEDOUT;
	case CURLE_COULDNT_CONNECT:
		return -ECONNREFUSED;
	case CURLE_COULDNT_RESOLVE_HOST:
		return -EHOSTUNREACH;
	case CURLE_OUT_OF_MEMORY:
		return -ENOMEM;
	case CURLE_UNSUPPORTED_PROTOCOL:
		return -EPROTONOSUPPORT;
	case CURLE_URL_MALFORMAT:
		return -EINVAL;
	default:
		return -EIO;
	}
}

/* One attempt of rq on c. Returns 0 when the whole body arrived (or, for a
 * probe, whenever a response came: the caller reads rq->resp.status), else
 * -errno with rq->why set; *transient says whether to try again and
 * *retry_after_ms what the server asked for (-1 if nothing). */
static int http_attempt(struct http_priv *p, struct http_conn *c, struct http_req *rq,
			bool *transient, long *retry_after_ms)
{
	char range[64];
	CURLcode rc = CURLE_OK;
	curl_off_t pre_us = 0, first_us = 0;
	long status;
	uint64_t t0;

	*transient = false;
	*retry_after_ms = -1;
	rq->got = 0;
	rq->discarded = 0;
	rq->checked = false;
	rq->stalled = false;
	rq->refused = false;
	rq->gap_limit_ns = (uint64_t)p->io_timeout * 1000000000ULL;
	rq->first_limit_ns = rq->gap_limit_ns + (uint64_t)p->connect_timeout * 1000000000ULL;
	if (rq->ep) {
		rq->url = rq->ep->url;
		rq->creds = rq->ep->creds;
		c->ep = rq->ep;
		if (rq->cls == FETCH_CLASS_GUEST && atomic_load(&p->nep) > 1) {
			/* A guest read does not wait out a stall when another
			 * server could serve it: after HTTP_FAILOVER_MIN_MS
			 * (or HTTP_FAILOVER_RTTS round trips on a far link)
			 * without a byte it goes there. The job keeps the
			 * full io_timeout: nobody waits on one of its reads. */
			uint64_t rtt = atomic_load(&p->rtt_min_ns), lim;
			bool other;

			lim = SFS_MAX((uint64_t)HTTP_FAILOVER_MIN_MS * 1000000,
				      rtt == UINT64_MAX ? 0 : rtt * HTTP_FAILOVER_RTTS);
			pthread_mutex_lock(&p->lock);
			other = http_ep_best(p, rq->ep) != NULL;
			pthread_mutex_unlock(&p->lock);
			if (other) {
				rq->gap_limit_ns = SFS_MIN(rq->gap_limit_ns, lim);
				rq->first_limit_ns = SFS_MIN(rq->first_limit_ns, lim);
			}
		}
	}
	rq->start_ns = rq->last_ns = sfs_now_ns();
	rq->err = 0;
	memset(&rq->resp, 0, sizeof(rq->resp));
	rq->resp.retry_after_ms = -1;
	c->errbuf[0] = '\0';
	snprintf(range, sizeof(range), "%llu-%llu", (unsigned long long)rq->off,
		 (unsigned long long)(rq->off + rq->len - 1));

#define HTTP_SET(opt, val)                                                                         \
	do {                                                                                       \
		if (rc == CURLE_OK)                                                                \
			rc = curl_easy_setopt(c->curl, opt, val);                                  \
	} while (0)
	HTTP_SET(CURLOPT_URL, rq->url);
	HTTP_SET(CURLOPT_RANGE, range);
	if (rq->probe)
		HTTP_SET(CURLOPT_HTTPHEADER, rq->creds ? p->probe_headers : NULL);
	else
		HTTP_SET(CURLOPT_HTTPHEADER, rq->ep->read_headers);
	HTTP_SET(CURLOPT_USERPWD, rq->creds ? p->userpwd : NULL);
	HTTP_SET(CURLOPT_HEADERDATA, rq);
	HTTP_SET(CURLOPT_WRITEDATA, rq);
	HTTP_SET(CURLOPT_XFERINFODATA, rq);
#undef HTTP_SET
	if (rc != CURLE_OK) {
		snprintf(rq->why, sizeof(rq->why), "libcurl setup: %s", curl_easy_strerror(rc));
		return -EIO;
	}

	t0 = sfs_now_ns();
	rc = curl_easy_perform(c->curl);
	rq->end_ns = sfs_now_ns();
	HTTP_NET_ADD(p, requests, 1);
	if ((rc == CURLE_ABORTED_BY_CALLBACK && rq->stalled) || rc == CURLE_OPERATION_TIMEDOUT)
		HTTP_NET_ADD(p, stalls, 1);
	rq->ttfb_ns = UINT64_MAX;
	if (curl_easy_getinfo(c->curl, CURLINFO_PRETRANSFER_TIME_T, &pre_us) == CURLE_OK &&
	    curl_easy_getinfo(c->curl, CURLINFO_STARTTRANSFER_TIME_T, &first_us) == CURLE_OK &&
	    first_us >= pre_us && pre_us > 0)
		rq->ttfb_ns = (uint64_t)(first_us - pre_us) * 1000;
	if (curl_easy_getinfo(c->curl, CURLINFO_RESPONSE_CODE, &status) != CURLE_OK)
		status = 0;
	if (p->verbose_level >= 0)
		sfs_log(p->verbose_level, "%s: GET bytes=%s -> %ld, %zu bytes in %.1f ms%s%s",
			rq->ep ? rq->ep->display : p->display, range, status, rq->got,
			(double)(sfs_now_ns() - t0) / 1e6, rc != CURLE_OK ? ", " : "",
			rc != CURLE_OK ? curl_easy_strerror(rc) : "");

	if (rq->err) /* decided by a callback: never worth retrying */
		return rq->err;
	if (rc == CURLE_ABORTED_BY_CALLBACK && rq->stalled) {
		snprintf(
		    rq->why, sizeof(rq->why), "no data for %.1f s (stalled)",
		    (double)(rq->last_ns == rq->start_ns ? rq->first_limit_ns : rq->gap_limit_ns) /
			1e9);
		*transient = true;
		return -ETIMEDOUT;
	}
	if (status == 0 || (rc != CURLE_OK && status == 206)) {
		/* No response, or the body broke off. */
		snprintf(rq->why, sizeof(rq->why), "%s",
			 c->errbuf[0] ? c->errbuf : curl_easy_strerror(rc));
		if (rc == CURLE_OK)
			snprintf(rq->why, sizeof(rq->why), "no HTTP status");
		*transient = rc == CURLE_OK || http_curl_transient(rc);
		return rc == CURLE_OK ? -EIO : http_curl_errno(rc);
	}
	/* The probe interprets these itself: size 0, Range ignored, redirects. */
	if (rq->probe && (status == 200 || status == 416 || (status >= 300 && status <= 399)))
		return 0;

	switch (status) {
	case 206:
		if (!rq->checked) { /* empty body: the headers were not seen yet */
			rq->checked = true;
			int r = http_check_206(rq);
			if (r < 0)
				return r;
		}
		if (rq->got != rq->len) {
			snprintf(rq->why, sizeof(rq->why), "short body: %zu of %zu bytes", rq->got,
				 rq->len);
			*transient = true;
			return -EIO;
		}
		return 0;
	case 200:
		if (p->validator_is_etag && strcmp(rq->resp.etag, p->validator) != 0) {
			http_refuse(rq, "ETag", p->validator, rq->resp.etag);
			snprintf(rq->why, sizeof(rq->why), "URL changed on the server");
		} else if (!p->validator_is_etag && p->validator[0] &&
			   strcmp(rq->resp.last_modified, p->validator) != 0) {
			http_refuse(rq, "Last-Modified", p->validator, rq->resp.last_modified);
			snprintf(rq->why, sizeof(rq->why), "URL changed on the server");
		} else {
			snprintf(rq->why, sizeof(rq->why),
				 "server ignored the Range request (200 instead of 206)");
		}
		return -EIO;
	case 412:
		http_refuse(rq, p->validator_is_etag ? "ETag" : "Last-Modified", p->validator,
			    "(precondition failed)");
		snprintf(rq->why, sizeof(rq->why), "URL changed on the server");
		return -EIO;
	case 416: {
		uint64_t total;

		if (http_parse_content_range(rq->resp.content_range, NULL, NULL, &total) &&
		    total != p->size) {
			char a[32], b[32];

			snprintf(a, sizeof(a), "%llu", (unsigned long long)p->size);
			snprintf(b, sizeof(b), "%llu", (unsigned long long)total);
			http_refuse(rq, "size", a, b);
		}
		snprintf(rq->why, sizeof(rq->why), "HTTP 416 (range not satisfiable)");
		return -EIO;
	}
	case 404:
	case 410:
		snprintf(rq->why, sizeof(rq->why), "HTTP %ld (not found)", status);
		return -ENOENT;
	case 401:
	case 403:
	case 407:
		snprintf(rq->why, sizeof(rq->why), "HTTP %ld (access denied)", status);
		return -EACCES;
	case 408:
	case 429:
		break;
	default:
		if (status >= 500 && status <= 599)
			break;
		if (status >= 300 && status <= 399)
			snprintf(rq->why, sizeof(rq->why),
				 "unexpected redirect (HTTP %ld) after open", status);
		else
			snprintf(rq->why, sizeof(rq->why), "unexpected HTTP status %ld", status);
		return -EIO;
	}
	/* 408, 429, 5xx */
	snprintf(rq->why, sizeof(rq->why), "HTTP %ld", status);
	*transient = true;
	*retry_after_ms = rq->resp.retry_after_ms;
	return status == 408 || status == 504 ? -ETIMEDOUT : -EIO;
}

/* Run rq on c with retries: a probe on its one URL; a read first on the
 * server http_get_conn() chose for it (rq->ep), then, after a transient
 * failure or a refusal, at once on another usable server if there is one,
 * else after the backoff on the one that comes back first. Logs the final
 * failure once. */
static int http_request(struct http_priv *p, struct http_conn *c, struct http_req *rq)
{
	struct http_endpoint *failed;
	const char *shown = p->display;
	unsigned attempt;
	bool transient = false;
	long wait_ms;
	int r = -EIO;

	for (attempt = 1;; attempt++) {
		long delay;

		if (atomic_load(&p->changed)) {
			snprintf(rq->why, sizeof(rq->why), "URL changed on the server");
			if (rq->ep) {
				pthread_mutex_lock(&p->lock);
				http_ep_untake(p, rq);
				pthread_mutex_unlock(&p->lock);
			}
			r = -EIO; /* said once, when detected */
			break;
		}
		r = http_attempt(p, c, rq, &transient, &wait_ms);
		/* With mirrors, any failure of one server (a refusal, a 404 or
		 * 403 there, a broken answer) may be its own: another server
		 * may still serve the read. */
		if (r < 0 && rq->ep && atomic_load(&p->nep) > 1 && !atomic_load(&p->changed))
			transient = true;
		if (r == 0 && !rq->probe) {
			struct http_sample smp = {.start_ns = rq->start_ns,
						  .end_ns = rq->end_ns,
						  .bytes = rq->len,
						  .ttfb_ns = rq->ttfb_ns};
			uint64_t m = atomic_load(&p->rtt_min_ns);

			http_net_sample(&p->net, &smp);
			http_net_sample(&http_all, &smp);
			atomic_fetch_add(&rq->ep->bytes, rq->len);
			while (rq->ttfb_ns < m &&
			       !atomic_compare_exchange_weak(&p->rtt_min_ns, &m, rq->ttfb_ns))
				;
		}
		failed = rq->ep;
		if (failed && atomic_load(&p->nep) > 1 && failed != p->ep)
			shown = failed->display; /* say which mirror failed */
		http_ep_done(p, rq, r, transient);
		rq->ep = NULL;
		if (r == 0 || !transient || attempt >= p->attempts)
			break;
		HTTP_NET_ADD(p, retries, 1);
		if (failed) {
			/* Another server now: no reason to wait. */
			struct http_endpoint *next;

			pthread_mutex_lock(&p->lock);
			next = http_ep_pick(p, failed);
			if (next)
				http_ep_take(p, next, rq);
			pthread_mutex_unlock(&p->lock);
			if (rq->ep) {
				sfs_info("%s: bytes %llu-%llu: %s; retrying at once on %s "
					 "(attempt %u of %u)",
					 shown, (unsigned long long)rq->off,
					 (unsigned long long)(rq->off + rq->len - 1), rq->why,
					 rq->ep->display, attempt + 1, p->attempts);
				continue;
			}
		}
		delay = HTTP_BACKOFF_BASE_MS << SFS_MIN(attempt - 1, 16u);
		if (delay > HTTP_BACKOFF_MAX_MS)
			delay = HTTP_BACKOFF_MAX_MS;
		delay += (long)(sfs_now_ns() % (uint64_t)(delay / 4 + 1)); /* jitter */
		if (wait_ms > delay)
			delay = SFS_MIN(wait_ms, (long)HTTP_RETRY_AFTER_MAX_MS);
		sfs_info("%s: bytes %llu-%llu: %s; retrying in %ld ms (attempt %u of %u)", shown,
			 (unsigned long long)rq->off, (unsigned long long)(rq->off + rq->len - 1),
			 rq->why, delay, attempt + 1, p->attempts);
		http_sleep_ms(delay);
		if (failed) {
			pthread_mutex_lock(&p->lock);
			struct http_endpoint *e = http_ep_pick(p, NULL) ?: http_ep_pick_any(p);
			http_ep_take(p, e ? e : failed, rq);
			pthread_mutex_unlock(&p->lock);
		}
	}
	if (r < 0)
		HTTP_NET_ADD(p, errors, 1);
	if (r < 0 && rq->probe)
		sfs_error("%s: %s%s", rq->shown ? rq->shown : p->display, rq->why,
			  transient ? " (giving up after retries)" : "");
	else if (r < 0 && !atomic_load(&p->changed))
		sfs_error("%s: reading bytes %llu-%llu: %s%s", shown, (unsigned long long)rq->off,
			  (unsigned long long)(rq->off + rq->len - 1), rq->why,
			  transient ? " (giving up after retries)" : "");
	return r;
}

/* ---- Open ---- */

/* What a probe learnt about one URL. */
struct http_probe_result {
	char *url; /* pinned (malloc'd) */
	bool creds;
	uint64_t size;
	char validator[HTTP_VALIDATOR_MAX];
	bool validator_is_etag;
};

/* Probe url (following redirects by hand, see the top of the file; shown
 * as display in messages): its pinned URL, size and validator. Credentials
 * go only to p->origin. Uses the handle c. */
static int http_probe(struct http_priv *p, struct http_conn *c, const char *url_in,
		      const char *display, struct http_probe_result *res)
{
	char hop_origin[512];
	const char *why = NULL;
	char *url = NULL;
	uint8_t byte;
	struct http_req rq = {
	    .p = p, .probe = true, .buf = &byte, .len = 1, .off = 0, .shown = display};
	unsigned hops;
	int r;

	r = http_url_origin(url_in, hop_origin, sizeof(hop_origin), &why);
	if (r < 0) {
		sfs_error("%s: %s", display, why);
		return r;
	}
	rq.creds = strcmp(hop_origin, p->origin) == 0;
	url = strdup(url_in);
	if (!url)
		return -ENOMEM;
	for (hops = 0;; hops++) {
		char *loc = NULL;

		rq.url = url;
		r = http_request(p, c, &rq);
		if (r < 0)
			goto out;
		if (rq.resp.status < 300 || rq.resp.status > 399 || rq.resp.status == 304)
			break;
		if (curl_easy_getinfo(c->curl, CURLINFO_REDIRECT_URL, &loc) != CURLE_OK || !loc) {
			sfs_error("%s: HTTP %ld without a usable Location", display,
				  rq.resp.status);
			r = -EIO;
			goto out;
		}
		if (hops >= HTTP_MAX_REDIRECTS) {
			sfs_error("%s: more than %d redirects", display, HTTP_MAX_REDIRECTS);
			r = -ELOOP;
			goto out;
		}
		r = http_url_origin(loc, hop_origin, sizeof(hop_origin), &why);
		if (r < 0) {
			char *d = fetch_display_uri(loc);

			sfs_error("%s: redirect to %s refused: %s", display, d ? d : "?", why);
			free(d);
			goto out;
		}
		if (rq.creds && (p->auth_header || p->userpwd) &&
		    strcmp(p->origin, hop_origin) != 0) {
			sfs_info("%s: redirected to another origin; not sending credentials there",
				 display);
			rq.creds = false;
		}
		free(url);
		url = strdup(loc);
		if (!url)
			return -ENOMEM;
	}

	switch (rq.resp.status) {
	case 206:
		if (rq.total == UINT64_MAX) {
			sfs_error(
			    "%s: server does not give the file size in Content-Range (\"%s\")",
			    display, rq.resp.content_range);
			r = -EOPNOTSUPP;
			goto out;
		}
		res->size = rq.total;
		break;
	case 200:
		sfs_error("%s: server ignores Range requests (200 instead of 206); streamfs needs "
			  "byte ranges",
			  display);
		r = -EOPNOTSUPP;
		goto out;
	case 416:
		/* An empty file: "bytes * /0". */
		if (http_parse_content_range(rq.resp.content_range, NULL, NULL, &res->size) &&
		    res->size == 0)
			break;
		sfs_error("%s: HTTP 416 for bytes=0-0 (Content-Range \"%s\")", display,
			  rq.resp.content_range);
		r = -EIO;
		goto out;
	default:
		sfs_error("%s: unexpected HTTP status %ld when probing", display, rq.resp.status);
		r = -EIO;
		goto out;
	}

	res->validator[0] = '\0';
	res->validator_is_etag = false;
	if (rq.resp.etag[0]) {
		snprintf(res->validator, sizeof(res->validator), "%s", rq.resp.etag);
		res->validator_is_etag = true;
	} else if (rq.resp.last_modified[0]) {
		snprintf(res->validator, sizeof(res->validator), "%s", rq.resp.last_modified);
	}
	res->creds = rq.creds;
	res->url = url;
	url = NULL;
	r = 0;
out:
	free(url);
	return r;
}

/* Fill e from the probe of its URL (taking res->url) with the headers of
 * its reads. Not published yet. */
static int http_ep_init(struct http_priv *p, struct http_endpoint *e, struct http_probe_result *res)
{
	char buf[HTTP_VALIDATOR_MAX + 32];
	struct curl_slist *l;

	e->url = res->url;
	res->url = NULL;
	e->creds = res->creds;
	e->state = FETCH_MIRROR_UP;
	e->down_ms = HTTP_DOWN_MIN_MS;
	if (p->auth_header && e->creds) {
		e->read_headers = curl_slist_append(NULL, p->auth_header);
		if (!e->read_headers)
			return -ENOMEM;
	}
	/* If-Match compares strongly: a weak ETag would always fail it. */
	buf[0] = '\0';
	if (p->validator_is_etag && strncmp(p->validator, "W/", 2) != 0)
		snprintf(buf, sizeof(buf), "If-Match: %s", p->validator);
	else if (!p->validator_is_etag && p->validator[0])
		snprintf(buf, sizeof(buf), "If-Unmodified-Since: %s", p->validator);
	if (buf[0]) {
		l = curl_slist_append(e->read_headers, buf);
		if (!l)
			return -ENOMEM;
		e->read_headers = l;
	}
	return 0;
}

static void http_ep_free(struct http_endpoint *e)
{
	free(e->url);
	free(e->display);
	curl_slist_free_all(e->read_headers);
	memset(e, 0, sizeof(*e));
}

static void http_close(struct fetch_source *s)
{
	struct http_priv *p = s->priv;
	struct http_conn *c;

	if (!p)
		return;
	if (atomic_load(&p->nep) && p->verbose_level >= 0)
		sfs_log(p->verbose_level, "%s: %llu HTTP requests, %llu retries", p->display,
			(unsigned long long)atomic_load(&p->net.requests),
			(unsigned long long)atomic_load(&p->net.retries));
	while ((c = p->free_conns)) {
		p->free_conns = c->next;
		http_conn_free(c);
		HTTP_NET_SUB(p, connections, 1);
	}
	if (p->share)
		curl_share_cleanup(p->share);
	if (p->share_locks_init)
		for (int i = 0; i < CURL_LOCK_DATA_LAST; i++)
			pthread_mutex_destroy(&p->share_lock[i]);
	if (p->lock_init) {
		pthread_mutex_destroy(&p->lock);
		pthread_cond_destroy(&p->cond_guest);
		pthread_cond_destroy(&p->cond_job);
		pthread_mutex_destroy(&p->net.lock);
		pthread_mutex_destroy(&p->mirror_lock);
	}
	for (unsigned i = 0; i < HTTP_MAX_ENDPOINTS; i++)
		http_ep_free(&p->ep[i]);
	curl_slist_free_all(p->probe_headers);
	if (p->auth_header)
		explicit_bzero(p->auth_header, strlen(p->auth_header));
	if (p->userpwd)
		explicit_bzero(p->userpwd, strlen(p->userpwd));
	free(p->auth_header);
	free(p->userpwd);
	free(p->display);
	free(p->cacert);
	memset(p, 0, sizeof(*p));
}

static int http_open(struct fetch_source *s, int flags)
{
	struct http_priv *p = s->priv;
	const struct fetch_options *o = fetch_get_options();
	const char *env = getenv("STREAMFS_HTTP_DEBUG");
	struct http_probe_result res = {0};
	const char *why = NULL;
	struct http_conn *c;
	int r;

	pthread_once(&http_once, http_global_init);
	if (http_global_rc != CURLE_OK) {
		sfs_error("libcurl initialisation failed: %s", curl_easy_strerror(http_global_rc));
		return -EIO;
	}
	p->display = fetch_display_uri(s->uri);
	if (!p->display)
		return -ENOMEM;
	if (flags & (FETCH_RDWR | FETCH_CREATE)) {
		sfs_error("%s: HTTP sources are read-only", p->display);
		r = -EROFS;
		goto fail;
	}
	p->pool_size =
	    o->pool_size ? SFS_MIN(o->pool_size, HTTP_MAX_POOL_SIZE) : HTTP_DEFAULT_POOL_SIZE;
	p->attempts = o->retries ? o->retries : HTTP_DEFAULT_ATTEMPTS;
	p->connect_timeout =
	    o->connect_timeout ? (long)o->connect_timeout : HTTP_DEFAULT_CONNECT_TIMEOUT;
	p->io_timeout = o->io_timeout ? (long)o->io_timeout : HTTP_DEFAULT_IO_TIMEOUT;
	if (o->cacert) {
		p->cacert = strdup(o->cacert);
		if (!p->cacert) {
			r = -ENOMEM;
			goto fail;
		}
	}
	/* STREAMFS_HTTP_DEBUG=1 is asked for explicitly: shown at the default
	 * log level. The verbose option follows the daemon's -v (info). */
	p->verbose_level = env && strcmp(env, "1") == 0 ? SFS_LOG_WARN
			   : o->verbose			? SFS_LOG_INFO
							: -1;
	atomic_init(&p->changed, false);
	atomic_init(&p->nep, 0);
	atomic_init(&p->rtt_min_ns, UINT64_MAX);
	r = http_url_origin(s->uri, p->origin, sizeof(p->origin), &why);
	if (r < 0) {
		sfs_error("%s: %s", p->display, why);
		goto fail;
	}

	if (o->http_auth_file) {
		r = http_read_auth_file(p, o->http_auth_file);
		if (r < 0)
			goto fail;
		if (strncasecmp(s->uri, "https://", 8) != 0)
			sfs_warn("%s: sending credentials over plain http", p->display);
	}

	for (int i = 0; i < CURL_LOCK_DATA_LAST; i++)
		pthread_mutex_init(&p->share_lock[i], NULL);
	p->share_locks_init = true;
	pthread_mutex_init(&p->lock, NULL);
	pthread_cond_init(&p->cond_guest, NULL);
	pthread_cond_init(&p->cond_job, NULL);
	pthread_mutex_init(&p->net.lock, NULL);
	pthread_mutex_init(&p->mirror_lock, NULL);
	p->lock_init = true;
	p->share = curl_share_init();
	if (!p->share) {
		r = -ENOMEM;
		goto fail;
	}
	if (curl_share_setopt(p->share, CURLSHOPT_LOCKFUNC, http_share_lock) != CURLSHE_OK ||
	    curl_share_setopt(p->share, CURLSHOPT_UNLOCKFUNC, http_share_unlock) != CURLSHE_OK ||
	    curl_share_setopt(p->share, CURLSHOPT_USERDATA, p) != CURLSHE_OK ||
	    curl_share_setopt(p->share, CURLSHOPT_SHARE, CURL_LOCK_DATA_DNS) != CURLSHE_OK ||
	    curl_share_setopt(p->share, CURLSHOPT_SHARE, CURL_LOCK_DATA_SSL_SESSION) !=
		CURLSHE_OK) {
		sfs_error("%s: libcurl share setup failed", p->display);
		r = -EIO;
		goto fail;
	}
	if (p->auth_header) {
		/* Probe headers (auth only) are needed before the probe. */
		p->probe_headers = curl_slist_append(NULL, p->auth_header);
		if (!p->probe_headers) {
			r = -ENOMEM;
			goto fail;
		}
	}

	c = http_get_conn(p, FETCH_CLASS_GUEST, true, true, NULL);
	if (!c) {
		r = -ENOMEM;
		goto fail;
	}
	r = http_probe(p, c, s->uri, p->display, &res);
	c->ep = &p->ep[0]; /* connected to the pinned URL (or to nothing) */
	http_put_conn(p, c, FETCH_CLASS_GUEST);
	if (r < 0)
		goto fail;
	p->size = res.size;
	memcpy(p->validator, res.validator, sizeof(p->validator));
	p->validator_is_etag = res.validator_is_etag;
	if (!p->validator[0])
		sfs_warn("%s: server sends neither ETag nor Last-Modified: a change of the file on "
			 "the server is only detected if its size changes",
			 p->display);
	p->ep[0].display = strdup(p->display);
	if (!p->ep[0].display) {
		r = -ENOMEM;
		goto fail;
	}
	r = http_ep_init(p, &p->ep[0], &res);
	if (r < 0)
		goto fail;
	atomic_store(&p->nep, 1);
	s->size = p->size;
	if (p->verbose_level >= 0)
		sfs_log(p->verbose_level,
			"%s: %llu bytes, %s %s, %u connections (+%u for the guest), %u attempts "
			"per request",
			p->display, (unsigned long long)p->size,
			p->validator_is_etag ? "ETag" : "Last-Modified",
			p->validator[0] ? p->validator : "(none)", p->pool_size, HTTP_GUEST_RESERVE,
			p->attempts);
	return 0;
fail:
	free(res.url);
	http_close(s);
	return r;
}

/* Compare the probe of a mirror with the source: another size or validator
 * is another version of the file (or another file). Returns why not, or
 * NULL when it is the same. */
static const char *http_mirror_differs(struct http_priv *p, const struct http_probe_result *res,
				       char *why, size_t len)
{
	if (res->size != p->size)
		snprintf(why, len, "size %llu, the backing URL has %llu",
			 (unsigned long long)res->size, (unsigned long long)p->size);
	else if (res->validator_is_etag != p->validator_is_etag)
		snprintf(why, len, "%s %s, the backing URL has %s %s",
			 res->validator_is_etag ? "ETag" : "Last-Modified",
			 res->validator[0] ? res->validator : "(none)",
			 p->validator_is_etag ? "ETag" : "Last-Modified", p->validator);
	else if (strcmp(res->validator, p->validator) != 0)
		snprintf(why, len, "%s %s, the backing URL has %s",
			 p->validator_is_etag ? "ETag" : "Last-Modified",
			 res->validator[0] ? res->validator : "(none)", p->validator);
	else
		return NULL;
	return why;
}

static int http_add_mirror(struct fetch_source *s, const char *url)
{
	struct http_priv *p = s->priv;
	struct http_probe_result res = {0};
	struct http_endpoint *e = NULL;
	char *display = fetch_display_uri(url);
	struct http_conn *c;
	char why[2 * HTTP_VALIDATOR_MAX + 96];
	unsigned n;
	int r;

	if (!display)
		return -ENOMEM;
	pthread_mutex_lock(&p->mirror_lock);
	n = atomic_load(&p->nep);
	if (n >= HTTP_MAX_ENDPOINTS) {
		sfs_error("%s: mirror %s: at most %d mirrors", p->display, display,
			  FETCH_MAX_MIRRORS);
		r = -E2BIG;
		goto out;
	}
	if (!p->validator[0]) {
		/* Nothing would tell another version from the same one. */
		sfs_error("%s: mirror %s refused: the backing URL has neither ETag nor "
			  "Last-Modified, so a mirror cannot be checked to serve the same file",
			  p->display, display);
		r = -EINVAL;
		goto out;
	}
	c = http_get_conn(p, FETCH_CLASS_GUEST, true, true, NULL);
	if (!c) {
		r = -ENOMEM;
		goto out;
	}
	r = http_probe(p, c, url, display, &res);
	c->ep = &p->ep[n]; /* a refused mirror's slot is reused by the next */
	http_put_conn(p, c, FETCH_CLASS_GUEST);
	if (r < 0) {
		sfs_error("%s: mirror %s refused: it does not answer as it should (see above)",
			  p->display, display);
		goto out;
	}
	if (http_mirror_differs(p, &res, why, sizeof(why))) {
		sfs_error("%s: mirror %s refused: it serves another version of the file (%s)",
			  p->display, display, why);
		r = -EINVAL;
		goto out;
	}
	e = &p->ep[n];
	e->display = display;
	display = NULL;
	r = http_ep_init(p, e, &res);
	if (r < 0) {
		http_ep_free(e);
		goto out;
	}
	pthread_mutex_lock(&p->lock);
	atomic_store(&p->nep, n + 1); /* published: reads may use it now */
	pthread_mutex_unlock(&p->lock);
	sfs_info("%s: mirror %s: same size and %s; reads spread over %u servers", p->display,
		 e->display, p->validator_is_etag ? "ETag" : "Last-Modified", n + 1);
	r = 0;
out:
	pthread_mutex_unlock(&p->mirror_lock);
	free(res.url);
	free(display);
	return r;
}

static unsigned http_mirrors(struct fetch_source *s, struct fetch_mirror *out, unsigned max)
{
	struct http_priv *p = s->priv;
	unsigned n;

	pthread_mutex_lock(&p->lock);
	n = atomic_load(&p->nep);
	for (unsigned i = 0; i < n && i < max; i++) {
		struct http_endpoint *e = &p->ep[i];

		out[i] = (struct fetch_mirror){.display = e->display,
					       .state = e->state,
					       .requests = atomic_load(&e->requests),
					       .errors = atomic_load(&e->errors),
					       .bytes = atomic_load(&e->bytes)};
	}
	pthread_mutex_unlock(&p->lock);
	return n;
}

/* ---- Read ---- */

struct http_piece {
	struct http_priv *p;
	struct http_conn *c;
	struct http_req rq;
	enum fetch_class cls;
	pthread_t thread;
	bool threaded;
	int r;
};

static void *http_piece_run(void *opaque)
{
	struct http_piece *pc = opaque;

	HTTP_NET_ADD(pc->p, in_flight[pc->cls], 1);
	pc->r = http_request(pc->p, pc->c, &pc->rq);
	HTTP_NET_SUB(pc->p, in_flight[pc->cls], 1);
	return NULL;
}

static int http_pread(struct fetch_source *s, void *buf, size_t len, uint64_t off)
{
	struct http_priv *p = s->priv;
	struct http_piece pieces[HTTP_MAX_SPLIT];
	/* The pieces run on threads of their own: the class goes with them. */
	enum fetch_class cls = fetch_get_thread_class();
	struct http_conn *c;
	unsigned n = 1, i;
	size_t piece_len;
	int r = 0;

	if (atomic_load(&p->changed))
		return -EIO; /* logged when detected */
	/* Each piece goes to the server its handle was taken for. */
	memset(&pieces[0].rq, 0, sizeof(pieces[0].rq));
	c = http_get_conn(p, cls, true, true, &pieces[0].rq);
	if (!c)
		return -ENOMEM;
	pieces[0].c = c;
	/* Split a large read over idle handles; never wait for one. */
	if (len > HTTP_SPLIT_MIN) {
		unsigned want = (unsigned)SFS_MIN(len / HTTP_SPLIT_PIECE, (size_t)p->pool_size);

		want = SFS_MIN(want, (unsigned)HTTP_MAX_SPLIT);
		while (n < want) {
			memset(&pieces[n].rq, 0, sizeof(pieces[n].rq));
			pieces[n].c = http_get_conn(p, cls, false, false, &pieces[n].rq);
			if (!pieces[n].c)
				break;
			n++;
		}
	}
	piece_len = SFS_ALIGN_UP(SFS_DIV_ROUND_UP(len, n), 65536);
	for (i = 0; i < n; i++) {
		size_t start = SFS_MIN((size_t)i * piece_len, len);
		struct http_piece *pc = &pieces[i];

		pc->p = p;
		pc->cls = cls;
		pc->threaded = false;
		pc->r = 0;
		pc->rq.p = p;
		pc->rq.cls = cls;
		pc->rq.buf = (uint8_t *)buf + start;
		pc->rq.len = SFS_MIN(piece_len, len - start);
		pc->rq.off = off + start;
	}
	for (i = 1; i < n; i++) {
		if (pieces[i].rq.len == 0) {
			pthread_mutex_lock(&p->lock);
			http_ep_untake(p, &pieces[i].rq);
			pthread_mutex_unlock(&p->lock);
			continue;
		}
		pieces[i].threaded =
		    pthread_create(&pieces[i].thread, NULL, http_piece_run, &pieces[i]) == 0;
	}
	http_piece_run(&pieces[0]);
	for (i = 1; i < n; i++) {
		if (pieces[i].threaded)
			pthread_join(pieces[i].thread, NULL);
		else if (pieces[i].rq.len)
			http_piece_run(&pieces[i]);
	}
	for (i = 0; i < n; i++) {
		if (pieces[i].r < 0 && r == 0)
			r = pieces[i].r;
		http_put_conn(p, pieces[i].c, cls);
	}
	if (r == 0 && atomic_load(&p->changed))
		r = -EIO; /* a piece saw the change: don't return a mix */
	if (r == 0)
		HTTP_NET_ADD(p, bytes[cls], len);
	return r;
}

static const char *http_validator(struct fetch_source *s)
{
	struct http_priv *p = s->priv;

	return p->validator; /* set at open, never changed */
}

const struct fetch_ops fetch_http_ops = {
    .scheme = "http",
    .network = true,
    .priv_size = sizeof(struct http_priv),
    .open = http_open,
    .close = http_close,
    .pread = http_pread,
    .validator = http_validator,
    .pwrite = NULL,
    .flush = NULL,
    .truncate = NULL,
    .net_stats = http_net_stats,
    .net_totals = http_net_totals,
    .add_mirror = http_add_mirror,
    .mirrors = http_mirrors,
};
