/* streamfs: boot-trace recording and replay (see include/prefetch.h).
 *
 * NOTES ON THE THREAD MODEL
 * - The read observer (prefetch_observe) runs on FUSE worker threads for
 *   every run of every guest read; it touches only the recorder (lock-free
 *   for repeats, see trace.h) and, for hits, an atomic counter after a
 *   binary search of an index that is immutable once pf->spans is set.
 * - Replay lanes take the next piece of the trace under pf->lock, copy it
 *   with disk_populate() without any lock of ours, and account under the
 *   lock. They never hold pf->lock across I/O.
 * - Lock order: pf->lock is a leaf (nothing is taken under it).
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fetch.h"
#include "prefetch.h"
#include "trace.h"
#include "util.h"

#define PREFETCH_PIECE (2u << 20) /* bytes per disk_populate of a long range */

/* A trace range in offset order, for the hit count: done once copied. */
struct prefetch_span {
	uint64_t off, end;
	_Atomic bool done;
};

struct prefetch {
	struct disk *d;
	struct events *ev;
	struct trace_rec *rec; /* this mount's boot, as it happens */
	char validator[512];   /* the backing's identity, for both directions */
	/* The replay. t, spans and nspans are immutable once started. */
	struct trace *t;
	struct prefetch_span *spans; /* t's ranges sorted by offset */
	_Atomic size_t nspans;	     /* published after spans is sorted */
	size_t *span_of;	     /* t->r[i] is spans[span_of[i]] */
	pthread_t lanes[PREFETCH_LANES];
	unsigned nlanes;
	pthread_mutex_t lock;
	/* Protected by lock. */
	size_t next_range;    /* next range of t to start */
	uint64_t next_off;    /* next offset inside it */
	unsigned busy;	      /* lanes copying */
	unsigned *range_left; /* pieces of each range not yet done */
	enum prefetch_state state;
	bool quit;
	uint64_t ranges_done, bytes_done, bytes_copied;
	char error[256];
	_Atomic uint64_t guest_hits;
};

const char *prefetch_state_name(enum prefetch_state s)
{
	static const char *names[] = {"none", "running", "done", "failed"};
	return (unsigned)s < sizeof(names) / sizeof(names[0]) ? names[s] : "unknown";
}

/* The span holding off, or NULL. */
static struct prefetch_span *prefetch_span_at(struct prefetch *pf, uint64_t off)
{
	size_t lo = 0, hi = atomic_load(&pf->nspans);

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (off < pf->spans[mid].off)
			hi = mid;
		else if (off >= pf->spans[mid].end)
			lo = mid + 1;
		else
			return &pf->spans[mid];
	}
	return NULL;
}

/* The disk's read observer: a miss goes into the recorder; a hit on data
 * the replay copied counts as a guest read it served. */
static void prefetch_observe(void *opaque, uint64_t off, uint64_t len, bool miss)
{
	struct prefetch *pf = opaque;
	struct prefetch_span *sp;

	/* Every first read is recorded, also of data that copy-on-read's
	 * read-ahead, the stream job or a replay had already copied: the trace
	 * is the guest's order, whatever served it. (Reads of what the guest
	 * wrote itself are recorded too; a replay skips them, as allocated.) */
	trace_rec_note(pf->rec, off, len);
	if (!miss && (sp = prefetch_span_at(pf, off)) && atomic_load(&sp->done))
		atomic_fetch_add(&pf->guest_hits, 1);
}

int prefetch_new(struct disk *d, struct events *ev, struct prefetch **out)
{
	struct prefetch *pf = calloc(1, sizeof(*pf));
	struct image *b = d->top->backing;
	int r;

	if (!pf)
		return -ENOMEM;
	pf->d = d;
	pf->ev = ev;
	pthread_mutex_init(&pf->lock, NULL);
	if (b)
		fetch_validator(b->file, pf->validator, sizeof(pf->validator));
	/* Without a backing there is nothing to record or replay. */
	if (b) {
		r = trace_rec_new(d->top->size, d->top->cluster_size, 0, &pf->rec);
		if (r < 0) {
			pthread_mutex_destroy(&pf->lock);
			free(pf);
			return r;
		}
		d->read_observer = prefetch_observe;
		d->read_observer_opaque = pf;
	}
	*out = pf;
	return 0;
}

void prefetch_free(struct prefetch *pf)
{
	if (!pf)
		return;
	pthread_mutex_lock(&pf->lock);
	pf->quit = true;
	pthread_mutex_unlock(&pf->lock);
	for (unsigned i = 0; i < pf->nlanes; i++)
		pthread_join(pf->lanes[i], NULL);
	if (pf->d->read_observer_opaque == pf) {
		pf->d->read_observer = NULL;
		pf->d->read_observer_opaque = NULL;
	}
	trace_rec_free(pf->rec);
	trace_free(pf->t);
	free(pf->spans);
	free(pf->span_of);
	free(pf->range_left);
	pthread_mutex_destroy(&pf->lock);
	free(pf);
}

int prefetch_load(const char *uri, char **text, size_t *len)
{
	struct fetch_source *s;
	uint64_t size;
	char *buf;
	int r;

	r = fetch_open(uri, FETCH_RDONLY, &s);
	if (r < 0)
		return r;
	size = fetch_size(s);
	if (size > TRACE_MAX_TEXT) {
		char *shown = fetch_display_uri(uri);

		sfs_error("%s: a trace of %llu bytes is over the limit of %u", shown ? shown : "?",
			  (unsigned long long)size, (unsigned)TRACE_MAX_TEXT);
		free(shown);
		fetch_close(s);
		return -EFBIG;
	}
	buf = malloc((size_t)size + 1);
	if (!buf) {
		fetch_close(s);
		return -ENOMEM;
	}
	r = size ? fetch_pread(s, buf, (size_t)size, 0) : 0;
	fetch_close(s);
	if (r < 0) {
		free(buf);
		return r;
	}
	buf[size] = '\0';
	*text = buf;
	*len = (size_t)size;
	return 0;
}

/* The next piece to copy, or false when none is left. Called with lock held. */
static bool prefetch_take(struct prefetch *pf, size_t *ri, uint64_t *off, uint64_t *len)
{
	const struct trace_range *rg;

	if (pf->quit || pf->state != PREFETCH_RUNNING || pf->next_range >= pf->t->n)
		return false;
	rg = &pf->t->r[pf->next_range];
	*ri = pf->next_range;
	*off = pf->next_off;
	*len = SFS_MIN((uint64_t)PREFETCH_PIECE, rg->off + rg->len - pf->next_off);
	pf->next_off += *len;
	if (pf->next_off >= rg->off + rg->len) {
		pf->next_range++;
		if (pf->next_range < pf->t->n)
			pf->next_off = pf->t->r[pf->next_range].off;
	}
	pf->busy++;
	return true;
}

static void *prefetch_lane(void *opaque)
{
	struct prefetch *pf = opaque;
	struct disk *d = pf->d;
	uint32_t cs = d->top->cluster_size;
	size_t bufsize = SFS_MAX((size_t)PREFETCH_PIECE, (size_t)cs);
	uint8_t *buf = malloc(bufsize);
	size_t ri;
	uint64_t off, len;

	/* Guest reads keep their reserved connections (fetch.h). */
	fetch_set_thread_class(FETCH_CLASS_JOB);
	pthread_mutex_lock(&pf->lock);
	if (!buf) {
		snprintf(pf->error, sizeof(pf->error), "out of memory");
		pf->state = PREFETCH_FAILED;
	}
	while (buf && prefetch_take(pf, &ri, &off, &len)) {
		uint64_t copied = 0, a = SFS_ALIGN_DOWN(off, cs);
		int r;

		pthread_mutex_unlock(&pf->lock);
		/* Trace ranges are cluster-aligned in the trace's granule, which
		 * may differ from this overlay's cluster: cover whole clusters. */
		r = disk_populate(d, NULL, a, SFS_ALIGN_UP(off + len, cs) - a, buf, bufsize,
				  &copied);
		pthread_mutex_lock(&pf->lock);
		pf->busy--;
		pf->bytes_done += len;
		pf->bytes_copied += copied;
		if (r < 0 && pf->state == PREFETCH_RUNNING) {
			/* Not fatal to the guest: it reads the backing itself.
			 * Stop here so a dead origin is not hammered. */
			snprintf(pf->error, sizeof(pf->error), "offset %llu: %s",
				 (unsigned long long)off, strerror(-r));
			pf->state = PREFETCH_FAILED;
			events_post(pf->ev, "prefetch-failed", "%s", pf->error);
			break;
		}
		if (--pf->range_left[ri] == 0) {
			pf->ranges_done++;
			atomic_store(&pf->spans[pf->span_of[ri]].done, true);
		}
		if (pf->state == PREFETCH_RUNNING && pf->busy == 0 && pf->next_range >= pf->t->n) {
			pf->state = PREFETCH_DONE;
			events_post(pf->ev, "prefetch-done", "ranges=%zu bytes=%llu copied=%llu",
				    pf->t->n, (unsigned long long)pf->bytes_done,
				    (unsigned long long)pf->bytes_copied);
		}
	}
	pthread_mutex_unlock(&pf->lock);
	free(buf);
	return NULL;
}

static int prefetch_span_cmp(const void *a, const void *b)
{
	const struct prefetch_span *x = a, *y = b;

	return x->off < y->off ? -1 : x->off > y->off;
}

/* The offset-sorted index of t's ranges and the piece counts. */
static int prefetch_index(struct prefetch *pf)
{
	struct trace *t = pf->t;

	pf->spans = calloc(t->n ? t->n : 1, sizeof(*pf->spans));
	pf->span_of = calloc(t->n ? t->n : 1, sizeof(*pf->span_of));
	pf->range_left = calloc(t->n ? t->n : 1, sizeof(*pf->range_left));
	if (!pf->spans || !pf->span_of || !pf->range_left)
		return -ENOMEM;
	for (size_t i = 0; i < t->n; i++) {
		pf->spans[i].off = t->r[i].off;
		pf->spans[i].end = t->r[i].off + t->r[i].len;
		pf->range_left[i] = (unsigned)SFS_DIV_ROUND_UP(t->r[i].len, PREFETCH_PIECE);
	}
	qsort(pf->spans, t->n, sizeof(*pf->spans), prefetch_span_cmp);
	atomic_store(&pf->nspans, t->n); /* now the observer may look */
	/* Ranges are disjoint and non-empty (trace.h), so each range's offset
	 * finds its own span. */
	for (size_t i = 0; i < t->n; i++) {
		struct prefetch_span *sp = prefetch_span_at(pf, t->r[i].off);

		if (!sp)
			return -EINVAL;
		pf->span_of[i] = (size_t)(sp - pf->spans);
	}
	return 0;
}

/* Parse text into *out and check it is a trace of d's backing. */
static int prefetch_parse(struct prefetch *pf, const char *text, size_t len, struct trace **out)
{
	struct disk *d = pf->d;
	struct trace *t = NULL;
	char err[256];
	int r;

	if (!d->top->backing) {
		sfs_error("prefetch: the overlay has no backing: nothing to prefetch");
		return -EINVAL;
	}
	if (d->read_only) {
		sfs_error("prefetch: the disk is read-only: nothing can be copied into it");
		return -EROFS;
	}
	r = trace_parse(text, len, &t, err, sizeof(err));
	if (r < 0) {
		sfs_error("prefetch: bad trace: %s", err);
		return r;
	}
	if (!trace_matches(t, d->top->size, pf->validator)) {
		sfs_error("prefetch: the trace is of another image (its size %llu, validator '%s'; "
			  "the backing's: %llu, '%s'): not used",
			  (unsigned long long)t->size, t->validator ? t->validator : "",
			  (unsigned long long)d->top->size, pf->validator);
		trace_free(t);
		return -EINVAL;
	}
	*out = t;
	return 0;
}

int prefetch_check(struct prefetch *pf, const char *text, size_t len)
{
	struct trace *t;
	int r = prefetch_parse(pf, text, len, &t);

	if (r == 0)
		trace_free(t);
	return r;
}

int prefetch_replay(struct prefetch *pf, const char *text, size_t len)
{
	struct trace *t;
	int r = prefetch_parse(pf, text, len, &t);

	if (r < 0)
		return r;
	pthread_mutex_lock(&pf->lock);
	if (pf->t) {
		pthread_mutex_unlock(&pf->lock);
		trace_free(t);
		return -EBUSY;
	}
	pf->t = t;
	r = prefetch_index(pf);
	if (r < 0) {
		pthread_mutex_unlock(&pf->lock);
		return r;
	}
	pf->next_range = 0;
	pf->next_off = t->n ? t->r[0].off : 0;
	pf->state = t->n ? PREFETCH_RUNNING : PREFETCH_DONE;
	for (unsigned i = 0; i < PREFETCH_LANES && pf->state == PREFETCH_RUNNING; i++) {
		if (pthread_create(&pf->lanes[i], NULL, prefetch_lane, pf) != 0)
			break;
		pf->nlanes++;
	}
	if (pf->state == PREFETCH_RUNNING && pf->nlanes == 0) {
		snprintf(pf->error, sizeof(pf->error), "cannot start a thread");
		pf->state = PREFETCH_FAILED;
	}
	events_post(pf->ev, "prefetch-started", "ranges=%zu", t->n);
	pthread_mutex_unlock(&pf->lock);
	return pf->state == PREFETCH_FAILED ? -EAGAIN : 0;
}

int prefetch_render_trace(struct prefetch *pf, char **buf, size_t *len)
{
	if (!pf->rec) {
		/* No backing: an empty trace of nothing. */
		*buf = strdup("");
		*len = 0;
		return *buf ? 0 : -ENOMEM;
	}
	return trace_rec_render(pf->rec, pf->validator, buf, len);
}

bool prefetch_active(struct prefetch *pf)
{
	bool r;

	if (!pf)
		return false;
	pthread_mutex_lock(&pf->lock);
	r = pf->state == PREFETCH_RUNNING;
	pthread_mutex_unlock(&pf->lock);
	return r;
}

void prefetch_get_status(struct prefetch *pf, struct prefetch_status *st)
{
	struct trace_rec_stats rs = {0};

	memset(st, 0, sizeof(*st));
	if (pf->rec)
		trace_rec_stats(pf->rec, &rs);
	pthread_mutex_lock(&pf->lock);
	st->state = pf->state;
	if (pf->t) {
		st->ranges_total = pf->t->n;
		for (size_t i = 0; i < pf->t->n; i++)
			st->bytes_total += pf->t->r[i].len;
	}
	st->ranges_done = pf->ranges_done;
	st->bytes_done = pf->bytes_done;
	st->bytes_copied = pf->bytes_copied;
	snprintf(st->error, sizeof(st->error), "%s", pf->error);
	pthread_mutex_unlock(&pf->lock);
	st->guest_reads_served = atomic_load(&pf->guest_hits);
	st->trace_ranges = rs.ranges;
	st->trace_dropped = rs.dropped;
}
