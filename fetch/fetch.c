/* streamfs: generic byte-source layer. Picks a fetch_ops by scheme, checks
 * bounds so the sources can trust their arguments, and keeps statistics.
 *
 * THREAD MODEL: stateless apart from the atomic counters in each source and
 * the process-wide options, which are set once before any source is opened.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "fetch.h"
#include "util.h"

static struct fetch_options fetch_opts;

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

static const struct fetch_ops *fetch_pick(const char *uri)
{
	if (sfs_is_url(uri))
		return &fetch_http_ops;
	if (strncmp(uri, "mem:", 4) == 0)
		return &fetch_mem_ops;
	return &fetch_file_ops;
}

int fetch_open(const char *uri, int flags, struct fetch_source **out)
{
	const struct fetch_ops *ops = fetch_pick(uri);
	struct fetch_source *s;
	char *shown;
	int r;

	if (strstr(uri, "://") && !sfs_is_url(uri) && strncmp(uri, "file://", 7) != 0) {
		shown = fetch_display_uri(uri);
		sfs_error("%s: unsupported URL scheme (only file paths, http:// and https://)",
			  shown ? shown : "URL");
		free(shown);
		return -EPROTONOSUPPORT;
	}
	if (strncmp(uri, "json:", 5) == 0) {
		/* Not shown: its options may hold a password in any form. */
		sfs_error("json: pseudo-URLs are not supported");
		return -EPROTONOSUPPORT;
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
	r = s->ops->pread(s, buf, len, off);
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

int fetch_extent(struct fetch_source *s, uint64_t off, uint64_t len, bool *data, uint64_t *pnum)
{
	uint64_t size = fetch_size(s);

	*data = true;
	*pnum = len;
	if (!s->ops->extent || off >= size)
		return 0;
	if (s->ops->extent(s, off, SFS_MIN(len, size - off), data, pnum) < 0 || *pnum == 0 ||
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
