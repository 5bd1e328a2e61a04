/* streamfs: NBD byte source over libnbd ("nbd://", "nbds://", "nbd+unix://",
 * "nbds+unix://", and QEMU's alias "nbd+tcp://").
 *
 * Notes on the design
 *
 * URIs. The backing name is handed to libnbd's nbd_aio_connect_uri() as is
 * (NBD URI spec, the forms QEMU writes: "nbd://HOST[:PORT]/EXPORT",
 * "nbd+unix:///EXPORT?socket=PATH"; "nbds" asks for TLS, with the query keys
 * tls-certificates=DIR, tls-psk-file=FILE, tls-verify-peer=false). Only
 * "nbd+tcp", which libnbd does not know, is rewritten to "nbd". libnbd does
 * the handshake, structured replies, TLS and multi-conn: nothing of the
 * protocol is written here. The source is read-only.
 *
 * Connections and parallelism. One connection per server is always safe; the
 * server says whether more are (NBD_FLAG_CAN_MULTI_CONN: a consistent view
 * from every connection). So a source has nconns connections: pool_size
 * (http_pool, default 4) when the server offers multi-conn, else 1. qemu-nbd
 * (7.2, -r) does not offer it, and by default serves one client at a time:
 * a second connection would wait in its listen queue forever. Either way
 * every connection carries several requests in flight through libnbd's AIO
 * API: a pread is cut into pieces of at most NBDSRC_PIECE_SIZE (and the
 * server's maximum block size), all submitted at once, spread over the
 * connections that are up, least loaded first. Serialising on one handle
 * would cost one round trip per piece, which is what the stream job's
 * lanes exist to avoid.
 *
 * Each connection has an I/O thread that owns its handle: it connects
 * (nbd_aio_connect_uri under the connect deadline), polls the socket together
 * with a wake-up pipe (the AIO API's direction changes when another thread
 * queues a command), runs libnbd's state machine (nbd_aio_notify_read/
 * write), enforces the stall bound and tears the connection down. Callers
 * queue commands with a completion callback and sleep on the condition
 * variable until their request is done: libnbd's synchronous calls hold the
 * handle lock for the whole request, so they could not overlap.
 *
 * Fork. streamfs opens the chain, then fuse_daemonize() forks: threads do
 * not survive that. So the I/O threads start with the first request, in the
 * process that makes it (nbdsrc_threads). A raw backing is not read before
 * the fork, and the daemon starts them over the connection made at open. A
 * qcow2 backing is (its header): the parent's threads ran, and may still
 * poll their sockets until the parent exits, so the child takes none of
 * those connections over: it closes its copies of their sockets (a server
 * that serves one client at a time, as qemu-nbd does by default, then sees
 * them go when the parent exits), leaves libnbd's memory of them alone, and
 * connects anew.
 *
 * Faults and the time bound. libnbd has no per-request timeout; the I/O
 * thread keeps one: a connection with requests in flight on which nothing
 * moves (no byte read or written) for io_timeout seconds (http_timeout,
 * default 30) is stalled: it is closed, which fails its requests. A lost
 * connection (server killed or restarted, socket reset) fails its requests
 * the same way. Failed requests are retried with exponential backoff
 * (NBDSRC_BACKOFF_BASE_MS doubling, capped at NBDSRC_BACKOFF_MAX_MS, plus jitter)
 * on a connection made anew: a connection that is down is reconnected when
 * a request needs it (and, for the extra connections of multi-conn, in the
 * background once its backoff has passed), never in a loop of its own.
 * `retries` (http_retries, default 5) counts attempts; an attempt is: wait
 * for a connection (a connect is bounded by connect_timeout, 10 s), then
 * the request (bounded by the stall timeout). So a dead or stalled server
 * fails one request in at most
 *	retries * (connect_timeout + io_timeout) + (retries - 1) * NBDSRC_BACKOFF_MAX_MS
 * (defaults: 5 * (10 + 30) s + 4 * 8 s = 232 s); a server that refuses
 * connections (stopped: the socket is gone or nobody listens) fails it after
 * the backoffs alone, 0.5 + 1 + 2 + 4 s = 7.5 s (+ up to 25% jitter). A
 * server back within that window (restarted on the same socket or port) is
 * invisible to the caller. A server that keeps sending, however slowly, is
 * not a stall. After the retries every failure is -EIO (the guest sees an
 * I/O error, never wrong bytes); the message names the server, the range and
 * the last reason. Error replies from the server are retried too, except
 * those that cannot change (EINVAL, EPERM, EROFS, ENOSPC, EOVERFLOW,
 * ENOTSUP).
 *
 * Consistency. The export's size is learnt at open and checked on every
 * reconnect: a server that comes back with another size serves another
 * image, so the source becomes "changed" and every later read fails with
 * -EIO (logged once); old and new data are never mixed.
 *
 * Holes. The base:allocation meta context is asked for on every connection;
 * when the server has it, extent() answers from NBD block status: a run
 * flagged NBD_STATE_ZERO reads as zeros and is a hole to the layers above
 * (raw.c maps it EXT_ZERO, so copy-on-read and the stream job skip it and
 * it is never transferred); NBD_STATE_HOLE alone does not promise zeros and
 * counts as data. One block-status request covers up to NBDSRC_STATUS_MAX bytes
 * from the asked offset, and the reply (up to NBDSRC_EXT_CACHE runs) is
 * remembered: the stream job and copy-on-read ask about consecutive runs,
 * and the export is read-only. Without the context, extent() says -ENOTSUP
 * and fetch_extent() answers "all data".
 *
 * NOTES ON THE THREAD MODEL
 * pread and extent are called concurrently from many threads. nbdsrc_priv.lock
 * protects the connection table (state, handle, in-flight request lists,
 * counters), every request's done/err fields, the block-status cache and
 * quit; nbdsrc_priv.cond (broadcast) signals request completion, connection
 * state changes and quit. No libnbd function is ever called with the lock
 * held: libnbd calls the completion callback with its handle lock held, and
 * the callback takes ours. A handle is used by callers only while its
 * connection is UP, and each caller counts itself in `users` around its
 * nbd_aio_* call; only the connection's I/O thread closes the handle, after
 * marking it DOWN and waiting for users to drop to 0. nbd_close() releases
 * every buffer of the requests in flight, so a caller whose request failed
 * that way may reuse its buffer at once. Settings from open (uri, size,
 * counts, timeouts) are read-only afterwards; `changed` is atomic, sticky.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include <libnbd.h>

#include "fetch.h"
#include "util.h"

#define NBDSRC_DEFAULT_CONNS	       4
#define NBDSRC_MAX_CONNS	       16
#define NBDSRC_DEFAULT_CONNECT_TIMEOUT 10 /* in seconds */
#define NBDSRC_DEFAULT_IO_TIMEOUT      30 /* in seconds: no progress for this long = stalled */
#define NBDSRC_DEFAULT_ATTEMPTS	       5
#define NBDSRC_BACKOFF_BASE_MS	       500	  /* first retry delay, doubled each time */
#define NBDSRC_BACKOFF_MAX_MS	       8000	  /* cap on the exponential backoff */
#define NBDSRC_PIECE_SIZE	       (2u << 20) /* in bytes: largest read request */
#define NBDSRC_STACK_PIECES	       8	  /* pieces of a pread kept on the stack */
#define NBDSRC_STATUS_MAX	       (1u << 30) /* in bytes asked per block-status request */
#define NBDSRC_EXT_CACHE	       64	  /* runs remembered from a block-status reply */

struct nbdsrc_priv;
struct nbdsrc_conn;

enum nbdsrc_req_kind { NBDSRC_REQ_READ, NBDSRC_REQ_STATUS };

/* One NBD command; owned by the thread that runs it (nbdsrc_run). */
struct nbdsrc_req {
	struct nbdsrc_priv *p;
	enum nbdsrc_req_kind kind;
	void *buf; /* READ: destination of len bytes */
	size_t len;
	uint64_t off;
	/* Protected by p->lock while submitted. */
	struct nbdsrc_conn *c;		/* the connection it is in flight on */
	struct nbdsrc_req *prev, *next; /* c->reqs */
	bool done, ok, transient;	/* ok: finished without error, never resent */
	int err;			/* -errno of the last attempt */
	char why[160];			/* its reason, for the final message */
	/* STATUS: runs from the reply, filled by nbdsrc_extent_cb before done. */
	unsigned ext_n;
	uint64_t ext_end[NBDSRC_EXT_CACHE];
	bool ext_data[NBDSRC_EXT_CACHE];
};

enum nbdsrc_conn_state {
	NBDSRC_CONN_DOWN,	/* no handle; connected again on demand (nbdsrc_kick) */
	NBDSRC_CONN_CONNECTING, /* the I/O thread is connecting */
	NBDSRC_CONN_UP,		/* handle ready for commands */
};

struct nbdsrc_conn {
	struct nbdsrc_priv *p;
	pthread_t thread;
	bool thread_started;
	int wake[2]; /* pipe: wakes the I/O thread's poll */
	/* Protected by p->lock. */
	enum nbdsrc_conn_state state;
	struct nbd_handle *h; /* while UP; closed only by the I/O thread */
	/* h's socket, recorded before h is published: a forked child closes it
	 * without calling libnbd on h, whose lock a parent thread may have held
	 * at the fork (nbd_aio_get_fd there hung the child). -1: none. */
	int fd;
	unsigned users; /* callers inside an nbd_aio_* call on h */
	unsigned inflight;
	struct nbdsrc_req *reqs;  /* in flight on h */
	unsigned fails;		  /* consecutive failed connects */
	uint64_t retry_ns;	  /* DOWN: not reconnected in the background before */
	_Atomic uint64_t last_ns; /* last progress on the socket (stall clock) */
};

struct nbdsrc_priv {
	/* Set by open, read-only afterwards. */
	char *uri;     /* given to libnbd */
	char *display; /* shown in messages */
	uint64_t size;
	bool multi_conn, can_status;
	size_t piece; /* largest read request, in bytes */
	unsigned nconns, attempts;
	long connect_timeout, io_timeout; /* in seconds */
	int verbose_level;		  /* of per-source messages; -1: none */
	struct nbdsrc_conn *conns;
	atomic_int pid; /* process running the I/O threads, 0: none yet; written
			 * under nbdsrc_start_lock */

	pthread_mutex_t lock;
	pthread_cond_t cond;
	bool lock_init;
	atomic_bool quit;   /* written under lock; read without by connects */
	bool degraded;	    /* a connection was lost, none came back yet; lock */
	int last_err;	    /* last failed connect; lock */
	char last_why[160]; /* its reason; lock */
	unsigned rr;	    /* round robin among equally loaded connections; lock */
	uint64_t ext_start; /* block-status cache: runs from ext_start; lock */
	unsigned ext_n;	    /* lock */
	uint64_t ext_end[NBDSRC_EXT_CACHE];
	bool ext_data[NBDSRC_EXT_CACHE];

	atomic_bool changed; /* sticky: the export changed (size) */
	_Atomic uint64_t requests, retries, reconnects;
};

/* Serialises the start of I/O threads (nbdsrc_threads). Global, not in
 * nbdsrc_priv: after a fork the child cannot trust the parent's locks. */
static pthread_mutex_t nbdsrc_start_lock = PTHREAD_MUTEX_INITIALIZER;

/* ---- Small helpers ---- */

static void nbdsrc_sleep_ms(long ms)
{
	struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};

	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

/* libnbd's last error in this thread, for a message. */
static void nbdsrc_why(char *why, size_t n)
{
	const char *e = nbd_get_error();

	snprintf(why, n, "%s", e && e[0] ? e : "unknown libnbd error");
}

/* Can a failure with this errno go away by itself (retry)? */
static bool nbdsrc_err_transient(int err)
{
	switch (err) {
	case EINVAL:
	case EPERM:
	case EACCES:
	case EROFS:
	case ENOSPC:
	case EOVERFLOW:
	case ENOTSUP:
	case EFBIG:
	case ERANGE:
		return false;
	default:
		return true;
	}
}

/* The shown form of uri: fetch_display_uri() (userinfo and query values
 * masked), but the socket= path stays visible: it names the server, and a
 * path is no secret. */
static char *nbdsrc_display_uri(const char *uri)
{
	const char *q = strchr(uri, '?'), *sock = NULL, *mark;
	char *d = fetch_display_uri(uri), *out;
	size_t vlen;

	/* The query's keys, each after '?' or '&', up to the fragment. */
	for (const char *k = q; k && *k && *k != '#'; k = strpbrk(k + 1, "&#")) {
		if (strncmp(k + 1, "socket=", 7) == 0) {
			sock = k + 8;
			break;
		}
	}
	mark = d ? strstr(d, "socket=***") : NULL;
	if (!sock || !mark)
		return d;
	vlen = strcspn(sock, "&#");
	out = malloc(strlen(d) + vlen + 1);
	if (!out)
		return d;
	sprintf(out, "%.*s%.*s%s", (int)(mark - d + 7), d, (int)vlen, sock, mark + 10);
	free(d);
	return out;
}

/* Has c been stalled for io_timeout? Called with p->lock held. */
static bool nbdsrc_stalled(struct nbdsrc_conn *c)
{
	uint64_t now = sfs_now_ns(), last = atomic_load(&c->last_ns);

	return c->inflight && now > last &&
	       now - last >= (uint64_t)c->p->io_timeout * 1000000000ULL;
}

/* ---- Connections ---- */

static void nbdsrc_wake(struct nbdsrc_conn *c)
{
	ssize_t n = write(c->wake[1], "w", 1);

	(void)n; /* a full pipe is awake already */
}

static void nbdsrc_drain(int fd)
{
	char buf[64];

	while (read(fd, buf, sizeof(buf)) > 0)
		;
}

/* Poll h's socket in the direction libnbd wants, and wake (if >= 0), for up
 * to timeout ms; then run the state machine. *progress is set when bytes
 * could move. Returns -1 on a libnbd error (the connection is dead). */
static int nbdsrc_poll_once(struct nbd_handle *h, int wake, int timeout, bool *progress)
{
	struct pollfd pfd[2];
	unsigned dir = nbd_aio_get_direction(h);
	int fd = nbd_aio_get_fd(h);

	*progress = false;
	if (fd < 0)
		return -1;
	pfd[0] = (struct pollfd){.fd = fd};
	if (dir & LIBNBD_AIO_DIRECTION_READ)
		pfd[0].events |= POLLIN;
	if (dir & LIBNBD_AIO_DIRECTION_WRITE)
		pfd[0].events |= POLLOUT;
	pfd[1] = (struct pollfd){.fd = wake, .events = POLLIN};
	if (poll(pfd, 2, timeout) < 0)
		return errno == EINTR ? 0 : -1;
	if (wake >= 0 && (pfd[1].revents & POLLIN))
		nbdsrc_drain(wake);
	/* One notification at a time: the first may change what libnbd
	 * waits for. POLLHUP/POLLERR are reported to the side it waits on,
	 * which then sees the end of the connection. */
	if ((dir & LIBNBD_AIO_DIRECTION_READ) && (pfd[0].revents & (POLLIN | POLLHUP | POLLERR))) {
		*progress = true;
		return nbd_aio_notify_read(h);
	}
	if ((dir & LIBNBD_AIO_DIRECTION_WRITE) &&
	    (pfd[0].revents & (POLLOUT | POLLHUP | POLLERR))) {
		*progress = true;
		return nbd_aio_notify_write(h);
	}
	return 0;
}

/* Connect a new handle to p->uri within connect_timeout; wake (>= 0) aborts
 * it at close. Checks the export's size against p->size when known. Returns
 * 0 and *out, or -errno and the reason in why. */
static int nbdsrc_connect_one(struct nbdsrc_priv *p, int wake, struct nbd_handle **out, char *why,
			      size_t whylen)
{
	uint64_t deadline = sfs_now_ns() + (uint64_t)p->connect_timeout * 1000000000ULL;
	struct nbd_handle *h = nbd_create();
	int64_t size;
	bool progress;
	int r;

	if (!h) {
		nbdsrc_why(why, whylen);
		return -ENOMEM;
	}
	/* The URI comes from the user or an image header: its tls-psk-file=
	 * is a key file the user named, read by libnbd for the handshake. */
	if (nbd_add_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION) < 0 ||
	    nbd_set_uri_allow_local_file(h, true) < 0 || nbd_aio_connect_uri(h, p->uri) < 0)
		goto fail;
	while (!nbd_aio_is_ready(h)) {
		uint64_t now = sfs_now_ns();

		if (nbd_aio_is_dead(h) || nbd_aio_is_closed(h))
			goto fail;
		if (atomic_load(&p->quit)) {
			snprintf(why, whylen, "closing");
			r = -ESHUTDOWN;
			goto out;
		}
		if (now >= deadline) {
			snprintf(why, whylen, "no connection after %ld s", p->connect_timeout);
			r = -ETIMEDOUT;
			goto out;
		}
		if (nbdsrc_poll_once(h, wake, (int)SFS_MIN((deadline - now) / 1000000 + 1, 1000),
				     &progress) < 0)
			goto fail;
	}
	size = nbd_get_size(h);
	if (size < 0)
		goto fail;
	if (p->size != UINT64_MAX && (uint64_t)size != p->size) {
		snprintf(why, whylen, "the export's size changed from %llu to %llu bytes",
			 (unsigned long long)p->size, (unsigned long long)size);
		if (!atomic_exchange(&p->changed, true))
			sfs_error("%s: %s: it is another image now; failing every read", p->display,
				  why);
		r = -EIO;
		goto out;
	}
	*out = h;
	return 0;
fail:
	nbdsrc_why(why, whylen);
	r = nbd_get_errno() ? -nbd_get_errno() : -EIO;
out:
	nbd_close(h);
	return r;
}

static bool nbdsrc_any_state(struct nbdsrc_priv *p, enum nbdsrc_conn_state st)
{
	for (unsigned i = 0; i < p->nconns; i++)
		if (p->conns[i].state == st)
			return true;
	return false;
}

/* Ask c's I/O thread to connect it. Called with p->lock held. */
static void nbdsrc_kick(struct nbdsrc_conn *c)
{
	if (c->state == NBDSRC_CONN_DOWN && c->thread_started && !atomic_load(&c->p->quit)) {
		c->state = NBDSRC_CONN_CONNECTING;
		pthread_cond_broadcast(&c->p->cond);
	}
}

/* Finish a request with err (0: success). Called with p->lock held. */
static void nbdsrc_req_finish(struct nbdsrc_req *rq, int err, bool transient, const char *why)
{
	struct nbdsrc_conn *c = rq->c;

	if (rq->done)
		return;
	if (c) {
		if (rq->prev)
			rq->prev->next = rq->next;
		else
			c->reqs = rq->next;
		if (rq->next)
			rq->next->prev = rq->prev;
		c->inflight--;
		rq->c = NULL;
	}
	rq->prev = rq->next = NULL;
	rq->err = err;
	rq->ok = err == 0;
	rq->transient = transient;
	if (why)
		snprintf(rq->why, sizeof(rq->why), "%s", why);
	rq->done = true;
	pthread_cond_broadcast(&rq->p->cond);
}

/* Close c's handle and fail what is in flight on it with err. Called by c's
 * I/O thread with p->lock held; drops it around nbd_close(). */
static void nbdsrc_conn_down(struct nbdsrc_conn *c, int err, const char *why)
{
	struct nbdsrc_priv *p = c->p;
	struct nbd_handle *h = c->h;

	c->state = NBDSRC_CONN_DOWN;
	c->h = NULL;
	c->fd = -1;
	c->retry_ns = 0;
	while (c->users)
		pthread_cond_wait(&p->cond, &p->lock);
	pthread_mutex_unlock(&p->lock);
	nbd_close(h); /* libnbd lets go of every buffer of c's requests */
	pthread_mutex_lock(&p->lock);
	while (c->reqs)
		nbdsrc_req_finish(c->reqs, err, true, why);
	if (!p->degraded && !atomic_load(&p->quit)) {
		p->degraded = true;
		sfs_warn("%s: connection lost (%s); reconnecting", p->display, why);
	}
	pthread_cond_broadcast(&p->cond);
}

/* Record the end of a connect of c. Called with p->lock held. */
static void nbdsrc_conn_connected(struct nbdsrc_conn *c, int r, struct nbd_handle *h,
				  const char *why)
{
	struct nbdsrc_priv *p = c->p;

	if (r == 0 && atomic_load(&p->quit)) {
		pthread_mutex_unlock(&p->lock);
		nbd_close(h);
		pthread_mutex_lock(&p->lock);
		r = -ESHUTDOWN;
		why = "closing"; /* a successful connect left it unset */
	}
	if (r == 0) {
		c->fd = nbd_aio_get_fd(h);
		c->h = h;
		c->state = NBDSRC_CONN_UP;
		c->fails = 0;
		atomic_store(&c->last_ns, sfs_now_ns());
		if (p->degraded) {
			p->degraded = false;
			atomic_fetch_add(&p->reconnects, 1);
			sfs_warn("%s: reconnected", p->display);
		}
	} else {
		long delay = NBDSRC_BACKOFF_BASE_MS << SFS_MIN(c->fails, 16u);

		c->state = NBDSRC_CONN_DOWN;
		c->fails++;
		c->retry_ns = sfs_now_ns() +
			      (uint64_t)SFS_MIN(delay, (long)NBDSRC_BACKOFF_MAX_MS) * 1000000ULL;
		p->last_err = r;
		snprintf(p->last_why, sizeof(p->last_why), "%s", why);
		if (p->verbose_level >= 0)
			sfs_log(p->verbose_level, "%s: connect failed: %s", p->display, why);
	}
	pthread_cond_broadcast(&p->cond);
}

/* The I/O thread of one connection (see the top of the file). */
static void *nbdsrc_conn_thread(void *opaque)
{
	struct nbdsrc_conn *c = opaque;
	struct nbdsrc_priv *p = c->p;
	char why[160] = "";

	pthread_mutex_lock(&p->lock);
	while (!atomic_load(&p->quit)) {
		struct nbd_handle *h;
		bool progress, dead;
		uint64_t now, last;
		int timeout = -1, r;

		if (c->state == NBDSRC_CONN_DOWN) {
			pthread_cond_wait(&p->cond, &p->lock);
			continue;
		}
		if (c->state == NBDSRC_CONN_CONNECTING) {
			pthread_mutex_unlock(&p->lock);
			h = NULL;
			r = nbdsrc_connect_one(p, c->wake[0], &h, why, sizeof(why));
			pthread_mutex_lock(&p->lock);
			nbdsrc_conn_connected(c, r, h, why);
			continue;
		}
		h = c->h;
		if (c->inflight) {
			now = sfs_now_ns();
			last = atomic_load(&c->last_ns) + (uint64_t)p->io_timeout * 1000000000ULL;
			timeout = last > now ? (int)((last - now) / 1000000 + 1) : 0;
		}
		pthread_mutex_unlock(&p->lock);
		r = nbdsrc_poll_once(h, c->wake[0], timeout, &progress);
		if (r < 0)
			nbdsrc_why(why, sizeof(why));
		if (progress)
			atomic_store(&c->last_ns, sfs_now_ns());
		dead = r < 0 || nbd_aio_is_dead(h) || nbd_aio_is_closed(h);
		if (dead && r >= 0)
			snprintf(why, sizeof(why), "the server closed the connection");
		pthread_mutex_lock(&p->lock);
		if (dead) {
			nbdsrc_conn_down(c, -ECONNRESET, why);
		} else if (nbdsrc_stalled(c)) {
			snprintf(why, sizeof(why), "no reply for %ld s (stalled)", p->io_timeout);
			nbdsrc_conn_down(c, -ETIMEDOUT, why);
		}
	}
	if (c->state == NBDSRC_CONN_UP)
		nbdsrc_conn_down(c, -ESHUTDOWN, "closing");
	pthread_mutex_unlock(&p->lock);
	return NULL;
}

/* ---- Requests ---- */

static int nbdsrc_complete_cb(void *opaque, int *error)
{
	struct nbdsrc_req *rq = opaque;
	struct nbdsrc_priv *p = rq->p;
	char why[96];

	pthread_mutex_lock(&p->lock);
	if (rq->c)
		atomic_store(&rq->c->last_ns, sfs_now_ns());
	if (*error)
		snprintf(why, sizeof(why), "server error: %s", strerror(*error));
	nbdsrc_req_finish(rq, *error ? -*error : 0, nbdsrc_err_transient(*error),
			  *error ? why : NULL);
	pthread_mutex_unlock(&p->lock);
	return 1; /* retire the command */
}

/* Collect the base:allocation runs of a block-status reply into rq (the
 * lock orders these writes before done is read). */
static int nbdsrc_extent_cb(void *opaque, const char *context, uint64_t off, uint32_t *entries,
			    size_t n, int *error)
{
	struct nbdsrc_req *rq = opaque;
	uint64_t pos = off;

	if (strcmp(context, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0 || off != rq->off || rq->ext_n)
		return 0;
	for (size_t i = 0; i + 1 < n && entries[i]; i += 2) {
		bool data = !(entries[i + 1] & LIBNBD_STATE_ZERO);

		pos += entries[i];
		if (rq->ext_n && rq->ext_data[rq->ext_n - 1] == data) {
			rq->ext_end[rq->ext_n - 1] = pos;
			continue;
		}
		if (rq->ext_n == NBDSRC_EXT_CACHE)
			break;
		rq->ext_end[rq->ext_n] = pos;
		rq->ext_data[rq->ext_n++] = data;
	}
	return 0;
}

/* The up connection with the fewest requests in flight, or NULL. Called
 * with p->lock held. */
static struct nbdsrc_conn *nbdsrc_pick(struct nbdsrc_priv *p)
{
	struct nbdsrc_conn *best = NULL;

	for (unsigned k = 0; k < p->nconns; k++) {
		struct nbdsrc_conn *c = &p->conns[(p->rr + k) % p->nconns];

		if (c->state == NBDSRC_CONN_UP && (!best || c->inflight < best->inflight))
			best = c;
	}
	p->rr++;
	return best;
}

/* Queue rq on the least loaded connection that is up. On failure rq is done
 * with an error. */
static void nbdsrc_submit(struct nbdsrc_priv *p, struct nbdsrc_req *rq)
{
	nbd_completion_callback done = {.callback = nbdsrc_complete_cb, .user_data = rq};
	struct nbd_handle *h;
	struct nbdsrc_conn *c;
	int64_t cookie;
	char why[160];
	int err = 0;

	pthread_mutex_lock(&p->lock);
	rq->done = false;
	rq->ext_n = 0;
	c = nbdsrc_pick(p);
	if (!c) {
		nbdsrc_req_finish(rq, -ENOTCONN, true, "not connected");
		pthread_mutex_unlock(&p->lock);
		return;
	}
	rq->c = c;
	rq->prev = NULL;
	rq->next = c->reqs;
	if (c->reqs)
		c->reqs->prev = rq;
	c->reqs = rq;
	if (c->inflight++ == 0)
		atomic_store(&c->last_ns, sfs_now_ns());
	c->users++;
	h = c->h;
	pthread_mutex_unlock(&p->lock);

	atomic_fetch_add(&p->requests, 1);
	if (rq->kind == NBDSRC_REQ_READ)
		cookie = nbd_aio_pread(h, rq->buf, rq->len, rq->off, done, 0);
	else
		cookie = nbd_aio_block_status(
		    h, rq->len, rq->off,
		    (nbd_extent_callback){.callback = nbdsrc_extent_cb, .user_data = rq}, done, 0);
	if (cookie < 0) {
		err = nbd_get_errno() ? nbd_get_errno() : EIO;
		nbdsrc_why(why, sizeof(why));
		/* A connection that died under us (its I/O thread has not
		 * seen it yet) is refused with EINVAL, "invalid state":
		 * that is a lost connection, to retry on a new one. */
		if (nbd_aio_is_dead(h) || nbd_aio_is_closed(h))
			err = ENOTCONN;
	}

	pthread_mutex_lock(&p->lock);
	if (--c->users == 0)
		pthread_cond_broadcast(&p->cond);
	if (cookie < 0)
		nbdsrc_req_finish(rq, -err, nbdsrc_err_transient(err), why);
	pthread_mutex_unlock(&p->lock);
	nbdsrc_wake(c); /* libnbd may now want to write: recompute the direction */
}

/* Is some connection up, or can one be made? Connects the connections that
 * are down; background ones (while another is up) once their backoff is
 * over. Returns 0 or the last connect error (reason in why). Called with
 * p->lock held. */
static int nbdsrc_wait_up(struct nbdsrc_priv *p, char *why, size_t whylen)
{
	uint64_t now = sfs_now_ns();

	if (nbdsrc_any_state(p, NBDSRC_CONN_UP)) {
		for (unsigned i = 0; i < p->nconns; i++)
			if (p->conns[i].state == NBDSRC_CONN_DOWN && now >= p->conns[i].retry_ns)
				nbdsrc_kick(&p->conns[i]);
		return 0;
	}
	for (unsigned i = 0; i < p->nconns; i++)
		nbdsrc_kick(&p->conns[i]);
	while (!nbdsrc_any_state(p, NBDSRC_CONN_UP)) {
		if (!nbdsrc_any_state(p, NBDSRC_CONN_CONNECTING) || atomic_load(&p->quit)) {
			snprintf(why, whylen, "cannot connect: %.140s", p->last_why);
			return p->last_err ? p->last_err : -ENOTCONN;
		}
		pthread_cond_wait(&p->cond, &p->lock);
	}
	return 0;
}

/* Start the I/O threads in process me (see "Fork" at the top). Called with
 * nbdsrc_start_lock held. A connection whose thread cannot start stays down
 * and is never used. */
static int nbdsrc_start_threads(struct nbdsrc_priv *p, int me)
{
	unsigned started = 0;

	if (atomic_load(&p->pid) != 0) {
		/* A child: no thread of ours is left, no lock can be trusted. */
		pthread_mutex_init(&p->lock, NULL);
		pthread_cond_init(&p->cond, NULL);
		p->degraded = false;
		for (unsigned i = 0; i < p->nconns; i++) {
			struct nbdsrc_conn *c = &p->conns[i];

			if (c->h) {
				if (c->fd >= 0)
					close(c->fd);
				c->h = NULL; /* leaked: freeing it would touch the socket */
			}
			c->fd = -1;
			if (c->wake[0] >= 0)
				close(c->wake[0]);
			if (c->wake[1] >= 0)
				close(c->wake[1]);
			c->wake[0] = c->wake[1] = -1;
			c->state = NBDSRC_CONN_DOWN;
			c->reqs = NULL;
			c->inflight = c->users = c->fails = 0;
			c->retry_ns = 0;
			c->thread_started = false;
		}
	}
	for (unsigned i = 0; i < p->nconns; i++) {
		struct nbdsrc_conn *c = &p->conns[i];
		int r = 0;

		if (pipe2(c->wake, O_CLOEXEC | O_NONBLOCK) < 0)
			r = -errno;
		else
			r = -pthread_create(&c->thread, NULL, nbdsrc_conn_thread, c);
		if (r < 0) {
			sfs_warn("%s: cannot start the thread of connection %u: %s", p->display, i,
				 strerror(-r));
			if (c->h) {
				nbd_close(c->h);
				c->h = NULL;
				c->fd = -1;
			}
			c->state = NBDSRC_CONN_DOWN;
			continue;
		}
		c->thread_started = true;
		started++;
	}
	atomic_store(&p->pid, me);
	return started ? 0 : -EAGAIN;
}

/* Make sure this process runs the I/O threads. */
static int nbdsrc_threads(struct nbdsrc_priv *p)
{
	int me = (int)getpid(), r = 0;

	if (atomic_load(&p->pid) == me)
		return 0;
	pthread_mutex_lock(&nbdsrc_start_lock);
	if (atomic_load(&p->pid) != me)
		r = nbdsrc_start_threads(p, me);
	pthread_mutex_unlock(&nbdsrc_start_lock);
	return r;
}

/* Run the n requests rqs to completion with retries (see the top of the
 * file). Logs the final failure once and returns -EIO; 0 when all are ok. */
static int nbdsrc_run(struct nbdsrc_priv *p, struct nbdsrc_req *rqs, unsigned n, const char *what)
{
	struct nbdsrc_req *bad = NULL;
	unsigned attempt, i;
	char why[160];

	if (nbdsrc_threads(p) < 0) {
		sfs_error("%s: no I/O thread", p->display);
		return -EIO;
	}
	for (i = 0; i < n; i++) {
		rqs[i].p = p;
		rqs[i].ok = false;
	}
	for (attempt = 1;; attempt++) {
		bool fatal = false;
		long delay;
		int r;

		if (atomic_load(&p->changed))
			return -EIO; /* said once, when detected */
		pthread_mutex_lock(&p->lock);
		r = nbdsrc_wait_up(p, why, sizeof(why));
		pthread_mutex_unlock(&p->lock);
		for (i = 0; i < n; i++) {
			if (rqs[i].ok)
				continue;
			if (r < 0) {
				rqs[i].err = r;
				rqs[i].transient = r != -EIO || !atomic_load(&p->changed);
				snprintf(rqs[i].why, sizeof(rqs[i].why), "%s", why);
			} else {
				nbdsrc_submit(p, &rqs[i]);
			}
		}
		bad = NULL;
		pthread_mutex_lock(&p->lock);
		for (i = 0; i < n; i++) {
			if (rqs[i].ok)
				continue;
			while (r == 0 && !rqs[i].done)
				pthread_cond_wait(&p->cond, &p->lock);
			if (!rqs[i].ok) {
				bad = bad ? bad : &rqs[i];
				fatal |= !rqs[i].transient;
			}
		}
		pthread_mutex_unlock(&p->lock);
		if (!bad)
			return 0;
		if (fatal || attempt >= p->attempts || atomic_load(&p->changed))
			break;
		delay = NBDSRC_BACKOFF_BASE_MS << SFS_MIN(attempt - 1, 16u);
		if (delay > NBDSRC_BACKOFF_MAX_MS)
			delay = NBDSRC_BACKOFF_MAX_MS;
		delay += (long)(sfs_now_ns() % (uint64_t)(delay / 4 + 1)); /* jitter */
		atomic_fetch_add(&p->retries, 1);
		sfs_info("%s: %s %llu-%llu: %s; retrying in %ld ms (attempt %u of %u)", p->display,
			 what, (unsigned long long)bad->off,
			 (unsigned long long)(bad->off + bad->len - 1), bad->why, delay,
			 attempt + 1, p->attempts);
		nbdsrc_sleep_ms(delay);
	}
	if (!atomic_load(&p->changed))
		sfs_error("%s: %s %llu-%llu: %s%s", p->display, what, (unsigned long long)bad->off,
			  (unsigned long long)(bad->off + bad->len - 1), bad->why,
			  bad->transient ? " (giving up after retries)" : "");
	return -EIO;
}

/* ---- Operations ---- */

static int nbdsrc_pread(struct fetch_source *s, void *buf, size_t len, uint64_t off)
{
	struct nbdsrc_priv *p = s->priv;
	struct nbdsrc_req stack[NBDSRC_STACK_PIECES], *rqs = stack;
	size_t n = SFS_DIV_ROUND_UP(len, p->piece);
	int r;

	if (atomic_load(&p->changed))
		return -EIO; /* logged when detected */
	if (n > NBDSRC_STACK_PIECES) {
		rqs = calloc(n, sizeof(*rqs));
		if (!rqs)
			return -ENOMEM;
	}
	for (size_t i = 0; i < n; i++) {
		size_t start = i * p->piece;

		memset(&rqs[i], 0, sizeof(rqs[i]));
		rqs[i].kind = NBDSRC_REQ_READ;
		rqs[i].buf = (uint8_t *)buf + start;
		rqs[i].len = SFS_MIN(p->piece, len - start);
		rqs[i].off = off + start;
	}
	r = nbdsrc_run(p, rqs, (unsigned)n, "reading bytes");
	if (rqs != stack)
		free(rqs);
	return r;
}

/* Answer from the block-status cache. Called with p->lock held. */
static bool nbdsrc_ext_lookup(struct nbdsrc_priv *p, uint64_t off, uint64_t len, bool *data,
			      uint64_t *pnum)
{
	if (off < p->ext_start)
		return false;
	for (unsigned i = 0; i < p->ext_n; i++) {
		if (off < p->ext_end[i]) {
			*data = p->ext_data[i];
			*pnum = SFS_MIN(len, p->ext_end[i] - off);
			return true;
		}
	}
	return false;
}

static int nbdsrc_extent(struct fetch_source *s, uint64_t off, uint64_t len, bool *data,
			 uint64_t *pnum)
{
	struct nbdsrc_priv *p = s->priv;
	struct nbdsrc_req rq = {.kind = NBDSRC_REQ_STATUS, .off = off};
	bool hit;
	int r;

	if (!p->can_status)
		return -ENOTSUP;
	pthread_mutex_lock(&p->lock);
	hit = nbdsrc_ext_lookup(p, off, len, data, pnum);
	pthread_mutex_unlock(&p->lock);
	if (hit)
		return 0;
	/* Ask well past len: the next questions are about what follows. */
	rq.len = SFS_MIN(p->size - off, (uint64_t)NBDSRC_STATUS_MAX);
	r = nbdsrc_run(p, &rq, 1, "block status of bytes");
	if (r < 0)
		return r;
	if (rq.ext_n == 0)
		return -EIO; /* no base:allocation reply: unknown, so data */
	pthread_mutex_lock(&p->lock);
	p->ext_start = off;
	p->ext_n = rq.ext_n;
	memcpy(p->ext_end, rq.ext_end, sizeof(p->ext_end));
	memcpy(p->ext_data, rq.ext_data, sizeof(p->ext_data));
	hit = nbdsrc_ext_lookup(p, off, len, data, pnum);
	pthread_mutex_unlock(&p->lock);
	return hit ? 0 : -EIO;
}

static void nbdsrc_close(struct fetch_source *s)
{
	struct nbdsrc_priv *p = s->priv;

	if (!p)
		return;
	if (p->conns) {
		/* Our threads, if this process runs them (not the parent's). */
		bool ours = atomic_load(&p->pid) == (int)getpid();

		pthread_mutex_lock(&p->lock);
		atomic_store(&p->quit, true);
		pthread_cond_broadcast(&p->cond);
		pthread_mutex_unlock(&p->lock);
		for (unsigned i = 0; i < p->nconns; i++) {
			struct nbdsrc_conn *c = &p->conns[i];

			if (ours && c->thread_started) {
				nbdsrc_wake(c);
				pthread_join(c->thread, NULL);
			}
			if (c->h) /* no thread of ours closed it */
				nbd_close(c->h);
			if (c->wake[0] >= 0)
				close(c->wake[0]);
			if (c->wake[1] >= 0)
				close(c->wake[1]);
		}
		free(p->conns);
	}
	if (p->verbose_level >= 0 && p->size != UINT64_MAX)
		sfs_log(p->verbose_level, "%s: %llu NBD requests, %llu retries, %llu reconnects",
			p->display, (unsigned long long)atomic_load(&p->requests),
			(unsigned long long)atomic_load(&p->retries),
			(unsigned long long)atomic_load(&p->reconnects));
	if (p->lock_init) {
		pthread_mutex_destroy(&p->lock);
		pthread_cond_destroy(&p->cond);
	}
	free(p->uri);
	free(p->display);
	memset(p, 0, sizeof(*p));
}

static int nbdsrc_open(struct fetch_source *s, int flags)
{
	struct nbdsrc_priv *p = s->priv;
	const struct fetch_options *o = fetch_get_options();
	const char *env = getenv("STREAMFS_HTTP_DEBUG");
	struct nbd_handle *h = NULL;
	char why[160];
	int64_t max;
	int r;

	p->size = UINT64_MAX; /* unknown until the first connect */
	p->display = nbdsrc_display_uri(s->uri);
	if (!p->display)
		return -ENOMEM;
	if (flags & (FETCH_RDWR | FETCH_CREATE)) {
		sfs_error("%s: NBD sources are read-only", p->display);
		r = -EROFS;
		goto fail;
	}
	/* QEMU's "nbd+tcp" is libnbd's "nbd". */
	if (strncasecmp(s->uri, "nbd+tcp:", 8) == 0)
		r = asprintf(&p->uri, "nbd:%s", s->uri + 8);
	else
		r = (p->uri = strdup(s->uri)) ? 0 : -1;
	if (r < 0) {
		p->uri = NULL;
		r = -ENOMEM;
		goto fail;
	}
	p->attempts = o->retries ? o->retries : NBDSRC_DEFAULT_ATTEMPTS;
	p->connect_timeout =
	    o->connect_timeout ? (long)o->connect_timeout : NBDSRC_DEFAULT_CONNECT_TIMEOUT;
	p->io_timeout = o->io_timeout ? (long)o->io_timeout : NBDSRC_DEFAULT_IO_TIMEOUT;
	p->verbose_level = env && strcmp(env, "1") == 0 ? SFS_LOG_WARN
			   : o->verbose			? SFS_LOG_INFO
							: -1;
	atomic_init(&p->quit, false);
	atomic_init(&p->changed, false);
	pthread_mutex_init(&p->lock, NULL);
	pthread_cond_init(&p->cond, NULL);
	p->lock_init = true;

	r = nbdsrc_connect_one(p, -1, &h, why, sizeof(why));
	if (r < 0) {
		sfs_error("%s: cannot connect: %s", p->display, why);
		goto fail;
	}
	p->size = (uint64_t)nbd_get_size(h);
	p->multi_conn = nbd_can_multi_conn(h) == 1;
	p->can_status = nbd_can_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1;
	max = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM);
	p->piece = max > 0 ? (size_t)SFS_MIN((uint64_t)max, (uint64_t)NBDSRC_PIECE_SIZE)
			   : NBDSRC_PIECE_SIZE;
	p->nconns = !p->multi_conn ? 1
		    : o->pool_size ? SFS_MIN(o->pool_size, (unsigned)NBDSRC_MAX_CONNS)
				   : NBDSRC_DEFAULT_CONNS;
	p->conns = calloc(p->nconns, sizeof(*p->conns));
	if (!p->conns) {
		nbd_close(h);
		r = -ENOMEM;
		goto fail;
	}
	for (unsigned i = 0; i < p->nconns; i++) {
		struct nbdsrc_conn *c = &p->conns[i];

		c->p = p;
		c->wake[0] = c->wake[1] = -1;
		c->fd = -1;
		/* The extra connections of multi-conn connect in the
		 * background once the threads run; reads use the first
		 * meanwhile. */
		c->state = i == 0 ? NBDSRC_CONN_UP : NBDSRC_CONN_CONNECTING;
		atomic_init(&c->last_ns, sfs_now_ns());
	}
	p->conns[0].fd = nbd_aio_get_fd(h);
	p->conns[0].h = h;
	atomic_init(&p->pid, 0); /* the threads start with the first request */
	s->size = p->size;
	if (p->verbose_level >= 0)
		sfs_log(
		    p->verbose_level,
		    "%s: %llu bytes, %u connection%s (multi-conn %s), block status %s, requests "
		    "of up to %zu bytes, %u attempts per request",
		    p->display, (unsigned long long)p->size, p->nconns, p->nconns > 1 ? "s" : "",
		    p->multi_conn ? "offered" : "not offered", p->can_status ? "yes" : "no",
		    p->piece, p->attempts);
	return 0;
fail:
	nbdsrc_close(s);
	return r;
}

const struct fetch_ops fetch_nbd_ops = {
    .scheme = "nbd",
    .network = true,
    .priv_size = sizeof(struct nbdsrc_priv),
    .open = nbdsrc_open,
    .close = nbdsrc_close,
    .pread = nbdsrc_pread,
    .pwrite = NULL,
    .flush = NULL,
    .truncate = NULL,
    .data_run = nbdsrc_extent,
};
