/* streamfs: FUSE operations. Glue only: translate requests on /disk and
 * /control/<file> into calls on the disk, the stream job and the control
 * parsers; no format knowledge here.
 *
 * NOTES ON THE THREAD MODEL
 * - libfuse's multithreaded loop calls these in parallel. /disk I/O goes
 *   straight to disk_read/disk_write, which are thread-safe.
 * - Each open of a control file gets a private handle with the snapshot
 *   rendered at open, or, for events, its own cursor. fi->fh is a random
 *   token looked up in sfs_handles, not a pointer: after a crash failover
 *   (fusefs/supervisor.c) the kernel still holds the dead server's fh
 *   values. An unknown token on a control file is adopted (sfs_handle_get):
 *   events reads go on from the current event, a snapshot is rendered again
 *   (a read past its start answers EOF: the dead server most likely gave
 *   the whole file in the first read), a command runs. /disk has fh 0.
 * - Poll handles of events readers are kept in sfs_polls (under
 *   sfs_poll_lock) and notified once each from events_post().
 *
 * POLL AND IO_URING
 * FUSE poll support is per connection, not per file. io_uring asks ->poll()
 * of a file without FMODE_NOWAIT (every FUSE file) before each read, to
 * learn whether it may issue it inline; while we answer FUSE_POLL, every
 * io_uring read of /disk costs a synchronous FUSE_POLL round trip in the
 * submitting thread first, which serialises the queue: 4 KiB random reads
 * at queue depth 16 ran at 21k IOPS instead of 130k (0.55x the
 * qemu-storage-daemon FUSE floor, which has no poll). Answering ENOSYS
 * makes the kernel stop asking for the rest of the mount and report every
 * file always readable and writable. A poll of /disk comes from io_uring's
 * probe (poll() of a regular file means nothing), so the first one turns
 * poll off (sfs_poll_off): control/events then always polls readable, and a
 * non-blocking read of it waits up to SFS_EVENTS_NOPOLL_MS for an event
 * before EAGAIN, so poll()+read loops (streamfs wait) sleep instead of spin.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

#include "fusefs.h"
#include <fuse_lowlevel.h>
#include "util.h"

#define SFS_MAX_IO  (1u << 20) /* max_write and the largest read we expect, bytes */
#define SFS_DISK    "/disk"
#define SFS_CONTROL "/control"
/* Without poll, how long a non-blocking read of control/events waits for an
 * event before EAGAIN (see POLL AND IO_URING above). */
#define SFS_EVENTS_NOPOLL_MS 250

enum sfs_node { NODE_NONE, NODE_ROOT, NODE_DISK, NODE_CONTROL_DIR, NODE_CONTROL };

struct sfs_handle {
	uint64_t token; /* fi->fh */
	bool adopted;	/* opened by a dead server (see above) */
	int ctl;	/* enum control_id */
	char *buf;	/* rendered snapshot, immutable after open */
	size_t len;
	/* events: one fd may be read by several threads at once (dup, fork),
	 * so the cursor and the pending lines are protected by lock. */
	pthread_mutex_t lock;
	uint64_t cursor;
	char *pend; /* lines read from the log, not yet returned */
	size_t pend_off, pend_len;
	struct fuse_pollhandle *ph;   /* protected by sfs_poll_lock */
	struct sfs_handle *next_poll; /* protected by sfs_poll_lock */
	bool polled;		      /* on the sfs_polls list */
	/* Every open handle, protected by sfs_handles_lock: the kernel sends
	 * RELEASE asynchronously, so at unmount (lazy or racing the last
	 * close) some never arrive; destroy frees what is left. */
	struct sfs_handle *prev_open, *next_open;
};

static pthread_mutex_t sfs_poll_lock = PTHREAD_MUTEX_INITIALIZER;
static struct sfs_handle *sfs_polls; /* events handles, protected by sfs_poll_lock */
static pthread_mutex_t sfs_handles_lock = PTHREAD_MUTEX_INITIALIZER;
static struct sfs_handle *sfs_handles; /* open handles, protected by sfs_handles_lock */
static time_t sfs_mount_time;
/* Set by the first poll of /disk; from then on every poll answers ENOSYS,
 * which the kernel remembers for the mount. */
static atomic_bool sfs_poll_off;

static struct sfs_mount *sfs_ctx(void)
{
	return fuse_get_context()->private_data;
}

static enum sfs_node sfs_resolve(const char *path, int *ctl)
{
	if (strcmp(path, "/") == 0)
		return NODE_ROOT;
	if (strcmp(path, SFS_DISK) == 0)
		return NODE_DISK;
	if (strcmp(path, SFS_CONTROL) == 0)
		return NODE_CONTROL_DIR;
	if (strncmp(path, SFS_CONTROL "/", sizeof(SFS_CONTROL)) == 0) {
		int id = control_lookup(path + sizeof(SFS_CONTROL));
		if (id >= 0) {
			*ctl = id;
			return NODE_CONTROL;
		}
	}
	return NODE_NONE;
}

/* Notify every poller of control/events (called from events_post). */
static void sfs_events_notify(void *opaque)
{
	struct sfs_handle *h;

	pthread_mutex_lock(&sfs_poll_lock);
	for (h = sfs_polls; h; h = h->next_poll) {
		if (h->ph) {
			fuse_notify_poll(h->ph);
			fuse_pollhandle_destroy(h->ph);
			h->ph = NULL;
		}
	}
	pthread_mutex_unlock(&sfs_poll_lock);
}

static void *sfs_init(struct fuse_conn_info *conn, struct fuse_config *cfg)
{
	struct sfs_mount *m = sfs_ctx();

	conn->max_write = SFS_MAX_IO;
	conn->max_readahead = SFS_MAX_IO;
	if (conn->capable & FUSE_CAP_ASYNC_DIO)
		conn->want |= FUSE_CAP_ASYNC_DIO;
	if (conn->capable & FUSE_CAP_SPLICE_WRITE)
		conn->want |= FUSE_CAP_SPLICE_WRITE;
	/* Nothing but us changes the files, so let the kernel cache attributes. */
	cfg->entry_timeout = 60;
	cfg->attr_timeout = 60;
	cfg->negative_timeout = 60;
	cfg->use_ino = 0;
	cfg->nullpath_ok = 0;
	/* Stable across server restarts (failover): a changed mtime on /disk
	 * would make the kernel drop its page cache. */
	sfs_mount_time = sfs_failover.mount_time ? sfs_failover.mount_time : time(NULL);
	events_set_notify(m->ctl.events, sfs_events_notify, NULL);
	return m;
}

static int sfs_getattr(const char *path, struct stat *st, struct fuse_file_info *fi)
{
	struct sfs_mount *m = sfs_ctx();
	int ctl = 0;

	memset(st, 0, sizeof(*st));
	st->st_uid = m->uid;
	st->st_gid = m->gid;
	st->st_atime = st->st_mtime = st->st_ctime = sfs_mount_time;
	switch (sfs_resolve(path, &ctl)) {
	case NODE_ROOT:
	case NODE_CONTROL_DIR:
		st->st_mode = S_IFDIR | 0755;
		st->st_nlink = 2;
		return 0;
	case NODE_DISK:
		pthread_mutex_lock(&m->attr_lock);
		st->st_uid = m->disk_uid;
		st->st_gid = m->disk_gid;
		st->st_mode = S_IFREG | m->disk_mode;
		st->st_ctime = m->disk_ctime;
		pthread_mutex_unlock(&m->attr_lock);
		if (m->ctl.disk->read_only)
			st->st_mode &= ~(mode_t)0222;
		st->st_nlink = 1;
		st->st_size = (off_t)m->ctl.disk->top->size;
		st->st_blksize = 65536;
		st->st_blocks = (blkcnt_t)SFS_DIV_ROUND_UP(m->ctl.disk->top->size, 512);
		return 0;
	case NODE_CONTROL:
		st->st_mode = S_IFREG | control_files[ctl].mode;
		if (m->ctl.disk->read_only)
			st->st_mode &= ~(mode_t)0222;
		st->st_nlink = 1;
		st->st_size = 0; /* dynamic content: read until EOF */
		return 0;
	default:
		return -ENOENT;
	}
}

static int sfs_readdir(const char *path, void *buf, fuse_fill_dir_t fill, off_t off,
		       struct fuse_file_info *fi, enum fuse_readdir_flags flags)
{
	int ctl;

	switch (sfs_resolve(path, &ctl)) {
	case NODE_ROOT:
		fill(buf, ".", NULL, 0, 0);
		fill(buf, "..", NULL, 0, 0);
		fill(buf, "disk", NULL, 0, 0);
		fill(buf, "control", NULL, 0, 0);
		return 0;
	case NODE_CONTROL_DIR:
		fill(buf, ".", NULL, 0, 0);
		fill(buf, "..", NULL, 0, 0);
		for (int i = 0; i < CTL_COUNT; i++)
			fill(buf, control_files[i].name, NULL, 0, 0);
		return 0;
	case NODE_NONE:
		return -ENOENT;
	default:
		return -ENOTDIR;
	}
}

/* A non-zero token, unique in practice (64 random bits). */
static uint64_t sfs_new_token(void)
{
	static atomic_uint_fast64_t ctr;
	uint64_t t = 0;

	if (getrandom(&t, sizeof(t), GRND_NONBLOCK) != sizeof(t))
		t = sfs_now_ns() * 0x9e3779b97f4a7c15ull + atomic_fetch_add(&ctr, 1);
	return t ? t : 1;
}

/* Called with sfs_handles_lock held. */
static struct sfs_handle *sfs_handle_find(uint64_t token)
{
	for (struct sfs_handle *h = sfs_handles; h; h = h->next_open)
		if (h->token == token)
			return h;
	return NULL;
}

/* A new handle on control file ctl, rendered if render; NULL on ENOMEM. */
static int sfs_handle_new(struct sfs_mount *m, int ctl, bool render, struct sfs_handle **out)
{
	struct sfs_handle *h = calloc(1, sizeof(*h));
	int r;

	if (!h)
		return -ENOMEM;
	pthread_mutex_init(&h->lock, NULL);
	h->ctl = ctl;
	if (ctl == CTL_EVENTS) {
		h->cursor = events_cursor(m->ctl.events);
	} else if (render) {
		r = control_render(&m->ctl, (enum control_id)ctl, &h->buf, &h->len);
		if (r < 0) {
			pthread_mutex_destroy(&h->lock);
			free(h);
			return r;
		}
	}
	*out = h;
	return 0;
}

/* Link h into sfs_handles unless its token is there already; returns the
 * handle that holds the token. */
static struct sfs_handle *sfs_handle_insert(struct sfs_handle *h)
{
	struct sfs_handle *old;

	pthread_mutex_lock(&sfs_handles_lock);
	old = sfs_handle_find(h->token);
	if (!old) {
		h->next_open = sfs_handles;
		if (sfs_handles)
			sfs_handles->prev_open = h;
		sfs_handles = h;
	}
	pthread_mutex_unlock(&sfs_handles_lock);
	if (old) {
		pthread_mutex_destroy(&h->lock);
		free(h->buf);
		free(h);
	}
	return old ? old : h;
}

/* The handle of fi (NULL for /disk), adopting a dead server's (see the
 * top of the file). */
static int sfs_handle_get(const char *path, struct fuse_file_info *fi, struct sfs_handle **out)
{
	struct sfs_handle *h;
	int ctl = 0, r;

	*out = NULL;
	if (!fi || !fi->fh)
		return 0;
	pthread_mutex_lock(&sfs_handles_lock);
	h = sfs_handle_find(fi->fh);
	pthread_mutex_unlock(&sfs_handles_lock);
	if (h) {
		*out = h;
		return 0;
	}
	if (!path || sfs_resolve(path, &ctl) != NODE_CONTROL)
		return -EBADF;
	r = sfs_handle_new(sfs_ctx(), ctl, (fi->flags & O_ACCMODE) != O_WRONLY, &h);
	if (r < 0)
		return r;
	h->token = fi->fh;
	h->adopted = true;
	*out = sfs_handle_insert(h);
	return 0;
}

static int sfs_open(const char *path, struct fuse_file_info *fi)
{
	struct sfs_mount *m = sfs_ctx();
	int acc = fi->flags & O_ACCMODE, ctl = 0, r;
	struct sfs_handle *h;

	switch (sfs_resolve(path, &ctl)) {
	case NODE_DISK:
		if (acc != O_RDONLY && m->ctl.disk->read_only)
			return -EROFS;
		fi->fh = 0;
		/* The guest view never changes behind the kernel's back. */
		fi->keep_cache = 1;
		return 0;
	case NODE_CONTROL:
		break;
	case NODE_NONE:
		return -ENOENT;
	default:
		return -EISDIR;
	}
	if (acc != O_RDONLY && !(control_files[ctl].mode & 0200))
		return -EACCES;
	if (acc != O_WRONLY && !(control_files[ctl].mode & 0400))
		return -EACCES;
	if (acc != O_RDONLY && m->ctl.disk->read_only)
		return -EROFS;
	r = sfs_handle_new(m, ctl, acc != O_WRONLY, &h);
	if (r < 0)
		return r;
	if (ctl == CTL_EVENTS)
		fi->nonseekable = 1;
	do
		h->token = sfs_new_token();
	while (sfs_handle_insert(h) != h); /* a 2^-64 collision: retry */
	fi->direct_io = 1;
	fi->fh = h->token;
	return 0;
}

static int sfs_read(const char *path, char *buf, size_t size, off_t off, struct fuse_file_info *fi)
{
	struct sfs_mount *m = sfs_ctx();
	struct sfs_handle *h = NULL;
	int r;

	if (fi->fh && (r = sfs_handle_get(path, fi, &h)) < 0)
		return r;
	if (!h) {
		uint64_t disk_size = m->ctl.disk->top->size;
		if (off < 0)
			return -EINVAL;
		if ((uint64_t)off >= disk_size)
			return 0;
		size = (size_t)SFS_MIN((uint64_t)size, disk_size - (uint64_t)off);
		r = disk_read(m->ctl.disk, buf, size, (uint64_t)off);
		return r < 0 ? r : (int)size;
	}
	if (h->ctl == CTL_EVENTS) {
		/* Lines go through a per-open buffer so that readers asking for
		 * fewer bytes than a line (shell "read" asks for 1) get it all. */
		for (;;) {
			pthread_mutex_lock(&h->lock);
			if (h->pend_off < h->pend_len) {
				size = SFS_MIN(size, h->pend_len - h->pend_off);
				memcpy(buf, h->pend + h->pend_off, size);
				h->pend_off += size;
				pthread_mutex_unlock(&h->lock);
				return (int)size;
			}
			if (!h->pend) {
				h->pend = malloc(EVENTS_LINE * 8);
				if (!h->pend) {
					pthread_mutex_unlock(&h->lock);
					return -ENOMEM;
				}
			}
			/* Held while waiting (at most 250 ms per round): a
			 * second reader of the same fd waits its turn. */
			h->pend_off = 0;
			h->pend_len =
			    events_read(m->ctl.events, &h->cursor, h->pend, EVENTS_LINE * 8,
					!(fi->flags & O_NONBLOCK)    ? 250
					: atomic_load(&sfs_poll_off) ? SFS_EVENTS_NOPOLL_MS
								     : 0);
			r = h->pend_len > 0;
			pthread_mutex_unlock(&h->lock);
			if (r)
				continue;
			if (fi->flags & O_NONBLOCK)
				return -EAGAIN;
			if (events_is_shutdown(m->ctl.events) ||
			    fuse_session_exited(fuse_get_session(fuse_get_context()->fuse)))
				return 0;
			if (fuse_interrupted())
				return -EINTR;
		}
	}
	if (off < 0 || (size_t)off >= h->len || (h->adopted && off > 0))
		return 0;
	size = SFS_MIN(size, h->len - (size_t)off);
	memcpy(buf, h->buf + off, size);
	return (int)size;
}

static int sfs_write(const char *path, const char *buf, size_t size, off_t off,
		     struct fuse_file_info *fi)
{
	struct sfs_mount *m = sfs_ctx();
	struct sfs_handle *h = NULL;
	int r;

	if (fi->fh && (r = sfs_handle_get(path, fi, &h)) < 0)
		return r;
	if (!h) {
		uint64_t disk_size = m->ctl.disk->top->size;
		if (off < 0)
			return -EINVAL;
		/* Like a block device: a write across the end is short, one
		 * past it is ENOSPC; the size never changes. */
		if ((uint64_t)off >= disk_size)
			return -ENOSPC;
		size = (size_t)SFS_MIN((uint64_t)size, disk_size - (uint64_t)off);
		r = disk_write(m->ctl.disk, buf, size, (uint64_t)off);
		return r < 0 ? r : (int)size;
	}
	r = control_command(&m->ctl, (enum control_id)h->ctl, buf, size);
	return r < 0 ? r : (int)size;
}

/* Guest discard (PUNCH_HOLE|KEEP_SIZE, e.g. QEMU discard=unmap, fstrim in
 * the guest) and write-zeroes (ZERO_RANGE): the range reads as zeros after,
 * the backing is hidden and the stream job skips it. Plain preallocation
 * (mode 0) is refused rather than faked: clusters are only allocated when
 * written. The size never changes: past the end is clamped with KEEP_SIZE,
 * else refused as a write there would be (ENOSPC). */
static int sfs_fallocate(const char *path, int mode, off_t off, off_t len,
			 struct fuse_file_info *fi)
{
	struct sfs_mount *m = sfs_ctx();
	uint64_t size = m->ctl.disk->top->size, end;

	if (fi && fi->fh)
		return -EOPNOTSUPP; /* a control file */
	if (mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE))
		return -EOPNOTSUPP;
	if (!(mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)))
		return -EOPNOTSUPP;
	if (off < 0 || len <= 0 || !sfs_add_ok((uint64_t)off, (uint64_t)len, &end))
		return -EINVAL;
	if (end > size) {
		if (!(mode & FALLOC_FL_KEEP_SIZE))
			return -ENOSPC;
		end = size;
	}
	if ((uint64_t)off >= end)
		return 0;
	return disk_zero(m->ctl.disk, (uint64_t)off, end - (uint64_t)off);
}

static int sfs_flush(const char *path, struct fuse_file_info *fi)
{
	struct sfs_mount *m = sfs_ctx();

	/* close() of /disk after writes: make them durable. libfuse 3.14 does
	 * not pass the open flags to flush, so decide on "written since the
	 * last flush" rather than on the access mode. */
	if (!fi->fh && !m->ctl.disk->read_only && atomic_load(&m->ctl.disk->dirty))
		return disk_flush(m->ctl.disk);
	return 0;
}

static int sfs_fsync(const char *path, int datasync, struct fuse_file_info *fi)
{
	struct sfs_mount *m = sfs_ctx();

	if (!fi || !fi->fh)
		return disk_flush(m->ctl.disk);
	return 0;
}

/* Unlink h from every list and free it. */
static void sfs_handle_free(struct sfs_handle *h)
{
	struct sfs_handle **pp;

	pthread_mutex_lock(&sfs_handles_lock);
	if (h->prev_open)
		h->prev_open->next_open = h->next_open;
	else
		sfs_handles = h->next_open;
	if (h->next_open)
		h->next_open->prev_open = h->prev_open;
	pthread_mutex_unlock(&sfs_handles_lock);
	pthread_mutex_lock(&sfs_poll_lock);
	if (h->polled) {
		for (pp = &sfs_polls; *pp; pp = &(*pp)->next_poll) {
			if (*pp == h) {
				*pp = h->next_poll;
				break;
			}
		}
	}
	if (h->ph)
		fuse_pollhandle_destroy(h->ph);
	pthread_mutex_unlock(&sfs_poll_lock);
	pthread_mutex_destroy(&h->lock);
	free(h->buf);
	free(h->pend);
	free(h);
}

void sfs_handle_release(uint64_t fh)
{
	struct sfs_handle *h = NULL;

	/* An unknown token (opened by a dead server, never used since) has
	 * nothing to free. */
	if (fh) {
		pthread_mutex_lock(&sfs_handles_lock);
		h = sfs_handle_find(fh);
		pthread_mutex_unlock(&sfs_handles_lock);
	}
	if (h)
		sfs_handle_free(h);
}

static int sfs_release(const char *path, struct fuse_file_info *fi)
{
	sfs_handle_release(fi->fh);
	return 0;
}

static int sfs_poll(const char *path, struct fuse_file_info *fi, struct fuse_pollhandle *ph,
		    unsigned *reventsp)
{
	struct sfs_mount *m = sfs_ctx();
	struct sfs_handle *h = NULL;
	int r;

	if (fi->fh && (r = sfs_handle_get(path, fi, &h)) < 0) {
		if (ph)
			fuse_pollhandle_destroy(ph);
		return r;
	}
	if (!h && !atomic_exchange(&sfs_poll_off, true)) {
		sfs_info("poll of disk (io_uring?): poll turned off for this mount, "
			 "control/events now always polls readable");
		/* Pollers sleeping on events re-poll, get ENOSYS and so see it
		 * readable; a poll racing with this reply gets ENOSYS below. */
		sfs_events_notify(NULL);
	}
	if (!h || atomic_load(&sfs_poll_off)) {
		if (ph)
			fuse_pollhandle_destroy(ph);
		return -ENOSYS;
	}
	if (h->ctl != CTL_EVENTS) {
		if (ph)
			fuse_pollhandle_destroy(ph);
		*reventsp |= POLLIN | POLLOUT;
		return 0;
	}
	if (ph) {
		pthread_mutex_lock(&sfs_poll_lock);
		if (h->ph)
			fuse_pollhandle_destroy(h->ph);
		h->ph = ph;
		if (!h->polled) {
			h->next_poll = sfs_polls;
			sfs_polls = h;
			h->polled = true;
		}
		pthread_mutex_unlock(&sfs_poll_lock);
	}
	pthread_mutex_lock(&h->lock);
	if (h->pend_off < h->pend_len || events_ready(m->ctl.events, h->cursor))
		*reventsp |= POLLIN;
	pthread_mutex_unlock(&h->lock);
	return 0;
}

static int sfs_truncate(const char *path, off_t size, struct fuse_file_info *fi)
{
	struct sfs_mount *m = sfs_ctx();
	int ctl;

	switch (sfs_resolve(path, &ctl)) {
	case NODE_CONTROL:
		return 0; /* "echo cmd > control/x" truncates first */
	case NODE_DISK:
		/* The virtual size is fixed; allow a no-op for tools that set it. */
		return (uint64_t)size == m->ctl.disk->top->size ? 0 : -EPERM;
	default:
		return -EACCES;
	}
}

/* chmod and chown of /disk, as on a file: the kernel has checked the
 * caller's right (default_permissions: owner or CAP_FOWNER for chmod,
 * CAP_CHOWN for chown); we keep the result for the life of the mount. The
 * rest of the tree has fixed attributes. */
static int sfs_chmod(const char *path, mode_t mode, struct fuse_file_info *fi)
{
	struct sfs_mount *m = sfs_ctx();
	int ctl;

	if (sfs_resolve(path, &ctl) != NODE_DISK)
		return -EPERM;
	pthread_mutex_lock(&m->attr_lock);
	m->disk_mode = mode & 07777;
	m->disk_ctime = time(NULL);
	sfs_attrs_save(m);
	pthread_mutex_unlock(&m->attr_lock);
	return 0;
}

static int sfs_chown(const char *path, uid_t uid, gid_t gid, struct fuse_file_info *fi)
{
	struct sfs_mount *m = sfs_ctx();
	int ctl;

	if (sfs_resolve(path, &ctl) != NODE_DISK)
		return -EPERM;
	pthread_mutex_lock(&m->attr_lock);
	if (uid != (uid_t)-1)
		m->disk_uid = uid;
	if (gid != (gid_t)-1)
		m->disk_gid = gid;
	/* As chown(2) on a regular file: an unprivileged change clears the
	 * set-user/group-ID bits (the kernel passes us the new mode for root). */
	m->disk_mode &= ~(mode_t)(S_ISUID | S_ISGID);
	m->disk_ctime = time(NULL);
	sfs_attrs_save(m);
	pthread_mutex_unlock(&m->attr_lock);
	return 0;
}

/*
 * Extended attributes of /disk, kept in memory for the life of the mount
 * like its owner and mode. libvirt's DAC labelling (remember_owner, on by
 * default) stores the original owner in trusted.libvirt.security.* before
 * it chowns the disk to the QEMU user, and puts it back from there at
 * shutdown; without them it restores root:root. Only user.* and trusted.*
 * names are kept (the kernel allows trusted.* to CAP_SYS_ADMIN only, and
 * checks user.* against the mode); security.* and system.* get ENOTSUP, as
 * on a filesystem without them. Bounded: SFS_XATTR_MAX entries and
 * SFS_XATTR_MAX_BYTES of names and values (then ENOSPC).
 */
static bool sfs_xattr_name_ok(const char *name)
{
	return strncmp(name, "user.", 5) == 0 || strncmp(name, "trusted.", 8) == 0;
}

/* The index of name on /disk, or -1. Called with attr_lock held. */
static int sfs_xattr_find(struct sfs_mount *m, const char *name)
{
	for (unsigned i = 0; i < m->disk_nxattrs; i++)
		if (strcmp(m->disk_xattrs[i].name, name) == 0)
			return (int)i;
	return -1;
}

static int sfs_setxattr(const char *path, const char *name, const char *value, size_t size,
			int flags)
{
	struct sfs_mount *m = sfs_ctx();
	struct sfs_xattr *x;
	size_t need;
	void *v;
	int ctl, i, r = 0;

	if (sfs_resolve(path, &ctl) != NODE_DISK || !sfs_xattr_name_ok(name))
		return -ENOTSUP;
	v = malloc(size ? size : 1);
	if (!v)
		return -ENOMEM;
	memcpy(v, value, size);
	pthread_mutex_lock(&m->attr_lock);
	i = sfs_xattr_find(m, name);
	if (i >= 0 && (flags & XATTR_CREATE)) {
		r = -EEXIST;
	} else if (i < 0 && (flags & XATTR_REPLACE)) {
		r = -ENODATA;
	} else if (i >= 0) {
		x = &m->disk_xattrs[i];
		need = m->disk_xattr_bytes - x->size + size;
		if (need > SFS_XATTR_MAX_BYTES) {
			r = -ENOSPC;
		} else {
			free(x->value);
			x->value = v;
			x->size = size;
			m->disk_xattr_bytes = need;
			v = NULL;
		}
	} else {
		need = m->disk_xattr_bytes + strlen(name) + size;
		if (m->disk_nxattrs >= SFS_XATTR_MAX || need > SFS_XATTR_MAX_BYTES) {
			r = -ENOSPC;
		} else {
			if (!m->disk_xattrs)
				m->disk_xattrs = calloc(SFS_XATTR_MAX, sizeof(*m->disk_xattrs));
			x = m->disk_xattrs ? &m->disk_xattrs[m->disk_nxattrs] : NULL;
			if (!x || !(x->name = strdup(name))) {
				r = -ENOMEM;
			} else {
				x->value = v;
				x->size = size;
				m->disk_nxattrs++;
				m->disk_xattr_bytes = need;
				v = NULL;
			}
		}
	}
	if (r == 0) {
		m->disk_ctime = time(NULL);
		sfs_attrs_save(m);
	}
	pthread_mutex_unlock(&m->attr_lock);
	free(v);
	return r;
}

/* The pids behind the mount, for "streamfs upgrade" (fusefs/main.c): on the
 * root directory, read-only, not listed. */
static int sfs_getxattr_root(const char *name, char *value, size_t size)
{
	char buf[32];
	int n;

	/* tests/test-failover.sh: a request that kills every server it
	 * reaches (the crash loop). */
	if (strcmp(name, "user.streamfs.test-crash") == 0 && getenv("STREAMFS_TEST_HOOKS"))
		abort();
	if (strcmp(name, SFS_XATTR_SUPERVISOR) == 0 && sfs_failover.supervisor)
		n = snprintf(buf, sizeof(buf), "%d", (int)sfs_failover.supervisor);
	else if (strcmp(name, SFS_XATTR_SERVER) == 0)
		n = snprintf(buf, sizeof(buf), "%d", (int)getpid());
	else
		return -ENODATA;
	if (size && size < (size_t)n)
		return -ERANGE;
	if (size)
		memcpy(value, buf, (size_t)n);
	return n;
}

static int sfs_getxattr(const char *path, const char *name, char *value, size_t size)
{
	struct sfs_mount *m = sfs_ctx();
	int ctl, i, r;

	if (sfs_resolve(path, &ctl) == NODE_ROOT)
		return sfs_getxattr_root(name, value, size);
	if (sfs_resolve(path, &ctl) != NODE_DISK || !sfs_xattr_name_ok(name))
		return -ENOTSUP;
	pthread_mutex_lock(&m->attr_lock);
	i = sfs_xattr_find(m, name);
	if (i < 0) {
		r = -ENODATA;
	} else {
		struct sfs_xattr *x = &m->disk_xattrs[i];

		r = (int)x->size;
		if (size && size < x->size)
			r = -ERANGE;
		else if (size)
			memcpy(value, x->value, x->size);
	}
	pthread_mutex_unlock(&m->attr_lock);
	return r;
}

static int sfs_listxattr(const char *path, char *list, size_t size)
{
	struct sfs_mount *m = sfs_ctx();
	size_t need = 0;
	int ctl;

	if (sfs_resolve(path, &ctl) != NODE_DISK)
		return 0;
	pthread_mutex_lock(&m->attr_lock);
	for (unsigned i = 0; i < m->disk_nxattrs; i++)
		need += strlen(m->disk_xattrs[i].name) + 1;
	if (size && size < need) {
		pthread_mutex_unlock(&m->attr_lock);
		return -ERANGE;
	}
	if (size) {
		char *p = list;

		for (unsigned i = 0; i < m->disk_nxattrs; i++) {
			size_t n = strlen(m->disk_xattrs[i].name) + 1;

			memcpy(p, m->disk_xattrs[i].name, n);
			p += n;
		}
	}
	pthread_mutex_unlock(&m->attr_lock);
	return (int)need;
}

static int sfs_removexattr(const char *path, const char *name)
{
	struct sfs_mount *m = sfs_ctx();
	int ctl, i, r = 0;

	if (sfs_resolve(path, &ctl) != NODE_DISK || !sfs_xattr_name_ok(name))
		return -ENOTSUP;
	pthread_mutex_lock(&m->attr_lock);
	i = sfs_xattr_find(m, name);
	if (i < 0) {
		r = -ENODATA;
	} else {
		struct sfs_xattr *x = &m->disk_xattrs[i];

		m->disk_xattr_bytes -= strlen(x->name) + x->size;
		free(x->name);
		free(x->value);
		*x = m->disk_xattrs[--m->disk_nxattrs];
		m->disk_ctime = time(NULL);
		sfs_attrs_save(m);
	}
	pthread_mutex_unlock(&m->attr_lock);
	return r;
}

static int sfs_utimens(const char *path, const struct timespec tv[2], struct fuse_file_info *fi)
{
	return 0; /* touch(1) and editors: accept and ignore */
}

static int sfs_statfs(const char *path, struct statvfs *sv)
{
	struct sfs_mount *m = sfs_ctx();

	memset(sv, 0, sizeof(*sv));
	sv->f_bsize = sv->f_frsize = 4096;
	sv->f_blocks = SFS_DIV_ROUND_UP(m->ctl.disk->top->size, 4096);
	sv->f_files = 2 + CTL_COUNT;
	sv->f_namemax = 255;
	return 0;
}

static void sfs_destroy(void *private_data)
{
	struct sfs_mount *m = private_data;

	events_set_notify(m->ctl.events, NULL, NULL);
	events_shutdown(m->ctl.events);
	/* The loop is over: no request runs, none of these will be used. */
	while (sfs_handles)
		sfs_handle_free(sfs_handles);
	for (unsigned i = 0; i < m->disk_nxattrs; i++) {
		free(m->disk_xattrs[i].name);
		free(m->disk_xattrs[i].value);
	}
	free(m->disk_xattrs);
	m->disk_xattrs = NULL;
	m->disk_nxattrs = 0;
}

const struct fuse_operations sfs_fuse_ops = {
    .init = sfs_init,
    .destroy = sfs_destroy,
    .getattr = sfs_getattr,
    .readdir = sfs_readdir,
    .open = sfs_open,
    .read = sfs_read,
    .write = sfs_write,
    .fallocate = sfs_fallocate,
    .flush = sfs_flush,
    .fsync = sfs_fsync,
    .release = sfs_release,
    .poll = sfs_poll,
    .truncate = sfs_truncate,
    .chmod = sfs_chmod,
    .chown = sfs_chown,
    .setxattr = sfs_setxattr,
    .getxattr = sfs_getxattr,
    .listxattr = sfs_listxattr,
    .removexattr = sfs_removexattr,
    .utimens = sfs_utimens,
    .statfs = sfs_statfs,
};
