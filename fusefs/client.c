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
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "fusefs.h"
#include "prefetch.h"
#include "trace.h"
#include "util.h"

#define CLIENT_EXIT_USAGE 1 /* bad command line, not a mount, I/O error */
#define CLIENT_EXIT_JOB	  4 /* wait: job failed or was cancelled */

static int client_path(char *buf, size_t len, const char *mnt, const char *file)
{
	int n = snprintf(buf, len, "%s/control/%s", mnt, file);

	if (n < 0 || (size_t)n >= len) {
		fprintf(stderr, "streamfs: %s: mountpoint name too long\n", mnt);
		return -ENAMETOOLONG;
	}
	return 0;
}

/* Write one command to MNT/control/FILE. A command is one write(): the
 * daemon parses each write on its own, so a short write is an error, never
 * continued (the rest would arrive as a second, bogus command). The close
 * is checked too: it is where FUSE reports a failed flush. */
static int client_write(const char *mnt, const char *file, const char *cmd)
{
	char path[4096], esc[256];
	size_t n = strlen(cmd);
	ssize_t w;
	int fd, r = 0;

	if (client_path(path, sizeof(path), mnt, file) < 0)
		return -ENAMETOOLONG;
	fd = open(path, O_WRONLY);
	if (fd < 0) {
		r = -errno;
		fprintf(stderr, "streamfs: %s: %s\n", path, strerror(-r));
		return r;
	}
	do
		w = write(fd, cmd, n);
	while (w < 0 && errno == EINTR);
	if (w < 0)
		r = -errno;
	else if ((size_t)w != n)
		r = -EIO;
	if (close(fd) < 0 && r == 0 && errno != EINTR)
		r = -errno;
	if (r < 0)
		fprintf(stderr, "streamfs: %s: '%s': %s\n", path,
			sfs_escape(esc, sizeof(esc), cmd, n),
			w >= 0 && (size_t)w != n ? "short write" : strerror(-r));
	return r;
}

/* Read all of MNT/control/FILE into a malloc'd string *out. Returns 0 or
 * -errno after a message (a read error is an error, not an early EOF). */
static int client_read(const char *mnt, const char *file, char **out)
{
	char path[4096], *buf = NULL;
	size_t len = 0, cap = 0;
	ssize_t n;
	int fd, r = 0;

	if (client_path(path, sizeof(path), mnt, file) < 0)
		return -ENAMETOOLONG;
	fd = open(path, O_RDONLY);
	if (fd < 0) {
		r = -errno;
		fprintf(stderr, "streamfs: %s: %s\n", path, strerror(-r));
		return r;
	}
	for (;;) {
		if (cap - len < 4096) {
			char *nb = realloc(buf, cap + 65536);
			if (!nb) {
				r = -ENOMEM;
				break;
			}
			buf = nb;
			cap += 65536;
		}
		n = read(fd, buf + len, cap - len - 1);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			r = -errno;
		if (n <= 0)
			break;
		len += (size_t)n;
	}
	close(fd); /* read-only: nothing to lose */
	if (r < 0) {
		fprintf(stderr, "streamfs: %s: %s\n", path, strerror(-r));
		free(buf);
		return r;
	}
	buf[len] = '\0';
	*out = buf;
	return 0;
}

/* Flush stdout; a full disk or a closed pipe is an error. */
static int client_flush_stdout(void)
{
	if (fflush(stdout) == 0 && !ferror(stdout))
		return 0;
	fprintf(stderr, "streamfs: writing to standard output: %s\n", strerror(errno));
	return CLIENT_EXIT_USAGE;
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

/* Follow the job until it ends; a bar on a terminal, lines otherwise.
 * Exits 0 when it completed, 4 when it failed or was cancelled, 1 when
 * MNT is not a streamfs mount or its status cannot be read. */
static int client_wait(const char *mnt)
{
	bool tty = isatty(STDOUT_FILENO);
	char last[64] = "", path[4096];
	struct stat st;
	int evfd = -1, r;

	if (client_path(path, sizeof(path), mnt, "status") < 0)
		return CLIENT_EXIT_USAGE;
	if (stat(path, &st) < 0) {
		int e = errno;

		if (e == ENOENT || e == ENOTDIR)
			fprintf(stderr, "streamfs: %s is not a streamfs mount (no %s)\n", mnt,
				path);
		else
			fprintf(stderr, "streamfs: %s: %s\n", path, strerror(e));
		return CLIENT_EXIT_USAGE;
	}
	if (client_path(path, sizeof(path), mnt, "events") == 0)
		evfd = open(path, O_RDONLY | O_NONBLOCK);
	r = client_wait_loop(mnt, tty, last, evfd);
	if (evfd >= 0)
		close(evfd);
	return r;
}

static int client_wait_loop(const char *mnt, bool tty, char *last, int evfd)
{
	for (;;) {
		char state[64], pct[32], rate[32], eta[32], err[512], hr[32];
		char *st;
		uint64_t r;

		if (client_read(mnt, "status", &st) < 0) {
			if (tty)
				putchar('\n');
			return CLIENT_EXIT_USAGE;
		}
		client_field(st, "state", state, sizeof(state));
		client_field(st, "percent", pct, sizeof(pct));
		client_field(st, "rate_bytes_per_s", rate, sizeof(rate));
		client_field(st, "eta_s", eta, sizeof(eta));
		client_field(st, "error", err, sizeof(err));
		free(st);
		if (!state[0]) {
			fprintf(stderr,
				"streamfs: %s/control/status has no state: not a streamfs "
				"mount?\n",
				mnt);
			return CLIENT_EXIT_USAGE;
		}
		r = strtoull(rate, NULL, 10);
		sfs_fmt_bytes(r, hr, sizeof(hr));
		if (tty) {
			int width = 40, fill = (int)(atof(pct) * width / 100.0);
			printf("\r[");
			for (int i = 0; i < width; i++)
				putchar(i < fill ? '#' : ' ');
			printf("] %5s%% %10s/s eta %ss %-10s", pct, hr, eta, state);
			if (client_flush_stdout())
				return CLIENT_EXIT_USAGE;
		} else if (strcmp(pct, last) != 0 || strcmp(state, "running") != 0) {
			printf("%s %s%% %llu B/s eta %s\n", state, pct, (unsigned long long)r, eta);
			if (client_flush_stdout())
				return CLIENT_EXIT_USAGE;
			snprintf(last, 64, "%s", pct);
		}
		if (strcmp(state, "running") != 0 && strcmp(state, "paused") != 0) {
			if (tty)
				putchar('\n');
			if (strcmp(state, "completed") == 0)
				return client_flush_stdout();
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
	char *s;

	if (client_read(mnt, file, &s) < 0)
		return CLIENT_EXIT_USAGE;
	fputs(s, stdout);
	free(s);
	return client_flush_stdout();
}

/* Follow MNT/control/events to standard output until EOF or an error. */
static int client_events(const char *mnt)
{
	char path[4096], buf[4096];
	ssize_t n;
	int fd, r = 0;

	if (client_path(path, sizeof(path), mnt, "events") < 0)
		return CLIENT_EXIT_USAGE;
	fd = open(path, O_RDONLY);
	if (fd < 0) {
		fprintf(stderr, "streamfs: %s: %s\n", path, strerror(errno));
		return CLIENT_EXIT_USAGE;
	}
	for (;;) {
		n = read(fd, buf, sizeof(buf));
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			fprintf(stderr, "streamfs: %s: %s\n", path, strerror(errno));
			r = CLIENT_EXIT_USAGE;
			break;
		}
		if (n == 0)
			break;
		if (fwrite(buf, 1, (size_t)n, stdout) != (size_t)n || client_flush_stdout()) {
			r = CLIENT_EXIT_USAGE;
			break;
		}
	}
	close(fd);
	return r;
}

/* Append " key=VALUE" to line, the value quoted as control/stream reads it
 * ("...", with \" and \\), so blanks and quotes in a path survive. */
static int client_add_arg(char *line, size_t size, size_t *n, const char *key, const char *val)
{
	size_t need = *n + strlen(key) + 4;

	if (!*val || strpbrk(val, "\n\r")) {
		fprintf(stderr, "streamfs stream: --%s: %s\n", key,
			*val ? "a newline cannot be sent in a command" : "empty value");
		return -EINVAL;
	}
	for (const char *c = val; *c; c++)
		need += *c == '"' || *c == '\\' ? 2 : 1;
	if (need >= size) {
		fprintf(stderr, "streamfs stream: --%s: too long\n", key);
		return -ENAMETOOLONG;
	}
	*n += (size_t)sprintf(line + *n, " %s=\"", key);
	for (const char *c = val; *c; c++) {
		if (*c == '"' || *c == '\\')
			line[(*n)++] = '\\';
		line[(*n)++] = *c;
	}
	line[(*n)++] = '"';
	line[*n] = '\0';
	return 0;
}

/* The base as the daemon must see it. The daemon runs in "/", so a name
 * relative to the caller's directory is made absolute when it names a
 * local file (realpath). URLs, absolute names and names that exist only
 * in an image header (matched there as written) are sent as they are.
 * Returns a malloc'd string or NULL after a message. */
static char *client_resolve_base(const char *base)
{
	char *r;

	if (base[0] == '/' || strstr(base, "://"))
		return strdup(base);
	r = realpath(base, NULL);
	if (r)
		return r;
	if (errno != ENOENT && errno != ENOTDIR) {
		fprintf(stderr, "streamfs stream: --base %s: %s\n", base, strerror(errno));
		return NULL;
	}
	return strdup(base);
}

/* stream MNT [--base B] [--speed S] [--on-error E] [--wait] */
static int client_stream(int argc, char **argv)
{
	const char *mnt = argv[2];
	char line[4096];
	size_t n = (size_t)snprintf(line, sizeof(line), "start");
	bool wait = false;

	for (int i = 3; i < argc; i++) {
		const char *key = NULL;
		char *val;
		int r;

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
			return CLIENT_EXIT_USAGE;
		}
		i++;
		val = strcmp(key, "base") == 0 ? client_resolve_base(argv[i]) : strdup(argv[i]);
		if (!val)
			return CLIENT_EXIT_USAGE;
		r = client_add_arg(line, sizeof(line), &n, key, val);
		free(val);
		if (r < 0)
			return CLIENT_EXIT_USAGE;
	}
	if (client_write(mnt, "stream", line) < 0)
		return CLIENT_EXIT_USAGE;
	return wait ? client_wait(mnt) : 0;
}

/* streamfs trace merge A B...: one trace of several boots of an image
 * (include/trace.h: MERGE ORDER) on stdout. */
static int client_trace_merge(int n, char **files)
{
	struct trace **in = calloc((size_t)n, sizeof(*in));
	struct trace *out = NULL;
	char err[256], *text = NULL;
	size_t len;
	int i, r = 0, ret = CLIENT_EXIT_USAGE;

	if (!in)
		return CLIENT_EXIT_USAGE;
	for (i = 0; i < n && r == 0; i++) {
		r = prefetch_load(files[i], &text, &len);
		if (r == 0) {
			r = trace_parse(text, len, &in[i], err, sizeof(err));
			if (r < 0)
				fprintf(stderr, "streamfs trace merge: %s: %s\n", files[i], err);
			free(text);
		}
	}
	if (r == 0) {
		r = trace_merge((const struct trace *const *)in, (size_t)n, &out, err, sizeof(err));
		if (r < 0)
			fprintf(stderr, "streamfs trace merge: %s\n", err);
	}
	if (r == 0 && (r = trace_render(out, &text, &len)) == 0) {
		if (fwrite(text, 1, len, stdout) == len && fflush(stdout) == 0)
			ret = 0;
		else
			fprintf(stderr, "streamfs trace merge: stdout: %s\n", strerror(errno));
		free(text);
	}
	for (i = 0; i < n; i++)
		trace_free(in[i]);
	free(in);
	trace_free(out);
	return ret;
}

int sfs_client_main(int argc, char **argv)
{
	static const char *cmds[] = {"status", "progress", "map",   "events", "stream", "pause",
				     "resume", "abort",	   "speed", "wait",   "trace"};
	const char *cmd = argv[1], *mnt;
	bool known = false;

	for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++)
		known |= strcmp(cmd, cmds[i]) == 0;
	if (!known)
		return -1;
	if (strcmp(cmd, "trace") == 0 && argc >= 3 && strcmp(argv[2], "merge") == 0) {
		if (argc < 4) {
			fprintf(stderr, "usage: streamfs trace merge TRACE...\n");
			return CLIENT_EXIT_USAGE;
		}
		return client_trace_merge(argc - 3, argv + 3);
	}
	if (argc < 3 ||
	    (strcmp(cmd, "stream") != 0 && argc > (strcmp(cmd, "speed") == 0 ? 4 : 3))) {
		fprintf(stderr, "usage: streamfs %s MOUNTPOINT%s\n", cmd,
			strcmp(cmd, "speed") == 0 ? " [SPEED]"
			: strcmp(cmd, "stream") == 0
			    ? " [--base B] [--speed S] [--on-error E] [--wait]"
			    : "");
		return CLIENT_EXIT_USAGE;
	}
	mnt = argv[2];
	if (strcmp(cmd, "status") == 0 || strcmp(cmd, "progress") == 0 || strcmp(cmd, "map") == 0 ||
	    strcmp(cmd, "trace") == 0)
		return client_cat(mnt, cmd);
	if (strcmp(cmd, "events") == 0)
		return client_events(mnt);
	if (strcmp(cmd, "pause") == 0 || strcmp(cmd, "resume") == 0)
		return client_write(mnt, "stream", cmd) == 0 ? 0 : CLIENT_EXIT_USAGE;
	if (strcmp(cmd, "abort") == 0)
		return client_write(mnt, "abort", "1\n") == 0 ? 0 : CLIENT_EXIT_USAGE;
	if (strcmp(cmd, "speed") == 0) {
		if (argc == 3)
			return client_cat(mnt, "speed");
		return client_write(mnt, "speed", argv[3]) == 0 ? 0 : CLIENT_EXIT_USAGE;
	}
	if (strcmp(cmd, "wait") == 0)
		return client_wait(mnt);
	return client_stream(argc, argv);
}
