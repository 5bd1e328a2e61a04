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
#define HO_MAX_SYNTH	 (2 + 2 + CTL_COUNT)

struct ho_req {
	unsigned char *buf;
	size_t len;
	uint64_t unique;
	uint64_t want_nodeid; /* LOOKUP: the node number it must get; 0: INIT */
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
} ho = {.lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER};

static int ho_add_lookup(uint64_t parent, const char *name, uint64_t nodeid)
{
	size_t nl = strlen(name) + 1, len = sizeof(struct fuse_in_header) + nl;
	struct ho_req *r = &ho.synth[ho.nsynth];
	struct fuse_in_header *ih;

	r->buf = calloc(1, len);
	if (!r->buf)
		return -ENOMEM;
	ih = (struct fuse_in_header *)r->buf;
	ih->len = (uint32_t)len;
	ih->opcode = FUSE_LOOKUP;
	ih->unique = HO_SYNTH_UNIQUE | ho.nsynth;
	ih->nodeid = parent;
	memcpy(r->buf + sizeof(*ih), name, nl);
	r->len = len;
	r->unique = ih->unique;
	r->want_nodeid = nodeid;
	ho.nsynth++;
	return 0;
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
		const struct fuse_in_header *ih = buf;

		if (n < (ssize_t)sizeof(*ih) ||
		    (ih->opcode != FUSE_FORGET && ih->opcode != FUSE_BATCH_FORGET))
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
			bool fwd = !r->want_nodeid && ho.forward_init;
			ssize_t w = total;

			if (oh->error) {
				sfs_error("failover: %s failed: %s",
					  r->want_nodeid ? "lookup" : "init", strerror(-oh->error));
				abort(); /* the supervisor counts it as a crash */
			}
			if (r->want_nodeid) {
				const struct fuse_entry_out *eo = iov[1].iov_base;

				if (count < 2 || eo->nodeid != r->want_nodeid) {
					sfs_error(
					    "failover: node %llu got number %llu: cannot keep "
					    "the kernel's node numbers",
					    (unsigned long long)r->want_nodeid,
					    count < 2 ? 0ULL : (unsigned long long)eo->nodeid);
					abort();
				}
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

	if (init_len < sizeof(struct fuse_in_header) + 16 ||
	    ((const struct fuse_in_header *)init)->opcode != FUSE_INIT)
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
	r->unique = ((const struct fuse_in_header *)init)->unique;
	r->want_nodeid = 0;
	ho.nsynth = 1;
	/* The fixed numbering: see the comment at the top. */
	ret = ho_add_lookup(FUSE_ROOT_ID, "disk", 2);
	if (ret == 0)
		ret = ho_add_lookup(FUSE_ROOT_ID, "control", 3);
	for (int i = 0; ret == 0 && i < CTL_COUNT; i++)
		ret = ho_add_lookup(3, control_files[i].name, 4 + (uint64_t)i);
	if (ret == 0)
		ret = fuse_session_custom_io(se, &io, fd);
	return ret;
}
