/* streamfs: private header of the FUSE front end (fusefs/). */
#ifndef STREAMFS_FUSEFS_H
#define STREAMFS_FUSEFS_H

#define FUSE_USE_VERSION 314
#include <fuse.h>

#include "control.h"
#include "disk.h"
#include "events.h"
#include "stream.h"

/* Everything a mounted streamfs serves; fuse_get_context()->private_data. */
struct sfs_mount {
	struct control_ctx ctl; /* disk, job, events */
	const char *mountpoint;
	unsigned readahead_kb; /* 0 = leave the kernel default */
};

/* The FUSE operations table (fusefs/ops.c). */
extern const struct fuse_operations sfs_fuse_ops;

/* Thin command-line wrappers over the control files (fusefs/client.c):
 * "streamfs status MNT" etc. Returns the exit status, or -1 if argv[1] is
 * not a client command. */
int sfs_client_main(int argc, char **argv);

#endif /* STREAMFS_FUSEFS_H */
