/* streamfs: byte-range locks for in-flight allocating requests (private to
 * formats/). A holder owns [off, off+len) exclusively; lockers of an
 * overlapping range wait. Few ranges are held at once (one per FUSE worker
 * thread plus the stream job), so a small array is enough. */
#ifndef STREAMFS_RANGELOCK_H
#define STREAMFS_RANGELOCK_H

#include <stdint.h>

struct rangelock;

struct rangelock *rangelock_new(void);
void rangelock_free(struct rangelock *rl);
/* Block until [off, off+len) overlaps no held range, then hold it.
 * Returns a slot handle for rangelock_unlock, or -errno. */
int rangelock_lock(struct rangelock *rl, uint64_t off, uint64_t len);
void rangelock_unlock(struct rangelock *rl, int slot);

#endif /* STREAMFS_RANGELOCK_H */
