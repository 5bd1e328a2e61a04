// SPDX-License-Identifier: MIT
/*
 * linkem: a user-space wide-area link emulator, as a TCP proxy (the kernel here has no netem).
 *
 *   linkem -l 127.0.0.1:PORT|0 -t 127.0.0.1:TPORT -d DELAY_MS_ONE_WAY -r RATE_MBIT
 *          [-w WINDOW_BYTES] [-p PORTFILE] [-P PIDFILE]
 *
 * Notes on the design
 *
 * What it models, per direction (client->target "up", target->client "down"):
 * - A bottleneck shared by all connections: one serializer per direction at RATE. A chunk read
 *   at time t leaves the bottleneck at depart = max(t, link_free) + len / RATE, and link_free
 *   becomes depart. This is a token bucket with no burst allowance (a pacer), in FIFO order of
 *   arrival; since every connection gets one read per event-loop turn, arrivals interleave
 *   round robin, which makes the FIFO fair-ish.
 * - Propagation delay: the chunk reaches the far side no earlier than depart + DELAY.
 * - A window per connection and direction: bytes count as in flight from the moment they are
 *   read until their "ACK" is back, DELAY after they were written to the far side. With WINDOW
 *   bytes in flight the connection stops reading its source, so the sender's socket buffer
 *   fills and TCP backpressure reaches it. One connection therefore moves at most WINDOW per
 *   RTT, and queueing at the bottleneck counts against the window, as in a real path.
 * - Connection setup: the client's connect() completes locally at once, so its first bytes
 *   are held until one RTT after the accept (the SYN / SYN-ACK exchange) and then pay the
 *   one-way delay. The target may send no earlier than one one-way delay after the accept.
 *   A tiny HTTP request/response therefore costs 2 RTT, as over a real path.
 * - Close: an EOF travels like data (after the bytes before it, DELAY later), then becomes
 *   shutdown(SHUT_WR) on the far side. Errors (reset, broken pipe) close both sides at once.
 *
 * Why a window stands in for TCP's congestion window: a sender over a long path can have at
 * most cwnd (bounded by the receive window) unacknowledged bytes, so a single flow moves at
 * most cwnd/RTT; a fixed WINDOW (default 2 MiB) is that limit in steady state. The loopback
 * TCP underneath never loses anything, so without the window one connection would take the
 * whole bottleneck however long the path.
 *
 * What it does not model: loss and retransmission, reordering, jitter, slow start and
 * congestion avoidance (the window is there from the first byte), ACK traffic on the reverse
 * link, the MTU (the unit is one read, at most LINKEM_CHUNK bytes), and delayed RSTs. A
 * receiver that reads slowly still used the bottleneck for what was read (bytes take their
 * slot when read, not when written); the window then stops its sender, as a receive window
 * would, one window late.
 *
 * NOTES ON THE THREAD MODEL: one thread, one epoll loop, level-triggered. Every turn: handle
 * the ready sockets (one read per readable socket), then pump every connection (return
 * window, write what is due, propagate EOFs), then sleep until the next event or due time
 * (epoll_pwait2, nanosecond timeout). SIGTERM/SIGINT are blocked except inside the wait, so a
 * signal always ends the wait with EINTR and the loop exits cleanly.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* accept4, epoll_pwait2 */
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define LINKEM_CHUNK	  (64 * 1024)	    /* in bytes: the most one read takes */
#define LINKEM_WINDOW_DEF (2 * 1024 * 1024) /* in bytes */
#define LINKEM_MAX_EVENTS 256
#define LINKEM_NS_PER_SEC 1000000000LL

/* A run of bytes read from one side, queued for the other. */
struct linkem_chunk {
	struct linkem_chunk *next;
	int64_t due; /* ns, monotonic: when it reaches the far side */
	int64_t ack; /* ns: when its window space returns; 0 until fully written */
	size_t len;
	size_t off; /* bytes already written */
	char data[];
};

/* One direction of the bottleneck, shared by all connections. */
struct linkem_link {
	int64_t free_at; /* ns: when the serializer is next idle */
	uint64_t bytes;	 /* total carried, for the exit summary */
};

/* One direction of one connection: reads fd[src], writes fd[1 - src]. */
struct linkem_dir {
	struct linkem_link *link;
	struct linkem_chunk *head, *tail; /* everything still counting against the window */
	struct linkem_chunk *send;	  /* first chunk not fully written, or NULL */
	size_t inflight;		  /* in bytes: read and not yet acknowledged */
	int64_t open_at;		  /* ns: no byte enters the link before this */
	int64_t fin_due;		  /* ns: when the EOF reaches the far side */
	bool eof;			  /* the source said EOF */
	bool shut;			  /* shutdown(dst, SHUT_WR) done */
	bool blocked;			  /* the last write hit EAGAIN: wait for EPOLLOUT */
};

/* The epoll cookie of one socket. */
struct linkem_end {
	struct linkem_conn *conn;
	int side; /* 0 client, 1 target */
};

struct linkem_conn {
	struct linkem_conn *next;
	int fd[2];	    /* 0 client, 1 target */
	uint32_t events[2]; /* registered epoll events; 0 = not registered */
	struct linkem_end end[2];
	struct linkem_dir dir[2]; /* dir[i] reads fd[i] and writes fd[1 - i] */
	bool connecting;	  /* the target connect() is in progress */
	bool dead;
};

static struct linkem_link linkem_links[2];
static struct linkem_conn *linkem_conns;
static int linkem_ep = -1;
static int64_t linkem_delay; /* ns, one way */
static double linkem_rate;   /* bytes per ns; 0 = unlimited */
static size_t linkem_window = LINKEM_WINDOW_DEF;
static struct sockaddr_in linkem_target;
static unsigned long linkem_nconns;
static volatile sig_atomic_t linkem_stop;
static char linkem_scratch[LINKEM_CHUNK];

static int64_t linkem_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * LINKEM_NS_PER_SEC + ts.tv_nsec;
}

static int64_t linkem_max(int64_t a, int64_t b)
{
	return a > b ? a : b;
}

static int64_t linkem_min(int64_t a, int64_t b)
{
	return a < b ? a : b;
}

static void linkem_on_signal(int sig)
{
	(void)sig;
	linkem_stop = 1;
}

/* Parse "A.B.C.D:PORT" (IPv4 only: the benchmark is on loopback). */
static int linkem_parse_addr(const char *s, struct sockaddr_in *sa)
{
	char host[64];
	const char *colon = strrchr(s, ':');
	char *end;
	long port;

	if (!colon || (size_t)(colon - s) >= sizeof(host))
		return -EINVAL;
	memcpy(host, s, colon - s);
	host[colon - s] = '\0';
	port = strtol(colon + 1, &end, 10);
	if (*end || end == colon + 1 || port < 0 || port > 65535)
		return -EINVAL;
	memset(sa, 0, sizeof(*sa));
	sa->sin_family = AF_INET;
	sa->sin_port = htons(port);
	if (inet_pton(AF_INET, host, &sa->sin_addr) != 1)
		return -EINVAL;
	return 0;
}

/* Write "VALUE\n" to PATH atomically, so a waiting script never reads half of it. */
static int linkem_write_file(const char *path, long value)
{
	char tmp[4096];
	FILE *f;
	int ret = 0;

	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	f = fopen(tmp, "w");
	if (!f)
		return -errno;
	fprintf(f, "%ld\n", value);
	if (fclose(f) != 0 || rename(tmp, path) != 0) {
		ret = -errno;
		unlink(tmp);
	}
	return ret;
}

/* Register exactly EVENTS for one end; an end that wants nothing is removed from the set,
 * since epoll reports HUP/ERR even for events = 0 and the loop would spin on them. */
static void linkem_set_events(struct linkem_conn *c, int side, uint32_t events)
{
	struct epoll_event ev = {.events = events, .data.ptr = &c->end[side]};
	int op;

	if (c->fd[side] < 0 || events == c->events[side])
		return;
	if (!events)
		op = EPOLL_CTL_DEL;
	else if (!c->events[side])
		op = EPOLL_CTL_ADD;
	else
		op = EPOLL_CTL_MOD;
	if (epoll_ctl(linkem_ep, op, c->fd[side], &ev) != 0) {
		perror("linkem: epoll_ctl");
		c->dead = true;
		return;
	}
	c->events[side] = events;
}

static bool linkem_wants_read(const struct linkem_conn *c, int side)
{
	const struct linkem_dir *d = &c->dir[side];

	return !d->eof && d->inflight < linkem_window && !(side == 1 && c->connecting);
}

static void linkem_update_events(struct linkem_conn *c)
{
	int s;

	for (s = 0; s < 2; s++) {
		uint32_t ev = 0;

		if (linkem_wants_read(c, s))
			ev |= EPOLLIN;
		/* fd[s] is the destination of dir[1 - s] */
		if (c->dir[1 - s].blocked || (s == 1 && c->connecting))
			ev |= EPOLLOUT;
		linkem_set_events(c, s, ev);
	}
}

/* One read from dir[side]'s source: schedule it through the bottleneck. -errno on error. */
static int linkem_read(struct linkem_conn *c, int side, int64_t now)
{
	struct linkem_dir *d = &c->dir[side];
	size_t room = linkem_window - d->inflight;
	struct linkem_chunk *ch;
	int64_t t, depart;
	ssize_t n;

	if (room > LINKEM_CHUNK)
		room = LINKEM_CHUNK;
	n = recv(c->fd[side], linkem_scratch, room, 0);
	if (n < 0)
		return errno == EAGAIN || errno == EINTR ? 0 : -errno;
	t = linkem_max(now, d->open_at);
	if (n == 0) {
		d->eof = true;
		d->fin_due = linkem_max(t + linkem_delay, d->tail ? d->tail->due : 0);
		return 0;
	}
	ch = malloc(sizeof(*ch) + n);
	if (!ch)
		return -ENOMEM;
	memcpy(ch->data, linkem_scratch, n);
	ch->next = NULL;
	ch->len = n;
	ch->off = 0;
	ch->ack = 0;
	depart = linkem_max(t, d->link->free_at);
	if (linkem_rate > 0)
		depart += (int64_t)(n / linkem_rate);
	d->link->free_at = depart;
	d->link->bytes += n;
	ch->due = depart + linkem_delay;
	if (d->tail)
		d->tail->next = ch;
	else
		d->head = ch;
	d->tail = ch;
	if (!d->send)
		d->send = ch;
	d->inflight += n;
	return 0;
}

/* Return acknowledged window, write what is due, pass on a due EOF. -errno on error. */
static int linkem_pump(struct linkem_conn *c, int side, int64_t now)
{
	struct linkem_dir *d = &c->dir[side];
	int dst = c->fd[1 - side];

	while (d->head && d->head->ack && d->head->ack <= now) {
		struct linkem_chunk *ch = d->head;

		d->head = ch->next;
		if (!d->head)
			d->tail = NULL;
		d->inflight -= ch->len;
		free(ch);
	}
	if (c->connecting)
		return 0;
	while (!d->blocked && d->send && d->send->due <= now) {
		struct linkem_chunk *ch = d->send;
		ssize_t n = send(dst, ch->data + ch->off, ch->len - ch->off, MSG_NOSIGNAL);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN)
				return -errno;
			d->blocked = true;
			break;
		}
		ch->off += n;
		if (ch->off == ch->len) {
			ch->ack = now + linkem_delay;
			d->send = ch->next;
		}
	}
	if (d->eof && !d->send && !d->shut && d->fin_due <= now) {
		/* ENOTCONN: the peer is gone already; the other direction finds out */
		if (shutdown(dst, SHUT_WR) != 0 && errno != ENOTCONN)
			return -errno;
		d->shut = true;
	}
	return 0;
}

/* The earliest time dir[side] can make progress without a socket event; INT64_MAX if none. */
static int64_t linkem_deadline(const struct linkem_conn *c, int side)
{
	const struct linkem_dir *d = &c->dir[side];
	int64_t t = INT64_MAX;

	if (d->head && d->head->ack)
		t = d->head->ack;
	if (c->connecting)
		return t;
	if (d->send && !d->blocked && d->send->due < t)
		t = d->send->due;
	if (d->eof && !d->send && !d->shut && d->fin_due < t)
		t = d->fin_due;
	return t;
}

static void linkem_conn_free(struct linkem_conn *c)
{
	int i;

	for (i = 0; i < 2; i++) {
		struct linkem_chunk *ch = c->dir[i].head, *next;

		for (; ch; ch = next) {
			next = ch->next;
			free(ch);
		}
		if (c->fd[i] >= 0)
			close(c->fd[i]); /* also removes it from the epoll set */
	}
	free(c);
}

/* Start proxying an accepted client socket: connect to the target. -errno on error. */
static int linkem_conn_new(int cfd, int64_t now)
{
	struct linkem_conn *c = NULL;
	int tfd, one = 1, i, ret;

	tfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (tfd < 0)
		return -errno;
	c = calloc(1, sizeof(*c));
	if (!c) {
		ret = -ENOMEM;
		goto fail;
	}
	/* the emulated path does the batching; Nagle would add loopback timing to it */
	setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	setsockopt(tfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (connect(tfd, (struct sockaddr *)&linkem_target, sizeof(linkem_target)) != 0 &&
	    errno != EINPROGRESS) {
		ret = -errno;
		goto fail;
	}
	c->fd[0] = cfd;
	c->fd[1] = tfd;
	c->connecting = true;
	for (i = 0; i < 2; i++) {
		c->end[i].conn = c;
		c->end[i].side = i;
		c->dir[i].link = &linkem_links[i];
	}
	/* the client's data waits for the emulated handshake (one RTT); the target's for the
	 * SYN to reach it (one way) */
	c->dir[0].open_at = now + 2 * linkem_delay;
	c->dir[1].open_at = now + linkem_delay;
	c->next = linkem_conns;
	linkem_conns = c;
	linkem_nconns++;
	linkem_update_events(c);
	return 0;
fail:
	close(tfd);
	free(c);
	return ret;
}

static void linkem_accept(int lfd, int64_t now)
{
	for (;;) {
		int cfd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC), ret;

		if (cfd < 0) {
			if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
				perror("linkem: accept");
			return;
		}
		ret = linkem_conn_new(cfd, now);
		if (ret) {
			fprintf(stderr, "linkem: connect to target: %s\n", strerror(-ret));
			close(cfd);
		}
	}
}

/* Handle a socket event on one end of a connection. */
static void linkem_event(struct linkem_end *e, uint32_t events, int64_t now)
{
	struct linkem_conn *c = e->conn;
	int s = e->side, err = 0;
	socklen_t len = sizeof(err);

	if (c->dead)
		return;
	if (s == 1 && c->connecting) {
		if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
			return;
		if (getsockopt(c->fd[1], SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err) {
			fprintf(stderr, "linkem: connect to target: %s\n",
				strerror(err ? err : errno));
			c->dead = true;
			return;
		}
		c->connecting = false;
		return;
	}
	/* on HUP/ERR too: the next write then reports what happened */
	if (events & (EPOLLOUT | EPOLLHUP | EPOLLERR))
		c->dir[1 - s].blocked = false;
	if ((events & (EPOLLIN | EPOLLHUP | EPOLLERR)) && linkem_wants_read(c, s)) {
		err = linkem_read(c, s, now);
		if (err) {
			if (err != -ECONNRESET)
				fprintf(stderr, "linkem: read: %s\n", strerror(-err));
			c->dead = true;
		}
	} else if (events & EPOLLERR) {
		c->dead = true;
	}
}

static int linkem_listen(const struct sockaddr_in *sa, int *port)
{
	struct sockaddr_in bound;
	socklen_t len = sizeof(bound);
	int fd, one = 1;

	fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(fd, (const struct sockaddr *)sa, sizeof(*sa)) != 0 || listen(fd, 128) != 0 ||
	    getsockname(fd, (struct sockaddr *)&bound, &len) != 0) {
		int ret = -errno;

		close(fd);
		return ret;
	}
	*port = ntohs(bound.sin_port);
	return fd;
}

static void linkem_usage(void)
{
	fprintf(stderr,
		"usage: linkem -l ADDR:PORT|0 -t ADDR:PORT -d DELAY_MS_ONE_WAY "
		"-r RATE_MBIT [-w WINDOW_BYTES] [-p PORTFILE] [-P PIDFILE]\n"
		"  RATE_MBIT 0 = unlimited; WINDOW default %d bytes\n",
		LINKEM_WINDOW_DEF);
}

static void linkem_loop(int lfd)
{
	struct epoll_event evs[LINKEM_MAX_EVENTS];
	sigset_t waitmask;

	sigprocmask(SIG_SETMASK, NULL, &waitmask);
	sigdelset(&waitmask, SIGTERM);
	sigdelset(&waitmask, SIGINT);
	while (!linkem_stop) {
		struct linkem_conn *c, **pp;
		int64_t now = linkem_now(), next = INT64_MAX;
		struct timespec ts, *tsp = NULL;
		int n, i;

		for (pp = &linkem_conns; (c = *pp);) {
			for (i = 0; i < 2 && !c->dead; i++) {
				int err = linkem_pump(c, i, now);

				if (err) {
					if (err != -EPIPE && err != -ECONNRESET)
						fprintf(stderr, "linkem: write: %s\n",
							strerror(-err));
					c->dead = true;
				}
			}
			if (c->dead || (c->dir[0].shut && c->dir[1].shut)) {
				*pp = c->next;
				linkem_conn_free(c);
				continue;
			}
			linkem_update_events(c);
			for (i = 0; i < 2; i++)
				next = linkem_min(next, linkem_deadline(c, i));
			pp = &c->next;
		}
		if (next != INT64_MAX) {
			int64_t wait = linkem_max(next - now, 0);

			ts.tv_sec = wait / LINKEM_NS_PER_SEC;
			ts.tv_nsec = wait % LINKEM_NS_PER_SEC;
			tsp = &ts;
		}
		n = epoll_pwait2(linkem_ep, evs, LINKEM_MAX_EVENTS, tsp, &waitmask);
		if (n < 0) {
			if (errno != EINTR) {
				perror("linkem: epoll_pwait2");
				return;
			}
			continue;
		}
		now = linkem_now();
		for (i = 0; i < n; i++) {
			if (evs[i].data.ptr)
				linkem_event(evs[i].data.ptr, evs[i].events, now);
			else
				linkem_accept(lfd, now);
		}
	}
}

int main(int argc, char **argv)
{
	struct sockaddr_in laddr;
	const char *portfile = NULL, *pidfile = NULL;
	bool have_l = false, have_t = false;
	double delay_ms = -1, rate_mbit = -1;
	struct sigaction sa = {.sa_handler = linkem_on_signal};
	struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
	sigset_t block;
	int opt, lfd, port = 0, ret = 1;
	char *end;

	while ((opt = getopt(argc, argv, "l:t:d:r:w:p:P:h")) != -1) {
		switch (opt) {
		case 'l':
			have_l = linkem_parse_addr(optarg, &laddr) == 0;
			break;
		case 't':
			have_t = linkem_parse_addr(optarg, &linkem_target) == 0;
			break;
		case 'd':
			delay_ms = strtod(optarg, &end);
			if (*end || delay_ms < 0)
				delay_ms = -1;
			break;
		case 'r':
			rate_mbit = strtod(optarg, &end);
			if (*end || rate_mbit < 0)
				rate_mbit = -1;
			break;
		case 'w':
			linkem_window = strtoul(optarg, &end, 10);
			if (*end || linkem_window < 1)
				linkem_window = 0;
			break;
		case 'p':
			portfile = optarg;
			break;
		case 'P':
			pidfile = optarg;
			break;
		default:
			linkem_usage();
			return 2;
		}
	}
	if (!have_l || !have_t || delay_ms < 0 || rate_mbit < 0 || !linkem_window ||
	    optind != argc) {
		linkem_usage();
		return 2;
	}
	linkem_delay = (int64_t)(delay_ms * 1e6);
	linkem_rate = rate_mbit * 1e6 / 8 / 1e9; /* Mbit/s to bytes per ns */

	/* block the stop signals except inside epoll_pwait2: no lost wakeup */
	sigemptyset(&block);
	sigaddset(&block, SIGTERM);
	sigaddset(&block, SIGINT);
	sigprocmask(SIG_BLOCK, &block, NULL);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);

	lfd = linkem_listen(&laddr, &port);
	if (lfd < 0) {
		fprintf(stderr, "linkem: listen: %s\n", strerror(-lfd));
		return 1;
	}
	linkem_ep = epoll_create1(EPOLL_CLOEXEC);
	if (linkem_ep < 0 || epoll_ctl(linkem_ep, EPOLL_CTL_ADD, lfd, &ev) != 0) {
		perror("linkem: epoll");
		goto out;
	}
	if (pidfile && linkem_write_file(pidfile, getpid()) != 0) {
		perror("linkem: pid file");
		goto out;
	}
	/* the port file last: once it exists, the proxy accepts connections */
	if (portfile && linkem_write_file(portfile, port) != 0) {
		perror("linkem: port file");
		goto out;
	}
	linkem_loop(lfd);
	fprintf(stderr, "linkem: %lu connections, %" PRIu64 " bytes up, %" PRIu64 " bytes down\n",
		linkem_nconns, linkem_links[0].bytes, linkem_links[1].bytes);
	ret = 0;
out:
	while (linkem_conns) {
		struct linkem_conn *c = linkem_conns;

		linkem_conns = c->next;
		linkem_conn_free(c);
	}
	if (linkem_ep >= 0)
		close(linkem_ep);
	close(lfd);
	return ret;
}
