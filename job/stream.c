/* streamfs: the background stream job (see stream.h).
 *
 * NOTES ON THE THREAD MODEL
 * - One job thread per disk; control-file writers (FUSE workers) change its
 *   wishes (pause, cancel, speed) under j->lock and signal j->cond; the job
 *   thread acts on them between chunks and acknowledges by changing state,
 *   so a caller of stream_pause() returns only once no chunk is in flight.
 * - The job never holds j->lock across I/O.
 * - Rate limit: a token bucket refilled at 'speed' bytes/s, charged with
 *   the bytes actually copied; throttled chunks are small (speed/20) so the
 *   rate is smooth and changes apply within ~50 ms.
 * - Yielding: when the guest has requests in flight or issued any since the
 *   last chunk, the job uses small chunks and sleeps as long as the chunk
 *   took (50% duty cycle), so guest requests rarely queue behind it.
 * - CPU priority follows the limit (stream_apply_priority): low while
 *   unthrottled, the daemon's own with a limit. Each of the job's threads
 *   sets its own, under lock, between chunks or flushes.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "fetch.h"
#include "prefetch.h"
#include "stream.h"
#include "util.h"

#define STREAM_CHUNK	  (8u << 20) /* bytes per chunk when the guest is idle */
#define STREAM_CHUNK_BUSY (1u << 20) /* bytes per chunk while the guest is active */
/* While the guest is active, sleep (chunk time / this) after each chunk. */
#define STREAM_BUSY_SLEEP_DIV 2
#define STREAM_FLUSH_BYTES    (256u << 20)  /* flush the overlay after this much copied */
#define STREAM_FLUSH_NS	      2000000000ull /* ... or this long */
#define STREAM_RATE_WINDOW    8		    /* rate samples kept, STREAM_RATE_NS apart */
#define STREAM_RATE_NS	      250000000ull
/* Lanes: chunks in flight at once (see "Depth" below). */
#define STREAM_MAX_LANES	8
#define STREAM_LANE_CHUNK	(4u << 20)    /* bytes per chunk with more than one lane */
#define STREAM_PROBE_NS		1000000000ull /* measure each depth this long */
#define STREAM_PROBE_GAIN	1.15	      /* a deeper pipeline must be this much faster */
#define STREAM_PROBE_HOLD	10	      /* periods to wait before probing again */
#define STREAM_PREFETCH_POLL_NS 50000000ull   /* how often a job waiting for a replay looks */

struct stream_job {
	struct disk *d;
	struct events *ev;
	pthread_t thread;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	uint8_t *buf; /* job's scratch buffer, STREAM_CHUNK + a cluster */
	size_t bufsize;
	/* All below protected by lock. */
	/* Lanes 1.. (lane 0 is the job thread): each copies one chunk at a
	 * time; lane_len[i] != 0 while lane i has [lane_pos[i], +lane_len[i])
	 * in flight. next is the first offset not yet handed out; offset (the
	 * progress shown) is the first offset not yet done. */
	pthread_t lanes[STREAM_MAX_LANES];
	unsigned nlanes; /* lane threads started, 1.. */
	uint8_t *lane_buf[STREAM_MAX_LANES];
	uint64_t lane_pos[STREAM_MAX_LANES], lane_len[STREAM_MAX_LANES];
	unsigned active; /* chunks in flight */
	uint64_t next;
	int lane_err; /* first error of a lane, 0 = none */
	uint64_t lane_err_pos;
	bool guest_active;   /* lane 0's last look: the guest has I/O going on */
	unsigned depth;	     /* lanes allowed to take chunks now */
	unsigned good_depth; /* the depth whose rate the probe is compared with */
	uint64_t probe_t0, probe_b0, probe_rate; /* the current period */
	unsigned probe_hold;
	uint64_t unflushed, flushed_ns; /* progress since the last flush request */
	unsigned fixed_depth;		/* stream_set_depth(): 0 = measured */
	struct prefetch *prefetch;	/* a boot-trace replay to let finish first */
	enum stream_state state;
	bool quit, want_pause, want_cancel;
	bool starting; /* a stream_start() is looking up its base */
	uint64_t speed, offset, length, resumed_from;
	struct image *base;
	char base_name[1024];
	char error[512];
	enum stream_on_error on_error;
	uint64_t start_ns, run_ns, resume_ns;
	uint64_t copied;		  /* bytes copied by this job */
	uint64_t bucket_t0, bucket_bytes; /* token bucket origin */
	uint64_t rate_t[STREAM_RATE_WINDOW], rate_b[STREAM_RATE_WINDOW];
	uint64_t rate_net[STREAM_RATE_WINDOW]; /* disk_network_bytes() samples */
	unsigned rate_n;
	/* The flusher thread persists progress in the background so the copy
	 * loop never waits for writeback; protected by lock, signalled on fcond. */
	pthread_t flusher;
	pthread_cond_t fcond;
	bool flush_req, flush_busy;
	int flush_err;
	/* The daemon's scheduling at stream_new(): what "normal priority" is. */
	int base_policy, base_nice;
	struct sched_param base_param;
	bool warned_nice; /* protected by lock */
};

/* A thread's priority as last set by stream_apply_priority(). */
enum stream_prio { STREAM_PRIO_NORMAL, STREAM_PRIO_LOW };

const char *stream_state_name(enum stream_state s)
{
	static const char *names[] = {"idle",	   "running",	"paused",
				      "completed", "cancelled", "failed"};
	return (unsigned)s < sizeof(names) / sizeof(names[0]) ? names[s] : "unknown";
}

/* Wait on the job's condvar for at most ns; called with lock held. */
static void stream_timedwait(struct stream_job *j, uint64_t ns)
{
	struct timespec ts = sfs_deadline_ns(ns);

	pthread_cond_timedwait(&j->cond, &j->lock, &ts);
}

/* Record a rate sample; called with lock held. */
static void stream_rate_sample(struct stream_job *j, uint64_t now, bool force)
{
	unsigned last = (j->rate_n + STREAM_RATE_WINDOW - 1) % STREAM_RATE_WINDOW;

	if (!force && j->rate_n && now - j->rate_t[last] < STREAM_RATE_NS)
		return;
	j->rate_t[j->rate_n % STREAM_RATE_WINDOW] = now;
	j->rate_b[j->rate_n % STREAM_RATE_WINDOW] = j->copied;
	j->rate_net[j->rate_n % STREAM_RATE_WINDOW] = disk_network_bytes(j->d);
	j->rate_n++;
}

/* Recent rate of copied bytes (net = false) or network bytes; lock held. */
static uint64_t stream_rate(struct stream_job *j, uint64_t now, bool net)
{
	unsigned n = j->rate_n < STREAM_RATE_WINDOW ? j->rate_n : STREAM_RATE_WINDOW;
	unsigned oldest = (j->rate_n - n) % STREAM_RATE_WINDOW;
	uint64_t dt, db, cur, then;
	double rate;

	if (n == 0 || j->state != STREAM_RUNNING)
		return 0;
	cur = net ? disk_network_bytes(j->d) : j->copied;
	then = net ? j->rate_net[oldest] : j->rate_b[oldest];
	dt = now - j->rate_t[oldest];
	/* Both counters only grow; should one ever not, show 0, never a
	 * wrapped difference. */
	if (dt == 0 || cur < then)
		return 0;
	db = cur - then;
	rate = (double)db * 1e9 / (double)dt;
	return rate >= 1.8e19 ? UINT64_MAX : (uint64_t)rate;
}

/* Restart the token bucket (on start, resume, speed change); lock held. */
static void stream_bucket_reset(struct stream_job *j)
{
	j->bucket_t0 = sfs_now_ns();
	j->bucket_bytes = 0;
}

/* Called with lock held; returns with it held. Drop into 'st' and post. */
static void stream_finish(struct stream_job *j, enum stream_state st, const char *event,
			  const char *detail)
{
	uint64_t now = sfs_now_ns();

	if (j->state == STREAM_RUNNING)
		j->run_ns += now - j->resume_ns;
	j->state = st;
	j->want_pause = j->want_cancel = false;
	pthread_cond_broadcast(&j->cond);
	events_post(j->ev, event, "%s", detail);
}

/* Where a (re)started job really starts: the first offset at which it has
 * something to do, i.e. data above base not yet in the overlay, or zeros
 * that must hide base's data (see disk_populate). Everything below is in
 * the overlay already or needs no copy (holes without a base). Called with
 * the chain lock read-held, so base and the chain stay put. */
static uint64_t stream_first_work(struct disk *d, struct image *base)
{
	struct image *top = d->top;
	uint64_t off = 0;

	while (off < top->size) {
		enum extent_type type;
		uint64_t pnum;
		int depth;

		if (image_block_status(top, base, off, top->size - off, &pnum, &depth, &type) < 0 ||
		    pnum == 0)
			break;
		if (depth > 0 && type != EXT_ZERO)
			break;
		if ((depth == -1 || (depth > 0 && type == EXT_ZERO)) && base &&
		    top->backing != base)
			break;
		off += pnum;
	}
	return SFS_ALIGN_DOWN(SFS_MIN(off, top->size), top->cluster_size);
}

/* Pick the next chunk size and sleep as the throttle and guest yielding
 * require. Called with lock held; may drop it while waiting. Returns 0 to
 * go on, or 1 if a wish (pause/cancel/quit) arrived meanwhile. */
static int stream_pace(struct stream_job *j, uint64_t *chunk, uint64_t last_chunk_ns,
		       bool guest_active)
{
	uint32_t cs = j->d->top->cluster_size;
	uint64_t c = guest_active   ? STREAM_CHUNK_BUSY
		     : j->depth > 1 ? STREAM_LANE_CHUNK
				    : STREAM_CHUNK;

	if (guest_active && last_chunk_ns) {
		stream_timedwait(j, SFS_MIN(last_chunk_ns / STREAM_BUSY_SLEEP_DIV, 20000000ull));
		if (j->quit || j->want_pause || j->want_cancel)
			return 1;
	}
	while (j->speed) {
		uint64_t now = sfs_now_ns();
		uint64_t due =
		    j->bucket_t0 + (uint64_t)((double)j->bucket_bytes * 1e9 / (double)j->speed);
		c = SFS_MIN(c, SFS_MAX(j->speed / 20, 64 * 1024));
		if (now >= due)
			break;
		stream_timedwait(j, due - now);
		if (j->quit || j->want_pause || j->want_cancel)
			return 1;
	}
	c = SFS_MAX(SFS_ALIGN_DOWN(c, cs), cs);
	*chunk = SFS_MIN(c, (uint64_t)j->bufsize);
	return 0;
}

/* Set the calling job thread's CPU priority for the current limit; called
 * with lock held, by the thread itself (policy and nice are per thread).
 * Unthrottled, the job yields the CPU to everything else (SCHED_BATCH, nice
 * 19): guest requests are served by FUSE worker threads, which then win
 * every scheduling decision against the copy loop. With a limit, the limit
 * keeps the job from hurting the guest, and at nice 19 it could not keep up
 * with the limit under CPU load (8.3 MiB/s of 100 requested, two busy loops
 * in the daemon's session on 2 CPUs), so it runs at the daemon's priority.
 * Lowering needs no privilege; raising nice back needs CAP_SYS_NICE or
 * RLIMIT_NICE, so threads start at normal priority and a job started with a
 * limit never lowers it; without the privilege, a limit set after the job
 * ran unthrottled is warned about once and kept at low priority. */
static void stream_apply_priority(struct stream_job *j, enum stream_prio *cur)
{
	enum stream_prio want = j->speed ? STREAM_PRIO_NORMAL : STREAM_PRIO_LOW;
	struct sched_param sp = {0};
	pid_t tid = gettid();

	if (*cur == want)
		return;
	*cur = want;
	if (want == STREAM_PRIO_LOW) {
		pthread_setschedparam(pthread_self(), SCHED_BATCH, &sp);
		setpriority(PRIO_PROCESS, (id_t)tid, 19);
		return;
	}
	pthread_setschedparam(pthread_self(), j->base_policy, &j->base_param);
	if (setpriority(PRIO_PROCESS, (id_t)tid, j->base_nice) < 0 && !j->warned_nice) {
		j->warned_nice = true;
		sfs_warn("stream: cannot raise the job's priority back for its speed limit (%s; "
			 "needs CAP_SYS_NICE): under CPU load it may fall short of the limit",
			 strerror(errno));
	}
}

static void *stream_flusher(void *opaque)
{
	struct stream_job *j = opaque;
	enum stream_prio prio = STREAM_PRIO_NORMAL;
	int r;

	pthread_mutex_lock(&j->lock);
	for (;;) {
		while (!j->quit && !j->flush_req)
			pthread_cond_wait(&j->fcond, &j->lock);
		if (j->quit)
			break;
		/* The job's own priority: a starved flusher would hold the
		 * overlay's metadata lock the job needs. */
		stream_apply_priority(j, &prio);
		j->flush_req = false;
		j->flush_busy = true;
		pthread_mutex_unlock(&j->lock);
		r = disk_flush(j->d);
		pthread_mutex_lock(&j->lock);
		j->flush_busy = false;
		if (r < 0)
			j->flush_err = r;
	}
	pthread_mutex_unlock(&j->lock);
	return NULL;
}

/* The first offset not yet done: the lowest chunk in flight, or next.
 * Called with lock held. */
static uint64_t stream_done_upto(struct stream_job *j)
{
	uint64_t o = j->next;

	for (unsigned i = 0; i < STREAM_MAX_LANES; i++)
		if (j->lane_len[i] && j->lane_pos[i] < o)
			o = j->lane_pos[i];
	return SFS_MIN(o, j->length);
}

/* Hand [next, next + chunk) to lane idx and charge the token bucket with it
 * now, so that lanes starting together cannot overshoot the limit (the
 * bytes not copied are refunded at completion). Called with lock held. */
static void stream_take(struct stream_job *j, unsigned idx, uint64_t chunk, uint64_t *pos,
			uint64_t *len)
{
	*pos = j->next;
	*len = SFS_MIN(chunk, j->length - j->next);
	j->lane_pos[idx] = *pos;
	j->lane_len[idx] = *len;
	j->next += *len;
	j->active++;
	j->bucket_bytes += *len;
}

/* Lane idx finished its chunk with result r, having copied 'copied' bytes.
 * Called with lock held. */
static void stream_complete(struct stream_job *j, unsigned idx, int r, uint64_t copied)
{
	uint64_t pos = j->lane_pos[idx], len = j->lane_len[idx], now = sfs_now_ns();

	j->lane_len[idx] = 0;
	j->active--;
	j->bucket_bytes -= SFS_MIN(j->bucket_bytes, len - SFS_MIN(len, copied));
	j->copied += copied;
	j->unflushed += copied;
	if (r == 0 &&
	    (j->unflushed >= STREAM_FLUSH_BYTES || now - j->flushed_ns >= STREAM_FLUSH_NS)) {
		/* Persist progress (what is copied stays copied after a crash)
		 * in the background, one flush at a time. */
		if (!j->flush_busy && !j->flush_req) {
			j->flush_req = true;
			pthread_cond_signal(&j->fcond);
		}
		j->unflushed = 0;
		j->flushed_ns = now;
	}
	if (r == 0 && j->flush_err) {
		r = j->flush_err;
		j->flush_err = 0;
	}
	if (r < 0 && (!j->lane_err || pos < j->lane_err_pos)) {
		j->lane_err = r;
		j->lane_err_pos = pos;
	}
	j->offset = stream_done_upto(j);
	stream_rate_sample(j, now, false);
	pthread_cond_broadcast(&j->cond);
}

static void *stream_lane(void *opaque);

struct stream_lane_arg {
	struct stream_job *j;
	unsigned idx;
};

/* Start lane threads up to j->depth; on failure the depth stays at the
 * lanes there are. Called with lock held. */
static void stream_grow_lanes(struct stream_job *j)
{
	size_t bufsize = SFS_MAX((size_t)STREAM_LANE_CHUNK, (size_t)j->d->top->cluster_size);

	while (j->nlanes < j->depth) {
		struct stream_lane_arg *a = malloc(sizeof(*a));
		unsigned idx = j->nlanes;

		j->lane_buf[idx] = malloc(bufsize);
		if (a) {
			a->j = j;
			a->idx = idx;
		}
		if (!a || !j->lane_buf[idx] ||
		    pthread_create(&j->lanes[idx], NULL, stream_lane, a) != 0) {
			free(a);
			free(j->lane_buf[idx]);
			j->lane_buf[idx] = NULL;
			j->depth = j->nlanes;
			sfs_warn("stream: cannot start lane %u; the job keeps %u chunks in flight",
				 idx, j->nlanes);
			return;
		}
		j->nlanes++;
	}
}

/* Depth: how many chunks the job keeps in flight. One is best for a local
 * or loopback backing (the copy is CPU- and disk-bound; and it is what the
 * job did before lanes existed); a far backing needs several, to cover the
 * round trip of every request and the window of every connection: one
 * request at a time used a fifth of an 80 ms / 500 Mbit/s link. The number
 * is measured, not configured for one network: every STREAM_PROBE_NS the
 * copy rate of the period is compared with the rate at the depth that
 * worked; the depth doubles while that raises the rate by at least
 * STREAM_PROBE_GAIN, and when it does not, the job goes back and probes
 * again after STREAM_PROBE_HOLD periods (links change). While the guest
 * does I/O the depth is 1 (see Yielding). Called with lock held, by lane 0. */
static void stream_adapt_depth(struct stream_job *j, uint64_t now)
{
	unsigned before = j->depth;
	uint64_t rate;

	if (j->fixed_depth) {
		j->depth = j->good_depth = j->guest_active ? 1 : j->fixed_depth;
		if (j->depth > j->nlanes)
			stream_grow_lanes(j);
		if (j->depth != before)
			pthread_cond_broadcast(&j->cond);
		return;
	}

	if (j->guest_active || j->probe_t0 == 0) {
		j->depth = j->good_depth = SFS_MAX(j->good_depth, 1u);
		if (j->guest_active)
			j->depth = 1;
		j->probe_t0 = now;
		j->probe_b0 = j->copied;
		return;
	}
	if (now - j->probe_t0 < STREAM_PROBE_NS)
		return;
	rate = (uint64_t)((double)(j->copied - j->probe_b0) * 1e9 / (double)(now - j->probe_t0));
	if (j->depth > j->good_depth) {
		/* A probe ended: keep it only if it paid. */
		if ((double)rate > (double)j->probe_rate * STREAM_PROBE_GAIN) {
			j->good_depth = j->depth;
			j->probe_rate = rate;
			if (j->depth < STREAM_MAX_LANES)
				j->depth = SFS_MIN(j->depth * 2, (unsigned)STREAM_MAX_LANES);
		} else {
			j->depth = j->good_depth;
			j->probe_hold = STREAM_PROBE_HOLD;
		}
	} else {
		j->probe_rate = rate;
		if (j->probe_hold)
			j->probe_hold--;
		else if (rate > 0 && j->depth < STREAM_MAX_LANES)
			j->depth = SFS_MIN(j->depth * 2, (unsigned)STREAM_MAX_LANES);
	}
	j->probe_t0 = now;
	j->probe_b0 = j->copied;
	if (j->depth > j->nlanes)
		stream_grow_lanes(j);
	if (j->depth != before) {
		sfs_debug("stream: %u chunk(s) in flight (rate %llu B/s)", j->depth,
			  (unsigned long long)rate);
		pthread_cond_broadcast(&j->cond);
	}
}

/* May lane idx (>= 1) take a chunk now? If only the token bucket says no,
 * *wait_ns is how long until it says yes. Called with lock held. */
static bool stream_lane_may_take(struct stream_job *j, unsigned idx, uint64_t *wait_ns)
{
	*wait_ns = 0;
	/* The guest first: no new chunk while a guest request is in progress
	 * (lane 0's guest_active lags by up to a chunk; the counter does not). */
	if (j->state != STREAM_RUNNING || j->want_pause || j->want_cancel || j->lane_err ||
	    j->guest_active || idx >= j->depth || j->next >= j->length ||
	    atomic_load(&j->d->stats.guest_inflight) > 0 || fetch_guest_inflight() > 0)
		return false;
	if (prefetch_active(j->prefetch)) {
		*wait_ns = STREAM_PREFETCH_POLL_NS;
		return false;
	}
	if (j->speed) {
		uint64_t now = sfs_now_ns();
		uint64_t due =
		    j->bucket_t0 + (uint64_t)((double)j->bucket_bytes * 1e9 / (double)j->speed);
		if (now < due) {
			*wait_ns = due - now;
			return false;
		}
	}
	return true;
}

/* Lanes 1..: copy chunks while the depth allows them. */
static void *stream_lane(void *opaque)
{
	struct stream_lane_arg *a = opaque;
	struct stream_job *j = a->j;
	unsigned idx = a->idx;
	enum stream_prio prio = STREAM_PRIO_NORMAL;
	size_t bufsize = SFS_MAX((size_t)STREAM_LANE_CHUNK, (size_t)j->d->top->cluster_size);

	free(a);
	/* Guest reads keep their reserved connections (fetch.h). */
	fetch_set_thread_class(FETCH_CLASS_JOB);
	pthread_mutex_lock(&j->lock);
	while (!j->quit) {
		uint64_t wait_ns, chunk, pos, len, copied = 0;
		uint32_t cs = j->d->top->cluster_size;
		struct image *base;
		int r;

		if (!stream_lane_may_take(j, idx, &wait_ns)) {
			if (wait_ns)
				stream_timedwait(j, wait_ns);
			else
				pthread_cond_wait(&j->cond, &j->lock);
			continue;
		}
		stream_apply_priority(j, &prio);
		chunk = STREAM_LANE_CHUNK;
		if (j->speed)
			chunk = SFS_MIN(chunk, SFS_MAX(j->speed / 20, 64 * 1024));
		chunk = SFS_MIN(SFS_MAX(SFS_ALIGN_DOWN(chunk, cs), cs), (uint64_t)bufsize);
		stream_take(j, idx, chunk, &pos, &len);
		base = j->base;
		pthread_mutex_unlock(&j->lock);
		r = disk_populate(j->d, base, pos, len, j->lane_buf[idx], bufsize, &copied);
		pthread_mutex_lock(&j->lock);
		stream_complete(j, idx, r, copied);
	}
	pthread_mutex_unlock(&j->lock);
	return NULL;
}

/* Lane 0, the job thread: owns the state transitions (which wait until no
 * chunk is in flight), paces itself (throttle, guest yielding), adapts the
 * depth, and copies chunks like any lane. */
static void *stream_thread(void *opaque)
{
	struct stream_job *j = opaque;
	struct disk *d = j->d;
	uint64_t last_ops = 0, last_chunk_ns = 0;
	enum stream_prio prio = STREAM_PRIO_NORMAL;

	fetch_set_thread_class(FETCH_CLASS_JOB);
	pthread_mutex_lock(&j->lock);
	for (;;) {
		uint64_t pos, len, chunk, copied = 0, t0, ops;
		struct image *base;
		char msg[600];
		int r;

		while (!j->quit && j->state != STREAM_RUNNING)
			pthread_cond_wait(&j->cond, &j->lock);
		if (j->quit)
			break;
		if ((j->want_cancel || j->want_pause || j->lane_err || j->next >= j->length) &&
		    j->active > 0) {
			/* Transitions happen with no chunk in flight. */
			pthread_cond_wait(&j->cond, &j->lock);
			continue;
		}
		if (j->want_cancel) {
			j->next = j->offset;
			j->lane_err = 0;
			pthread_mutex_unlock(&j->lock);
			disk_flush(d);
			pthread_mutex_lock(&j->lock);
			snprintf(msg, sizeof(msg), "offset=%llu length=%llu",
				 (unsigned long long)j->offset, (unsigned long long)j->length);
			stream_finish(j, STREAM_CANCELLED, "cancelled", msg);
			continue;
		}
		if (j->lane_err) {
			r = j->lane_err;
			pos = j->lane_err_pos;
			j->lane_err = 0;
			j->next = j->offset = pos;
			snprintf(j->error, sizeof(j->error), "offset %llu: %s",
				 (unsigned long long)pos, strerror(-r));
			if (j->on_error == STREAM_ON_ERROR_STOP) {
				j->run_ns += sfs_now_ns() - j->resume_ns;
				j->state = STREAM_PAUSED;
				j->want_pause = false;
				pthread_cond_broadcast(&j->cond);
				events_post(j->ev, "error", "%s", j->error);
				events_post(j->ev, "paused", "offset=%llu on-error=stop",
					    (unsigned long long)pos);
			} else {
				stream_finish(j, STREAM_FAILED, "failed", j->error);
			}
			continue;
		}
		if (j->want_pause) {
			j->next = j->offset;
			j->want_pause = false;
			j->run_ns += sfs_now_ns() - j->resume_ns;
			j->state = STREAM_PAUSED;
			pthread_cond_broadcast(&j->cond);
			events_post(j->ev, "paused", "offset=%llu", (unsigned long long)j->offset);
			continue;
		}
		if (j->offset >= j->length) {
			base = j->base;
			/* Only this thread rebases, so top->backing is stable
			 * here. A job whose base is already the backing (a
			 * start after a completed job) changes nothing. */
			bool rebase = d->top->backing != base;

			pthread_mutex_unlock(&j->lock);
			r = disk_flush(d);
			if (r == 0 && rebase)
				r = disk_rebase(d, base);
			pthread_mutex_lock(&j->lock);
			if (r < 0) {
				snprintf(j->error, sizeof(j->error),
					 "cannot update the overlay's backing reference: %s",
					 strerror(-r));
				stream_finish(j, STREAM_FAILED, "failed", j->error);
				continue;
			}
			if (rebase)
				events_post(j->ev, "backing-changed", "backing=%s",
					    base ? j->base_name : "none");
			stream_rate_sample(j, sfs_now_ns(), true);
			snprintf(msg, sizeof(msg), "length=%llu copied=%llu",
				 (unsigned long long)j->length, (unsigned long long)j->copied);
			stream_finish(j, STREAM_COMPLETED, "completed", msg);
			continue;
		}
		if (j->next >= j->length) {
			/* Everything is handed out and done: offset caught up. */
			j->offset = stream_done_upto(j);
			continue;
		}
		ops = atomic_load(&d->stats.guest_ops);
		j->guest_active = ops != last_ops || atomic_load(&d->stats.guest_inflight) > 0;
		last_ops = ops;
		if (prefetch_active(j->prefetch)) {
			/* The replay copies what the guest needs first; the
			 * job then copies the rest, nothing twice. */
			stream_timedwait(j, STREAM_PREFETCH_POLL_NS);
			continue;
		}
		stream_adapt_depth(j, sfs_now_ns());
		if (stream_pace(j, &chunk, last_chunk_ns, j->guest_active))
			continue;
		if (j->next >= j->length || j->lane_err || j->state != STREAM_RUNNING)
			continue; /* other lanes took the rest meanwhile, or failed */
		/* After pacing, which a speed change (control/speed) wakes:
		 * every chunk runs at the priority for the current limit. */
		stream_apply_priority(j, &prio);
		stream_take(j, 0, chunk, &pos, &len);
		base = j->base;
		pthread_cond_broadcast(&j->cond);
		pthread_mutex_unlock(&j->lock);

		t0 = sfs_now_ns();
		if (j->depth == 1 && pos + len < j->length)
			disk_prefetch(d, base, pos + len, len);
		r = disk_populate(d, base, pos, len, j->buf, j->bufsize, &copied);
		last_chunk_ns = sfs_now_ns() - t0;

		pthread_mutex_lock(&j->lock);
		stream_complete(j, 0, r, copied);
	}
	pthread_mutex_unlock(&j->lock);
	return NULL;
}

int stream_new(struct disk *d, struct events *ev, struct stream_job **out)
{
	struct stream_job *j = calloc(1, sizeof(*j));
	int r;

	if (!j)
		return -ENOMEM;
	j->d = d;
	j->ev = ev;
	j->bufsize = STREAM_CHUNK > d->top->cluster_size ? STREAM_CHUNK : d->top->cluster_size;
	j->buf = malloc(j->bufsize);
	if (!j->buf) {
		free(j);
		return -ENOMEM;
	}
	j->length = d->top->size;
	j->depth = j->good_depth = j->nlanes = 1; /* lane 0 is the job thread */
	j->flushed_ns = sfs_now_ns();
	/* Threads inherit the creator's policy and nice: remember them. */
	if (pthread_getschedparam(pthread_self(), &j->base_policy, &j->base_param) != 0) {
		j->base_policy = SCHED_OTHER;
		memset(&j->base_param, 0, sizeof(j->base_param));
	}
	errno = 0;
	j->base_nice = getpriority(PRIO_PROCESS, (id_t)gettid());
	if (errno)
		j->base_nice = 0;
	pthread_mutex_init(&j->lock, NULL);
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&j->cond, &ca);
	pthread_condattr_destroy(&ca);
	pthread_cond_init(&j->fcond, NULL);
	r = -pthread_create(&j->thread, NULL, stream_thread, j);
	if (r < 0) {
		free(j->buf);
		free(j);
		return r;
	}
	r = -pthread_create(&j->flusher, NULL, stream_flusher, j);
	if (r < 0) {
		pthread_mutex_lock(&j->lock);
		j->quit = true;
		pthread_cond_broadcast(&j->cond);
		pthread_mutex_unlock(&j->lock);
		pthread_join(j->thread, NULL);
		free(j->buf);
		free(j);
		return r;
	}
	*out = j;
	return 0;
}

void stream_free(struct stream_job *j)
{
	if (!j)
		return;
	pthread_mutex_lock(&j->lock);
	j->quit = true;
	pthread_cond_broadcast(&j->cond);
	pthread_cond_broadcast(&j->fcond);
	pthread_mutex_unlock(&j->lock);
	pthread_join(j->thread, NULL);
	for (unsigned i = 1; i < j->nlanes; i++) {
		pthread_join(j->lanes[i], NULL);
		free(j->lane_buf[i]);
	}
	pthread_join(j->flusher, NULL);
	pthread_mutex_destroy(&j->lock);
	pthread_cond_destroy(&j->cond);
	pthread_cond_destroy(&j->fcond);
	free(j->buf);
	free(j);
}

int stream_start(struct stream_job *j, const struct stream_params *p)
{
	struct disk *d = j->d;
	struct image *base = NULL;
	char base_name[sizeof(j->base_name)];
	uint64_t resumed = 0;

	if (d->read_only) {
		sfs_error("stream: the disk is mounted read-only");
		return -EROFS;
	}
	pthread_mutex_lock(&j->lock);
	if (j->state == STREAM_RUNNING || j->state == STREAM_PAUSED || j->starting) {
		const char *what = j->starting ? "starting" : stream_state_name(j->state);

		pthread_mutex_unlock(&j->lock);
		sfs_error("stream: a job is already %s on this disk", what);
		return -EBUSY;
	}
	/* Claim the job, then look the base up under the chain lock only
	 * (block status may read metadata over the network: never under the
	 * job lock). Only a running job frees layers (disk_rebase), and none
	 * runs while we hold the claim, so the layer found stays valid for the
	 * life of the new job. */
	j->starting = true;
	pthread_mutex_unlock(&j->lock);
	pthread_rwlock_rdlock(&d->chain_lock);
	if (p->base)
		base = disk_find_layer(d, p->base);
	if (base || !p->base) {
		/* Shown in status and events (readable by all with
		 * allow_other): the masked form. */
		snprintf(base_name, sizeof(base_name), "%s", base ? base->display : "");
		resumed = stream_first_work(d, base);
	}
	pthread_rwlock_unlock(&d->chain_lock);
	pthread_mutex_lock(&j->lock);
	j->starting = false;
	if (p->base && !base) {
		char *shown = fetch_display_uri(p->base), esc[256];

		pthread_mutex_unlock(&j->lock);
		/* The name comes from a control-file write: any byte but NUL
		 * and newlines, and perhaps a signed URL. */
		sfs_escape(esc, sizeof(esc), shown ? shown : "?", shown ? strlen(shown) : 1);
		sfs_error("stream: base '%s' is not an image of the backing chain", esc);
		free(shown);
		return -EINVAL;
	}
	snprintf(j->base_name, sizeof(j->base_name), "%s", base_name);
	j->base = base;
	if (p->speed_set)
		j->speed = p->speed;
	j->on_error = p->on_error;
	j->offset = j->next = 0;
	j->lane_err = 0;
	j->probe_t0 = 0; /* a new job measures its depth afresh */
	j->good_depth = j->depth = 1;
	j->probe_hold = 0;
	j->length = d->top->size;
	j->resumed_from = resumed;
	j->copied = 0;
	j->error[0] = '\0';
	j->rate_n = 0;
	j->run_ns = 0;
	j->start_ns = j->resume_ns = sfs_now_ns();
	j->want_pause = j->want_cancel = false;
	stream_bucket_reset(j);
	stream_rate_sample(j, j->start_ns, true);
	j->state = STREAM_RUNNING;
	events_post(j->ev, "started", "length=%llu resumed-from=%llu speed=%llu base=%s",
		    (unsigned long long)j->length, (unsigned long long)resumed,
		    (unsigned long long)j->speed, base ? j->base_name : "none");
	pthread_cond_broadcast(&j->cond);
	pthread_mutex_unlock(&j->lock);
	return 0;
}

int stream_pause(struct stream_job *j)
{
	int r = 0;

	pthread_mutex_lock(&j->lock);
	if (j->state != STREAM_RUNNING) {
		r = -EINVAL;
	} else {
		j->want_pause = true;
		pthread_cond_broadcast(&j->cond);
		/* Return once the job is between chunks, so progress is frozen. */
		while (j->state == STREAM_RUNNING && j->want_pause)
			pthread_cond_wait(&j->cond, &j->lock);
	}
	pthread_mutex_unlock(&j->lock);
	return r;
}

int stream_resume(struct stream_job *j)
{
	int r = 0;

	pthread_mutex_lock(&j->lock);
	if (j->state != STREAM_PAUSED) {
		r = -EINVAL;
	} else {
		j->state = STREAM_RUNNING;
		j->resume_ns = sfs_now_ns();
		j->next = j->offset;
		j->probe_t0 = 0;
		j->error[0] = '\0';
		stream_bucket_reset(j);
		j->rate_n = 0;
		stream_rate_sample(j, j->resume_ns, true);
		events_post(j->ev, "resumed", "offset=%llu", (unsigned long long)j->offset);
		pthread_cond_broadcast(&j->cond);
	}
	pthread_mutex_unlock(&j->lock);
	return r;
}

int stream_cancel(struct stream_job *j)
{
	int r = 0;

	pthread_mutex_lock(&j->lock);
	if (j->state == STREAM_PAUSED) {
		/* The thread is idle: finish here. */
		j->state = STREAM_RUNNING; /* so stream_finish accounts nothing twice */
		j->resume_ns = sfs_now_ns();
		j->want_cancel = true;
		pthread_cond_broadcast(&j->cond);
	} else if (j->state == STREAM_RUNNING) {
		j->want_cancel = true;
		pthread_cond_broadcast(&j->cond);
	} else {
		r = -EINVAL;
	}
	while (r == 0 && j->state == STREAM_RUNNING)
		pthread_cond_wait(&j->cond, &j->lock);
	pthread_mutex_unlock(&j->lock);
	return r;
}

void stream_set_prefetch(struct stream_job *j, struct prefetch *pf)
{
	pthread_mutex_lock(&j->lock);
	j->prefetch = pf;
	pthread_mutex_unlock(&j->lock);
}

int stream_set_depth(struct stream_job *j, unsigned depth)
{
	if (depth > STREAM_MAX_LANES)
		return -EINVAL;
	pthread_mutex_lock(&j->lock);
	j->fixed_depth = depth;
	j->probe_t0 = 0;
	pthread_mutex_unlock(&j->lock);
	return 0;
}

int stream_set_speed(struct stream_job *j, uint64_t speed)
{
	pthread_mutex_lock(&j->lock);
	j->speed = speed;
	stream_bucket_reset(j);
	pthread_cond_broadcast(&j->cond);
	pthread_mutex_unlock(&j->lock);
	return 0;
}

void stream_get_status(struct stream_job *j, struct stream_status *st)
{
	uint64_t now = sfs_now_ns();

	pthread_mutex_lock(&j->lock);
	st->state = j->state;
	st->offset = j->offset;
	st->length = j->length;
	st->resumed_from = j->resumed_from;
	st->speed = j->speed;
	st->rate = stream_rate(j, now, false);
	st->net_rate = stream_rate(j, now, true);
	st->elapsed =
	    (double)(j->run_ns + (j->state == STREAM_RUNNING ? now - j->resume_ns : 0)) / 1e9;
	st->avg_rate = st->elapsed > 0 ? (uint64_t)((double)j->copied / st->elapsed) : 0;
	snprintf(st->base, sizeof(st->base), "%s", j->base_name);
	snprintf(st->error, sizeof(st->error), "%s", j->error);
	st->on_error = j->on_error;
	pthread_mutex_unlock(&j->lock);
}

enum stream_state stream_wait(struct stream_job *j)
{
	enum stream_state s;

	pthread_mutex_lock(&j->lock);
	while (j->state == STREAM_RUNNING || j->state == STREAM_PAUSED)
		pthread_cond_wait(&j->cond, &j->lock);
	s = j->state;
	pthread_mutex_unlock(&j->lock);
	return s;
}

int stream_pull(struct stream_job *j, uint64_t off, uint64_t len)
{
	struct disk *d = j->d;
	uint32_t cs = d->top->cluster_size;
	size_t bufsize = SFS_MAX((size_t)(4u << 20), (size_t)cs);
	uint64_t end, copied = 0;
	void *buf;
	int r;

	if (d->read_only)
		return -EROFS;
	if (!sfs_add_ok(off, len, &end) || end > d->top->size || len == 0)
		return -EINVAL;
	buf = malloc(bufsize);
	if (!buf)
		return -ENOMEM;
	off = SFS_ALIGN_DOWN(off, cs);
	r = disk_populate(d, NULL, off, SFS_ALIGN_UP(end, cs) - off, buf, bufsize, &copied);
	free(buf);
	if (r == 0)
		r = disk_flush(d);
	return r;
}
