/* streamfs: private header of the FUSE front end (fusefs/). */
#ifndef STREAMFS_FUSEFS_H
#define STREAMFS_FUSEFS_H

#define FUSE_USE_VERSION 314
#include <fuse.h>
#include <pthread.h>
#include <stdbool.h>
#include <time.h>
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
	void *attrs_shm;	 /* failover: a copy for the next server (attrs.c), or NULL */
};

/* Extended attributes of /disk: at most this many, names and values
 * together at most this many bytes (then ENOSPC). */
#define SFS_XATTR_MAX	    64
#define SFS_XATTR_MAX_BYTES (256u << 10)

/* The attributes of /disk across crash failover (fusefs/attrs.c): the
 * shared memory they need (created by the supervisor), starting from what
 * it holds (-EINVAL/-EBADMSG: unusable, m untouched), and saving them after
 * a change (called with attr_lock held; nothing without shared memory). */
#define SFS_ATTRS_SHM_SIZE (1u << 20)
int sfs_attrs_attach(struct sfs_mount *m, void *shm, size_t len);
void sfs_attrs_save(struct sfs_mount *m);

/* The FUSE operations table (fusefs/ops.c). */
extern const struct fuse_operations sfs_fuse_ops;

/* Crash failover (fusefs/supervisor.c, fusefs/handover.c). */
#define SFS_FAILOVER_MAX_IO (1u << 20) /* max_write: the supervisor's EIO loop reads that much */

struct sfs_sup_opts {
	int fd;		     /* the mounted /dev/fuse descriptor */
	char *const *argv;   /* the server's command line: ours */
	const char *pidfile; /* -o pidfile: ours goes to PIDFILE.supervisor */
};

/* Run the supervisor until the mount ends; 0, 1 if the server died and
 * could not be replaced (leave the mount dead, as a crash did before
 * supervisors: ENOTCONN), or -errno. */
int sfs_supervise(const struct sfs_sup_opts *o);

/* In a server: serve se on fd, a connection mounted by the supervisor.
 * init is the kernel's FUSE_INIT request; forward_init: no server has
 * answered it yet; resend: ask the kernel to resend what a dead server
 * left unanswered. ready() runs once requests from the kernel flow. */
int sfs_handover_attach(struct fuse_session *se, int fd, const void *init, size_t init_len,
			bool forward_init, bool resend, void (*ready)(void));

/* Free the control-file handle with token fh, if any (fusefs/ops.c): for
 * a RELEASE that handover.c answers itself. */
void sfs_handle_release(uint64_t fh);

/* What control/status may show about failover (zeros without it). */
struct sfs_failover_info {
	pid_t supervisor;    /* 0: no supervisor (foreground, or nofailover) */
	unsigned restarts;   /* servers started after the first */
	time_t last_restart; /* when the last one started, 0 if none */
	time_t mount_time;   /* of the first server, 0 without a supervisor */
};
extern struct sfs_failover_info sfs_failover;

/* Extended attributes of the mount's root: the supervisor's and the
 * server's pids (decimal). */
#define SFS_XATTR_SUPERVISOR "user.streamfs.supervisor"
#define SFS_XATTR_SERVER     "user.streamfs.server"

/* Thin command-line wrappers over the control files (fusefs/client.c):
 * "streamfs status MNT" etc. Returns the exit status, or -1 if argv[1] is
 * not a client command. */
int sfs_client_main(int argc, char **argv);

#endif /* STREAMFS_FUSEFS_H */
