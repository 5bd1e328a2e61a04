/* streamfs: command-line wrappers over a mounted streamfs's control files,
 * so scripts can use either: "streamfs stream MNT --speed 50M --wait" is
 * "echo 'start speed=50M' > MNT/control/stream" plus a wait.
 * They only open files under MNT/control; no FUSE calls here. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "fusefs.h"
#include "util.h"

#define CLIENT_EXIT_JOB 4 /* wait: job failed or was cancelled */

static int client_path(char *buf, size_t len, const char *mnt, const char *file)
{
	int n = snprintf(buf, len, "%s/control/%s", mnt, file);
	return n < 0 || (size_t)n >= len ? -ENAMETOOLONG : 0;
}

/* Write one command line to MNT/control/FILE. */
static int client_write(const char *mnt, const char *file, const char *cmd)
{
	char path[4096];
	size_t n = strlen(cmd);
	ssize_t w;
	int fd;

	if (client_path(path, sizeof(path), mnt, file) < 0)
		return -ENAMETOOLONG;
	fd = open(path, O_WRONLY);
	if (fd < 0) {
		fprintf(stderr, "streamfs: %s: %s\n", path, strerror(errno));
		return -errno;
	}
	w = write(fd, cmd, n);
	if (w < 0) {
		int e = errno;
		fprintf(stderr, "streamfs: %s: '%s': %s\n", path, cmd, strerror(e));
		close(fd);
		return -e;
	}
	close(fd);
	return 0;
}

/* Read all of MNT/control/FILE into a malloc'd string. */
static char *client_read(const char *mnt, const char *file)
{
	char path[4096], *buf = NULL;
	size_t len = 0, cap = 0;
	ssize_t n;
	int fd;

	if (client_path(path, sizeof(path), mnt, file) < 0)
		return NULL;
	fd = open(path, O_RDONLY);
	if (fd < 0) {
		fprintf(stderr, "streamfs: %s: %s\n", path, strerror(errno));
		return NULL;
	}
	for (;;) {
		if (cap - len < 4096) {
			char *nb = realloc(buf, cap + 65536);
			if (!nb)
				break;
			buf = nb;
			cap += 65536;
		}
		n = read(fd, buf + len, cap - len - 1);
		if (n <= 0)
			break;
		len += (size_t)n;
	}
	close(fd);
	if (buf)
		buf[len] = '\0';
	return buf;
}

/* Value of "key: value" in a status text, copied into out. */
static const char *client_field(const char *text, const char *key, char *out, size_t len)
{
	size_t k = strlen(key);
	const char *p = text;

	out[0] = '\0';
	while (p && *p) {
		if (strncmp(p, key, k) == 0 && p[k] == ':' && p[k + 1] == ' ') {
			const char *v = p + k + 2, *e = strchr(v, '\n');
			size_t n = e ? (size_t)(e - v) : strlen(v);
			n = SFS_MIN(n, len - 1);
			memcpy(out, v, n);
			out[n] = '\0';
			return out;
		}
		p = strchr(p, '\n');
		if (p)
			p++;
	}
	return out;
}

static int client_wait_loop(const char *mnt, bool tty, char *last, int evfd);

/* Follow the job until it ends; a bar on a terminal, lines otherwise. */
static int client_wait(const char *mnt)
{
	bool tty = isatty(STDOUT_FILENO);
	char last[64] = "", evpath[4096];
	int evfd = -1, r;

	if (client_path(evpath, sizeof(evpath), mnt, "events") == 0)
		evfd = open(evpath, O_RDONLY | O_NONBLOCK);
	r = client_wait_loop(mnt, tty, last, evfd);
	if (evfd >= 0)
		close(evfd);
	return r;
}

static int client_wait_loop(const char *mnt, bool tty, char *last, int evfd)
{

	for (;;) {
		char state[64], pct[32], rate[32], eta[32], err[512], hr[32];
		char *st = client_read(mnt, "status");
		uint64_t r;

		if (!st)
			return CLIENT_EXIT_JOB;
		client_field(st, "state", state, sizeof(state));
		client_field(st, "percent", pct, sizeof(pct));
		client_field(st, "rate_bytes_per_s", rate, sizeof(rate));
		client_field(st, "eta_s", eta, sizeof(eta));
		client_field(st, "error", err, sizeof(err));
		free(st);
		r = strtoull(rate, NULL, 10);
		sfs_fmt_bytes(r, hr, sizeof(hr));
		if (tty) {
			int width = 40, fill = (int)(atof(pct) * width / 100.0);
			printf("\r[");
			for (int i = 0; i < width; i++)
				putchar(i < fill ? '#' : ' ');
			printf("] %5s%% %10s/s eta %ss %-10s", pct, hr, eta, state);
			fflush(stdout);
		} else if (strcmp(pct, last) != 0 || strcmp(state, "running") != 0) {
			printf("%s %s%% %llu B/s eta %s\n", state, pct, (unsigned long long)r, eta);
			fflush(stdout);
			snprintf(last, 64, "%s", pct);
		}
		if (strcmp(state, "running") != 0 && strcmp(state, "paused") != 0) {
			if (tty)
				putchar('\n');
			if (strcmp(state, "completed") == 0)
				return 0;
			if (strcmp(err, "-") != 0)
				fprintf(stderr, "streamfs: job %s: %s\n", state, err);
			else
				fprintf(stderr, "streamfs: job %s\n", state);
			return CLIENT_EXIT_JOB;
		}
		/* Sleep until the next event (completion wakes us at once) or
		 * the next progress update is due. */
		if (evfd >= 0) {
			struct pollfd pfd = {.fd = evfd, .events = POLLIN};
			char drain[4096];
			if (poll(&pfd, 1, tty ? 200 : 1000) > 0)
				while (read(evfd, drain, sizeof(drain)) > 0)
					;
		} else {
			usleep(tty ? 200000 : 1000000);
		}
	}
}

static int client_cat(const char *mnt, const char *file)
{
	char *s = client_read(mnt, file);

	if (!s)
		return 1;
	fputs(s, stdout);
	free(s);
	return 0;
}

int sfs_client_main(int argc, char **argv)
{
	static const char *cmds[] = {"status", "progress", "map",   "events", "stream",
				     "pause",  "resume",   "abort", "speed",  "wait"};
	const char *cmd = argv[1], *mnt;
	bool known = false;

	for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++)
		known |= strcmp(cmd, cmds[i]) == 0;
	if (!known)
		return -1;
	if (argc < 3) {
		fprintf(stderr, "usage: streamfs %s MOUNTPOINT ...\n", cmd);
		return 1;
	}
	mnt = argv[2];
	if (strcmp(cmd, "status") == 0 || strcmp(cmd, "progress") == 0 || strcmp(cmd, "map") == 0)
		return argc == 3 ? client_cat(mnt, cmd) : 1;
	if (strcmp(cmd, "events") == 0) {
		char path[4096], buf[4096];
		ssize_t n;
		int fd;
		if (client_path(path, sizeof(path), mnt, "events") < 0)
			return 1;
		fd = open(path, O_RDONLY);
		if (fd < 0) {
			fprintf(stderr, "streamfs: %s: %s\n", path, strerror(errno));
			return 1;
		}
		while ((n = read(fd, buf, sizeof(buf))) > 0) {
			fwrite(buf, 1, (size_t)n, stdout);
			fflush(stdout);
		}
		close(fd);
		return 0;
	}
	if (strcmp(cmd, "pause") == 0 || strcmp(cmd, "resume") == 0)
		return argc == 3 && client_write(mnt, "stream", cmd) == 0 ? 0 : 1;
	if (strcmp(cmd, "abort") == 0)
		return argc == 3 && client_write(mnt, "abort", "1\n") == 0 ? 0 : 1;
	if (strcmp(cmd, "speed") == 0) {
		if (argc != 4)
			return client_cat(mnt, "speed");
		return client_write(mnt, "speed", argv[3]) == 0 ? 0 : 1;
	}
	if (strcmp(cmd, "wait") == 0)
		return client_wait(mnt);
	/* stream MNT [--base B] [--speed S] [--on-error E] [--wait] */
	{
		char line[4096];
		size_t n = (size_t)snprintf(line, sizeof(line), "start");
		bool wait = false;
		for (int i = 3; i < argc; i++) {
			const char *key = NULL;
			if (strcmp(argv[i], "--wait") == 0) {
				wait = true;
				continue;
			}
			if (strcmp(argv[i], "--base") == 0)
				key = "base";
			else if (strcmp(argv[i], "--speed") == 0)
				key = "speed";
			else if (strcmp(argv[i], "--on-error") == 0)
				key = "on-error";
			if (!key || i + 1 >= argc) {
				fprintf(stderr, "streamfs stream: bad argument '%s'\n", argv[i]);
				return 1;
			}
			n += (size_t)snprintf(line + n, sizeof(line) - SFS_MIN(n, sizeof(line)),
					      " %s=%s", key, argv[++i]);
			if (n >= sizeof(line))
				return 1;
		}
		if (client_write(mnt, "stream", line) < 0)
			return 1;
		return wait ? client_wait(mnt) : 0;
	}
}
