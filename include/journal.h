/* streamfs: the failover allocation journal (block/journal.c).
 *
 * A server process that dies loses the metadata its drivers had not yet
 * written back (the qcow2/QED caches are write-back until a flush), so a
 * write it had acknowledged into a newly allocated cluster would vanish with
 * it although the guest, which never saw the mount go away, believes it
 * done. The data itself is safe: every write reaches the overlay file (the
 * page cache, which outlives the process) before it is acknowledged, and
 * the allocators only append, so a cluster's bytes stay where they were
 * written. What is lost is only where they are. So under crash failover
 * every allocation since the last successful flush (guest range -> file
 * offset: guest writes, copy-on-read, read-ahead, the stream job) and every
 * zeroing is kept, in order, in memory shared with the supervisor (a memfd
 * that outlives each server): 32 bytes a record, however large the write.
 * The next server replays the records before it serves (it copies each
 * recorded run's bytes from the file into the disk again, and zeroes what
 * was zeroed), so nothing the guest was told is written is lost to a server
 * crash; the clusters the dead server had taken are left as leaks, which
 * qemu-img check reports and which cost nothing else.
 *
 * A machine crash loses the journal with the guest, which is the usual
 * contract: only flushed writes survive it.
 */
#ifndef STREAMFS_JOURNAL_H
#define STREAMFS_JOURNAL_H

#include <stddef.h>
#include <stdint.h>

/* Bytes of shared memory a journal needs: one page of header, the rest
 * records (about 131,000). Pages are only touched as records are appended,
 * and handed back when the journal empties. More allocations than that
 * between two flushes get a flush from the server instead (disk.c). */
#define JOURNAL_SIZE (4u << 20)

enum journal_kind {
	JOURNAL_MAP = 1,  /* guest [off, off+len) was allocated at file offset host */
	JOURNAL_ZERO = 2, /* guest [off, off+len) was made to read as zeros */
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
 * at fn's first error and returns it. Records appended meanwhile are not
 * visited. -EBADMSG (nothing applied) if the records are malformed: the
 * memory is treated as untrusted input (fn checks the values). */
typedef int (*journal_fn)(void *opaque, enum journal_kind kind, uint64_t off, uint64_t len,
			  uint64_t host);
int journal_replay(struct journal *j, journal_fn fn, void *opaque);

/* Keep one record (host: 0 for JOURNAL_ZERO). -ENOSPC when it does not
 * fit: the caller must make the operation durable another way (a flush). */
int journal_append(struct journal *j, enum journal_kind kind, uint64_t off, uint64_t len,
		   uint64_t host);

/* The flush protocol: m = journal_mark(j) before a flush starts; after it
 * succeeded, journal_release(j, m) drops the records kept before m (the
 * flush covered them). Flushes must not overlap (disk.c's flush_lock). */
uint64_t journal_mark(struct journal *j);
void journal_release(struct journal *j, uint64_t mark);
/* Drop every record (after a replay was made durable). */
void journal_reset(struct journal *j);

#endif
