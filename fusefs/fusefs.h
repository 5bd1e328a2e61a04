/* streamfs: private header of the FUSE front end (fusefs/). */
#ifndef STREAMFS_FUSEFS_H
#define STREAMFS_FUSEFS_H

#define FUSE_USE_VERSION 314
#include <fuse.h>
#include <pthread.h>
#include <sys/types.h>

#include "control.h"
#include "disk.h"
#include "events.h"
#include "stream.h"

/* An extended attribute of /disk (fusefs/ops.c). */
struct sfs_xattr {
	char *name;
	void *value;
	size_t size;
};

/* Everything a mounted streamfs serves; fuse_get_context()->private_data. */
struct sfs_mount {
	struct control_ctx ctl; /* disk, job, events */
	const char *mountpoint;
	unsigned readahead_kb; /* 0 = leave the kernel default */
	uid_t uid;	       /* owner of everything but /disk: the mounting user */
	gid_t gid;
	/* Owner and permission bits of /disk: from -o uid=,gid=,mode= (default
	 * the mounting user, 0600: a guest's disk holds its secrets), changed
	 * by chown/chmod (libvirt's DAC labelling) for the life of the mount.
	 * Protected by attr_lock. */
	pthread_mutex_t attr_lock;
	uid_t disk_uid;
	gid_t disk_gid;
	mode_t disk_mode;
	time_t disk_ctime;
	struct sfs_xattr *disk_xattrs; /* user.* and trusted.* of /disk, in memory */
	unsigned disk_nxattrs;
	size_t disk_xattr_bytes; /* names + values, bounded by SFS_XATTR_MAX_BYTES */
};

/* The FUSE operations table (fusefs/ops.c). */
extern const struct fuse_operations sfs_fuse_ops;

/* Thin command-line wrappers over the control files (fusefs/client.c):
 * "streamfs status MNT" etc. Returns the exit status, or -1 if argv[1] is
 * not a client command. */
int sfs_client_main(int argc, char **argv);

#endif /* STREAMFS_FUSEFS_H */
