/* streamfs: the failover write journal (block/journal.c).
 *
 * A server process that dies loses the metadata its drivers had not yet
 * written back (the qcow2/QED caches are write-back until a flush), so an
 * allocating write it had acknowledged would vanish with it although the
 * guest, which never saw the mount go away, believes it done. Under crash
 * failover every acknowledged guest write and zeroing since the last
 * successful flush is therefore also kept, in order, in memory shared with
 * the supervisor (a memfd that outlives each server). The next server
 * replays the records before it serves, flushes, and empties the journal:
 * nothing the guest was told is written is lost to a server crash.
 *
 * A machine crash loses the journal with the guest, which is the usual
 * contract: only flushed writes survive it.
 */
#ifndef STREAMFS_JOURNAL_H
#define STREAMFS_JOURNAL_H

#include <stddef.h>
#include <stdint.h>

/* Bytes of shared memory a journal needs: one page of header, the rest
 * records. Pages are only touched as records are appended, and handed back
 * when the journal empties. A guest that writes more than this between two
 * flushes gets a flush from the server instead (disk.c). */
#define JOURNAL_SIZE (32u << 20)

enum journal_kind {
	JOURNAL_WRITE = 1, /* data follows */
	JOURNAL_ZERO = 2,  /* the range reads as zeros */
};

struct journal;

/* Use mem (len bytes, shared, writable, zero-filled when new) as the
 * journal. -EINVAL if len is too small or mem holds a journal of another
 * size or a damaged header. */
int journal_open(void *mem, size_t len, struct journal **out);
/* Free j (not the memory). */
void journal_close(struct journal *j);

/* Bytes of records kept now. */
uint64_t journal_used(struct journal *j);

/* Call fn for each record a previous process left, oldest first; stops
 * at fn's first error and returns it. -EBADMSG (nothing applied) if the
 * records are malformed: the memory is treated as untrusted input. */
typedef int (*journal_fn)(void *opaque, enum journal_kind kind, uint64_t off, uint64_t len,
			  const void *data);
int journal_replay(struct journal *j, journal_fn fn, void *opaque);

/* Keep one record. data is len bytes for JOURNAL_WRITE, NULL for
 * JOURNAL_ZERO. -ENOSPC when it does not fit: the caller must make the
 * operation durable another way (a flush). */
int journal_append(struct journal *j, enum journal_kind kind, uint64_t off, uint64_t len,
		   const void *data);

/* The flush protocol: m = journal_mark(j) before a flush starts; after it
 * succeeded, journal_release(j, m) drops the records kept before m (the
 * flush covered them). Flushes must not overlap (disk.c's flush_lock). */
uint64_t journal_mark(struct journal *j);
void journal_release(struct journal *j, uint64_t mark);
/* Drop every record (after a replay was made durable). */
void journal_reset(struct journal *j);

#endif
