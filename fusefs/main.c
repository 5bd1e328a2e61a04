/* streamfs: command line and daemon lifecycle.
 *
 *   streamfs [-f] [-d] [-o OPTS] OVERLAY MOUNTPOINT   mount (daemonizes unless -f)
 *   streamfs create [-f FMT] [-b BACKING [-F BFMT]] [-c CLUSTER] OVERLAY [SIZE]
 *   streamfs status|progress|stream|pause|resume|abort|speed|wait|map MOUNTPOINT ...
 *
 * Mount order follows libfuse's example/passthrough_ll.c: parse, open the
 * image chain (so errors reach the terminal with a non-zero exit status),
 * fuse_new, mount, daemonize, start threads (after the fork), loop, then tear
 * down in reverse through one exit ladder.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <grp.h>
#include <limits.h>
#include <pwd.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

#include "fusefs.h"
#include <fuse_lowlevel.h>
#include "util.h"

/* Exit codes (documented in man/streamfs.1). */
#define EXIT_USAGE 1 /* bad command line */
#define EXIT_IMAGE 2 /* the overlay or its backing chain cannot be opened */
#define EXIT_MOUNT 3 /* FUSE mount failed */

struct sfs_opts {
	int ro;
	char *copy_on_read; /* "on"/"off" */
	int stream;
	char *speed;
	char *base;
	char *on_error;
	char *backing;
	char *format;
	char *cacert;
	char *http_auth_file;
	unsigned http_pool;
	unsigned http_timeout;
	unsigned http_retries;
	int verbose;
	unsigned readahead_kb;
	unsigned max_threads;
	unsigned stream_depth;
	char *prefetch;			  /* a boot trace to replay: file or URL */
	char *mirrors[FETCH_MAX_MIRRORS]; /* -o mirror=URL, in order */
	unsigned nmirrors;
	char *pidfile;
	int nofailover;
	char *uid, *gid, *mode; /* owner and permissions of disk */
	int show_help;
	int show_version;
	int foreground;
	char *overlay;
	char *mountpoint;
};

#define SFS_OPT(t, p, v)                                                                           \
	{                                                                                          \
		t, offsetof(struct sfs_opts, p), v                                                 \
	}

enum { KEY_RO, KEY_FOREGROUND, KEY_DEBUG, KEY_MIRROR };

static const struct fuse_opt sfs_opt_spec[] = {
    SFS_OPT("copy_on_read=%s", copy_on_read, 0),
    SFS_OPT("stream", stream, 1),
    SFS_OPT("speed=%s", speed, 0),
    SFS_OPT("base=%s", base, 0),
    SFS_OPT("on_error=%s", on_error, 0),
    SFS_OPT("on-error=%s", on_error, 0),
    SFS_OPT("backing=%s", backing, 0),
    SFS_OPT("format=%s", format, 0),
    SFS_OPT("cacert=%s", cacert, 0),
    SFS_OPT("http_auth_file=%s", http_auth_file, 0),
    SFS_OPT("http_pool=%u", http_pool, 0),
    SFS_OPT("http_timeout=%u", http_timeout, 0),
    SFS_OPT("http_retries=%u", http_retries, 0),
    SFS_OPT("verbose", verbose, 1),
    SFS_OPT("readahead=%u", readahead_kb, 0),
    SFS_OPT("threads=%u", max_threads, 0),
    SFS_OPT("pidfile=%s", pidfile, 0),
    SFS_OPT("nofailover", nofailover, 1),
    SFS_OPT("stream_depth=%u", stream_depth, 0),
    SFS_OPT("prefetch=%s", prefetch, 0),
    /* Ours, not libfuse's: its uid=/gid= would force the owner of every
     * file and make chown on disk a silent no-op. */
    SFS_OPT("uid=%s", uid, 0),
    SFS_OPT("gid=%s", gid, 0),
    SFS_OPT("mode=%s", mode, 0),
    SFS_OPT("-h", show_help, 1),
    SFS_OPT("--help", show_help, 1),
    SFS_OPT("-V", show_version, 1),
    SFS_OPT("--version", show_version, 1),
    FUSE_OPT_KEY("mirror=", KEY_MIRROR), /* repeatable */
    FUSE_OPT_KEY("ro", KEY_RO),
    FUSE_OPT_KEY("-f", KEY_FOREGROUND),
    FUSE_OPT_KEY("-d", KEY_DEBUG),
    FUSE_OPT_KEY("debug", KEY_DEBUG),
    FUSE_OPT_END,
};

static void sfs_usage(FILE *f)
{
	fprintf(
	    f,
	    "usage: streamfs [options] OVERLAY MOUNTPOINT\n"
	    "       streamfs create [-f qcow2|qed] [-b BACKING [-F FMT] [-u]] [-c CLUSTER] "
	    "OVERLAY [SIZE]\n"
	    "       streamfs status|progress|map|events MOUNTPOINT\n"
	    "       streamfs stream MOUNTPOINT [--base B] [--speed S] [--on-error E] [--wait]\n"
	    "       streamfs pause|resume|abort MOUNTPOINT\n"
	    "       streamfs speed MOUNTPOINT SPEED\n"
	    "       streamfs wait MOUNTPOINT\n"
	    "       streamfs upgrade MOUNTPOINT\n"
	    "\n"
	    "Mounts OVERLAY (qcow2 or QED, with a local or http(s) backing chain) at\n"
	    "MOUNTPOINT as MOUNTPOINT/disk plus MOUNTPOINT/control/.\n"
	    "\n"
	    "options:\n"
	    "    -f                     stay in the foreground\n"
	    "    -d, -o debug           FUSE debug output (implies -f)\n"
	    "    -o ro                  read-only disk, no copy-on-read, no stream job\n"
	    "    -o copy_on_read=on|off copy data read from the backing into the overlay "
	    "(on)\n"
	    "    -o stream              start the stream job at mount\n"
	    "    -o speed=N[KMG]        stream rate limit in bytes/s (0 = unlimited)\n"
	    "    -o base=IMAGE          stream only images above IMAGE, then rebase onto it\n"
	    "    -o on_error=report|stop  stream job error policy (report)\n"
	    "    -o stream_depth=N      chunks the job keeps in flight, 1-8 (default: measured)\n"
	    "    -o prefetch=TRACE      copy a recorded boot trace's ranges first (file or URL)\n"
	    "    -o backing=URI         use this backing instead of the header's, for this mount\n"
	    "    -o format=qcow2|qed    overlay format (probed by default)\n"
	    "    -o cacert=FILE         extra CA certificates for https backings\n"
	    "    -o http_auth_file=FILE credentials for http(s): 'Header: value' or "
	    "'user:password'\n"
	    "    -o http_pool=N         HTTP connections per backing for the job (8); guest reads "
	    "may open 2 more\n"
	    "    -o http_timeout=S      seconds before a stalled HTTP request is retried (30)\n"
	    "    -o http_retries=N      attempts per HTTP request (5)\n"
	    "    -o mirror=URL          another server of the http(s) backing (repeatable)\n"
	    "    -o readahead=KB        kernel read-ahead for the mount (default: 1024 as root)\n"
	    "    -o threads=N           FUSE worker threads (16)\n"
	    "    -o verbose             log more (requests, job steps)\n"
	    "    -o pidfile=FILE        write the server's pid to FILE once mounted, the\n"
	    "                           supervisor's to FILE.supervisor\n"
	    "    -o nofailover          one process, no supervisor: the mount ends with it\n"
	    "    -o uid=USER,gid=GROUP  owner of disk (default: the mounting user)\n"
	    "    -o mode=OCTAL          permissions of disk (default 0600)\n"
	    "    -o allow_other         let other users (e.g. libvirt-qemu) open disk; the\n"
	    "                           kernel enforces its owner and mode\n"
	    "    -o auto_unmount, ...   passed to FUSE (see fuse(8))\n"
	    "    -h, --help             this help\n"
	    "    -V, --version          version\n");
}

static int sfs_opt_proc(void *data, const char *arg, int key, struct fuse_args *outargs)
{
	struct sfs_opts *o = data;

	switch (key) {
	case KEY_RO:
		o->ro = 1;
		return 1; /* also a FUSE mount option */
	case KEY_FOREGROUND:
		o->foreground = 1;
		return 0;
	case KEY_DEBUG:
		o->foreground = 1;
		return 1;
	case KEY_MIRROR:
		if (o->nmirrors == FETCH_MAX_MIRRORS) {
			fprintf(stderr, "streamfs: at most %d -o mirror options\n",
				FETCH_MAX_MIRRORS);
			return -1;
		}
		o->mirrors[o->nmirrors] = strdup(arg + strlen("mirror="));
		if (!o->mirrors[o->nmirrors])
			return -1;
		o->nmirrors++;
		return 0;
	case FUSE_OPT_KEY_NONOPT:
		if (!o->overlay) {
			o->overlay = strdup(arg);
			return 0;
		}
		if (!o->mountpoint) {
			o->mountpoint = strdup(arg);
			return 0;
		}
		fprintf(stderr, "streamfs: unexpected argument '%s'\n", arg);
		return -1;
	default:
		return 1;
	}
}

/* Is path (resolved) inside dir (resolved)? */
static bool sfs_path_inside(const char *path, const char *dir)
{
	size_t n = strlen(dir);

	if (strcmp(dir, "/") == 0)
		return true;
	return strncmp(path, dir, n) == 0 && (path[n] == '/' || path[n] == '\0');
}

/* Undo mountinfo's octal escapes (space, tab, newline, backslash) in place. */
static void sfs_unescape_mountinfo(char *s)
{
	char *w = s;

	for (; *s; s++) {
		if (s[0] == '\\' && s[1] >= '0' && s[1] <= '3' && s[2] >= '0' && s[2] <= '7' &&
		    s[3] >= '0' && s[3] <= '7') {
			*w++ = (char)((s[1] - '0') << 6 | (s[2] - '0') << 3 | (s[3] - '0'));
			s += 3;
		} else {
			*w++ = *s;
		}
	}
	*w = '\0';
}

/* Raise the kernel's read-ahead for our mount: FUSE caps it at the bdi's
 * default (128 KiB), which halves sequential throughput of buffered reads.
 * Best effort: needs root; finds the bdi from /proc/self/mountinfo so it
 * never touches the mount itself (the loop is not serving yet). */
static void sfs_set_readahead(const char *mountpoint, unsigned kb)
{
	char line[4096], path[128];
	FILE *f = fopen("/proc/self/mountinfo", "r");
	unsigned maj, min;

	if (!f)
		return;
	while (fgets(line, sizeof(line), f)) {
		char mnt[PATH_MAX];
		if (sscanf(line, "%*d %*d %u:%u %*s %4095s", &maj, &min, mnt) != 3)
			continue;
		sfs_unescape_mountinfo(mnt);
		if (strcmp(mnt, mountpoint) != 0)
			continue;
		snprintf(path, sizeof(path), "/sys/class/bdi/%u:%u/read_ahead_kb", maj, min);
		FILE *w = fopen(path, "w");
		if (w) {
			fprintf(w, "%u\n", kb);
			fclose(w);
		}
	}
	fclose(f);
}

/* A user or group given by name or number; -1 if unknown. */
static int sfs_parse_owner(const char *s, bool group, unsigned *out)
{
	char *end;
	unsigned long v;

	if (!*s)
		return -1;
	errno = 0;
	v = strtoul(s, &end, 10);
	if (!*end && !errno && v < (unsigned long)(uid_t)-1) {
		*out = (unsigned)v;
		return 0;
	}
	if (group) {
		struct group *g = getgrnam(s);
		if (!g)
			return -1;
		*out = g->gr_gid;
	} else {
		struct passwd *pw = getpwnam(s);
		if (!pw)
			return -1;
		*out = pw->pw_uid;
	}
	return 0;
}

/* The owner and mode options into m (defaults: the mounting user, 0600). */
static int sfs_parse_disk_attrs(const struct sfs_opts *o, struct sfs_mount *m)
{
	unsigned v;
	char *end;

	m->uid = m->disk_uid = getuid();
	m->gid = m->disk_gid = getgid();
	m->disk_mode = 0600;
	m->disk_ctime = time(NULL);
	if (o->uid) {
		if (sfs_parse_owner(o->uid, false, &v) < 0) {
			fprintf(stderr, "streamfs: uid: unknown user '%s'\n", o->uid);
			return -EINVAL;
		}
		m->disk_uid = v;
	}
	if (o->gid) {
		if (sfs_parse_owner(o->gid, true, &v) < 0) {
			fprintf(stderr, "streamfs: gid: unknown group '%s'\n", o->gid);
			return -EINVAL;
		}
		m->disk_gid = v;
	}
	if (o->mode) {
		unsigned long mv;

		errno = 0;
		mv = strtoul(o->mode, &end, 8);
		if (!*o->mode || *end || errno || mv > 07777) {
			fprintf(stderr,
				"streamfs: mode must be octal permission bits, e.g. 0600\n");
			return -EINVAL;
		}
		m->disk_mode = (mode_t)mv;
	}
	return 0;
}

/* The base named by -o base=NAME, as stream_start will find it: NAME as the
 * chain names it (a backing name in a header, a URL, an absolute path), or
 * a path relative to the caller's directory, resolved now because the
 * daemon runs in /. NULL (after a message) when no layer matches. */
static char *sfs_resolve_base(struct disk *disk, const char *name)
{
	char real[PATH_MAX];

	if (realpath(name, real) && disk_find_layer(disk, real))
		return strdup(real);
	if (disk_find_layer(disk, name))
		return strdup(name);
	fprintf(stderr, "streamfs: base '%s' is not an image of the backing chain\n", name);
	return NULL;
}

/* A server started by the supervisor (fusefs/supervisor.c): what it gave
 * us by environment. */
struct sfs_server_env {
	int fd;		/* the FUSE connection; -1: we are not a server */
	int sup_fd;	/* one byte when we serve */
	int journal_fd; /* the allocation journal shared with the supervisor, -1: none */
	int attrs_fd;	/* /disk's attributes shared with it (attrs.c), -1: none */
	unsigned char init[4096] __attribute__((aligned(8))); /* a fuse_in_header first */
	size_t init_len;
	bool forward_init, resend;
};

static struct sfs_server_env sfs_srv = {.fd = -1, .sup_fd = -1, .journal_fd = -1, .attrs_fd = -1};

static int sfs_env_int(const char *name)
{
	const char *v = getenv(name);

	return v && *v ? atoi(v) : -1;
}

/* Read (and clear) the server environment; false if we are not a server. */
static bool sfs_server_env(void)
{
	const char *hex = getenv("STREAMFS_FUSE_INIT"), *cwd = getenv("STREAMFS_CWD"), *v;

	sfs_srv.fd = sfs_env_int("STREAMFS_FUSE_FD");
	if (sfs_srv.fd < 0 || !hex)
		return false;
	sfs_srv.sup_fd = sfs_env_int("STREAMFS_SUP_FD");
	sfs_srv.journal_fd = sfs_env_int("STREAMFS_JOURNAL_FD");
	sfs_srv.attrs_fd = sfs_env_int("STREAMFS_ATTRS_FD");
	for (; hex[0] && hex[1] && sfs_srv.init_len < sizeof(sfs_srv.init); hex += 2) {
		unsigned b;

		if (sscanf(hex, "%2x", &b) != 1)
			break;
		sfs_srv.init[sfs_srv.init_len++] = (unsigned char)b;
	}
	v = getenv("STREAMFS_FUSE_INIT_FWD");
	sfs_srv.forward_init = v && strcmp(v, "1") == 0;
	v = getenv("STREAMFS_RESEND");
	sfs_srv.resend = v && strcmp(v, "1") == 0;
	sfs_failover.supervisor = getppid();
	sfs_failover.restarts = (unsigned)SFS_MAX(sfs_env_int("STREAMFS_RESTARTS"), 0);
	sfs_failover.last_restart = (time_t)SFS_MAX(sfs_env_int("STREAMFS_LAST_RESTART"), 0);
	sfs_failover.mount_time = (time_t)SFS_MAX(sfs_env_int("STREAMFS_MOUNT_TIME"), 0);
	/* Relative paths on the command line are the mounting shell's. */
	if (cwd && chdir(cwd) < 0)
		sfs_error("%s: %s", cwd, strerror(errno));
	unsetenv("STREAMFS_FUSE_INIT");
	unsetenv("STREAMFS_FUSE_FD");
	unsetenv("STREAMFS_SUP_FD");
	unsetenv("STREAMFS_JOURNAL_FD");
	unsetenv("STREAMFS_ATTRS_FD");
	return true;
}

static void sfs_server_ready(void)
{
	if (sfs_srv.sup_fd >= 0 && write(sfs_srv.sup_fd, "R", 1) < 0)
		sfs_error("cannot tell the supervisor we serve: %s", strerror(errno));
}

/* Check the mount options that need no image; -1 after a message. */
static int sfs_check_opts(struct sfs_opts *o, bool *cor, uint64_t *speed)
{
	if (o->verbose)
		sfs_log_level = SFS_LOG_DEBUG;
	if (o->copy_on_read) {
		if (strcmp(o->copy_on_read, "on") == 0)
			*cor = true;
		else if (strcmp(o->copy_on_read, "off") == 0)
			*cor = false;
		else {
			fprintf(stderr, "streamfs: copy_on_read must be on or off\n");
			return -1;
		}
	}
	if (o->speed && sfs_parse_size(o->speed, speed) < 0) {
		fprintf(stderr, "streamfs: invalid speed '%s'\n", o->speed);
		return -1;
	}
	if (o->on_error && strcmp(o->on_error, "report") != 0 && strcmp(o->on_error, "stop") != 0) {
		fprintf(stderr, "streamfs: on_error must be report or stop\n");
		return -1;
	}
	if (o->stream_depth > STREAM_MAX_DEPTH) {
		fprintf(stderr, "streamfs: stream_depth must be 1 to %d (0: measured)\n",
			STREAM_MAX_DEPTH);
		return -1;
	}
	if (o->ro && o->stream) {
		fprintf(stderr, "streamfs: -o stream needs a writable overlay (drop -o ro)\n");
		return -1;
	}
	return 0;
}

/* Open the overlay's chain into *out, add the -o mirror servers to its
 * first http(s) image, and refuse images inside the mountpoint. 0, or the
 * exit status after a message. */
static int sfs_open_chain(const struct sfs_opts *o, const char *overlay, const char *mnt,
			  struct image **out)
{
	struct image *top;
	int r;

	r = image_open_chain(overlay, o->format, o->ro ? 0 : IMAGE_RDWR, o->backing, out);
	top = *out;
	if (r < 0) {
		fprintf(stderr, "streamfs: cannot open %s: %s\n", overlay, strerror(-r));
		return EXIT_IMAGE;
	}
	if (o->nmirrors) {
		/* Mirrors serve the first http(s) image of the chain: the
		 * overlay's backing when it is a URL, else the URL below the
		 * local images. */
		struct image *l = top;

		while (l && fetch_get_mirrors(l->file, NULL, 0) == 0)
			l = l->backing;
		if (!l) {
			fprintf(stderr,
				"streamfs: -o mirror: no http(s) image in the chain of %s\n",
				overlay);
			image_close_chain(top);
			return EXIT_USAGE;
		}
		for (unsigned i = 0; i < o->nmirrors; i++) {
			r = fetch_add_mirror(l->file, o->mirrors[i]);
			if (r < 0) {
				char *shown = fetch_display_uri(o->mirrors[i]);

				fprintf(stderr, "streamfs: -o mirror=%s refused (see above)\n",
					shown ? shown : "URL");
				free(shown);
				image_close_chain(top);
				return EXIT_IMAGE;
			}
		}
	}
	for (struct image *l = top; l; l = l->backing) {
		char real[PATH_MAX];
		if (!realpath(l->filename, real)) /* not a local file */
			continue;
		if (sfs_path_inside(real, mnt)) {
			fprintf(stderr, "streamfs: %s lies inside the mountpoint %s\n", real, mnt);
			image_close_chain(top);
			return EXIT_USAGE;
		}
	}
	return 0;
}

/* Read and check the -o prefetch trace into *text (NULL when it is not
 * used). -1 only for a usage error: a bad trace is not used, with a message. */
static int sfs_load_trace(const struct sfs_opts *o, struct prefetch *pf, char **text, size_t *len)
{
	int r;

	if (o->ro) {
		fprintf(stderr, "streamfs: -o prefetch needs a writable overlay\n");
		return -1;
	}
	/* A trace only speeds a boot up: one that cannot be read, does
	 * not parse, or is of another image (stale) is refused with a
	 * message and the mount goes on without it, never blocking the
	 * boot it was meant to help. */
	r = prefetch_load(o->prefetch, text, len);
	if (r < 0)
		fprintf(stderr, "streamfs: cannot read the trace %s: %s\n", o->prefetch,
			strerror(-r));
	else if (prefetch_check(pf, *text, *len) < 0)
		r = -EINVAL;
	if (r < 0) {
		fprintf(stderr, "streamfs: the trace is not used; mounting without it\n");
		free(*text);
		*text = NULL;
	}
	return 0;
}

/* Configure the stream job, start the trace replay and, with -o stream,
 * the job; failures are logged (the mount serves on). */
static void sfs_start_job(const struct sfs_opts *o, struct sfs_mount *m, uint64_t speed,
			  const char *base, const char *trace_text, size_t trace_len)
{
	int r;

	stream_set_depth(m->ctl.job, o->stream_depth);
	stream_set_prefetch(m->ctl.job, m->ctl.prefetch);
	if (trace_text && prefetch_replay(m->ctl.prefetch, trace_text, trace_len) < 0)
		sfs_error("%s: the trace is not replayed", o->prefetch);
	if (!o->ro) {
		struct stream_params sp = {.speed = speed, .speed_set = true, .base = base};
		sp.on_error = o->on_error && strcmp(o->on_error, "stop") == 0
				  ? STREAM_ON_ERROR_STOP
				  : STREAM_ON_ERROR_REPORT;
		if (o->stream) {
			r = stream_start(m->ctl.job, &sp);
			if (r < 0)
				sfs_error("cannot start the stream job: %s", strerror(-r));
		} else {
			stream_set_speed(m->ctl.job, speed);
		}
	}
}

static void sfs_free_opts(struct sfs_opts *o)
{
	free(o->overlay);
	free(o->mountpoint);
	free(o->copy_on_read);
	free(o->speed);
	free(o->base);
	free(o->on_error);
	free(o->backing);
	free(o->format);
	free(o->cacert);
	free(o->http_auth_file);
	free(o->pidfile);
	free(o->prefetch);
	free(o->uid);
	free(o->gid);
	free(o->mode);
	for (unsigned i = 0; i < o->nmirrors; i++)
		free(o->mirrors[i]);
}

static int sfs_mount_main(int argc, char **argv)
{
	struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
	struct sfs_opts o = {0};
	struct sfs_mount m = {0};
	struct fetch_options fo = {0};
	struct fuse_loop_config *lc = NULL;
	struct image *top = NULL;
	struct disk *disk = NULL;
	struct fuse *fuse = NULL;
	char overlay[PATH_MAX], mnt[PATH_MAX], *base = NULL, *trace_text = NULL;
	size_t trace_len = 0;
	struct stat mst;
	bool cor = true;
	uint64_t speed = 0;
	int ret = EXIT_USAGE, r;
	bool server = sfs_server_env(), supervise;

	if (fuse_opt_parse(&args, &o, sfs_opt_spec, sfs_opt_proc) < 0)
		goto out;
	if (o.show_help) {
		sfs_usage(stdout);
		ret = 0;
		goto out;
	}
	if (o.show_version) {
		printf("streamfs %s (libfuse %d)\n", STREAMFS_VERSION, fuse_version());
		ret = 0;
		goto out;
	}
	if (!o.overlay || !o.mountpoint) {
		fprintf(stderr, "streamfs: missing %s\n", !o.overlay ? "OVERLAY" : "MOUNTPOINT");
		sfs_usage(stderr);
		goto out;
	}
	if (sfs_check_opts(&o, &cor, &speed) < 0)
		goto out;
	if (!realpath(o.overlay, overlay)) {
		fprintf(stderr, "streamfs: %s: %s\n", o.overlay, strerror(errno));
		ret = EXIT_IMAGE;
		goto out;
	}
	if (server) {
		/* Our mountpoint, resolved by the mount: looking it up now
		 * would wait for ourselves to serve. */
		const char *sm = getenv("STREAMFS_MNT");

		if (!sm || strlen(sm) >= sizeof(mnt)) {
			sfs_error("server: no STREAMFS_MNT");
			goto out;
		}
		strcpy(mnt, sm);
	} else if (!realpath(o.mountpoint, mnt)) {
		fprintf(stderr, "streamfs: %s: %s\n", o.mountpoint, strerror(errno));
		goto out;
	}
	if (!server && (stat(mnt, &mst) < 0 || !S_ISDIR(mst.st_mode))) {
		fprintf(stderr, "streamfs: %s: not a directory (the mountpoint must be one)\n",
			o.mountpoint);
		goto out;
	}
	if (sfs_parse_disk_attrs(&o, &m) < 0)
		goto out;
	fo.cacert = o.cacert;
	fo.http_auth_file = o.http_auth_file;
	fo.pool_size = o.http_pool;
	fo.io_timeout = o.http_timeout;
	fo.retries = o.http_retries;
	fo.verbose = o.verbose;
	fetch_set_options(&fo);

	r = sfs_open_chain(&o, overlay, mnt, &top);
	if (r > 0) {
		ret = r;
		goto out;
	}
	r = disk_new(top, cor, o.ro, &disk);
	if (r < 0) {
		image_close_chain(top);
		ret = EXIT_IMAGE;
		goto out;
	}
	if (sfs_srv.journal_fd >= 0 && !o.ro) {
		/* A failover server: replay what a dead one acknowledged, and
		 * journal where the next one finds it (include/journal.h). */
		void *mem = mmap(NULL, JOURNAL_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED,
				 sfs_srv.journal_fd, 0);
		struct journal *jr = NULL;

		r = mem == MAP_FAILED ? -errno : journal_open(mem, JOURNAL_SIZE, &jr);
		if (r < 0)
			sfs_error(
			    "allocation journal: %s: a crash of this server loses the writes it "
			    "acknowledged since the guest's last flush",
			    strerror(-r));
		else
			disk_set_journal(disk, jr);
	}
	if (o.base && !(base = sfs_resolve_base(disk, o.base)))
		goto out_disk;
	m.ctl.disk = disk;
	m.ctl.supervisor_pid = (int)sfs_failover.supervisor;
	m.ctl.restarts = sfs_failover.restarts;
	m.ctl.last_restart = (long long)sfs_failover.last_restart;
	m.mountpoint = mnt;
	pthread_mutex_init(&m.attr_lock, NULL);
	if (sfs_srv.attrs_fd >= 0) {
		/* A failover server: /disk's owner, mode and xattrs as the
		 * previous server left them (libvirt's labels on a running
		 * guest), and a copy of every change for the next one. */
		void *shm = mmap(NULL, SFS_ATTRS_SHM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED,
				 sfs_srv.attrs_fd, 0);

		r = shm == MAP_FAILED ? -errno : sfs_attrs_attach(&m, shm, SFS_ATTRS_SHM_SIZE);
		if (r < 0)
			sfs_error("the attributes of disk: %s: a restart of this server resets "
				  "them to the mount options",
				  strerror(-r));
	}
	m.ctl.events = events_new();
	if (!m.ctl.events)
		goto out_disk;
	/* The boot trace: recording from the first guest read (the observer
	 * is installed before FUSE serves), and the replay of -o prefetch,
	 * checked here so that a bad or foreign trace is refused on the
	 * terminal; its threads start after the fork. */
	r = prefetch_new(disk, m.ctl.events, &m.ctl.prefetch);
	if (r < 0)
		goto out_events;
	if (o.prefetch && sfs_load_trace(&o, m.ctl.prefetch, &trace_text, &trace_len) < 0)
		goto out_events;

	/* Kernel caching of attributes is safe: nothing else changes them. */
	fuse_opt_add_arg(&args, "-odefault_permissions");
	fuse_opt_add_arg(&args, "-ofsname=streamfs");
	fuse_opt_add_arg(&args, "-osubtype=streamfs");
	fuse = fuse_new(&args, &sfs_fuse_ops, sizeof(sfs_fuse_ops), &m);
	if (!fuse) {
		ret = EXIT_USAGE;
		goto out_events;
	}
	if (server) {
		r = sfs_handover_attach(fuse_get_session(fuse), sfs_srv.fd, sfs_srv.init,
					sfs_srv.init_len, sfs_srv.forward_init, sfs_srv.resend,
					sfs_server_ready);
		if (r < 0) {
			sfs_error("cannot serve the supervisor's connection: %s", strerror(-r));
			ret = EXIT_MOUNT;
			goto out_fuse;
		}
		sfs_log_to_syslog(true);
		if (chdir("/") < 0)
			sfs_error("/: %s", strerror(errno));
	} else {
		/* Daemonized, a supervisor holds the connection and runs the
		 * servers (fusefs/supervisor.c); -f keeps one process. */
		char cwd[PATH_MAX];

		supervise = !o.foreground && !o.nofailover;
		if (supervise) {
			char now[32];

			if (getcwd(cwd, sizeof(cwd)))
				setenv("STREAMFS_CWD", cwd, 1);
			setenv("STREAMFS_MNT", mnt, 1);
			snprintf(now, sizeof(now), "%lld", (long long)time(NULL));
			setenv("STREAMFS_MOUNT_TIME", now, 1);
		}
		if (fuse_mount(fuse, mnt) != 0) {
			ret = EXIT_MOUNT;
			goto out_fuse;
		}
		if (fuse_daemonize(o.foreground) != 0) {
			ret = EXIT_MOUNT;
			goto out_unmount;
		}
		if (!o.foreground)
			sfs_log_to_syslog(true);
		if (supervise) {
			struct sfs_sup_opts so = {
			    .fd = fuse_session_fd(fuse_get_session(fuse)),
			    .argv = argv,
			    .pidfile = o.pidfile,
			};

			/* Opened only to report errors to the terminal: the
			 * servers open their own. Nothing was served: no flush.
			 * The recorder points into the disk: free it first. */
			prefetch_free(m.ctl.prefetch);
			m.ctl.prefetch = NULL;
			disk_close(disk);
			disk = NULL;
			r = sfs_supervise(&so);
			ret = r < 0 ? EXIT_MOUNT : 0;
			if (r == 1) {
				/* The server died and cannot be replaced: end as a
				 * daemon without failover would, leaving the mount
				 * dead (ENOTCONN). No unmount, so libfuse's copy of
				 * the mountpoint is not freed: exit here rather than
				 * run the teardown (and leak checks) around it. */
				_exit(ret);
			}
			goto out_unmount;
		}
	}
	if (fuse_set_signal_handlers(fuse_get_session(fuse)) != 0) {
		ret = EXIT_MOUNT;
		goto out_unmount;
	}
	if (o.pidfile) {
		FILE *pf = fopen(o.pidfile, "w");
		if (!pf || fprintf(pf, "%d\n", (int)getpid()) < 0 || fclose(pf) != 0)
			sfs_error("%s: cannot write pid file", o.pidfile);
	}
	/* Threads only now: fuse_daemonize() forks. */
	r = stream_new(disk, m.ctl.events, &m.ctl.job);
	if (r < 0) {
		sfs_error("cannot start the stream thread: %s", strerror(-r));
		ret = EXIT_MOUNT;
		goto out_signals;
	}
	sfs_start_job(&o, &m, speed, base, trace_text, trace_len);
	if (geteuid() == 0 || o.readahead_kb)
		sfs_set_readahead(mnt, o.readahead_kb ? o.readahead_kb : 1024);

	lc = fuse_loop_cfg_create();
	fuse_loop_cfg_set_max_threads(lc, o.max_threads ? o.max_threads : 16);
	fuse_loop_cfg_set_idle_threads(lc, 4);
	r = fuse_loop_mt(fuse, lc);
	/* libfuse returns the number of the signal that ended the loop: a
	 * SIGTERM/SIGINT/SIGHUP stop is as clean as an unmount. So is a
	 * connection that went away under a reader (-ENODEV, -ECONNABORTED:
	 * a lazy unmount whose last open file just closed). */
	ret = r == 0 || r == SIGTERM || r == SIGINT || r == SIGHUP || r == -ENODEV ||
		      r == -ECONNABORTED
		  ? 0
		  : EXIT_MOUNT;
	if (ret)
		sfs_error("the FUSE loop ended with %d (%s)", r, strerror(r < 0 ? -r : r));
	fuse_loop_cfg_destroy(lc);

	stream_free(m.ctl.job);
out_signals:
	fuse_remove_signal_handlers(fuse_get_session(fuse));
out_unmount:
	fuse_unmount(fuse);
out_fuse:
	fuse_destroy(fuse);
out_events:
	prefetch_free(m.ctl.prefetch); /* its lanes use the disk */
	events_free(m.ctl.events);
out_disk:
	r = disk_close(disk);
	if (r < 0) {
		sfs_error("%s: final flush failed: %s", overlay, strerror(-r));
		if (ret == 0)
			ret = EXIT_IMAGE;
	}
out:
	sfs_free_opts(&o);
	free(trace_text);
	free(base);
	fuse_opt_free_args(&args);
	return ret;
}

/* streamfs create [-f FMT] [-b BACKING [-F BFMT]] [-u] [-c CLUSTER] [-o compat=0.10|1.1]
 *                 OVERLAY [SIZE]
 * -u (unsafe, as in qemu-img): record the backing without opening it. */
static int sfs_create_main(int argc, char **argv)
{
	const char *fmt = "qcow2", *backing = NULL, *bfmt = NULL, *path;
	struct image_create_opts co = {0};
	const char *fopts[16]; /* -o options, applied by the format's driver */
	unsigned nfopts = 0;
	bool unsafe = false;
	uint64_t v;
	int c, r;

	optind = 1;
	while ((c = getopt(argc, argv, "f:b:F:c:o:uh")) != -1) {
		switch (c) {
		case 'f':
			fmt = optarg;
			break;
		case 'b':
			backing = optarg;
			break;
		case 'F':
			bfmt = optarg;
			break;
		case 'c':
			/* The format checks its own limits (image_create). */
			if (sfs_parse_size(optarg, &v) < 0 || v == 0 || v > UINT32_MAX) {
				fprintf(stderr, "streamfs create: bad cluster size '%s'\n", optarg);
				return EXIT_USAGE;
			}
			co.cluster_size = (uint32_t)v;
			break;
		case 'o':
			if (nfopts == sizeof(fopts) / sizeof(fopts[0])) {
				fprintf(stderr, "streamfs create: too many -o options\n");
				return EXIT_USAGE;
			}
			fopts[nfopts++] = optarg;
			break;
		case 'u':
			unsafe = true;
			break;
		case 'h':
			sfs_usage(stdout);
			return 0;
		default:
			return EXIT_USAGE;
		}
	}
	if (optind >= argc) {
		fprintf(stderr, "streamfs create: missing OVERLAY\n");
		return EXIT_USAGE;
	}
	path = argv[optind];
	if (optind + 1 < argc) {
		if (sfs_parse_size(argv[optind + 1], &co.size) < 0 || co.size == 0) {
			fprintf(stderr, "streamfs create: bad size '%s'\n", argv[optind + 1]);
			return EXIT_USAGE;
		}
	}
	if (optind + 2 < argc) {
		fprintf(stderr, "streamfs create: unexpected argument '%s'\n", argv[optind + 2]);
		return EXIT_USAGE;
	}
	for (unsigned i = 0; i < nfopts; i++)
		if (image_create_option(fmt, &co, fopts[i]) < 0)
			return EXIT_USAGE;
	if (!image_find_driver(fmt) || !image_find_driver(fmt)->create) {
		fprintf(stderr, "streamfs create: format must be qcow2 or qed\n");
		return EXIT_USAGE;
	}
	if (unsafe && (!backing || !bfmt || !co.size)) {
		/* As qemu-img's -u: the backing is not opened (it may not
		 * exist yet), so nothing can be learnt from it. */
		fprintf(stderr, "streamfs create: -u needs -b BACKING, -F FMT and SIZE\n");
		return EXIT_USAGE;
	}
	if (unsafe) {
		co.backing_name = backing;
		co.backing_fmt = bfmt;
		r = image_create(path, fmt, &co);
	} else if (backing) {
		/* Open the chain to learn its size and check it is sane; a
		 * relative name is relative to the overlay, as in the header. */
		struct image *b;
		char *uri;

		if (fetch_resolve_uri(path, backing, &uri) < 0)
			return EXIT_IMAGE;
		r = image_open_chain(uri, bfmt, 0, NULL, &b);
		free(uri);
		if (r < 0) {
			fprintf(stderr, "streamfs create: cannot open backing '%s': %s\n", backing,
				strerror(-r));
			return EXIT_IMAGE;
		}
		if (!co.size)
			co.size = b->size;
		if (!bfmt)
			bfmt = b->drv->name; /* always record it: never re-probe */
		co.backing_name = backing;
		co.backing_fmt = bfmt;
		r = image_create(path, fmt, &co);
		image_close_chain(b);
	} else {
		if (!co.size) {
			fprintf(stderr, "streamfs create: SIZE is needed without -b\n");
			return EXIT_USAGE;
		}
		r = image_create(path, fmt, &co);
	}
	if (r < 0) {
		fprintf(stderr, "streamfs create: %s: %s\n", path, strerror(-r));
		return EXIT_IMAGE;
	}
	printf("Formatting '%s', fmt=%s size=%llu%s%s%s%s\n", path, fmt,
	       (unsigned long long)co.size, backing ? " backing_file=" : "", backing ? backing : "",
	       bfmt ? " backing_fmt=" : "", bfmt ? bfmt : "");
	return 0;
}

/* A pid from an extended attribute of the mount's root; -errno. */
static int sfs_mount_pid(const char *mnt, const char *name)
{
	char buf[32];
	ssize_t n = getxattr(mnt, name, buf, sizeof(buf) - 1);

	if (n < 0)
		return -errno;
	buf[n] = '\0';
	return atoi(buf) > 0 ? atoi(buf) : -EINVAL;
}

/* streamfs upgrade MOUNTPOINT: the supervisor starts the streamfs binary
 * now installed where the mount's was, on the same connection; wait until
 * it serves. */
static int sfs_upgrade_main(int argc, char **argv)
{
	int sup, old, cur = -1;

	if (argc != 2) {
		fprintf(stderr, "usage: streamfs upgrade MOUNTPOINT\n");
		return EXIT_USAGE;
	}
	sup = sfs_mount_pid(argv[1], SFS_XATTR_SUPERVISOR);
	old = sfs_mount_pid(argv[1], SFS_XATTR_SERVER);
	if (sup < 0 || old < 0) {
		fprintf(stderr,
			"streamfs upgrade: %s: no supervisor (mounted with -f or -o nofailover, "
			"or not a streamfs mount)\n",
			argv[1]);
		return EXIT_USAGE;
	}
	if (kill(sup, SIGUSR1) < 0) {
		fprintf(stderr, "streamfs upgrade: supervisor %d: %s\n", sup, strerror(errno));
		return EXIT_USAGE;
	}
	/* Answered by the new server once it serves. */
	for (int i = 0; i < 600; i++) {
		cur = sfs_mount_pid(argv[1], SFS_XATTR_SERVER);
		if (cur > 0 && cur != old) {
			printf("server %d replaced by %d\n", old, cur);
			return 0;
		}
		usleep(50000);
	}
	fprintf(stderr, "streamfs upgrade: server %d still serves after 30 s\n", old);
	return EXIT_MOUNT;
}

int main(int argc, char **argv)
{
	if (argc >= 2 && strcmp(argv[1], "upgrade") == 0)
		return sfs_upgrade_main(argc - 1, argv + 1);
	if (argc >= 2 && strcmp(argv[1], "create") == 0)
		return sfs_create_main(argc - 1, argv + 1);
	if (argc >= 2) {
		int r = sfs_client_main(argc, argv);
		if (r >= 0)
			return r;
	}
	return sfs_mount_main(argc, argv);
}
