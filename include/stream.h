/* streamfs: the background stream job (QEMU's block-stream, libvirt's
 * BlockPull/BlockRebase) for one disk.
 *
 * One thread per disk, created at mount and idle until started. It walks
 * the disk from 0 to its size in chunks, calling disk_populate() for each,
 * which shares copy-on-read's range locks so a racing guest write wins.
 * Between chunks it sleeps for the rate limit (token bucket), yields while
 * the guest has requests in flight, and checks for pause and cancel.
 * Progress lives in the overlay itself (allocated clusters are skipped), so
 * a restarted job resumes where the last one stopped. On completion it
 * points the overlay at base (or drops the backing) with disk_rebase().
 */
#ifndef STREAMFS_STREAM_H
#define STREAMFS_STREAM_H

#include <stdbool.h>
#include <stdint.h>

#include "disk.h"
#include "events.h"

enum stream_state {
	STREAM_IDLE,
	STREAM_RUNNING,
	STREAM_PAUSED,
	STREAM_COMPLETED,
	STREAM_CANCELLED,
	STREAM_FAILED,
};

enum stream_on_error {
	STREAM_ON_ERROR_REPORT, /* the job fails */
	STREAM_ON_ERROR_STOP,	/* the job pauses at the failing offset; resume retries */
};

struct stream_params {
	uint64_t speed;	  /* bytes/s, 0 = unlimited */
	bool speed_set;	  /* speed given (else keep the current limit) */
	const char *base; /* image of the chain to stop at, or NULL */
	enum stream_on_error on_error;
};

struct stream_status {
	enum stream_state state;
	uint64_t offset, length; /* bytes covered so far / to cover */
	uint64_t resumed_from;	 /* first offset not already in the overlay at start */
	uint64_t speed;		 /* limit in bytes/s, 0 = unlimited */
	uint64_t rate;		 /* recent achieved copy rate in bytes/s */
	uint64_t avg_rate;	 /* copy rate since the job started */
	uint64_t net_rate;	 /* recent HTTP(S) fetch rate in bytes/s, while running */
	double elapsed;		 /* seconds running */
	char base[1024];	 /* base image name or "" */
	char error[512];	 /* last error or "" */
	enum stream_on_error on_error;
};

struct stream_job;

int stream_new(struct disk *d, struct events *ev, struct stream_job **out);
/* Stop the thread (cancelling a running job) and free. */
void stream_free(struct stream_job *j);

/* -EBUSY if a job is running or paused; -EINVAL if base is not in the chain. */
int stream_start(struct stream_job *j, const struct stream_params *p);
int stream_pause(struct stream_job *j);	 /* -EINVAL unless running */
int stream_resume(struct stream_job *j); /* -EINVAL unless paused */
int stream_cancel(struct stream_job *j); /* -EINVAL unless running or paused */
int stream_set_speed(struct stream_job *j, uint64_t speed);
/* Keep depth (1..STREAM_MAX_DEPTH) chunks in flight instead of measuring
 * the best depth (0, the default). -EINVAL above the maximum. */
#define STREAM_MAX_DEPTH 8
int stream_set_depth(struct stream_job *j, unsigned depth);
/* While pf replays a boot trace the job copies nothing (NULL: none). */
struct prefetch;
void stream_set_prefetch(struct stream_job *j, struct prefetch *pf);
void stream_get_status(struct stream_job *j, struct stream_status *st);
/* Pull [off, off+len) into the overlay now (control/pull); returns when done. */
int stream_pull(struct stream_job *j, uint64_t off, uint64_t len);
/* Wait until the job leaves RUNNING/PAUSED (for tests and --wait). */
enum stream_state stream_wait(struct stream_job *j);

const char *stream_state_name(enum stream_state s);

#endif /* STREAMFS_STREAM_H */
