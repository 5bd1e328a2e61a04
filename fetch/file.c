/* streamfs: local-file byte source.
 *
 * pread/pwrite on one fd (thread-safe by nature), fdatasync for flush.
 * Locking follows what QEMU expects so the two refuse each other: a writable
 * open takes an exclusive OFD lock on the whole file (QEMU's shared locks on
 * its permission bytes 100..299 then fail: "Failed to get shared lock");
 * a read-only open takes shared locks on byte 100 (consistent read) and 201
 * (QEMU's "unshare write"), so QEMU cannot open our backing for writing.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fetch.h"
#include "util.h"

struct file_priv {
	int fd;
	/* Last SEEK_DATA/SEEK_HOLE answer [start, end) of a read-only file:
	 * copy-on-read asks about the same run many times, and a cold lseek
	 * costs ~0.2 ms (ext4 reads its extent tree). Protected by lock. */
	pthread_mutex_t lock;
	uint64_t ext_start, ext_end;
	bool ext_data;
};

static const char *file_path(const char *uri)
{
	return strncasecmp(uri, "file://", 7) == 0 ? uri + 7 : uri;
}

static int file_lock_range(int fd, short type, off_t start, off_t len)
{
	struct flock fl = {.l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = len};

	if (fcntl(fd, F_OFD_SETLK, &fl) < 0)
		return -errno;
	return 0;
}

/* What a non-disk file is, for the message refusing it. */
static const char *file_kind(mode_t mode)
{
	if (S_ISFIFO(mode))
		return "a FIFO (named pipe)";
	if (S_ISSOCK(mode))
		return "a socket";
	if (S_ISCHR(mode))
		return "a character device";
	if (S_ISDIR(mode))
		return "a directory";
	return "not a regular file";
}

/* Only regular files and block devices (sized by seeking to the end, as
 * QEMU accepts them) hold images. Anything else is refused by kind, before
 * it is opened when it can be: open() of a FIFO waits for a writer. */
static int file_check_type(const char *path, mode_t mode)
{
	if (S_ISREG(mode) || S_ISBLK(mode))
		return 0;
	sfs_error("%s: is %s, not a regular file or block device: it cannot hold a disk image",
		  path, file_kind(mode));
	return S_ISDIR(mode) ? -EISDIR : -EINVAL;
}

static int file_open(struct fetch_source *s, int flags)
{
	struct file_priv *p = s->priv;
	const char *path = file_path(s->uri);
	/* O_NONBLOCK: if the path turns into a FIFO between stat() and
	 * open(), the open returns at once and the fstat() refuses it. */
	int oflags = O_CLOEXEC | O_NOCTTY | O_NONBLOCK, fl;
	struct stat st;
	int r;

	if (flags & FETCH_RDWR)
		oflags |= O_RDWR;
	else
		oflags |= O_RDONLY;
	if (flags & FETCH_CREATE)
		oflags |= O_CREAT | O_EXCL;
	if (!(flags & FETCH_CREATE) && stat(path, &st) == 0) {
		r = file_check_type(path, st.st_mode);
		if (r < 0)
			return r;
	}
	pthread_mutex_init(&p->lock, NULL);
	p->fd = open(path, oflags, 0644);
	if (p->fd < 0) {
		r = -errno;
		sfs_error("%s: %s", path, strerror(-r));
		pthread_mutex_destroy(&p->lock);
		return r;
	}
	if (fstat(p->fd, &st) < 0) {
		r = -errno;
		goto fail;
	}
	r = file_check_type(path, st.st_mode);
	if (r < 0)
		goto fail_quiet;
	/* Regular files and block devices ignore O_NONBLOCK today; clear it
	 * so no future kernel makes our preads short or EAGAIN. */
	fl = fcntl(p->fd, F_GETFL);
	if (fl < 0 || fcntl(p->fd, F_SETFL, fl & ~O_NONBLOCK) < 0) {
		r = -errno;
		goto fail;
	}
	if (S_ISBLK(st.st_mode)) {
		off_t end = lseek(p->fd, 0, SEEK_END);
		if (end < 0) {
			r = -errno;
			goto fail;
		}
		s->size = (uint64_t)end;
	} else {
		s->size = (uint64_t)st.st_size;
	}
	if (flags & FETCH_LOCK) {
		if (flags & FETCH_RDWR)
			r = file_lock_range(p->fd, F_WRLCK, 0, 0);
		else {
			r = file_lock_range(p->fd, F_RDLCK, 100, 1);
			if (r == 0)
				r = file_lock_range(p->fd, F_RDLCK, 201, 1);
		}
		if (r == -EAGAIN || r == -EACCES) {
			sfs_error("%s: image is in use by another process (streamfs, QEMU or "
				  "qemu-img hold a lock on it)",
				  path);
			r = -EBUSY;
			goto fail_quiet;
		}
		if (r < 0 && r != -EINVAL && r != -ENOTSUP) {
			sfs_error("%s: cannot lock: %s", path, strerror(-r));
			goto fail_quiet;
		}
	}
	return 0;
fail:
	sfs_error("%s: %s", path, strerror(-r));
fail_quiet:
	close(p->fd);
	pthread_mutex_destroy(&p->lock);
	return r;
}

static void file_close(struct fetch_source *s)
{
	struct file_priv *p = s->priv;

	close(p->fd);
	pthread_mutex_destroy(&p->lock);
}

static int file_pread(struct fetch_source *s, void *buf, size_t len, uint64_t off)
{
	struct file_priv *p = s->priv;
	char *b = buf;

	while (len > 0) {
		ssize_t n = pread(p->fd, b, len, (off_t)off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			sfs_error("%s: read at %llu: %s", s->uri, (unsigned long long)off,
				  strerror(errno));
			return -errno;
		}
		if (n == 0) {
			sfs_error("%s: unexpected end of file at %llu (file truncated?)", s->uri,
				  (unsigned long long)off);
			return -EIO;
		}
		b += n;
		len -= (size_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

static int file_pwrite(struct fetch_source *s, const void *buf, size_t len, uint64_t off)
{
	struct file_priv *p = s->priv;
	const char *b = buf;

	while (len > 0) {
		ssize_t n = pwrite(p->fd, b, len, (off_t)off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			/* ENOSPC is expected on a full disk; the caller reports it. */
			if (errno != ENOSPC)
				sfs_error("%s: write at %llu: %s", s->uri, (unsigned long long)off,
					  strerror(errno));
			return -errno;
		}
		b += n;
		len -= (size_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

static int file_flush(struct fetch_source *s)
{
	struct file_priv *p = s->priv;

	if (fdatasync(p->fd) < 0) {
		sfs_error("%s: fdatasync: %s", s->uri, strerror(errno));
		return -errno;
	}
	return 0;
}

static int file_truncate(struct fetch_source *s, uint64_t size)
{
	struct file_priv *p = s->priv;

	if (ftruncate(p->fd, (off_t)size) < 0) {
		sfs_error("%s: truncate: %s", s->uri, strerror(errno));
		return -errno;
	}
	return 0;
}

/* A backing that shrank under us must fail reads of the lost part, never
 * read as zeros. */
static int file_check_size(struct fetch_source *s)
{
	struct file_priv *p = s->priv;
	struct stat st;

	if (fstat(p->fd, &st) < 0 || (uint64_t)st.st_size < fetch_size(s))
		return -EIO;
	return 0;
}

/* One SEEK_DATA/SEEK_HOLE probe: is off data, and where does its run end? */
static int file_extent_seek(struct fetch_source *s, uint64_t off, bool *data, uint64_t *end)
{
	struct file_priv *p = s->priv;
	off_t d = lseek(p->fd, (off_t)off, SEEK_DATA), h;

	if (d < 0) {
		if (errno != ENXIO)
			return -errno;
		/* ENXIO: only a hole up to the end, or past EOF (shrunk). */
		if (file_check_size(s) < 0)
			return -EIO;
		*data = false;
		*end = fetch_size(s);
		return 0;
	}
	if ((uint64_t)d > off) {
		*data = false;
		*end = (uint64_t)d;
		return 0;
	}
	h = lseek(p->fd, (off_t)off, SEEK_HOLE);
	if (h < 0)
		return -errno;
	*data = true;
	*end = (uint64_t)h;
	return 0;
}

/* SEEK_DATA/SEEK_HOLE, so a sparse raw backing is streamed as holes. A
 * read-only file remembers its last answer: copy-on-read asks about the same
 * run many times, and a cold lseek costs ~0.2 ms (ext4 reads its extent
 * tree); a remembered hole still checks that the file did not shrink. */
static int file_extent(struct fetch_source *s, uint64_t off, uint64_t len, bool *data,
		       uint64_t *pnum)
{
	struct file_priv *p = s->priv;
	bool cache = !(s->flags & FETCH_RDWR), hit = false;
	uint64_t end = 0;
	int r;

	if (cache) {
		pthread_mutex_lock(&p->lock);
		hit = off >= p->ext_start && off < p->ext_end;
		if (hit) {
			*data = p->ext_data;
			end = p->ext_end;
		}
		pthread_mutex_unlock(&p->lock);
	}
	if (hit && !*data && file_check_size(s) < 0)
		return -EIO;
	if (!hit) {
		r = file_extent_seek(s, off, data, &end);
		if (r < 0)
			return r;
		if (cache) {
			pthread_mutex_lock(&p->lock);
			p->ext_start = off;
			p->ext_end = end;
			p->ext_data = *data;
			pthread_mutex_unlock(&p->lock);
		}
	}
	*pnum = SFS_MIN(len, end - off);
	return 0;
}

/* The stream job asks for the next chunk while it copies this one, so the
 * backing's disk reads overlap the overlay writes. */
static void file_prefetch(struct fetch_source *s, uint64_t off, uint64_t len)
{
	struct file_priv *p = s->priv;

	posix_fadvise(p->fd, (off_t)off, (off_t)len, POSIX_FADV_WILLNEED);
}

const struct fetch_ops fetch_file_ops = {
    .scheme = "file",
    .priv_size = sizeof(struct file_priv),
    .open = file_open,
    .close = file_close,
    .pread = file_pread,
    .pwrite = file_pwrite,
    .flush = file_flush,
    .truncate = file_truncate,
    .data_run = file_extent,
    .prefetch = file_prefetch,
};
