/* streamfs: the server side of crash failover: serve a FUSE connection this
 * process did not mount (fusefs/supervisor.c holds it and restarts us).
 *
 * WHY A CUSTOM IO LAYER
 * The kernel sends FUSE_INIT once per connection; the supervisor read it
 * and gives every server its bytes. libfuse refuses every request before
 * an INIT (fuse_lowlevel.c: se->got_init), so our read() first hands libfuse
 * that INIT, then synthetic LOOKUPs of every name in a fixed order, one at
 * a time; writev() swallows their replies (the INIT reply goes to the
 * kernel only if no server has answered it yet). The LOOKUPs matter
 * because the high-level API numbers nodes in lookup order (fuse.c
 * next_id) and the kernel keeps the numbers across our death: done first
 * and in order, they give every server the same numbers (disk 2, control
 * 3, control/<file> 4...), checked against the replies. FORGETs are
 * dropped before libfuse sees them, so those nodes are never freed (a
 * FORGET of lookups made with an earlier server would trip fuse.c's
 * nlookup assert). Then FUSE_NOTIFY_RESEND (Linux 6.9) re-queues every
 * request the dead server had read but not answered.
 *
 * HANDLES OF A DEAD SERVER
 * The kernel keeps the file handles the dead server gave. Ours (ops.c) are
 * tokens that survive that, but the high-level library's are not: a
 * directory handle is a pointer (fuse.c fuse_lib_opendir), and RELEASE of
 * an open it did not see trips an assert (fuse.c fuse_do_release,
 * node->open_count). So this layer counts the opens each node got from
 * this process and the directory handles it gave: a RELEASE beyond the
 * count, a RELEASEDIR of an unknown handle are answered here (ops.c frees
 * the control handle by token); a READDIR on an unknown handle is pointed
 * at a directory handle opened during the synthetic phase (the listing is
 * fixed, so offsets carry over).
 *
 * No splice_receive: libfuse then reads requests with read() (one copy,
 * not a splice into a pipe and a copy out), and this layer sees headers.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "fusefs.h"
#include <fuse_lowlevel.h>
#include "util.h"

#define HO_NOTIFY_RESEND 7	      /* enum fuse_notify_code, Linux 6.9 */
#define HO_SYNTH_UNIQUE	 (1ULL << 62) /* ours: the kernel's never get there */
#define HO_MAX_SYNTH	 (1 + 2 + CTL_COUNT + 2)
#define HO_NODES	 (4 + CTL_COUNT) /* node numbers: 1 root ... 3 + CTL_COUNT */
#define HO_PENDING	 64		 /* OPEN/OPENDIR awaiting their reply */

enum ho_kind { HO_INIT, HO_LOOKUP, HO_OPENDIR };

struct ho_req {
	unsigned char *buf;
	size_t len;
	uint64_t unique;
	enum ho_kind kind;
	uint64_t nodeid; /* LOOKUP: the number it must get; OPENDIR: the dir */
};

struct ho_pending {
	uint64_t unique, nodeid;
	bool dir;
};

struct sfs_failover_info sfs_failover;

static struct {
	int fd;
	bool forward_init; /* no server has answered the kernel's INIT yet */
	bool resend;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct ho_req synth[HO_MAX_SYNTH];
	unsigned nsynth, next; /* next: how many were handed out */
	bool inflight;	       /* synth[next - 1] awaits its reply */
	atomic_bool open;      /* all synthetic requests answered */
	void (*ready)(void);
	/* Handles (see the top), under lock. */
	uint64_t syn_dh[2]; /* our own directory handles of / and /control */
	unsigned opens[HO_NODES];
	struct ho_pending pend[HO_PENDING];
	atomic_uint npend;
	uint64_t *dirfh; /* directory handles this process gave */
	unsigned ndirfh, cap_dirfh;
} ho = {.lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER};

/* Queue a synthetic request: opcode on node with argument arg. */
static int ho_add_synth(enum ho_kind kind, uint32_t opcode, uint64_t node, const void *arg,
			size_t arglen, uint64_t want)
{
	size_t len = sizeof(struct fuse_in_header) + arglen;
	struct ho_req *r = &ho.synth[ho.nsynth];
	struct fuse_in_header *ih;

	r->buf = calloc(1, len);
	if (!r->buf)
		return -ENOMEM;
	ih = (struct fuse_in_header *)r->buf;
	ih->len = (uint32_t)len;
	ih->opcode = opcode;
	ih->unique = HO_SYNTH_UNIQUE | ho.nsynth;
	ih->nodeid = node;
	memcpy(r->buf + sizeof(*ih), arg, arglen);
	r->len = len;
	r->unique = ih->unique;
	r->kind = kind;
	r->nodeid = want;
	ho.nsynth++;
	return 0;
}

static int ho_add_lookup(uint64_t parent, const char *name, uint64_t nodeid)
{
	return ho_add_synth(HO_LOOKUP, FUSE_LOOKUP, parent, name, strlen(name) + 1, nodeid);
}

static int ho_add_opendir(uint64_t node)
{
	struct fuse_open_in oi = {.flags = O_RDONLY | O_DIRECTORY};

	return ho_add_synth(HO_OPENDIR, FUSE_OPENDIR, node, &oi, sizeof(oi), node);
}

/* Answer a request here, with error (0 or -errno) and no data. */
static void ho_reply(int fd, uint64_t unique, int error)
{
	struct fuse_out_header oh = {.len = sizeof(oh), .error = error, .unique = unique};

	if (write(fd, &oh, sizeof(oh)) < 0 && errno != ENOENT)
		sfs_error("failover: reply: %s", strerror(errno));
}

/* Called with ho.lock held. */
static int ho_dirfh_find(uint64_t fh)
{
	for (unsigned i = 0; i < ho.ndirfh; i++)
		if (ho.dirfh[i] == fh)
			return (int)i;
	return -1;
}

/* Called with ho.lock held. */
static void ho_dirfh_add(uint64_t fh)
{
	if (ho.ndirfh == ho.cap_dirfh) {
		unsigned cap = ho.cap_dirfh ? 2 * ho.cap_dirfh : 16;
		uint64_t *n = realloc(ho.dirfh, cap * sizeof(*n));

		if (!n)
			return; /* its READDIRs will use our own handle: same listing */
		ho.dirfh = n;
		ho.cap_dirfh = cap;
	}
	ho.dirfh[ho.ndirfh++] = fh;
}

/* A request from the kernel: true if libfuse should see it. */
static bool ho_filter(int fd, void *buf, ssize_t n)
{
	struct fuse_in_header *ih = buf;
	uint64_t *fhp = (uint64_t *)(ih + 1); /* fh leads release_in, read_in, fsync_in */
	uint64_t node = ih->nodeid;
	unsigned np;
	bool pass = true;
	int i;

	switch (ih->opcode) {
	case FUSE_FORGET:
	case FUSE_BATCH_FORGET:
		return false;
	case FUSE_OPEN:
	case FUSE_OPENDIR:
		pthread_mutex_lock(&ho.lock);
		np = atomic_load(&ho.npend);
		if (np < HO_PENDING) {
			ho.pend[np] = (struct ho_pending){.unique = ih->unique,
							  .nodeid = node,
							  .dir = ih->opcode == FUSE_OPENDIR};
			atomic_store(&ho.npend, np + 1);
		} else if (ih->opcode == FUSE_OPEN && node < HO_NODES) {
			ho.opens[node]++; /* no room to wait for the reply: count it now */
		}
		pthread_mutex_unlock(&ho.lock);
		return true;
	case FUSE_RELEASE:
		if ((size_t)n < sizeof(*ih) + sizeof(struct fuse_release_in))
			return true;
		pthread_mutex_lock(&ho.lock);
		if (node < HO_NODES && ho.opens[node] > 0)
			ho.opens[node]--;
		else
			pass = false;
		pthread_mutex_unlock(&ho.lock);
		if (!pass) {
			sfs_handle_release(*fhp);
			ho_reply(fd, ih->unique, 0);
		}
		return pass;
	case FUSE_RELEASEDIR:
	case FUSE_READDIR:
	case FUSE_READDIRPLUS:
	case FUSE_FSYNCDIR:
		if ((size_t)n < sizeof(*ih) + sizeof(uint64_t))
			return true;
		pthread_mutex_lock(&ho.lock);
		i = ho_dirfh_find(*fhp);
		if (i >= 0 && ih->opcode == FUSE_RELEASEDIR)
			ho.dirfh[i] = ho.dirfh[--ho.ndirfh];
		pthread_mutex_unlock(&ho.lock);
		if (i >= 0)
			return true;
		if (ih->opcode == FUSE_RELEASEDIR) {
			ho_reply(fd, ih->unique, 0);
			return false;
		}
		if (node != FUSE_ROOT_ID && node != 3) {
			ho_reply(fd, ih->unique, -EBADF);
			return false;
		}
		*fhp = ho.syn_dh[node == 3];
		return true;
	default:
		return true;
	}
}

/* A reply: the handle an OPEN/OPENDIR of ours got. */
static void ho_note_reply(const struct iovec *iov, int count)
{
	const struct fuse_out_header *oh = iov[0].iov_base;

	pthread_mutex_lock(&ho.lock);
	for (unsigned i = 0, np = atomic_load(&ho.npend); i < np; i++) {
		struct ho_pending p = ho.pend[i];

		if (p.unique != oh->unique)
			continue;
		ho.pend[i] = ho.pend[np - 1];
		atomic_store(&ho.npend, np - 1);
		if (oh->error)
			break;
		if (!p.dir && p.nodeid < HO_NODES)
			ho.opens[p.nodeid]++;
		else if (p.dir && count >= 2 && iov[1].iov_len >= sizeof(struct fuse_open_out))
			ho_dirfh_add(((const struct fuse_open_out *)iov[1].iov_base)->fh);
		break;
	}
	pthread_mutex_unlock(&ho.lock);
}

static void ho_unlock(void *arg)
{
	pthread_mutex_unlock(&ho.lock);
}

/* The next synthetic request into buf: its length, 0 once they are all
 * answered, -1 if buf is too small. Other readers wait meanwhile: each
 * one must be answered before the next is handed out (node numbering). */
static ssize_t ho_take_synth(void *buf, size_t len)
{
	volatile ssize_t n = 0;

	pthread_mutex_lock(&ho.lock);
	/* libfuse cancels idle workers at exit: never die holding it. */
	pthread_cleanup_push(ho_unlock, NULL);
	while (!atomic_load(&ho.open) && ho.inflight)
		pthread_cond_wait(&ho.cond, &ho.lock);
	if (!atomic_load(&ho.open)) {
		struct ho_req *r = &ho.synth[ho.next];

		if (r->len <= len) {
			memcpy(buf, r->buf, r->len);
			ho.next++;
			ho.inflight = true;
			n = (ssize_t)r->len;
		} else {
			errno = EINVAL;
			n = -1;
		}
	}
	pthread_cleanup_pop(1);
	return n;
}

static ssize_t ho_read(int fd, void *buf, size_t len, void *userdata)
{
	if (!atomic_load(&ho.open)) {
		ssize_t n = ho_take_synth(buf, len);

		if (n != 0)
			return n;
	}
	for (;;) {
		ssize_t n = read(fd, buf, len);

		if (n < (ssize_t)sizeof(struct fuse_in_header) || ho_filter(fd, buf, n))
			return n;
	}
}

/* Once the last synthetic request is answered: serve the kernel's queue. */
static void ho_open_gate(void)
{
	if (ho.resend) {
		struct fuse_out_header oh = {
		    .len = sizeof(oh), .error = HO_NOTIFY_RESEND, .unique = 0};

		if (write(ho.fd, &oh, sizeof(oh)) != sizeof(oh))
			sfs_error("failover: FUSE_NOTIFY_RESEND failed: %s: requests the last "
				  "server had not answered may hang",
				  strerror(errno));
	}
	atomic_store(&ho.open, true);
	if (ho.ready)
		ho.ready();
}

static ssize_t ho_writev(int fd, struct iovec *iov, int count, void *userdata)
{
	if (!atomic_load(&ho.open) && count > 0 &&
	    iov[0].iov_len >= sizeof(struct fuse_out_header)) {
		const struct fuse_out_header *oh = iov[0].iov_base;
		ssize_t total = 0;

		for (int i = 0; i < count; i++)
			total += (ssize_t)iov[i].iov_len;
		pthread_mutex_lock(&ho.lock);
		if (ho.inflight && oh->unique == ho.synth[ho.next - 1].unique) {
			const struct ho_req *r = &ho.synth[ho.next - 1];
			bool fwd = r->kind == HO_INIT && ho.forward_init;
			ssize_t w = total;

			if (oh->error) {
				sfs_error("failover: synthetic request %u failed: %s", ho.next - 1,
					  strerror(-oh->error));
				abort(); /* the supervisor counts it as a crash */
			}
			if (r->kind == HO_LOOKUP) {
				const struct fuse_entry_out *eo = iov[1].iov_base;

				if (count < 2 || eo->nodeid != r->nodeid) {
					sfs_error(
					    "failover: node %llu got number %llu: cannot keep "
					    "the kernel's node numbers",
					    (unsigned long long)r->nodeid,
					    count < 2 ? 0ULL : (unsigned long long)eo->nodeid);
					abort();
				}
			} else if (r->kind == HO_OPENDIR && count >= 2) {
				const struct fuse_open_out *oo = iov[1].iov_base;

				ho.syn_dh[r->nodeid == 3] = oo->fh;
			}
			/* ENOENT: a dead server answered it after all. */
			if (fwd && (w = writev(fd, iov, count)) < 0 && errno == ENOENT)
				w = total;
			ho.inflight = false;
			if (ho.next == ho.nsynth)
				ho_open_gate();
			pthread_cond_broadcast(&ho.cond);
			pthread_mutex_unlock(&ho.lock);
			return w;
		}
		pthread_mutex_unlock(&ho.lock);
	}
	if (atomic_load(&ho.npend) && count > 0 && iov[0].iov_len >= sizeof(struct fuse_out_header))
		ho_note_reply(iov, count);
	return writev(fd, iov, count);
}

static ssize_t ho_splice_send(int fdin, off_t *offin, int fdout, off_t *offout, size_t len,
			      unsigned int flags, void *userdata)
{
	return splice(fdin, offin, fdout, offout, len, flags);
}

int sfs_handover_attach(struct fuse_session *se, int fd, const void *init, size_t init_len,
			bool forward_init, bool resend, void (*ready)(void))
{
	static const struct fuse_custom_io io = {
	    .read = ho_read,
	    .writev = ho_writev,
	    .splice_send = ho_splice_send,
	};
	struct ho_req *r = &ho.synth[0];
	int ret;

	struct fuse_in_header ih;

	/* init is a byte buffer, not aligned for the header: copy it out. */
	if (init_len < sizeof(ih) + 16)
		return -EINVAL;
	memcpy(&ih, init, sizeof(ih));
	if (ih.opcode != FUSE_INIT)
		return -EINVAL;
	ho.fd = fd;
	ho.forward_init = forward_init;
	ho.resend = resend;
	ho.ready = ready;
	r->buf = malloc(init_len);
	if (!r->buf)
		return -ENOMEM;
	memcpy(r->buf, init, init_len);
	r->len = init_len;
	r->unique = ih.unique;
	r->kind = HO_INIT;
	ho.nsynth = 1;
	/* The fixed numbering: see the comment at the top. */
	ret = ho_add_lookup(FUSE_ROOT_ID, "disk", 2);
	if (ret == 0)
		ret = ho_add_lookup(FUSE_ROOT_ID, "control", 3);
	for (int i = 0; ret == 0 && i < CTL_COUNT; i++)
		ret = ho_add_lookup(3, control_files[i].name, 4 + (uint64_t)i);
	if (ret == 0)
		ret = ho_add_opendir(FUSE_ROOT_ID);
	if (ret == 0)
		ret = ho_add_opendir(3);
	if (ret == 0)
		ret = fuse_session_custom_io(se, &io, fd);
	return ret;
}
