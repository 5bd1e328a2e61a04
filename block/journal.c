/* streamfs: the failover allocation journal (see journal.h).
 *
 * LAYOUT: the first page is the header, the records follow it back to
 * back, each a struct journal_rec. The live records are [start, end) of the record area; both live
 * in one 64-bit word, span = start << 32 | end, so a single store commits
 * an append (end moves past a record written beyond it) or a release
 * (start moves, or both go back to 0). A server killed at any instruction
 * leaves either the old span or the new one, never half a record inside
 * it.
 *
 * THREAD MODEL: appends, marks and releases take j->lock (a process-local
 * mutex: only one server uses the memory at a time); a record is 32 bytes.
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "journal.h"
#include "util.h"

#define JOURNAL_MAGIC	  0x4c4e524a53465331ull /* "1SFSJRNL" little-endian */
#define JOURNAL_REC_MAGIC 0x4a524543u
#define JOURNAL_HDR_BYTES 4096u

struct journal_hdr {
	uint64_t magic;
	uint64_t area; /* bytes of the record area */
	_Atomic uint64_t span;
};

struct journal_rec {
	uint32_t magic;
	uint32_t kind;
	uint64_t off;  /* guest offset */
	uint64_t len;  /* bytes */
	uint64_t host; /* JOURNAL_MAP: file offset of the run */
};

struct journal {
	struct journal_hdr *hdr;
	uint8_t *area;
	uint64_t size; /* == hdr->area, as this process set or checked it */
	pthread_mutex_t lock;
};

#define SPAN(start, end) (((uint64_t)(start) << 32) | (uint64_t)(end))
#define SPAN_START(s)	 ((s) >> 32)
#define SPAN_END(s)	 ((s)&0xffffffffu)

int journal_open(void *mem, size_t len, struct journal **out)
{
	struct journal_hdr *h = mem;
	uint64_t area = len > JOURNAL_HDR_BYTES ? len - JOURNAL_HDR_BYTES : 0;
	struct journal *j;

	if (area < sizeof(struct journal_rec) || area > 0xffffffffu)
		return -EINVAL;
	if (h->magic == 0 && h->area == 0 && atomic_load(&h->span) == 0) {
		h->area = area; /* a new memfd: zeros */
		h->magic = JOURNAL_MAGIC;
	} else if (h->magic != JOURNAL_MAGIC || h->area != area) {
		return -EINVAL;
	}
	j = calloc(1, sizeof(*j));
	if (!j)
		return -ENOMEM;
	j->hdr = h;
	j->area = (uint8_t *)mem + JOURNAL_HDR_BYTES;
	j->size = area;
	pthread_mutex_init(&j->lock, NULL);
	*out = j;
	return 0;
}

void journal_close(struct journal *j)
{
	if (!j)
		return;
	pthread_mutex_destroy(&j->lock);
	free(j);
}

uint64_t journal_used(struct journal *j)
{
	uint64_t s = atomic_load(&j->hdr->span);

	return SPAN_END(s) > SPAN_START(s) ? SPAN_END(s) - SPAN_START(s) : 0;
}

int journal_replay(struct journal *j, journal_fn fn, void *opaque)
{
	uint64_t s = atomic_load(&j->hdr->span), start = SPAN_START(s), end = SPAN_END(s);
	int r;

	/* Check everything first: a damaged journal applies nothing. */
	if (start > end || end > j->size)
		return -EBADMSG;
	for (int pass = 0; pass < 2; pass++) {
		for (uint64_t pos = start; pos < end;) {
			struct journal_rec rec;
			uint64_t n;

			if (end - pos < sizeof(rec))
				return -EBADMSG;
			memcpy(&rec, j->area + pos, sizeof(rec));
			if (rec.magic != JOURNAL_REC_MAGIC ||
			    (rec.kind != JOURNAL_MAP && rec.kind != JOURNAL_ZERO) || rec.len == 0)
				return -EBADMSG;
			n = sizeof(rec);
			if (pass == 1) {
				r = fn(opaque, rec.kind, rec.off, rec.len, rec.host);
				if (r < 0)
					return r;
			}
			pos += n;
		}
	}
	return 0;
}

int journal_append(struct journal *j, enum journal_kind kind, uint64_t off, uint64_t len,
		   uint64_t host)
{
	struct journal_rec rec = {
	    .magic = JOURNAL_REC_MAGIC, .kind = kind, .off = off, .len = len, .host = host};
	uint64_t s, end;

	if (len == 0)
		return 0;
	pthread_mutex_lock(&j->lock);
	s = atomic_load(&j->hdr->span);
	end = SPAN_END(s);
	if (sizeof(rec) > j->size - end) {
		pthread_mutex_unlock(&j->lock);
		return -ENOSPC;
	}
	memcpy(j->area + end, &rec, sizeof(rec));
	/* Release: the record is complete before the span covers it. */
	atomic_store_explicit(&j->hdr->span, SPAN(SPAN_START(s), end + sizeof(rec)),
			      memory_order_release);
	pthread_mutex_unlock(&j->lock);
	return 0;
}

uint64_t journal_mark(struct journal *j)
{
	uint64_t m;

	pthread_mutex_lock(&j->lock);
	m = SPAN_END(atomic_load(&j->hdr->span));
	pthread_mutex_unlock(&j->lock);
	return m;
}

/* Called with j->lock held: the span is empty; start over at 0 and give
 * the pages the records used back to the system (MADV_REMOVE frees a
 * shared memfd's pages; failure only costs memory). */
static void journal_empty_locked(struct journal *j, uint64_t old_end)
{
	long pg = sysconf(_SC_PAGESIZE);

	atomic_store(&j->hdr->span, 0);
	if (pg > 0 && old_end > (uint64_t)pg)
		madvise(j->area, SFS_ALIGN_UP(old_end, (uint64_t)pg), MADV_REMOVE);
}

void journal_release(struct journal *j, uint64_t mark)
{
	uint64_t s, end;

	pthread_mutex_lock(&j->lock);
	s = atomic_load(&j->hdr->span);
	end = SPAN_END(s);
	if (mark >= end)
		journal_empty_locked(j, end);
	else if (mark > SPAN_START(s))
		atomic_store(&j->hdr->span, SPAN(mark, end));
	pthread_mutex_unlock(&j->lock);
}

void journal_reset(struct journal *j)
{
	pthread_mutex_lock(&j->lock);
	journal_empty_locked(j, SPAN_END(atomic_load(&j->hdr->span)));
	pthread_mutex_unlock(&j->lock);
}
