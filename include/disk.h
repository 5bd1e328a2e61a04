/* streamfs: the guest-facing disk: copy-on-read with adaptive read-ahead,
 * writes with cluster read-modify-write, in-flight tracking, populate (used
 * by the stream job and control/pull), rebase. Lives in block/disk.c, above
 * the format drivers and below fusefs/, which only translates FUSE requests
 * into these calls.
 *
 * Read-ahead: a copy-on-read miss that continues a sequential guest stream
 * also copies the data that follows (a window doubling from 128 KiB to
 * 4 MiB while the stream holds), in the same backing request, so the
 * stream's next reads cost no round trip. Misses of one read separated by
 * small allocated gaps are fetched in one backing request too.
 *
 * In-flight tracking: every operation that allocates in the overlay (guest
 * write, copy-on-read, stream copy) first locks the cluster-aligned guest
 * range it touches (block/rangelock.c), then re-maps it under the lock.
 * So a copy-on-read that read old backing data never overwrites a guest write
 * that won the lock first: it sees the cluster allocated and drops its copy.
 *
 * LOCK ORDER, across every module (take left before right; never the reverse):
 *
 *   job lock (job/stream.c j->lock)
 *     -> disk chain_lock (read; written only by disk_rebase, which holds
 *        nothing else)
 *          -> range lock (block/rangelock.c, one slot per allocating range)
 *               -> driver lock (qcow2 p->lock, QED's) -> byte-source locks
 *                  (fetch/http.c connection pool)
 *     -> events lock (job/events.c; its notify callback runs after release)
 *   disk flush_lock -> driver lock          (disk_flush, disk_rebase)
 *   events handle lock (fusefs/ops.c h->lock) -> events lock
 *   Leaves, taken with nothing else after them: fusefs/ops.c sfs_poll_lock,
 *   sfs_handles_lock, attr_lock; block/disk.c's read-ahead table lock.
 *
 * Never held across network or disk I/O: the job lock and the events lock.
 * The chain lock and range locks are (reads of the backing, overlay writes):
 * that is what they protect.
 */
#ifndef STREAMFS_DISK_H
#define STREAMFS_DISK_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "image.h"
#include "journal.h"

struct rangelock;

/* Counters shown in control/status; in bytes unless noted. */
struct disk_stats {
	_Atomic uint64_t guest_read;	   /* bytes read by the guest */
	_Atomic uint64_t guest_written;	   /* bytes written by the guest */
	_Atomic uint64_t cor_bytes;	   /* bytes copied into the overlay by guest reads */
	_Atomic uint64_t cor_skipped;	   /* bytes read but not copied: the overlay was full */
	_Atomic uint64_t stream_copied;	   /* bytes copied by the stream job / pull */
	_Atomic uint64_t stream_present;   /* bytes the job found already in the overlay */
	_Atomic uint64_t stream_zero;	   /* bytes the job skipped as holes/zero */
	_Atomic uint64_t guest_ops;	   /* guest requests seen (for yielding) */
	_Atomic uint64_t guest_inflight;   /* guest requests in progress */
	_Atomic uint64_t net_bytes_closed; /* HTTP bytes fetched by layers since closed */
	_Atomic uint64_t readahead_bytes;  /* bytes copied ahead of sequential guest reads */
	_Atomic uint64_t readahead_hits;   /* guest reads (count) served from read-ahead data */
	_Atomic uint64_t journal_replayed; /* records of a dead server's journal replayed */
	_Atomic uint64_t journal_flushes;  /* flushes made because the journal was full */
};

struct disk_ra;

struct disk {
	struct image *top;	 /* the writable overlay (or read-only with -o ro) */
	struct rangelock *locks; /* in-flight allocating ranges */
	bool copy_on_read;
	bool read_only;
	struct disk_stats stats;
	pthread_rwlock_t chain_lock; /* write-held while the backing chain is swapped */
	pthread_mutex_t flush_lock;
	_Atomic bool dirty; /* allocations since the last flush */
	struct disk_ra *ra; /* recent sequential guest read streams */
	/* Told of every run of every guest read, miss = the overlay did not
	 * hold it (it came from the backing chain, copied or not): the boot
	 * trace recorder (job/prefetch.c). Set before the disk serves
	 * requests and cleared after; runs on the reading thread. */
	void (*read_observer)(void *opaque, uint64_t off, uint64_t len, bool miss);
	void *read_observer_opaque;
	struct journal *journal; /* failover: allocations since the last flush */
	bool journal_replaying;	 /* disk_set_journal() is replaying: no flush on full */
	bool journal_flush_due;	 /* ... and the journal filled up meanwhile */
	_Atomic bool lost;	 /* acknowledged writes were lost: fail a flush */
};

/* Wrap an open chain. Takes ownership of top. */
int disk_new(struct image *top, bool copy_on_read, bool read_only, struct disk **out);
/* Flush and close everything. Returns the flush result. */
int disk_close(struct disk *d);

/* Guest read: exactly len bytes (the caller clamps to the size). */
int disk_read(struct disk *d, void *buf, size_t len, uint64_t off);
/* Guest write: -ENOSPC past the size, -EROFS when read-only. */
int disk_write(struct disk *d, const void *buf, size_t len, uint64_t off);
/* Make [off, off+len) read as zeros (guest discard / write-zeroes): whole
 * clusters become zero clusters or are zeroed in place, partial ones are
 * written; the backing is hidden, so the stream job skips them. -EINVAL past
 * the size, -EROFS when read-only. */
int disk_zero(struct disk *d, uint64_t off, uint64_t len);
/* Read-ahead: the first window a miss that starts a read stream reads
 * past itself now (0: none; see block/disk.c), and, for tests and callers
 * that know better than the network statistics, the backing link's round
 * trip (s) and transfer rate (bytes/s) it is derived from. */
uint64_t disk_ra_first_window(struct disk *d);
void disk_ra_set_link(struct disk *d, double rtt_s, double rate);
/* Durable barrier (guest fsync). -EIO once after disk_set_journal() could
 * not replay writes a dead server had acknowledged. */
int disk_flush(struct disk *d);
/* Crash failover (journal.h): replay what j holds (a dead server's
 * allocations and zeroings; kept until the next flush), then journal every
 * allocation and zeroing until a flush covers it. Takes ownership of j. Call before serving;
 * returns the replay's error (then the next flush fails with EIO). */
int disk_set_journal(struct disk *d, struct journal *j);

/* Copy everything in [off, off+len) that lives above 'base' (NULL = the
 * whole chain) into the overlay; zero regions above base become zero
 * clusters (or nothing, when no base holds data below them). Uses the same
 * range locks as guest I/O, so a racing guest write always wins. Sets
 * *copied to the bytes of data copied. buf is a caller scratch buffer of
 * bufsize bytes (a multiple of the cluster size). */
int disk_populate(struct disk *d, struct image *base, uint64_t off, uint64_t len, void *buf,
		  size_t bufsize, uint64_t *copied);

/* Hint that disk_populate(d, base, off, len) comes next: start reading the
 * backing data it will copy. Cheap; never fails. */
void disk_prefetch(struct disk *d, struct image *base, uint64_t off, uint64_t len);

/* After a complete populate: point the overlay at base (NULL = no backing),
 * durably, then close the layers that are no longer referenced. */
int disk_rebase(struct disk *d, struct image *base);

/* Bytes fetched over HTTP(S) by every backing layer, past and present. */
uint64_t disk_network_bytes(struct disk *d);

/* Find the layer of the chain whose filename (resolved) or backing name
 * equals name; NULL if none (the top itself is not a valid base). Called
 * with chain_lock held: the layer is valid only while no rebase can run. */
struct image *disk_find_layer(struct disk *d, const char *name);

#endif /* STREAMFS_DISK_H */
