/* streamfs: the supervisor of a daemonized mount (crash failover, live
 * upgrade). It holds the /dev/fuse descriptor, so the FUSE connection
 * outlives any server process (the kernel aborts a connection only when
 * the last holder of that file closes it), and runs the server as a child:
 * the same binary with the same arguments, given the descriptor and the
 * INIT request by environment (fusefs/handover.c). When the server dies,
 * a new one starts, and asks the kernel to resend what the dead one had
 * not answered.
 *
 * Deliberately small: no image, network or FUSE library code runs here,
 * only fork/exec, signals and, after a crash loop, a loop that answers
 * every request with EIO. It reads the descriptor only for the INIT and in
 * that EIO state; never while a server runs.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/fuse.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "fusefs.h"
#include "journal.h"
#include "util.h"

#define SUP_FUSE_HAS_RESEND (1u << (39 - 32)) /* flags2 bit of FUSE_HAS_RESEND */
#define SUP_NOTIFY_RESEND   7
/* A server that dies within SUP_STABLE_MS of being ready (or before) is a
 * crash-loop suspect; SUP_MAX_QUICK of those in a row end the restarts. */
#define SUP_STABLE_MS 500
#define SUP_MAX_QUICK 5
#define SUP_EIO_BUF   (SFS_FAILOVER_MAX_IO + 65536)

struct sup {
	const struct sfs_sup_opts *o;
	char exe[PATH_MAX];
	unsigned char init[4096] __attribute__((aligned(8))); /* a fuse_in_header first */
	size_t init_len;
	bool has_resend, init_done, upgrading, stopping, eio;
	bool dead; /* the server crashed and cannot be replaced: leave the mount dead */
	pid_t server;
	int status_r, status_w; /* the server writes one byte when it serves */
	int journal_fd;		/* memfd: the servers' allocation journal (journal.h) */
	int attrs_fd;		/* memfd: /disk's attributes (fusefs/attrs.c) */
	unsigned restarts, quick;
	time_t last_restart;
	uint64_t started_ns, ready_ns, died_ns;
};

static void sup_write_pidfile(const char *path, pid_t pid)
{
	FILE *f = fopen(path, "w");

	if (!f || fprintf(f, "%d\n", (int)pid) < 0 || fclose(f) != 0)
		sfs_error("%s: cannot write pid file", path);
}

static int sup_read_init(struct sup *s)
{
	unsigned char *buf = malloc(SUP_EIO_BUF);
	const struct fuse_in_header *ih = (const void *)buf;
	const struct fuse_init_in *ii = (const void *)(buf + sizeof(*ih));
	ssize_t n;
	int r = 0;

	if (!buf)
		return -ENOMEM;
	do
		n = read(s->o->fd, buf, SUP_EIO_BUF);
	while (n < 0 && errno == EINTR);
	if (n < 0) {
		r = -errno;
		goto out;
	}
	if ((size_t)n < sizeof(*ih) + 16 || (size_t)n > sizeof(s->init) ||
	    ih->opcode != FUSE_INIT) {
		r = -EPROTO;
		goto out;
	}
	memcpy(s->init, buf, (size_t)n);
	s->init_len = (size_t)n;
	s->has_resend = (size_t)n >= sizeof(*ih) + sizeof(*ii) && (ii->flags & FUSE_INIT_EXT) &&
			(ii->flags2 & SUP_FUSE_HAS_RESEND);
	/* Test hook: behave as on a kernel without resend (before 6.9). */
	if (getenv("STREAMFS_TEST_NO_RESEND"))
		s->has_resend = false;
out:
	free(buf);
	return r;
}

static int sup_start(struct sup *s)
{
	char hex[2 * sizeof(s->init) + 1], num[32];
	sigset_t none;
	pid_t pid;

	for (size_t i = 0; i < s->init_len; i++)
		snprintf(hex + 2 * i, 3, "%02x", s->init[i]);
	setenv("STREAMFS_FUSE_INIT", hex, 1);
	snprintf(num, sizeof(num), "%d", s->o->fd);
	setenv("STREAMFS_FUSE_FD", num, 1);
	snprintf(num, sizeof(num), "%d", s->status_w);
	setenv("STREAMFS_SUP_FD", num, 1);
	snprintf(num, sizeof(num), "%d", s->journal_fd);
	setenv("STREAMFS_JOURNAL_FD", num, 1);
	snprintf(num, sizeof(num), "%d", s->attrs_fd);
	setenv("STREAMFS_ATTRS_FD", num, 1);
	setenv("STREAMFS_FUSE_INIT_FWD", s->init_done ? "0" : "1", 1);
	setenv("STREAMFS_RESEND", s->has_resend && s->restarts ? "1" : "0", 1);
	snprintf(num, sizeof(num), "%u", s->restarts);
	setenv("STREAMFS_RESTARTS", num, 1);
	snprintf(num, sizeof(num), "%lld", (long long)s->last_restart);
	setenv("STREAMFS_LAST_RESTART", num, 1);
	s->started_ns = sfs_now_ns();
	s->ready_ns = 0;
	pid = fork();
	if (pid < 0)
		return -errno;
	if (pid == 0) {
		/* The server must not outlive us: then nobody would restart it,
		 * and a killed supervisor should end the mount as before. */
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (getppid() == 1)
			_exit(EXIT_FAILURE);
		fcntl(s->o->fd, F_SETFD, 0);
		fcntl(s->status_w, F_SETFD, 0);
		fcntl(s->journal_fd, F_SETFD, 0);
		fcntl(s->attrs_fd, F_SETFD, 0);
		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);
		execv(s->exe, s->o->argv);
		_exit(127);
	}
	s->server = pid;
	return 0;
}

/* After a crash loop: answer every request, queued or re-sent, with EIO,
 * until the mount goes away or an upgrade asks for a server again. */
static int sup_eio_one(struct sup *s, unsigned char *buf)
{
	const struct fuse_in_header *ih = (const void *)buf;
	struct fuse_out_header oh = {.len = sizeof(oh), .error = -EIO};
	ssize_t n = read(s->o->fd, buf, SUP_EIO_BUF);

	if (n < 0)
		return errno == ENODEV ? -ENODEV : 0;
	if ((size_t)n < sizeof(*ih) || ih->opcode == FUSE_FORGET ||
	    ih->opcode == FUSE_BATCH_FORGET || ih->opcode == FUSE_INTERRUPT)
		return 0;
	oh.unique = ih->unique;
	if (write(s->o->fd, &oh, sizeof(oh)) < 0 && errno == ENODEV)
		return -ENODEV;
	return 0;
}

static void sup_resend(struct sup *s)
{
	struct fuse_out_header oh = {.len = sizeof(oh), .error = SUP_NOTIFY_RESEND};

	if (write(s->o->fd, &oh, sizeof(oh)) < 0)
		sfs_error("supervisor: resend: %s", strerror(errno));
}

/* The server process ended with status st. Returns true to go on. */
static bool sup_server_gone(struct sup *s, int st)
{
	uint64_t now = sfs_now_ns();
	bool clean = WIFEXITED(st) && WEXITSTATUS(st) == 0;
	unsigned delay_ms;
	pid_t pid = s->server;

	s->server = 0;
	if (s->stopping)
		return false;
	if (clean && !s->upgrading)
		return false; /* unmounted, or stopped by SIGTERM: as before */
	if (s->upgrading) {
		s->upgrading = false;
		s->quick = 0;
		sfs_info("supervisor: upgrade: starting %s", s->exe);
	} else {
		if (WIFSIGNALED(st))
			sfs_error("supervisor: server %d killed by signal %d", (int)pid,
				  WTERMSIG(st));
		else
			sfs_error("supervisor: server %d exited with status %d", (int)pid,
				  WEXITSTATUS(st));
		if (!s->has_resend) {
			sfs_error("supervisor: no failover without FUSE_NOTIFY_RESEND: the mount "
				  "ends with its server");
			s->dead = true;
			return false;
		}
		if (!s->ready_ns || now - s->ready_ns < SUP_STABLE_MS * 1000000ull)
			s->quick++;
		else
			s->quick = 0;
		if (s->quick >= SUP_MAX_QUICK) {
			sfs_error("supervisor: the server died %u times in a row within %u ms of "
				  "starting: crash loop, no more restarts; every request now fails "
				  "with EIO (streamfs upgrade retries)",
				  s->quick, SUP_STABLE_MS);
			s->eio = true;
			sup_resend(s);
			return true;
		}
		/* Back off a little on a crash loop, still well under 1 s. */
		delay_ms = s->quick > 1 ? 25u << (s->quick - 2) : 0;
		if (delay_ms)
			usleep(delay_ms * 1000);
	}
	s->restarts++;
	s->last_restart = time(NULL);
	s->died_ns = now;
	if (sup_start(s) < 0) {
		sfs_error("supervisor: cannot start a server: %s", strerror(errno));
		s->eio = true;
		sup_resend(s);
	}
	return true;
}

int sfs_supervise(const struct sfs_sup_opts *o)
{
	struct sup s = {.o = o, .journal_fd = -1, .attrs_fd = -1};
	unsigned char *eio_buf = NULL;
	sigset_t set;
	int sfd = -1, p[2], r;
	ssize_t n;

	n = readlink("/proc/self/exe", s.exe, sizeof(s.exe) - 1);
	if (n < 0) {
		sfs_error("supervisor: /proc/self/exe: %s", strerror(errno));
		return -errno;
	}
	s.exe[n] = '\0';
	if (pipe2(p, O_CLOEXEC) < 0)
		return -errno;
	s.status_r = p[0];
	s.status_w = p[1];
	/* The allocation journal outlives each server: a new one replays what the
	 * dead one acknowledged but had not flushed. Sparse: it costs memory
	 * only while writes are journaled. */
	s.journal_fd = memfd_create("streamfs-journal", MFD_CLOEXEC);
	if (s.journal_fd < 0 || ftruncate(s.journal_fd, JOURNAL_SIZE) < 0) {
		r = -errno;
		sfs_error("supervisor: journal memfd: %s", strerror(-r));
		goto out;
	}
	/* So do /disk's owner, mode and xattrs (libvirt's labels). */
	s.attrs_fd = memfd_create("streamfs-attrs", MFD_CLOEXEC);
	if (s.attrs_fd < 0 || ftruncate(s.attrs_fd, SFS_ATTRS_SHM_SIZE) < 0) {
		r = -errno;
		sfs_error("supervisor: attributes memfd: %s", strerror(-r));
		goto out;
	}
	r = sup_read_init(&s);
	if (r < 0) {
		sfs_error("supervisor: reading FUSE_INIT: %s", strerror(-r));
		goto out;
	}
	if (!s.has_resend)
		sfs_info("kernel without FUSE_NOTIFY_RESEND (Linux < 6.9): no crash failover, "
			 "the mount ends with its server");
	if (o->pidfile) {
		char path[PATH_MAX];

		snprintf(path, sizeof(path), "%s.supervisor", o->pidfile);
		sup_write_pidfile(path, getpid());
	}
	sigemptyset(&set);
	sigaddset(&set, SIGCHLD);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGHUP);
	sigaddset(&set, SIGUSR1);
	sigprocmask(SIG_BLOCK, &set, NULL);
	signal(SIGPIPE, SIG_IGN);
	sfd = signalfd(-1, &set, SFD_CLOEXEC);
	if (sfd < 0) {
		r = -errno;
		goto out;
	}
	r = sup_start(&s);
	if (r < 0)
		goto out;
	for (;;) {
		struct pollfd pf[3] = {{.fd = sfd, .events = POLLIN},
				       {.fd = s.status_r, .events = POLLIN},
				       {.fd = s.eio ? o->fd : -1, .events = POLLIN}};
		struct signalfd_siginfo si;
		int st;
		pid_t w;

		if (poll(pf, 3, -1) < 0) {
			if (errno == EINTR)
				continue;
			r = -errno;
			break;
		}
		if (pf[1].revents & POLLIN) {
			char c;

			if (read(s.status_r, &c, 1) == 1 && s.server) {
				s.ready_ns = sfs_now_ns();
				s.init_done = true;
				if (s.restarts)
					sfs_info("supervisor: server %d serving, %.0f ms after the "
						 "last one ended",
						 (int)s.server,
						 (double)(s.ready_ns - s.died_ns) / 1e6);
			}
		}
		if (pf[2].revents & (POLLIN | POLLERR)) {
			if (!eio_buf)
				eio_buf = malloc(SUP_EIO_BUF);
			if (!eio_buf || sup_eio_one(&s, eio_buf) == -ENODEV) {
				r = 0;
				break;
			}
		}
		if (!(pf[0].revents & POLLIN) || read(sfd, &si, sizeof(si)) != sizeof(si))
			continue;
		switch (si.ssi_signo) {
		case SIGCHLD:
			while ((w = waitpid(-1, &st, WNOHANG)) > 0) {
				if (w == s.server && !sup_server_gone(&s, st))
					goto done;
			}
			break;
		case SIGUSR1:
			if (s.eio) {
				sfs_info("supervisor: upgrade: leaving the EIO state");
				s.eio = false;
				s.quick = 0;
				s.restarts++;
				s.last_restart = time(NULL);
				s.died_ns = sfs_now_ns();
				if (sup_start(&s) < 0)
					s.eio = true;
			} else if (s.server && !s.upgrading) {
				/* The server finishes what it has read, flushes and
				 * exits 0; what it had not read waits in the kernel. */
				s.upgrading = true;
				s.died_ns = sfs_now_ns();
				kill(s.server, SIGTERM);
			}
			break;
		default: /* SIGTERM, SIGINT, SIGHUP: stop, as the daemon did */
			if (!s.server)
				goto done;
			s.stopping = true;
			kill(s.server, SIGTERM);
			break;
		}
	}
done:
	r = s.dead ? 1 : 0;
out:
	if (s.server) {
		kill(s.server, SIGKILL);
		waitpid(s.server, NULL, 0);
	}
	free(eio_buf);
	if (sfd >= 0)
		close(sfd);
	close(p[0]);
	close(p[1]);
	if (s.journal_fd >= 0)
		close(s.journal_fd);
	if (s.attrs_fd >= 0)
		close(s.attrs_fd);
	return r;
}
