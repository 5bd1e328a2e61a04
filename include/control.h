/* streamfs: the control/ directory: file table, rendering of the readable
 * files and strict parsing of the commands written to the others. No FUSE
 * here, so the parsers can be unit-tested and fuzzed.
 *
 * A write is a command: parsed all or nothing; a bad command is -EINVAL and
 * changes nothing; a command that cannot run now is -EBUSY. */
#ifndef STREAMFS_CONTROL_H
#define STREAMFS_CONTROL_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "disk.h"
#include "events.h"
#include "prefetch.h"
#include "stream.h"

enum control_id {
	CTL_STATUS,
	CTL_PROGRESS,
	CTL_SPEED,
	CTL_STREAM,
	CTL_ABORT,
	CTL_PULL,
	CTL_EVENTS,
	CTL_MAP,
	CTL_METRICS,
	CTL_TRACE,
	CTL_COUNT,
};

struct control_info {
	const char *name;
	mode_t mode; /* permission bits */
};
extern const struct control_info control_files[CTL_COUNT];

/* What the control files act on. */
struct control_ctx {
	struct disk *disk;
	struct stream_job *job;
	struct events *events;
	struct prefetch *prefetch; /* boot trace recording and replay */
};

/* Index of control file 'name' or -ENOENT. */
int control_lookup(const char *name);

/* Render a readable file's content into a malloc'd buffer. */
int control_render(struct control_ctx *c, enum control_id id, char **buf, size_t *len);

/* Run a command written to file id. Returns 0 or -errno. */
int control_command(struct control_ctx *c, enum control_id id, const char *text, size_t len);

/* Parsed form of a line written to control/stream. */
enum control_stream_action {
	CTL_STREAM_START,
	CTL_STREAM_PAUSE,
	CTL_STREAM_RESUME,
	CTL_STREAM_CANCEL,
};
struct control_stream_cmd {
	enum control_stream_action action;
	struct stream_params params; /* for START; params.base points into base[] */
	char base[1024];
};

/* Parse "start [base=PATH] [speed=N[KMGT]] [on-error=report|stop]", "pause",
 * "resume", "cancel" (one line, optional trailing newline). A value may be
 * double-quoted ("a b", with \" and \\ inside) or written with backslash
 * escapes (a\ b); an unterminated quote, an unknown escape or text glued
 * to a closing quote is -EINVAL. */
int control_parse_stream(const char *text, size_t len, struct control_stream_cmd *out);
/* Parse a speed ("50M", "0"); one line. */
int control_parse_speed(const char *text, size_t len, uint64_t *out);
/* Parse "OFFSET LENGTH" (decimal or 0x hex, optional suffixes). */
int control_parse_pull(const char *text, size_t len, uint64_t *off, uint64_t *plen);

#endif /* STREAMFS_CONTROL_H */
