/* streamfs: the guest-facing disk (see include/disk.h).
 *
 * NOTES ON THE THREAD MODEL
 * - Any number of FUSE worker threads and the stream job call in at once.
 * - chain_lock is read-held by every operation and write-held only by
 *   disk_rebase() while it swaps the backing chain.
 * - Allocating operations hold a range lock on the cluster-aligned guest
 *   range they may allocate in, and re-map that range under it. Plain reads
 *   of allocated data take no lock: an allocated cluster never moves.
 * - Copy-on-read and the stream job read the backing chain BEFORE taking the
 *   range lock (backing images are immutable), so the lock is held only
 *   while the overlay is written; a guest request waits at most for that.
 *   Under the lock, clusters that became allocated meanwhile (a racing guest
 *   write) are left alone and their current data is returned instead.
 *
 * - The read-ahead table (struct disk_ra) has its own mutex, a leaf held
 *   only to look up and update a few words, never across I/O.
 *
 * Bounce buffers are per thread and grow to the largest request seen, so
 * the hot path does not allocate. Read-ahead buffers (up to DISK_RA_MAX) are
 * allocated per read-ahead instead: one per FUSE thread kept for good would
 * cost megabytes each, and a read-ahead already pays a round trip.
 */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "disk.h"
#include "rangelock.h"
#include "util.h"

/* A per-thread bounce buffer, reused across requests. */
static __thread uint8_t *disk_bounce_buf;
static __thread size_t disk_bounce_len;

static void disk_bounce_free(void *unused)
{
	free(disk_bounce_buf);
	disk_bounce_buf = NULL;
	disk_bounce_len = 0;
}

static pthread_key_t disk_bounce_key;
static pthread_once_t disk_bounce_once = PTHREAD_ONCE_INIT;

static void disk_bounce_init(void)
{
	pthread_key_create(&disk_bounce_key, disk_bounce_free);
}

static uint8_t *disk_bounce(size_t len)
{
	if (len > disk_bounce_len) {
		uint8_t *n;

		pthread_once(&disk_bounce_once, disk_bounce_init);
		n = realloc(disk_bounce_buf, len);
		if (!n)
			return NULL;
		disk_bounce_buf = n;
		disk_bounce_len = len;
		/* Only to have the destructor run at thread exit. */
		pthread_setspecific(disk_bounce_key, n);
	}
	return disk_bounce_buf;
}

/* ---- read-ahead ----
 *
 * Over a slow link every copy-on-read costs a round trip, and a booting
 * guest reads many small runs one after the other; O_DIRECT readers (QEMU
 * cache=none) get no help from the kernel's read-ahead. So the disk keeps a
 * few recent guest read streams, each keyed by the offset its next read is
 * expected at. A copy-on-read miss in a stream that has continued at least
 * once extends its backing read by the stream's window, which doubles at
 * every such miss; a read that continues no stream starts a new one
 * (evicting the least recently used) with no window, so random reads never
 * read ahead and a broken pattern starts over small.
 *
 * Synchronous: the miss fetches request and window in one backing read and
 * commits both before it returns. That already removes the next round trips
 * of the stream, which is where the time goes at high latency; an
 * asynchronous fetch would also spare the triggering read the window's
 * transfer time, at the cost of a thread and of readers waiting on data in
 * flight. The window is claimed (reserved) before the fetch, so another
 * thread's read of the same stream does not fetch it a second time.
 *
 * The read-ahead data is committed exactly as copy-on-read data: under the
 * range lock, re-mapped there, so clusters a guest write allocated meanwhile
 * keep the guest's data. Only runs unallocated in the top with data in the
 * backing chain are read ahead: never holes, never past the image end.
 */

/* Streams tracked at once: a guest's few concurrent sequential readers
 * (a boot reading several files, a copy, a page-cache writeback) plus the
 * random reads that come between them. */
#define DISK_RA_STREAMS 8
/* First window: small, so a short sequential burst (a few file blocks)
 * costs little more than its own reads. */
#define DISK_RA_MIN (128u << 10)
/* Largest window. A stream's throughput is window / (RTT + window / rate):
 * at 80 ms and 4 MiB that is 50 MiB/s of an unbounded link and 80% of a
 * 100 Mbit/s one. The triggering read waits for the whole window (up to
 * 0.3 s at 100 Mbit/s) and guest writes into it wait for its commit, so
 * larger windows would trade guest latency for little gain. */
#define DISK_RA_MAX (4u << 20)
/* A read continues a stream when it starts at the offset expected next, or
 * this much before it: a queue-depth > 1 reader's requests reach the FUSE
 * worker threads slightly out of order, and a late one should not evict its
 * own stream. Only a read that moves the stream forward reads ahead. (One
 * that starts past the expected offset starts a stream of its own, which
 * continues from there if the pattern holds.) */
#define DISK_RA_SLACK (64u << 10)
/* First windows. A booting guest reads many short runs (a file or two of
 * 100 KiB, an inode table block) near each other but rarely contiguous, so
 * most of its misses start no stream and the doubling above never starts:
 * each costs a round trip, where QEMU's http driver, which reads 256 KiB
 * past every miss, often finds the next read already there. So a miss
 * that starts a stream also reads a first window past its end, when the
 * backing link makes that cheap next to a round trip: its transfer takes
 * at most a quarter of the RTT (measured: fetch_net_totals, the transfer
 * rate of recent large requests). Local and loopback backings get none.
 * Whether it pays is measured too: the last DISK_RA_SPEC first windows are
 * remembered, a guest read that lands in one is a hit, and when fewer than
 * a quarter hit (random reads) first windows stop, but for one miss in
 * DISK_RA_PROBE that keeps the measure current. */
#define DISK_RA_FIRST	      (256u << 10)
#define DISK_RA_SPEC	      16
#define DISK_RA_PROBE	      16
#define DISK_RA_FIRST_MIN_RTT 0.002	  /* s: below it a round trip is not worth saving */
#define DISK_RA_LINK_NS	      1000000000u /* how often the link's figures are looked at */

/* Misses of one guest read separated by allocated runs shorter than this
 * are fetched in one backing request: re-reading the gap costs less than a
 * round trip on any link where round trips matter. */
#define DISK_COALESCE_GAP (64u << 10)

struct disk_ra_stream {
	uint64_t next;	   /* offset the stream's next read is expected at */
	uint64_t window;   /* bytes read ahead at its last miss; 0: none yet */
	uint64_t ra_start; /* [ra_start, ra_end): read (or being read) ahead */
	uint64_t ra_end;
	uint64_t used; /* tick of the last read; 0: free */
	uint64_t id;   /* tick of creation: tells a reused slot */
};

struct disk_ra_spec {
	uint64_t start, end; /* a first window read ahead */
	bool hit;	     /* a guest read landed in it since */
};

struct disk_ra {
	pthread_mutex_t lock;
	uint64_t tick;
	struct disk_ra_stream s[DISK_RA_STREAMS];
	/* First windows: protected by lock. */
	uint64_t first;	  /* bytes, 0: none (see First windows) */
	uint64_t link_ns; /* when first was last derived from the link */
	bool link_fixed;  /* disk_ra_set_link() gave the link: keep it */
	struct disk_ra_spec spec[DISK_RA_SPEC];
	unsigned spec_next;
	unsigned issued, hits; /* first windows read / hit, halved at 64 */
	unsigned fresh;	       /* misses that started a stream */
};

/* What disk_ra_note() found out about one guest read. */
struct disk_ra_ticket {
	int slot; /* the stream it moves forward or started; -1: none */
	uint64_t id;
	bool in_ra; /* it lies in the stream's read-ahead data */
	bool fresh; /* it started the stream */
};

/* The first window a link with this round trip and transfer rate gets. */
static uint64_t disk_ra_first_for(double rtt_s, double rate)
{
	double w;

	if (isnan(rtt_s) || isnan(rate) || rtt_s < DISK_RA_FIRST_MIN_RTT)
		return 0;
	w = rtt_s * rate / 4;
	return w >= DISK_RA_FIRST ? DISK_RA_FIRST : w >= DISK_RA_MIN ? DISK_RA_MIN : 0;
}

/* Refresh ra->first from the network's figures, at most once a
 * DISK_RA_LINK_NS. Takes ra->lock. */
static void disk_ra_look_at_link(struct disk_ra *ra)
{
	struct fetch_net_stats n;
	uint64_t now = sfs_now_ns();
	bool due;

	pthread_mutex_lock(&ra->lock);
	due = !ra->link_fixed && now - ra->link_ns >= DISK_RA_LINK_NS;
	if (due)
		ra->link_ns = now;
	pthread_mutex_unlock(&ra->lock);
	if (!due)
		return;
	fetch_net_totals(&n);
	pthread_mutex_lock(&ra->lock);
	if (!ra->link_fixed)
		ra->first = disk_ra_first_for(n.rtt_s, n.xfer_rate_bytes_per_s);
	pthread_mutex_unlock(&ra->lock);
}

void disk_ra_set_link(struct disk *d, double rtt_s, double rate)
{
	pthread_mutex_lock(&d->ra->lock);
	d->ra->link_fixed = true;
	d->ra->first = disk_ra_first_for(rtt_s, rate);
	pthread_mutex_unlock(&d->ra->lock);
}

/* Do recent first windows pay (or are there too few to tell)? Called with
 * ra->lock held. */
static bool disk_ra_first_paying(const struct disk_ra *ra)
{
	return ra->issued < 8 || ra->hits * 4 >= ra->issued;
}

uint64_t disk_ra_first_window(struct disk *d)
{
	uint64_t w;

	pthread_mutex_lock(&d->ra->lock);
	w = disk_ra_first_paying(d->ra) ? d->ra->first : 0;
	pthread_mutex_unlock(&d->ra->lock);
	return w;
}

/* Should this miss, which started a stream, read a first window? Counts
 * the miss. Called with ra->lock held. */
static bool disk_ra_first_pays(struct disk_ra *ra)
{
	if (!ra->first)
		return false;
	ra->fresh++;
	return disk_ra_first_paying(ra) || ra->fresh % DISK_RA_PROBE == 0;
}

/* Record the guest read [off, end) in the stream table. */
static void disk_ra_note(struct disk_ra *ra, uint64_t off, uint64_t end, struct disk_ra_ticket *t)
{
	struct disk_ra_stream *s = NULL;
	int i, lru = 0;

	t->slot = -1;
	t->in_ra = false;
	pthread_mutex_lock(&ra->lock);
	ra->tick++;
	for (i = 0; i < DISK_RA_SPEC; i++) {
		struct disk_ra_spec *w = &ra->spec[i];

		if (!w->hit && off < w->end && end > w->start) {
			w->hit = true;
			ra->hits++;
		}
	}
	for (i = 0; i < DISK_RA_STREAMS; i++) {
		struct disk_ra_stream *c = &ra->s[i];

		if (c->used && off <= c->next && c->next - off <= DISK_RA_SLACK) {
			s = c;
			break;
		}
		if (c->used < ra->s[lru].used)
			lru = i;
	}
	if (s) {
		if (end > s->next)
			t->slot = i;
		t->id = s->id;
		t->in_ra = off >= s->ra_start && end <= s->ra_end;
		s->next = SFS_MAX(s->next, end);
	} else {
		s = &ra->s[lru];
		*s = (struct disk_ra_stream){.next = end, .id = ra->tick};
		t->slot = lru;
		t->id = s->id;
		t->fresh = true;
	}
	s->used = ra->tick;
	pthread_mutex_unlock(&ra->lock);
}

/* A copy-on-read miss of the read behind t, whose backing read ends at
 * from: the bytes to read ahead past from (0: none), reserved for it. */
static uint64_t disk_ra_claim(struct disk_ra *ra, const struct disk_ra_ticket *t, uint64_t from)
{
	struct disk_ra_stream *s;
	uint64_t w = 0;

	if (t->slot < 0)
		return 0;
	pthread_mutex_lock(&ra->lock);
	s = &ra->s[t->slot];
	/* Not when another read of the stream has claimed this part. */
	if (s->id == t->id && from > s->ra_end) {
		if (!t->fresh)
			w = s->window ? SFS_MIN(2 * s->window, (uint64_t)DISK_RA_MAX) : DISK_RA_MIN;
		else if (disk_ra_first_pays(ra))
			w = ra->first;
		if (w && t->fresh) {
			ra->spec[ra->spec_next] = (struct disk_ra_spec){from, from + w, false};
			ra->spec_next = (ra->spec_next + 1) % DISK_RA_SPEC;
			if (++ra->issued >= 64) {
				ra->issued /= 2;
				ra->hits /= 2;
			}
		}
		if (w) {
			s->window = w;
			s->ra_start = from;
			s->ra_end = from + w;
		}
	}
	pthread_mutex_unlock(&ra->lock);
	return w;
}

/* The read-ahead claimed up to claimed_end stopped at end (a hole, an
 * allocated run, the image end, an error): the stream misses again there. */
static void disk_ra_done(struct disk_ra *ra, const struct disk_ra_ticket *t, uint64_t claimed_end,
			 uint64_t end)
{
	struct disk_ra_stream *s = &ra->s[t->slot];

	pthread_mutex_lock(&ra->lock);
	if (s->id == t->id && s->ra_end == claimed_end)
		s->ra_end = end;
	pthread_mutex_unlock(&ra->lock);
}

/* How much of [pos, pos+want) (pos cluster-aligned) is worth reading
 * ahead: the leading runs unallocated in the top with data in the backing
 * chain, in whole top clusters except at the image end. */
static uint64_t disk_ra_span(struct image *top, uint64_t pos, uint64_t want)
{
	uint64_t start = pos, end = SFS_MIN(pos + want, top->size);

	while (pos < end) {
		enum extent_type type;
		uint64_t pnum;
		int depth;

		if (image_block_status(top, NULL, pos, end - pos, &pnum, &depth, &type) < 0)
			break;
		if (depth <= 0 || type == EXT_ZERO)
			break;
		/* A lower layer with smaller clusters: a top cluster of mixed
		 * state ends the read-ahead. */
		if (pos + pnum < end)
			pnum = SFS_ALIGN_DOWN(pnum, top->cluster_size);
		if (pnum == 0)
			break;
		pos += pnum;
	}
	return pos - start;
}

int disk_new(struct image *top, bool copy_on_read, bool read_only, struct disk **out)
{
	struct disk *d = calloc(1, sizeof(*d));

	if (!d)
		return -ENOMEM;
	d->locks = rangelock_new();
	d->ra = calloc(1, sizeof(*d->ra));
	if (!d->locks || !d->ra) {
		rangelock_free(d->locks);
		free(d->ra);
		free(d);
		return -ENOMEM;
	}
	pthread_mutex_init(&d->ra->lock, NULL);
	d->top = top;
	d->read_only = read_only || top->read_only;
	d->copy_on_read = copy_on_read && !d->read_only && top->drv->alloc_write;
	pthread_rwlock_init(&d->chain_lock, NULL);
	pthread_mutex_init(&d->flush_lock, NULL);
	*out = d;
	return 0;
}

int disk_close(struct disk *d)
{
	int r = 0;

	if (!d)
		return 0;
	/* A journal is emptied by a last flush through the disk, so that a
	 * server ended on purpose (an upgrade) leaves nothing to replay; the
	 * close flushes again, and its error is ours to return. */
	if (d->journal)
		disk_flush(d);
	r = image_close_chain(d->top);
	journal_close(d->journal);
	rangelock_free(d->locks);
	pthread_mutex_destroy(&d->ra->lock);
	free(d->ra);
	pthread_rwlock_destroy(&d->chain_lock);
	pthread_mutex_destroy(&d->flush_lock);
	free(d);
	return r;
}

/* Map a run of the top, refusing a driver answer outside [off, off+len). */
static int disk_map(struct image *top, uint64_t off, uint64_t len, struct extent *ext)
{
	int r = top->drv->map(top, off, len, ext);

	if (r == 0 && (ext->len == 0 || ext->len > len)) {
		sfs_error("%s: %s driver returned a bad extent at %llu", top->display,
			  top->drv->name, (unsigned long long)off);
		return -EIO;
	}
	return r;
}

/* Current guest contents of a run of the top. */
static int disk_fill(struct disk *d, const struct extent *ext, void *buf, size_t len, uint64_t off)
{
	return image_read_extent(d->top, ext, buf, len, off);
}

/* Under failover (journal.h) the journal has no room: flush instead,
 * which makes every allocation done so far durable, this one included. A
 * replay only notes that a flush is due at its end: a flush now would drop
 * records it has not applied yet. */
static int disk_journal_full(struct disk *d)
{
	if (d->journal_replaying) {
		d->journal_flush_due = true;
		return 0;
	}
	atomic_fetch_add(&d->stats.journal_flushes, 1);
	return disk_flush(d);
}

/* Journal where [pos, pos+len) of the top, just allocated, now lives.
 * Called under the range lock that covers it, before the operation that
 * allocated is acknowledged. */
static int disk_journal_map(struct disk *d, uint64_t pos, uint64_t len)
{
	struct image *top = d->top;
	uint64_t end = SFS_MIN(pos + len, top->size);

	while (pos < end) {
		struct extent ext;
		int r = disk_map(top, pos, end - pos, &ext);

		if (r < 0)
			return r;
		if (ext.type == EXT_DATA) {
			r = journal_append(d->journal, JOURNAL_MAP, pos, ext.len, ext.host_off);
			if (r == -ENOSPC)
				return disk_journal_full(d);
			if (r < 0)
				return r;
		}
		pos += ext.len;
	}
	return 0;
}

/* Every allocation in the top goes through here (guest writes and
 * zeroing, copy-on-read, read-ahead, populate): the driver writes the data
 * to the overlay file, then the journal learns where it went. */
static int disk_alloc_write(struct disk *d, uint64_t pos, const void *buf, uint64_t len)
{
	struct image *top = d->top;
	int r = top->drv->alloc_write(top, pos, buf, len);

	if (r == 0 && d->journal)
		r = disk_journal_map(d, pos, len);
	return r;
}

/* Under the range lock on the cluster-aligned [a, a+alen), which the caller
 * has already filled in bounce[] with the chain's data: allocate every run
 * still unallocated in the top; runs that became allocated meanwhile are
 * re-read from the overlay into bounce[] so the caller returns current data.
 * Called with chain_lock read-held. Adds the bytes allocated to *copied.
 * With best_effort (a guest read), a full overlay is not an error: the run
 * stays unallocated and the read is served from bounce[], which holds the
 * chain's data and cannot be stale (the range lock keeps writers out). */
static int disk_commit_locked(struct disk *d, uint8_t *bounce, uint64_t a, uint64_t alen,
			      bool best_effort, uint64_t *copied)
{
	struct image *top = d->top;
	uint64_t pos = a, end = a + alen;

	while (pos < end) {
		struct extent ext;
		uint64_t mlen = SFS_MIN(end, top->size) - pos;
		int r;

		if (pos >= top->size)
			break;
		r = disk_map(top, pos, mlen, &ext);
		if (r < 0)
			return r;
		if (ext.type == EXT_UNALLOC) {
			/* Extend to whole clusters: the run may end mid-cluster
			 * only at the image end. */
			uint64_t wlen = SFS_ALIGN_UP(ext.len, top->cluster_size);
			r = disk_alloc_write(d, pos, bounce + (pos - a), wlen);
			if (best_effort && (r == -ENOSPC || r == -EDQUOT)) {
				if (atomic_fetch_add(&d->stats.cor_skipped, ext.len) == 0)
					sfs_warn(
					    "%s: overlay full: guest reads are served from the "
					    "backing without being copied",
					    top->display);
			} else if (r < 0) {
				return r;
			} else {
				atomic_store(&d->dirty, true);
				*copied += ext.len;
			}
		} else {
			r = disk_fill(d, &ext, bounce + (pos - a), (size_t)ext.len, pos);
			if (r < 0)
				return r;
		}
		pos += ext.len;
	}
	return 0;
}

/* Copy-on-read of [off, off+len) into buf: one backing read of its
 * cluster-aligned cover, committed where the top is still unallocated (runs
 * allocated in the top, a coalesced gap or a racing write, are served from
 * the top). With t, the read that ends the guest's request, in a stream:
 * the backing read also covers the stream's read-ahead window. */
static int disk_cor(struct disk *d, uint8_t *buf, size_t len, uint64_t off,
		    const struct disk_ra_ticket *t)
{
	struct image *top = d->top;
	uint32_t cs = top->cluster_size;
	uint64_t a = SFS_ALIGN_DOWN(off, cs);
	uint64_t alen = SFS_ALIGN_UP(off + len, cs) - a;
	uint64_t copied = 0, ra_copied = 0, want = 0, ralen = 0, total;
	struct extent ext = {.type = EXT_UNALLOC};
	uint8_t *bounce, *heap = NULL;
	int slot, r;

	/* Not once the overlay was found full: it could not keep the data. */
	if (t && t->fresh)
		disk_ra_look_at_link(d->ra);
	if (t && !atomic_load(&d->stats.cor_skipped))
		want = disk_ra_claim(d->ra, t, a + alen);
	if (want)
		ralen = disk_ra_span(top, a + alen, want);
	if (ralen)
		heap = malloc(alen + SFS_ALIGN_UP(ralen, cs));
	if (!heap)
		ralen = 0; /* read-ahead is optional: without memory, just the read */
	total = alen + SFS_ALIGN_UP(ralen, cs);
	bounce = heap ? heap : disk_bounce(alen);
	if (!bounce) {
		r = -ENOMEM;
		goto out;
	}
	/* Backing data first, unlocked (immutable); zero-pad past the end. */
	memset(bounce + total - cs, 0, cs);
	r = disk_fill(d, &ext, bounce, (size_t)(SFS_MIN(a + total, top->size) - a), a);
	if (r < 0)
		goto out;
	slot = rangelock_lock(d->locks, a, total);
	if (slot < 0) {
		r = slot;
		goto out;
	}
	r = disk_commit_locked(d, bounce, a, alen, true, &copied);
	if (r == 0 && ralen)
		r = disk_commit_locked(d, bounce + alen, a + alen, total - alen, true, &ra_copied);
	rangelock_unlock(d->locks, slot);
	if (r < 0)
		goto out;
	atomic_fetch_add(&d->stats.cor_bytes, copied);
	atomic_fetch_add(&d->stats.readahead_bytes, ra_copied);
	memcpy(buf, bounce + (off - a), len);
out:
	if (want)
		disk_ra_done(d->ra, t, a + alen + want, a + alen + (r == 0 ? ralen : 0));
	free(heap);
	return r;
}

/* A guest read [off, off+len) whose first run, [off, off+n), is a miss:
 * the length of the span one backing read should serve, extended over
 * allocated gaps shorter than DISK_COALESCE_GAP up to the last miss behind
 * them. A map error only ends the span (the caller's map reports it). */
static uint64_t disk_coalesce(struct image *top, uint64_t off, uint64_t len, uint64_t n)
{
	uint64_t pos = off + n, end = off + len, span = n;

	while (pos < end) {
		struct extent ext;

		if (disk_map(top, pos, end - pos, &ext) < 0)
			break;
		pos += ext.len;
		if (ext.type == EXT_UNALLOC)
			span = pos - off;
		else if (pos - (off + span) >= DISK_COALESCE_GAP)
			break;
	}
	return span;
}

int disk_read(struct disk *d, void *buf, size_t len, uint64_t off)
{
	struct image *top = d->top;
	struct disk_ra_ticket t = {.slot = -1};
	bool cor, fetched = false;
	uint8_t *b = buf;
	uint64_t end;
	int r = 0;

	if (!sfs_add_ok(off, len, &end) || end > top->size)
		return -EINVAL;
	atomic_fetch_add(&d->stats.guest_inflight, 1);
	pthread_rwlock_rdlock(&d->chain_lock);
	cor = d->copy_on_read && top->backing;
	if (cor && len > 0)
		disk_ra_note(d->ra, off, end, &t);
	while (len > 0) {
		struct extent ext;

		r = disk_map(top, off, len, &ext);
		if (r < 0)
			break;
		if (d->read_observer)
			d->read_observer(d->read_observer_opaque, off, ext.len,
					 ext.type == EXT_UNALLOC && top->backing);
		if (ext.type == EXT_UNALLOC && cor) {
			ext.len = disk_coalesce(top, off, len, ext.len);
			r = disk_cor(d, b, (size_t)ext.len, off, ext.len == len ? &t : NULL);
			fetched = true;
		} else {
			r = disk_fill(d, &ext, b, (size_t)ext.len, off);
		}
		if (r < 0)
			break;
		b += ext.len;
		off += ext.len;
		len -= (size_t)ext.len;
	}
	pthread_rwlock_unlock(&d->chain_lock);
	atomic_fetch_sub(&d->stats.guest_inflight, 1);
	atomic_fetch_add(&d->stats.guest_ops, 1);
	if (r == 0) {
		atomic_fetch_add(&d->stats.guest_read, (uint64_t)(b - (uint8_t *)buf));
		if (!fetched && t.in_ra)
			atomic_fetch_add(&d->stats.readahead_hits, 1);
	}
	return r;
}

/* Write [off, off+len) under the range lock on its cluster-aligned cover. */
static int disk_write_locked(struct disk *d, const uint8_t *buf, size_t len, uint64_t off,
			     uint64_t a, uint64_t alen)
{
	struct image *top = d->top;
	uint32_t cs = top->cluster_size;
	uint64_t pos = a, end = a + alen;

	while (pos < end) {
		struct extent ext;
		uint64_t mlen = SFS_MIN(end, top->size) - pos;
		uint64_t rend, wa, wb;
		int r;

		if (pos >= top->size)
			break;
		r = disk_map(top, pos, mlen, &ext);
		if (r < 0)
			return r;
		rend = pos + ext.len;
		/* The part of this run the guest writes: [wa, wb). */
		wa = SFS_MAX(pos, off);
		wb = SFS_MIN(rend, off + len);
		if (ext.type == EXT_DATA) {
			if (wb > wa) {
				r = fetch_pwrite(top->file, buf + (wa - off), (size_t)(wb - wa),
						 ext.host_off + (wa - pos));
				if (r < 0)
					return r;
			}
		} else {
			/* Whole clusters: old contents around the write, then the write. */
			uint64_t clen = SFS_ALIGN_UP(ext.len, cs);
			uint8_t *bounce = disk_bounce(clen);

			if (!bounce)
				return -ENOMEM;
			memset(bounce + clen - cs, 0, cs);
			if (wa > pos) {
				r = disk_fill(d, &ext, bounce, (size_t)(wa - pos), pos);
				if (r < 0)
					return r;
			}
			if (rend > wb) {
				struct extent tail = ext;

				if (tail.type == EXT_DATA)
					tail.host_off += wb - pos;
				r = disk_fill(d, &tail, bounce + (wb - pos), (size_t)(rend - wb),
					      wb);
				if (r < 0)
					return r;
			}
			memcpy(bounce + (wa - pos), buf + (wa - off), (size_t)(wb - wa));
			r = disk_alloc_write(d, pos, bounce, clen);
			if (r < 0)
				return r;
			atomic_store(&d->dirty, true);
		}
		pos = rend;
	}
	return 0;
}

/* A guest update of [off, off+len) (checked against the size: past_end is
 * the error) done by fn under the range lock on its cluster-aligned cover
 * [a, a+alen), counted as guest I/O for the job's yielding. */
typedef int (*disk_update_fn)(struct disk *d, const void *arg, uint64_t off, uint64_t len,
			      uint64_t a, uint64_t alen);

static int disk_guest_update(struct disk *d, uint64_t off, uint64_t len, int past_end,
			     disk_update_fn fn, const void *arg, enum journal_kind kind)
{
	struct image *top = d->top;
	uint32_t cs = top->cluster_size;
	uint64_t end, a, alen;
	int slot, r;

	if (d->read_only)
		return -EROFS;
	if (!sfs_add_ok(off, len, &end) || end > top->size)
		return past_end;
	if (len == 0)
		return 0;
	if (!top->drv->alloc_write)
		return -EROFS;
	a = SFS_ALIGN_DOWN(off, cs);
	alen = SFS_ALIGN_UP(end, cs) - a;
	atomic_fetch_add(&d->stats.guest_inflight, 1);
	pthread_rwlock_rdlock(&d->chain_lock);
	slot = rangelock_lock(d->locks, a, alen);
	if (slot < 0) {
		r = slot;
	} else {
		r = fn(d, arg, off, len, a, alen);
		if (r == 0 && d->journal && kind == JOURNAL_ZERO) {
			r = journal_append(d->journal, JOURNAL_ZERO, off, len, 0);
			if (r == -ENOSPC)
				r = disk_journal_full(d);
		}
		rangelock_unlock(d->locks, slot);
	}
	pthread_rwlock_unlock(&d->chain_lock);
	atomic_fetch_sub(&d->stats.guest_inflight, 1);
	atomic_fetch_add(&d->stats.guest_ops, 1);
	/* In-place writes too: they need an fdatasync to be durable. */
	if (r == 0)
		atomic_store(&d->dirty, true);
	return r;
}

static int disk_write_fn(struct disk *d, const void *buf, uint64_t off, uint64_t len, uint64_t a,
			 uint64_t alen)
{
	return disk_write_locked(d, buf, (size_t)len, off, a, alen);
}

int disk_write(struct disk *d, const void *buf, size_t len, uint64_t off)
{
	int r = disk_guest_update(d, off, len, -ENOSPC, disk_write_fn, buf, JOURNAL_MAP);

	if (r == 0)
		atomic_fetch_add(&d->stats.guest_written, len);
	return r;
}

/* Make the unallocated (or compressed) whole clusters [pos, pos+zlen) of the
 * top read as zeros: zero clusters, or zero data where the format has none
 * (qcow2 v2). zbuf holds zbuflen (>= one cluster) zero bytes. Called under
 * the range lock. */
static int disk_zero_run(struct disk *d, uint64_t pos, uint64_t zlen, const uint8_t *zbuf,
			 size_t zbuflen)
{
	struct image *top = d->top;
	int r = top->drv->zero_clusters ? top->drv->zero_clusters(top, pos, zlen) : -ENOTSUP;

	if (r == -ENOTSUP) {
		r = 0;
		for (uint64_t done = 0; r == 0 && done < zlen;) {
			uint64_t c = SFS_MIN((uint64_t)zbuflen, zlen - done);

			r = disk_alloc_write(d, pos + done, zbuf, c);
			done += c;
		}
	}
	if (r == 0)
		atomic_store(&d->dirty, true);
	return r;
}

/* Whole clusters [pos, end) of the top read as zeros afterwards: data runs
 * are overwritten in place (no metadata change, nothing to free, and QED
 * could not free them anyway), the rest becomes zero clusters. zbuf holds
 * one cluster of zeros. Called under the range lock. */
static int disk_zero_clusters_locked(struct disk *d, uint64_t pos, uint64_t end,
				     const uint8_t *zbuf)
{
	struct image *top = d->top;
	uint32_t cs = top->cluster_size;
	int r = 0;

	end = SFS_MIN(end, top->size);
	while (r == 0 && pos < end) {
		struct extent ext;

		r = disk_map(top, pos, end - pos, &ext);
		if (r == 0 && ext.type == EXT_DATA)
			r = fetch_write_zeros(top->file, ext.host_off, ext.len);
		else if (r == 0 && ext.type != EXT_ZERO)
			r = disk_zero_run(d, pos, SFS_ALIGN_UP(ext.len, cs), zbuf, cs);
		pos += ext.len;
	}
	return r;
}

/* Whole clusters [ca, cb) are zeroed as clusters; the partial ones at
 * either end (a last cluster cut by the image end counts as whole) get
 * written zeros. */
static int disk_zero_fn(struct disk *d, const void *unused, uint64_t off, uint64_t len, uint64_t a,
			uint64_t alen)
{
	uint32_t cs = d->top->cluster_size;
	uint64_t end = off + len, ca = SFS_ALIGN_UP(off, cs);
	uint64_t cb = end == d->top->size ? SFS_ALIGN_UP(end, cs) : SFS_ALIGN_DOWN(end, cs);
	uint8_t *zbuf = calloc(1, cs);
	int r = 0;

	if (!zbuf)
		return -ENOMEM;
	if (ca >= cb)
		ca = cb = end; /* inside one cluster: all partial */
	if (off < ca)
		r = disk_write_locked(d, zbuf, ca - off, off, a, cs);
	if (r == 0 && ca < cb)
		r = disk_zero_clusters_locked(d, ca, cb, zbuf);
	if (r == 0 && cb < end)
		r = disk_write_locked(d, zbuf, end - cb, cb, cb, cs);
	free(zbuf);
	return r;
}

int disk_zero(struct disk *d, uint64_t off, uint64_t len)
{
	return disk_guest_update(d, off, len, -EINVAL, disk_zero_fn, NULL, JOURNAL_ZERO);
}

int disk_flush(struct disk *d)
{
	uint64_t mark = 0;
	int r;

	if (d->read_only)
		return 0;
	pthread_mutex_lock(&d->flush_lock);
	atomic_store(&d->dirty, false);
	/* Updates journaled before the mark were applied before it: the
	 * flush below covers them. */
	if (d->journal)
		mark = journal_mark(d->journal);
	r = d->top->drv->flush(d->top);
	if (r < 0) {
		atomic_store(&d->dirty, true);
	} else {
		if (d->journal)
			journal_release(d->journal, mark);
		if (atomic_exchange(&d->lost, false)) {
			sfs_error("%s: reporting the loss of writes a crashed server had "
				  "acknowledged to this flush (EIO)",
				  d->top->display);
			r = -EIO;
		}
	}
	pthread_mutex_unlock(&d->flush_lock);
	return r;
}

/* Replay a zeroing: only where the top does not hold data now. Data there
 * was zeroed in place and is in the file already (with any later writes,
 * which zeroing again would destroy); the rest was a metadata change the
 * dead server lost. */
static int disk_replay_zero(struct disk *d, uint64_t off, uint64_t len)
{
	uint64_t end = off + len;

	while (off < end) {
		struct extent ext;
		int r = disk_map(d->top, off, end - off, &ext);

		if (r == 0 && ext.type != EXT_DATA)
			r = disk_zero(d, off, ext.len);
		if (r < 0)
			return r;
		off += ext.len;
	}
	return 0;
}

/* Replay an allocation: the run's bytes are still at host in the file
 * (allocators only append; in-place writes after the allocation went there
 * too), so copy them into the disk again. */
static int disk_replay_map(struct disk *d, uint64_t off, uint64_t len, uint64_t host)
{
	struct image *top = d->top;
	uint64_t done = 0, hend;
	size_t cap = 1u << 20;
	uint8_t *buf;
	int r = 0;

	if (!sfs_add_ok(host, len, &hend) || hend > fetch_size(top->file) ||
	    host % top->cluster_size || off % top->cluster_size)
		return -EBADMSG;
	buf = malloc(cap);
	if (!buf)
		return -ENOMEM;
	while (r == 0 && done < len) {
		size_t n = (size_t)SFS_MIN((uint64_t)cap, len - done);

		r = fetch_pread(top->file, buf, n, host + done);
		if (r == 0)
			r = disk_write(d, buf, n, off + done);
		done += n;
	}
	free(buf);
	return r;
}

static int disk_replay_one(void *opaque, enum journal_kind kind, uint64_t off, uint64_t len,
			   uint64_t host)
{
	struct disk *d = opaque;
	uint64_t end;

	if (!sfs_add_ok(off, len, &end) || end > SFS_ALIGN_UP(d->top->size, d->top->cluster_size))
		return -EBADMSG;
	len = SFS_MIN(end, d->top->size) - off; /* a last partial cluster */
	if (len == 0)
		return 0;
	return kind == JOURNAL_MAP ? disk_replay_map(d, off, len, host)
				   : disk_replay_zero(d, off, len);
}

int disk_set_journal(struct disk *d, struct journal *j)
{
	uint64_t used = journal_used(j);
	int r = 0;

	/* Journal from the start: the replay's own allocations are recorded
	 * after the old records, so a crash of this server before its first
	 * flush replays both, in order. The old records stay until that
	 * flush. */
	d->journal = j;
	if (used) {
		d->journal_replaying = true;
		r = journal_replay(j, disk_replay_one, d);
		d->journal_replaying = false;
		if (r == 0 && d->journal_flush_due)
			r = disk_flush(d);
		if (r == 0) {
			sfs_warn(
			    "%s: replayed %llu record(s) of allocations the previous server had "
			    "acknowledged but not flushed",
			    d->top->display, (unsigned long long)(used / 32));
			atomic_fetch_add(&d->stats.journal_replayed, used / 32);
		} else {
			sfs_error("%s: cannot replay the writes the previous server had "
				  "acknowledged (%s): they are lost, and the guest's next flush "
				  "fails with EIO",
				  d->top->display, strerror(-r));
			atomic_store(&d->lost, true);
			journal_reset(j);
		}
	}
	return r;
}

/* Populate one run of at most bufsize bytes starting at pos (cluster-
 * aligned), known to hold data above base in layer 'depth' > 0. */
static int disk_populate_run(struct disk *d, uint64_t pos, uint64_t n, uint8_t *buf,
			     uint64_t *copied)
{
	struct image *top = d->top;
	uint32_t cs = top->cluster_size;
	uint64_t alen = SFS_ALIGN_UP(n, cs);
	struct extent ext = {.type = EXT_UNALLOC};
	int slot, r;

	if (alen > n)
		memset(buf + alen - cs, 0, cs);
	r = disk_fill(d, &ext, buf, (size_t)n, pos);
	if (r < 0)
		return r;
	slot = rangelock_lock(d->locks, pos, alen);
	if (slot < 0)
		return slot;
	r = disk_commit_locked(d, buf, pos, alen, false, copied);
	rangelock_unlock(d->locks, slot);
	return r;
}

/* Make [pos, pos+n) read as zeros in the top, except clusters the guest has
 * written meanwhile. Used when the chain above base has zeros over base data.
 * The whole run is re-mapped under the lock: a guest write may have landed
 * anywhere inside it since image_block_status() looked. */
static int disk_populate_zero(struct disk *d, uint64_t pos, uint64_t n, uint8_t *buf,
			      size_t bufsize)
{
	struct image *top = d->top;
	uint32_t cs = top->cluster_size;
	uint64_t alen = SFS_ALIGN_UP(n, cs), end = SFS_MIN(pos + alen, top->size);
	int slot, r = 0;

	slot = rangelock_lock(d->locks, pos, alen);
	if (slot < 0)
		return slot;
	memset(buf, 0, bufsize);
	while (r == 0 && pos < end) {
		struct extent ext;

		r = disk_map(top, pos, end - pos, &ext);
		if (r == 0 && ext.type == EXT_UNALLOC)
			r = disk_zero_run(d, pos, SFS_ALIGN_UP(ext.len, cs), buf, bufsize);
		pos += ext.len;
	}
	rangelock_unlock(d->locks, slot);
	return r;
}

int disk_populate(struct disk *d, struct image *base, uint64_t off, uint64_t len, void *vbuf,
		  size_t bufsize, uint64_t *copied)
{
	struct image *top = d->top;
	uint8_t *buf = vbuf;
	uint64_t end;
	uint32_t cs = top->cluster_size;
	int r = 0;

	*copied = 0;
	if (!sfs_add_ok(off, len, &end))
		return -EINVAL;
	end = SFS_MIN(end, top->size);
	if (off % cs || bufsize < cs || bufsize % cs)
		return -EINVAL;
	if (d->read_only)
		return -EROFS;
	pthread_rwlock_rdlock(&d->chain_lock);
	while (off < end) {
		uint64_t pnum, n = SFS_MIN(end - off, (uint64_t)bufsize);
		enum extent_type type;
		int depth;

		r = image_block_status(top, base, off, n, &pnum, &depth, &type);
		if (r < 0)
			break;
		/* Lower layers may have smaller clusters or end mid-cluster: work
		 * in whole top clusters, copying a cluster of mixed state. */
		if (off + pnum < end)
			pnum = SFS_ALIGN_DOWN(pnum, cs);
		if (pnum == 0) {
			pnum = SFS_MIN((uint64_t)cs, end - off);
			depth = 1;
			type = EXT_DATA;
		}
		if (depth == 0 || depth == -2) {
			atomic_fetch_add(&d->stats.stream_present, pnum);
		} else if (depth == -1 || type == EXT_ZERO) {
			/* Zeros above base: they must hide base's data after the
			 * rebase. Without a base, a hole is simply left a hole. */
			if (base && top->backing != base) {
				r = disk_populate_zero(d, off, pnum, buf, bufsize);
				if (r < 0)
					break;
			}
			atomic_fetch_add(&d->stats.stream_zero, pnum);
		} else {
			uint64_t c = 0;

			r = disk_populate_run(d, off, pnum, buf, &c);
			if (r < 0)
				break;
			*copied += c;
			atomic_fetch_add(&d->stats.stream_copied, c);
		}
		off += pnum;
	}
	pthread_rwlock_unlock(&d->chain_lock);
	return r;
}

/* The name to record for base in the top's header: relative to the top's
 * directory when base lives there or below (so the pair can be moved
 * together, as qemu-img does), else base's resolved path or URL. */
static char *disk_backing_name_for(struct image *top, struct image *base)
{
	const char *slash = strrchr(top->filename, '/');
	size_t dirlen;

	if (top->backing == base && top->backing_name)
		return strdup(top->backing_name);
	if (!slash)
		return strdup(base->filename);
	dirlen = (size_t)(slash - top->filename) + 1;
	if (strncmp(base->filename, top->filename, dirlen) == 0)
		return strdup(base->filename + dirlen);
	return strdup(base->filename);
}

int disk_rebase(struct disk *d, struct image *base)
{
	struct image *top = d->top, *old, *cur, *next;
	char *name = NULL;
	int r;

	if (d->read_only)
		return -EROFS;
	if (!top->drv->set_backing)
		return -ENOTSUP;
	if (base) {
		name = disk_backing_name_for(top, base);
		if (!name)
			return -ENOMEM;
	}
	/* The header rewrite (a flush, a write, a sync) runs beside guest
	 * I/O: guests read only what is above base, which is in the top now.
	 * Only the pointer swap excludes readers, so it never stalls them for
	 * the length of an fdatasync. Callers serialize rebases (one job). */
	pthread_mutex_lock(&d->flush_lock);
	r = top->drv->set_backing(top, name, base ? base->drv->name : NULL);
	pthread_mutex_unlock(&d->flush_lock);
	free(name);
	if (r < 0)
		return r;
	pthread_rwlock_wrlock(&d->chain_lock);
	old = top->backing;
	/* Move the dropped layers' network bytes to the closed total in the
	 * same critical section as the swap: disk_network_bytes() (read-held)
	 * must see them in one place or the other, or the total would drop. No
	 * reader is inside those layers now, so their counters are final. */
	for (cur = old; cur && cur != base; cur = cur->backing)
		if (fetch_is_network(cur->file))
			atomic_fetch_add(&d->stats.net_bytes_closed,
					 atomic_load(&cur->file->stats.bytes_read));
	top->backing = base;
	for (cur = top; cur && cur->backing; cur = cur->backing)
		cur->backing->depth = cur->depth + 1;
	pthread_rwlock_unlock(&d->chain_lock);
	/* No reader can reach the old layers any more: the header no longer
	 * names them, so close them and never touch them again. */
	for (cur = old; cur && cur != base; cur = next) {
		next = cur->backing;
		cur->backing = NULL;
		image_close_chain(cur);
	}
	return 0;
}

struct image *disk_find_layer(struct disk *d, const char *name)
{
	struct image *parent, *cur;

	for (parent = d->top; (cur = parent->backing); parent = cur) {
		if (sfs_same_file(cur->filename, name) ||
		    (parent->backing_name && strcmp(parent->backing_name, name) == 0))
			return cur;
	}
	return NULL;
}

uint64_t disk_network_bytes(struct disk *d)
{
	uint64_t n;

	pthread_rwlock_rdlock(&d->chain_lock);
	n = atomic_load(&d->stats.net_bytes_closed);
	for (struct image *img = d->top->backing; img; img = img->backing)
		if (fetch_is_network(img->file))
			n += atomic_load(&img->file->stats.bytes_read);
	pthread_rwlock_unlock(&d->chain_lock);
	return n;
}

void disk_prefetch(struct disk *d, struct image *base, uint64_t off, uint64_t len)
{
	struct image *top = d->top;
	uint64_t end;

	if (!sfs_add_ok(off, len, &end))
		return;
	end = SFS_MIN(end, top->size);
	pthread_rwlock_rdlock(&d->chain_lock);
	while (off < end) {
		uint64_t pnum;
		enum extent_type type;
		struct extent ext;
		struct image *l;
		int depth;

		if (image_block_status(top, base, off, end - off, &pnum, &depth, &type) < 0)
			break;
		l = depth > 0 ? image_layer(top, depth) : NULL;
		if (l && type == EXT_DATA && l->drv->map(l, off, pnum, &ext) == 0 &&
		    ext.type == EXT_DATA && ext.len > 0 && ext.len <= pnum)
			fetch_prefetch(l->file, ext.host_off, ext.len);
		off += pnum;
	}
	pthread_rwlock_unlock(&d->chain_lock);
}
