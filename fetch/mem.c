/* streamfs: in-memory byte source "mem:NAME" for unit tests and fuzzers,
 * with fault injection (the idea of nbdkit's memory plugin plus its error
 * filter). Files live in a process-wide list; a source holds a reference to
 * its file so a test can inspect the bytes after closing the image.
 *
 * THREAD MODEL: one global mutex around everything; fine for tests.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "fetch.h"
#include "util.h"

struct mem_file {
	struct mem_file *next;
	char *name;
	uint8_t *data;
	size_t len, cap;
	int fail_mask;	     /* FETCH_MEM_* kinds that are armed */
	uint64_t fail_after; /* successful calls left before failing */
	int fail_err;
	/* Disk-full model: which MEM_BLOCK blocks were ever written (a hole
	 * costs nothing until written, as on a real filesystem), and how many
	 * may be (0: unlimited). */
	uint8_t *blk;
	uint64_t nblk_used, nblk_max;
};

#define MEM_BLOCK 4096

static pthread_mutex_t mem_lock = PTHREAD_MUTEX_INITIALIZER;
static struct mem_file *mem_files;

static struct mem_file *mem_find(const char *name)
{
	struct mem_file *f;

	for (f = mem_files; f; f = f->next)
		if (strcmp(f->name, name) == 0)
			return f;
	return NULL;
}

static struct mem_file *mem_find_or_add(const char *name)
{
	struct mem_file *f = mem_find(name);

	if (f)
		return f;
	f = calloc(1, sizeof(*f));
	if (!f)
		return NULL;
	f->name = strdup(name);
	if (!f->name) {
		free(f);
		return NULL;
	}
	f->next = mem_files;
	mem_files = f;
	return f;
}

static int mem_reserve(struct mem_file *f, size_t len)
{
	uint8_t *n;
	size_t cap;

	if (len <= f->cap)
		return 0;
	cap = SFS_MAX(len, f->cap * 2);
	n = realloc(f->data, cap);
	if (!n)
		return -ENOMEM;
	memset(n + f->cap, 0, cap - f->cap);
	f->data = n;
	n = realloc(f->blk, cap / MEM_BLOCK + 1);
	if (!n)
		return -ENOMEM; /* f->data is grown, harmlessly */
	memset(n + f->cap / MEM_BLOCK, 0, cap / MEM_BLOCK + 1 - f->cap / MEM_BLOCK);
	f->blk = n;
	f->cap = cap;
	return 0;
}

/* Called with mem_lock held, after mem_reserve(off + len): account the
 * blocks [off, off+len) newly written; -ENOSPC, with nothing changed, if
 * they do not fit. */
static int mem_use_blocks(struct mem_file *f, uint64_t off, uint64_t len)
{
	uint64_t first = off / MEM_BLOCK, last = (off + len - 1) / MEM_BLOCK, fresh = 0;

	for (uint64_t b = first; b <= last; b++)
		fresh += !f->blk[b];
	if (f->nblk_max && f->nblk_used + fresh > f->nblk_max)
		return -ENOSPC;
	for (uint64_t b = first; b <= last; b++)
		f->blk[b] = 1;
	f->nblk_used += fresh;
	return 0;
}

int fetch_mem_put(const char *name, const void *data, size_t len)
{
	struct mem_file *f;
	int r = -ENOMEM;

	pthread_mutex_lock(&mem_lock);
	f = mem_find_or_add(name);
	if (f) {
		f->len = 0;
		f->fail_mask = 0;
		r = mem_reserve(f, len);
		if (r == 0) {
			if (f->cap) {
				memset(f->data, 0, f->cap);
				memset(f->blk, 0, f->cap / MEM_BLOCK + 1);
			}
			f->nblk_used = f->nblk_max = 0;
			if (len) {
				memcpy(f->data, data, len);
				mem_use_blocks(f, 0, len);
			}
			f->len = len;
		}
	}
	pthread_mutex_unlock(&mem_lock);
	return r;
}

int fetch_mem_get(const char *name, const void **data, size_t *len)
{
	struct mem_file *f;
	int r = -ENOENT;

	pthread_mutex_lock(&mem_lock);
	f = mem_find(name);
	if (f) {
		*data = f->data;
		*len = f->len;
		r = 0;
	}
	pthread_mutex_unlock(&mem_lock);
	return r;
}

int fetch_mem_fail(const char *name, int op_mask, uint64_t after, int err)
{
	struct mem_file *f;
	int r = -ENOENT;

	pthread_mutex_lock(&mem_lock);
	f = mem_find(name);
	if (f) {
		f->fail_mask = op_mask;
		f->fail_after = after;
		f->fail_err = err;
		r = 0;
	}
	pthread_mutex_unlock(&mem_lock);
	return r;
}

int fetch_mem_limit(const char *name, uint64_t bytes)
{
	struct mem_file *f;
	int r = -ENOENT;

	pthread_mutex_lock(&mem_lock);
	f = mem_find(name);
	if (f) {
		f->nblk_max = bytes ? f->nblk_used + SFS_DIV_ROUND_UP(bytes, MEM_BLOCK) : 0;
		r = 0;
	}
	pthread_mutex_unlock(&mem_lock);
	return r;
}

void fetch_mem_reset(void)
{
	struct mem_file *f, *next;

	pthread_mutex_lock(&mem_lock);
	for (f = mem_files; f; f = next) {
		next = f->next;
		free(f->name);
		free(f->data);
		free(f->blk);
		free(f);
	}
	mem_files = NULL;
	pthread_mutex_unlock(&mem_lock);
}

/* Called with mem_lock held: should this call of kind 'op' fail? */
static int mem_fault(struct mem_file *f, int op)
{
	if (!(f->fail_mask & op))
		return 0;
	if (f->fail_after > 0) {
		f->fail_after--;
		return 0;
	}
	return -f->fail_err;
}

static int mem_open(struct fetch_source *s, int flags)
{
	struct mem_file *f;
	int r = 0;

	pthread_mutex_lock(&mem_lock);
	f = (flags & FETCH_CREATE) ? mem_find_or_add(s->uri + 4) : mem_find(s->uri + 4);
	if (!f) {
		r = (flags & FETCH_CREATE) ? -ENOMEM : -ENOENT;
		sfs_error("%s: %s", s->uri, strerror(-r));
	} else {
		if (flags & FETCH_CREATE)
			f->len = 0;
		s->priv = f;
		s->size = f->len;
	}
	pthread_mutex_unlock(&mem_lock);
	return r;
}

static void mem_close(struct fetch_source *s)
{
	s->priv = NULL; /* the file outlives the source */
}

static int mem_pread(struct fetch_source *s, void *buf, size_t len, uint64_t off)
{
	struct mem_file *f = s->priv;
	int r;

	pthread_mutex_lock(&mem_lock);
	r = mem_fault(f, FETCH_MEM_READ);
	if (r == 0 && off + len > f->len)
		r = -EIO;
	if (r == 0)
		memcpy(buf, f->data + off, len);
	pthread_mutex_unlock(&mem_lock);
	return r;
}

static int mem_pwrite(struct fetch_source *s, const void *buf, size_t len, uint64_t off)
{
	struct mem_file *f = s->priv;
	int r;

	pthread_mutex_lock(&mem_lock);
	r = mem_fault(f, FETCH_MEM_WRITE);
	if (r == 0 && off + len > (1ULL << 32))
		r = -EFBIG; /* tests never need more; keeps fuzzers bounded */
	if (r == 0)
		r = mem_reserve(f, off + len);
	if (r == 0 && len)
		r = mem_use_blocks(f, off, len);
	if (r == 0) {
		memcpy(f->data + off, buf, len);
		if (off + len > f->len)
			f->len = off + len;
	}
	pthread_mutex_unlock(&mem_lock);
	return r;
}

static int mem_flush(struct fetch_source *s)
{
	struct mem_file *f = s->priv;
	int r;

	pthread_mutex_lock(&mem_lock);
	r = mem_fault(f, FETCH_MEM_FLUSH);
	pthread_mutex_unlock(&mem_lock);
	return r;
}

static int mem_truncate(struct fetch_source *s, uint64_t size)
{
	struct mem_file *f = s->priv;
	int r;

	pthread_mutex_lock(&mem_lock);
	r = mem_reserve(f, size);
	if (r == 0) {
		if (size < f->len)
			memset(f->data + size, 0, f->len - size);
		f->len = size;
	}
	pthread_mutex_unlock(&mem_lock);
	return r;
}

const struct fetch_ops fetch_mem_ops = {
    .scheme = "mem",
    .priv_size = 0,
    .open = mem_open,
    .close = mem_close,
    .pread = mem_pread,
    .pwrite = mem_pwrite,
    .flush = mem_flush,
    .truncate = mem_truncate,
};
