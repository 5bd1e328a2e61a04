/* streamfs: generic byte-source layer. Owns URIs (the scheme table below,
 * backing-name resolution), picks a fetch_ops by scheme, checks bounds so the
 * sources can trust their arguments, and keeps statistics.
 *
 * THREAD MODEL: stateless apart from the atomic counters in each source, the
 * process-wide count of guest reads on the network (atomic), the calling
 * thread's I/O class (thread-local) and the process-wide options, which are
 * set once before any source is opened.
 */
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <strings.h>
#include <sys/uio.h>
#include <unistd.h>

#include <curl/curl.h>

#include "fetch.h"
#include "util.h"

/* The kinds of sources, one file each in fetch/. */
extern const struct fetch_ops fetch_file_ops;
extern const struct fetch_ops fetch_http_ops;
extern const struct fetch_ops fetch_mem_ops;
extern const struct fetch_ops fetch_nbd_ops;

/* Every URI scheme streamfs reads, and its source: adding a kind of source
 * is its file plus its line here (and its extern above). A URI without a
 * scheme is a local path, served by the first entry. */
static const struct fetch_scheme {
	const char *name; /* lower case; matched case-insensitively (RFC 3986 3.1) */
	const struct fetch_ops *ops;
	bool listed; /* named in the "unsupported scheme" message */
} fetch_schemes[] = {
    {"file", &fetch_file_ops, true},
    {"http", &fetch_http_ops, true},
    {"https", &fetch_http_ops, true},
    {"nbd", &fetch_nbd_ops, true},
    {"nbds", &fetch_nbd_ops, true},
    {"nbd+unix", &fetch_nbd_ops, true},
    {"nbds+unix", &fetch_nbd_ops, true},
    {"nbd+tcp", &fetch_nbd_ops, false}, /* QEMU's alias of nbd */
    {"mem", &fetch_mem_ops, false},	/* unit tests and fuzzers */
};
#define FETCH_NSCHEMES (sizeof(fetch_schemes) / sizeof(fetch_schemes[0]))

static struct fetch_options fetch_opts;

/* The class of this thread's reads; GUEST unless the thread says otherwise,
 * so FUSE workers (and anything new) are served first by default. */
static __thread enum fetch_class fetch_thread_class = FETCH_CLASS_GUEST;

/* GUEST reads of network sources now in fetch_pread (fetch_guest_inflight). */
static _Atomic unsigned fetch_guest_net_reads;

/* Write tracing for crash-consistency tests (tests/helpers/replay.c):
 * with STREAMFS_TRACE=FILE, every write, flush and truncate of a writable
 * source is appended to FILE, in completion order, as records
 *   'W' u64 off, u32 len, data | 'F' | 'T' u64 size     (little endian).
 * Writes are serialized while tracing so the order is exact. */
static pthread_mutex_t fetch_trace_lock = PTHREAD_MUTEX_INITIALIZER;
static int fetch_trace_fd = -2; /* -2: not looked at yet, -1: off */

static int fetch_trace_open(void)
{
	pthread_mutex_lock(&fetch_trace_lock);
	if (fetch_trace_fd == -2) {
		const char *path = getenv("STREAMFS_TRACE");
		fetch_trace_fd =
		    path ? open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644) : -1;
	}
	pthread_mutex_unlock(&fetch_trace_lock);
	return fetch_trace_fd;
}

/* Called with fetch_trace_lock held. */
static void fetch_trace_put(char kind, uint64_t a, const void *data, uint32_t len)
{
	uint8_t hdr[13];
	size_t n = 1;
	struct iovec iov[2];

	hdr[0] = (uint8_t)kind;
	if (kind != 'F') {
		uint64_t le = htole64(a);
		memcpy(hdr + 1, &le, 8);
		n += 8;
	}
	if (kind == 'W') {
		uint32_t le = htole32(len);
		memcpy(hdr + 9, &le, 4);
		n += 4;
	}
	iov[0] = (struct iovec){.iov_base = hdr, .iov_len = n};
	iov[1] = (struct iovec){.iov_base = (void *)data, .iov_len = kind == 'W' ? len : 0};
	if (writev(fetch_trace_fd, iov, 2) < 0)
		sfs_error("STREAMFS_TRACE: %s", strerror(errno));
}

void fetch_set_options(const struct fetch_options *opts)
{
	fetch_opts = *opts;
}

const struct fetch_options *fetch_get_options(void)
{
	return &fetch_opts;
}

/* Length of the scheme of uri ("http" in "http://h/x"; RFC 3986 3.1:
 * ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ) then ":"), or 0 if it has none. */
static size_t fetch_scheme_len(const char *uri)
{
	size_t n;

	if (!isalpha((unsigned char)uri[0]))
		return 0;
	n = strspn(uri, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+.-");
	return uri[n] == ':' ? n : 0;
}

/* The table entry for uri's scheme of length n, or NULL. */
static const struct fetch_scheme *fetch_find_scheme(const char *uri, size_t n)
{
	for (size_t i = 0; n && i < FETCH_NSCHEMES; i++)
		if (strlen(fetch_schemes[i].name) == n &&
		    strncasecmp(uri, fetch_schemes[i].name, n) == 0)
			return &fetch_schemes[i];
	return NULL;
}

bool fetch_uri_is_path(const char *uri)
{
	size_t n = fetch_scheme_len(uri);

	/* "json:" is QEMU's pseudo-protocol: a URI, refused by fetch_open. */
	return !n || (!fetch_find_scheme(uri, n) && strncmp(uri + n, "://", 3) != 0 &&
		      strncasecmp(uri, "json:", 5) != 0);
}

/* A URL whose relative references resolve per RFC 3986: "scheme://" other
 * than file:, whose names stay plain paths (see fetch_resolve_uri). */
static bool fetch_uri_is_url(const char *uri)
{
	size_t n = fetch_scheme_len(uri);

	return n && strncmp(uri + n, "://", 3) == 0 && strncasecmp(uri, "file:", 5) != 0;
}

/* Log that name does not resolve against parent, both in their shown form. */
static void fetch_resolve_error(const char *parent, const char *name, const char *why)
{
	char *p = fetch_display_uri(parent), *n = fetch_display_uri(name);
	char esc[256];

	sfs_error("%s: backing name '%s' %s", p ? p : "image",
		  sfs_escape(esc, sizeof(esc), n ? n : "", n ? strlen(n) : 0), why);
	free(p);
	free(n);
}

/* Resolve the relative reference name against the URL parent with CURLU. */
static int fetch_resolve_url(const char *parent, const char *name, char **out)
{
	const unsigned flags = CURLU_NON_SUPPORT_SCHEME;
	char *ref = NULL, *url = NULL;
	CURLUcode rc;
	CURLU *u;
	int r = 0;

	u = curl_url();
	if (!u)
		return -ENOMEM;
	/* "a:b" would parse as scheme "a": RFC 3986 4.2 says write "./a:b". */
	if (asprintf(&ref, "%s%s", fetch_scheme_len(name) ? "./" : "", name) < 0) {
		ref = NULL;
		r = -ENOMEM;
		goto out;
	}
	rc = curl_url_set(u, CURLUPART_URL, parent, flags);
	/* The fragment is never inherited; and libcurl 7.88 would take a '/'
	 * inside it for the last path separator. */
	if (rc == CURLUE_OK)
		rc = curl_url_set(u, CURLUPART_FRAGMENT, NULL, 0);
	if (rc == CURLUE_OK)
		rc = curl_url_set(u, CURLUPART_URL, ref, flags);
	if (rc == CURLUE_OK)
		rc = curl_url_get(u, CURLUPART_URL, &url, 0);
	if (rc == CURLUE_OUT_OF_MEMORY) {
		r = -ENOMEM;
	} else if (rc != CURLUE_OK) {
		fetch_resolve_error(parent, name, "does not make a URL");
		r = -EINVAL;
	} else {
		*out = strdup(url);
		if (!*out)
			r = -ENOMEM;
	}
out:
	curl_free(url);
	free(ref);
	curl_url_cleanup(u);
	return r;
}

int fetch_resolve_uri(const char *parent, const char *name, char **out)
{
	const char *slash;
	size_t dirlen;

	*out = NULL;
	if (!name[0]) {
		fetch_resolve_error(parent, name, "is empty");
		return -EINVAL;
	}
	/* As QEMU's bdrv_make_absolute_filename: a name with a scheme or an
	 * absolute path is as is, even below a URL (QEMU opens "/b" as a
	 * local file there too). */
	if (name[0] == '/' || !fetch_uri_is_path(name))
		goto as_is;
	if (fetch_uri_is_url(parent))
		return fetch_resolve_url(parent, name, out);
	/* A path: the parent's directory, then name, as QEMU's path_combine. */
	slash = strrchr(parent, '/');
	if (!slash)
		goto as_is;
	dirlen = (size_t)(slash - parent) + 1;
	*out = malloc(dirlen + strlen(name) + 1);
	if (!*out)
		return -ENOMEM;
	memcpy(*out, parent, dirlen);
	strcpy(*out + dirlen, name);
	return 0;
as_is:
	*out = strdup(name);
	return *out ? 0 : -ENOMEM;
}

/* Log that uri's scheme (of length n) is not one streamfs reads, listing
 * those it does from the table ("file, http and https"). */
static void fetch_unsupported(const char *uri, size_t n)
{
	char *shown = fetch_display_uri(uri), list[128] = "";
	size_t k = 0, j = 0, len = 0;

	for (size_t i = 0; i < FETCH_NSCHEMES; i++)
		k += fetch_schemes[i].listed;
	for (size_t i = 0; i < FETCH_NSCHEMES && len < sizeof(list); i++) {
		const char *sep = "";

		if (!fetch_schemes[i].listed)
			continue;
		if (j++)
			sep = j == k ? " and " : ", ";
		len += (size_t)snprintf(list + len, sizeof(list) - len, "%s%s", sep,
					fetch_schemes[i].name);
	}
	sfs_error("%s: unsupported scheme '%.*s' (streamfs reads %s backings)",
		  shown ? shown : "URL", (int)SFS_MIN(n, 32), uri, list);
	free(shown);
}

int fetch_open(const char *uri, int flags, struct fetch_source **out)
{
	const struct fetch_ops *ops = fetch_schemes[0].ops;
	struct fetch_source *s;
	size_t n = fetch_scheme_len(uri);
	char *shown;
	int r;

	if (strncasecmp(uri, "json:", 5) == 0) {
		/* Not shown: its options may hold a password in any form. */
		sfs_error("json: pseudo-URLs are not supported");
		return -EPROTONOSUPPORT;
	}
	if (!fetch_uri_is_path(uri)) {
		const struct fetch_scheme *e = fetch_find_scheme(uri, n);

		if (!e) {
			fetch_unsupported(uri, n);
			return -EPROTONOSUPPORT;
		}
		ops = e->ops;
	}
	if ((flags & FETCH_RDWR) && !ops->pwrite) {
		shown = fetch_display_uri(uri);
		sfs_error("%s: %s sources are read-only", shown ? shown : "URL", ops->scheme);
		free(shown);
		return -EROFS;
	}
	s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	s->ops = ops;
	s->flags = flags;
	s->uri = strdup(uri);
	if (!s->uri) {
		free(s);
		return -ENOMEM;
	}
	if (ops->priv_size) {
		s->priv = calloc(1, ops->priv_size);
		if (!s->priv) {
			free(s->uri);
			free(s);
			return -ENOMEM;
		}
	}
	r = ops->open(s, flags);
	if (r < 0) {
		free(s->priv);
		free(s->uri);
		free(s);
		return r;
	}
	*out = s;
	return 0;
}

void fetch_close(struct fetch_source *s)
{
	if (!s)
		return;
	s->ops->close(s);
	free(s->priv);
	free(s->uri);
	free(s);
}

int fetch_pread(struct fetch_source *s, void *buf, size_t len, uint64_t off)
{
	uint64_t end;
	int r;

	if (len == 0)
		return 0;
	if (!sfs_add_ok(off, len, &end) || end > fetch_size(s)) {
		char *shown = fetch_display_uri(s->uri);

		sfs_error("%s: read of %zu bytes at offset %llu is past the end of the file "
			  "(%llu bytes): truncated or corrupt image",
			  shown ? shown : "source", len, (unsigned long long)off,
			  (unsigned long long)fetch_size(s));
		free(shown);
		atomic_fetch_add(&s->stats.errors, 1);
		return -EIO;
	}
	if (s->ops->network && fetch_thread_class == FETCH_CLASS_GUEST) {
		atomic_fetch_add(&fetch_guest_net_reads, 1);
		r = s->ops->pread(s, buf, len, off);
		atomic_fetch_sub(&fetch_guest_net_reads, 1);
	} else {
		r = s->ops->pread(s, buf, len, off);
	}
	if (r < 0) {
		atomic_fetch_add(&s->stats.errors, 1);
		return r;
	}
	atomic_fetch_add(&s->stats.bytes_read, len);
	atomic_fetch_add(&s->stats.reads, 1);
	return 0;
}

int fetch_pwrite(struct fetch_source *s, const void *buf, size_t len, uint64_t off)
{
	uint64_t end, cur;
	int r;

	if (!(s->flags & FETCH_RDWR) || !s->ops->pwrite)
		return -EROFS;
	if (len == 0)
		return 0;
	if (!sfs_add_ok(off, len, &end) || end > (1ULL << 62))
		return -EFBIG;
	if (fetch_trace_open() >= 0 && len <= UINT32_MAX) {
		pthread_mutex_lock(&fetch_trace_lock);
		r = s->ops->pwrite(s, buf, len, off);
		if (r == 0)
			fetch_trace_put('W', off, buf, (uint32_t)len);
		pthread_mutex_unlock(&fetch_trace_lock);
	} else {
		r = s->ops->pwrite(s, buf, len, off);
	}
	if (r < 0) {
		atomic_fetch_add(&s->stats.errors, 1);
		return r;
	}
	/* Grow the recorded size monotonically; concurrent appends race here. */
	cur = atomic_load(&s->size);
	while (cur < end && !atomic_compare_exchange_weak(&s->size, &cur, end))
		;
	atomic_fetch_add(&s->stats.bytes_written, len);
	atomic_fetch_add(&s->stats.writes, 1);
	return 0;
}

int fetch_write_zeros(struct fetch_source *s, uint64_t off, uint64_t len)
{
	static const uint8_t zero[65536];
	int r = 0;

	while (len && r == 0) {
		size_t n = (size_t)SFS_MIN(len, (uint64_t)sizeof(zero));

		r = fetch_pwrite(s, zero, n, off);
		off += n;
		len -= n;
	}
	return r;
}

int fetch_flush(struct fetch_source *s)
{
	int r;

	if (!(s->flags & FETCH_RDWR) || !s->ops->flush)
		return 0;
	if (fetch_trace_open() >= 0) {
		pthread_mutex_lock(&fetch_trace_lock);
		r = s->ops->flush(s);
		if (r == 0)
			fetch_trace_put('F', 0, NULL, 0);
		pthread_mutex_unlock(&fetch_trace_lock);
	} else {
		r = s->ops->flush(s);
	}
	if (r < 0)
		atomic_fetch_add(&s->stats.errors, 1);
	else
		atomic_fetch_add(&s->stats.flushes, 1);
	return r;
}

int fetch_truncate(struct fetch_source *s, uint64_t size)
{
	int r;

	if (!(s->flags & FETCH_RDWR) || !s->ops->truncate)
		return -EROFS;
	if (fetch_trace_open() >= 0) {
		pthread_mutex_lock(&fetch_trace_lock);
		r = s->ops->truncate(s, size);
		if (r == 0)
			fetch_trace_put('T', size, NULL, 0);
		pthread_mutex_unlock(&fetch_trace_lock);
	} else {
		r = s->ops->truncate(s, size);
	}
	if (r == 0)
		atomic_store(&s->size, size);
	return r;
}

const char *fetch_validator(struct fetch_source *s, char *buf, size_t len)
{
	struct stat st;

	if (s->ops->validator)
		snprintf(buf, len, "%s", s->ops->validator(s));
	else if (!s->ops->network && stat(s->uri, &st) == 0)
		snprintf(buf, len, "size:%lld,mtime:%lld.%09ld", (long long)st.st_size,
			 (long long)st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
	else
		snprintf(buf, len, "%s", "");
	return buf;
}

int fetch_extent(struct fetch_source *s, uint64_t off, uint64_t len, bool *data, uint64_t *pnum)
{
	uint64_t size = fetch_size(s);

	*data = true;
	*pnum = len;
	if (!s->ops->data_run || off >= size)
		return 0;
	if (s->ops->data_run(s, off, SFS_MIN(len, size - off), data, pnum) < 0 || *pnum == 0 ||
	    *pnum > len) {
		*data = true; /* unknown: treat as data, which is always correct */
		*pnum = len;
	}
	return 0;
}

void fetch_prefetch(struct fetch_source *s, uint64_t off, uint64_t len)
{
	uint64_t size = fetch_size(s);

	if (s->ops->prefetch && off < size)
		s->ops->prefetch(s, off, SFS_MIN(len, size - off));
}

void fetch_set_thread_class(enum fetch_class c)
{
	fetch_thread_class = c == FETCH_CLASS_JOB ? FETCH_CLASS_JOB : FETCH_CLASS_GUEST;
}

enum fetch_class fetch_get_thread_class(void)
{
	return fetch_thread_class;
}

unsigned fetch_guest_inflight(void)
{
	return atomic_load_explicit(&fetch_guest_net_reads, memory_order_relaxed);
}

int fetch_add_mirror(struct fetch_source *s, const char *url)
{
	char *shown;

	if (s->ops->add_mirror)
		return s->ops->add_mirror(s, url);
	shown = fetch_display_uri(s->uri);
	sfs_error("%s: mirrors are for http(s) sources, not %s ones", shown ? shown : "source",
		  s->ops->scheme);
	free(shown);
	return -EOPNOTSUPP;
}

unsigned fetch_get_mirrors(struct fetch_source *s, struct fetch_mirror *out, unsigned max)
{
	return s->ops->mirrors ? s->ops->mirrors(s, out, max) : 0;
}

const char *fetch_mirror_state_name(enum fetch_mirror_state st)
{
	switch (st) {
	case FETCH_MIRROR_UP:
		return "up";
	case FETCH_MIRROR_DOWN:
		return "down";
	case FETCH_MIRROR_REFUSED:
		return "refused";
	}
	return "?";
}

static void fetch_net_clear(struct fetch_net_stats *out)
{
	memset(out, 0, sizeof(*out));
	out->latency_p50_s = out->latency_p99_s = out->rtt_s = out->rate_bytes_per_s = NAN;
	out->xfer_rate_bytes_per_s = NAN;
}

int fetch_net_stats(struct fetch_source *s, struct fetch_net_stats *out)
{
	fetch_net_clear(out);
	if (!s->ops->network || !s->ops->net_stats)
		return -ENOTSUP;
	s->ops->net_stats(s, out);
	return 0;
}

/* Merge two figures of which either may be NAN ("unknown"): the larger,
 * the smaller or the sum of those known. */
static double fetch_net_max(double a, double b)
{
	if (isnan(a))
		return b;
	return isnan(b) || a > b ? a : b;
}

static double fetch_net_min(double a, double b)
{
	if (isnan(a))
		return b;
	return isnan(b) || a < b ? a : b;
}

static double fetch_net_sum(double a, double b)
{
	if (isnan(a))
		return b;
	return isnan(b) ? a : a + b;
}

void fetch_net_totals(struct fetch_net_stats *out)
{
	fetch_net_clear(out);
	for (size_t i = 0; i < FETCH_NSCHEMES; i++) {
		const struct fetch_ops *ops = fetch_schemes[i].ops;
		struct fetch_net_stats k;
		bool seen = false;

		/* Several schemes share one kind ("http", "https"): once each. */
		for (size_t j = 0; j < i; j++)
			seen |= fetch_schemes[j].ops == ops;
		if (seen || !ops->net_totals)
			continue;
		fetch_net_clear(&k);
		ops->net_totals(&k);
		/* Counters add up. Only one kind is on the network today; were
		 * there two, the worst percentile and the nearest server's RTT
		 * are the figures that stay meaningful when merged. */
		for (int c = 0; c < FETCH_NCLASSES; c++) {
			out->in_flight[c] += k.in_flight[c];
			out->waiting[c] += k.waiting[c];
			out->bytes[c] += k.bytes[c];
		}
		out->requests += k.requests;
		out->retries += k.retries;
		out->stalls += k.stalls;
		out->errors += k.errors;
		out->connections += k.connections;
		out->latency_count += k.latency_count;
		out->latency_sum_s += k.latency_sum_s;
		out->latency_p50_s = fetch_net_max(out->latency_p50_s, k.latency_p50_s);
		out->latency_p99_s = fetch_net_max(out->latency_p99_s, k.latency_p99_s);
		out->rtt_s = fetch_net_min(out->rtt_s, k.rtt_s);
		out->rate_bytes_per_s = fetch_net_sum(out->rate_bytes_per_s, k.rate_bytes_per_s);
		out->xfer_rate_bytes_per_s =
		    fetch_net_max(out->xfer_rate_bytes_per_s, k.xfer_rate_bytes_per_s);
	}
}
