/* streamfs: boot-trace recording and replay for one disk (job/prefetch.c).
 *
 * Recording: every mount records the order in which the guest first reads
 * data the overlay did not have (include/trace.h's recorder, fed by the
 * disk's read observer), so that `cat MNT/control/trace` after a boot gives a
 * trace of that boot.
 *
 * Replay (-o prefetch=FILE|URL): from the moment of mounting, the trace's
 * ranges are copied into the overlay in trace order by PREFETCH_LANES threads
 * through disk_populate(), the path the stream job uses: clusters already in
 * the overlay (written by the guest, or copied on read) are skipped, a racing
 * guest write always wins, and every byte copied is backing data, so a stale
 * or foreign trace can waste bandwidth but never change what the guest reads.
 * A trace whose header names another backing (size, validator) is refused.
 * The stream job, if started, takes no chunk until the replay is over, so
 * nothing is fetched twice.
 */
#ifndef STREAMFS_PREFETCH_H
#define STREAMFS_PREFETCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "disk.h"
#include "events.h"

#define PREFETCH_LANES 8 /* trace pieces in flight */

struct prefetch;

enum prefetch_state { PREFETCH_NONE, PREFETCH_RUNNING, PREFETCH_DONE, PREFETCH_FAILED };

struct prefetch_status {
	enum prefetch_state state;
	uint64_t ranges_total, ranges_done;
	uint64_t bytes_total, bytes_done;     /* bytes of the trace covered */
	uint64_t bytes_copied;		      /* of those, copied (the rest was already there) */
	uint64_t guest_reads_served;	      /* guest reads of data the replay had copied */
	uint64_t trace_ranges, trace_dropped; /* the recorder's counters */
	char error[256];
};

/* Start recording d's guest reads (installs d's read observer: call before
 * the disk serves requests). */
int prefetch_new(struct disk *d, struct events *ev, struct prefetch **out);
/* Stop the replay threads and free everything (the disk outlives it). */
void prefetch_free(struct prefetch *pf);

/* Read a trace file or URL (at most TRACE_MAX_TEXT bytes) into a malloc'd
 * buffer. -errno after a message naming the uri. */
int prefetch_load(const char *uri, char **text, size_t *len);

/* Parse text and check it names d's backing, without starting anything:
 * -EINVAL after a message for a bad or foreign trace. */
int prefetch_check(struct prefetch *pf, const char *text, size_t len);
/* Parse text, check it names d's backing, and start copying its ranges in
 * the background. -EINVAL (after a message) for a bad or foreign trace. */
int prefetch_replay(struct prefetch *pf, const char *text, size_t len);

/* The trace recorded so far, as text (control/trace). */
int prefetch_render_trace(struct prefetch *pf, char **buf, size_t *len);

/* True while a replay is copying (the stream job waits for it). */
bool prefetch_active(struct prefetch *pf);

void prefetch_get_status(struct prefetch *pf, struct prefetch_status *st);
const char *prefetch_state_name(enum prefetch_state s);

#endif /* STREAMFS_PREFETCH_H */
