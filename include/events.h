/* streamfs: the job's event log behind control/events.
 *
 * A bounded ring of timestamped lines with sequence numbers. Each open of
 * control/events gets a cursor starting at the next event; a read blocks
 * until an event past the cursor exists (QEMU's BLOCK_JOB_* events, as
 * lines). A reader that falls more than EVENTS_RING events behind skips to
 * the oldest one kept and gets a "lost N" line first. poll() support: the
 * FUSE layer registers poll handles, which events_post() notifies. */
#ifndef STREAMFS_EVENTS_H
#define STREAMFS_EVENTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define EVENTS_RING 256 /* events kept */
#define EVENTS_LINE 512 /* bytes per event line, including newline */

struct events;

struct events *events_new(void);
void events_free(struct events *ev);

/* Append "TIMESTAMP name detail\n" and wake readers and pollers. */
void events_post(struct events *ev, const char *name, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* The sequence number a new reader starts at (the next event). */
uint64_t events_cursor(struct events *ev);

/* Copy whole lines for events >= *cursor into buf (at least one line if
 * any is available), advance *cursor. If none is available, wait up to
 * timeout_ms (-1 = until one arrives or events_shutdown()). Returns the
 * number of bytes copied (0 on timeout or shutdown). */
size_t events_read(struct events *ev, uint64_t *cursor, char *buf, size_t len, int timeout_ms);

/* True once events_shutdown() was called. */
bool events_is_shutdown(struct events *ev);

/* True if an event >= cursor is available. */
bool events_ready(struct events *ev, uint64_t cursor);

/* Set a callback run (without the lock) after each post, for poll wakeups. */
void events_set_notify(struct events *ev, void (*fn)(void *), void *opaque);

/* Wake all blocked readers for good (unmount). */
void events_shutdown(struct events *ev);

#endif /* STREAMFS_EVENTS_H */
