/* streamfs: control files (see control.h).
 *
 * Every readable file except events is rendered once at open into a
 * private buffer, so a reader sees one consistent snapshot whatever its
 * read sizes. The format is "key: value" lines, units in the key; see
 * man/streamfs.1 for the list, which is an API. metrics holds the same
 * facts for scrapers, in the Prometheus text exposition format 0.0.4.
 *
 * The network figures (net_* keys, streamfs_net_* metrics) are those of
 * the whole process (fetch_net_totals): a streamfs process serves one
 * disk, and unlike a sum over the layers of the chain they never go
 * backwards when a rebase closes the HTTP layers it drops.
 */
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "control.h"
#include "fetch.h"
#include "util.h"

#define CONTROL_CMD_MAX 4096 /* longest command accepted, in bytes */
#define CONTROL_LOG_MAX 160  /* most bytes of a command shown in the log */

const struct control_info control_files[CTL_COUNT] = {
    [CTL_STATUS] = {"status", 0444},   [CTL_PROGRESS] = {"progress", 0444},
    [CTL_SPEED] = {"speed", 0644},     [CTL_STREAM] = {"stream", 0644},
    [CTL_ABORT] = {"abort", 0200},     [CTL_PULL] = {"pull", 0200},
    [CTL_EVENTS] = {"events", 0444},   [CTL_MAP] = {"map", 0444},
    [CTL_METRICS] = {"metrics", 0444}, [CTL_TRACE] = {"trace", 0444},
};

int control_lookup(const char *name)
{
	for (int i = 0; i < CTL_COUNT; i++)
		if (strcmp(control_files[i].name, name) == 0)
			return i;
	return -ENOENT;
}

/* A growable text buffer. */
struct control_buf {
	char *s;
	size_t len, cap;
	int err;
};

static void cb_printf(struct control_buf *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void cb_printf(struct control_buf *b, const char *fmt, ...)
{
	va_list ap;
	int n;

	if (b->err)
		return;
	for (;;) {
		size_t room = b->cap - b->len;
		va_start(ap, fmt);
		n = vsnprintf(b->s ? b->s + b->len : NULL, room, fmt, ap);
		va_end(ap);
		if (n < 0) {
			b->err = -EIO;
			return;
		}
		if ((size_t)n < room) {
			b->len += (size_t)n;
			return;
		}
		size_t cap = SFS_MAX(b->cap * 2, b->len + (size_t)n + 256);
		char *s = realloc(b->s, cap);
		if (!s) {
			b->err = -ENOMEM;
			return;
		}
		b->s = s;
		b->cap = cap;
	}
}

/* The names of the layers as they may be shown: control files are readable
 * by every user of the mount (allow_other), and a backing URL may carry a
 * token in its query or credentials. names[] has IMAGE_MAX_CHAIN + 1 slots;
 * NULL past the chain's end. Called with chain_lock held. */
static void control_layer_names(struct control_buf *b, struct disk *d, char **names)
{
	struct image *img = d->top;

	for (int i = 0; i <= IMAGE_MAX_CHAIN; i++, img = img ? img->backing : NULL) {
		names[i] = img ? fetch_display_uri(img->filename) : NULL;
		if (img && !names[i])
			b->err = -ENOMEM;
	}
}

static void control_free_names(char **names)
{
	for (int i = 0; i <= IMAGE_MAX_CHAIN; i++)
		free(names[i]);
}

static void control_render_chain(struct control_buf *b, struct disk *d, char **names)
{
	int i = 0;

	cb_printf(b, "chain:");
	for (struct image *img = d->top; img && i <= IMAGE_MAX_CHAIN; img = img->backing, i++)
		cb_printf(b, "%s %s (%s)", i ? " <-" : "", names[i] ? names[i] : "?",
			  img->drv->name);
	cb_printf(b, "\n");
}

/* "key: value" for a figure in seconds shown in milliseconds; "-" when
 * unknown (NAN). */
static void control_put_ms(struct control_buf *b, const char *key, double s)
{
	if (isnan(s))
		cb_printf(b, "%s: -\n", key);
	else
		cb_printf(b, "%s: %.3f\n", key, s * 1e3);
}

/* One "key: value" line of an unsigned counter. */
static void cb_u64(struct control_buf *b, const char *key, uint64_t v)
{
	cb_printf(b, "%s: %llu\n", key, (unsigned long long)v);
}

static void control_render_net(struct control_buf *b)
{
	struct fetch_net_stats n;

	fetch_net_totals(&n);
	cb_printf(
	    b, "net_requests_in_flight: %llu\n",
	    (unsigned long long)(n.in_flight[FETCH_CLASS_GUEST] + n.in_flight[FETCH_CLASS_JOB]));
	cb_u64(b, "net_requests_in_flight_guest", n.in_flight[FETCH_CLASS_GUEST]);
	cb_u64(b, "net_requests_in_flight_job", n.in_flight[FETCH_CLASS_JOB]);
	cb_u64(b, "net_requests_waiting_guest", n.waiting[FETCH_CLASS_GUEST]);
	cb_u64(b, "net_requests_waiting_job", n.waiting[FETCH_CLASS_JOB]);
	cb_u64(b, "net_connections", n.connections);
	cb_u64(b, "net_bytes_guest", n.bytes[FETCH_CLASS_GUEST]);
	cb_u64(b, "net_bytes_job", n.bytes[FETCH_CLASS_JOB]);
	cb_u64(b, "net_requests", n.requests);
	cb_u64(b, "net_retries", n.retries);
	cb_u64(b, "net_stalls", n.stalls);
	cb_u64(b, "net_errors", n.errors);
	control_put_ms(b, "net_latency_p50_ms", n.latency_p50_s);
	control_put_ms(b, "net_latency_p99_ms", n.latency_p99_s);
	control_put_ms(b, "net_rtt_ms", n.rtt_s);
	if (isnan(n.rate_bytes_per_s))
		cb_printf(b, "net_rate_bytes_per_s: -\n");
	else
		cb_printf(b, "net_rate_bytes_per_s: %.0f\n", n.rate_bytes_per_s);
}

/* The boot trace: what this mount recorded, and the replay of -o prefetch. */
static void control_render_prefetch(struct control_buf *b, struct control_ctx *c)
{
	struct prefetch_status ps = {0};

	if (c->prefetch)
		prefetch_get_status(c->prefetch, &ps);
	cb_u64(b, "trace_ranges", ps.trace_ranges);
	cb_u64(b, "trace_clusters_dropped", ps.trace_dropped);
	cb_printf(b, "prefetch: %s\n", prefetch_state_name(ps.state));
	cb_u64(b, "prefetch_ranges_done", ps.ranges_done);
	cb_u64(b, "prefetch_ranges_total", ps.ranges_total);
	cb_u64(b, "prefetch_bytes_done", ps.bytes_done);
	cb_u64(b, "prefetch_bytes_total", ps.bytes_total);
	cb_u64(b, "prefetch_bytes_copied", ps.bytes_copied);
	cb_u64(b, "prefetch_guest_reads_served", ps.guest_reads_served);
	cb_printf(b, "prefetch_error: %s\n", ps.error[0] ? ps.error : "-");
}

/* The servers of the first http(s) image of the chain, the one -o mirror
 * serves: "mirrors: N" (0 without), then for N > 0 one line per server,
 * its own URL as mirror_0, "mirror_I: STATE REQUESTS ERRORS URL". Called
 * with chain_lock held (the names stay valid). */
static void control_render_mirrors(struct control_buf *b, struct disk *d)
{
	struct fetch_mirror m[FETCH_MAX_MIRRORS + 1];
	struct image *img = d->top;
	unsigned n = 0;

	while (img && fetch_get_mirrors(img->file, NULL, 0) == 0)
		img = img->backing;
	if (img)
		n = SFS_MIN(fetch_get_mirrors(img->file, m, FETCH_MAX_MIRRORS + 1),
			    (unsigned)FETCH_MAX_MIRRORS + 1);
	cb_printf(b, "mirrors: %u\n", n > 1 ? n - 1 : 0);
	for (unsigned i = 0; n > 1 && i < n; i++)
		cb_printf(b, "mirror_%u: %s %llu %llu %s\n", i, fetch_mirror_state_name(m[i].state),
			  (unsigned long long)m[i].requests, (unsigned long long)m[i].errors,
			  m[i].display);
}

static void control_render_status(struct control_buf *b, struct control_ctx *c)
{
	struct stream_status st;
	struct disk_stats *ds = &c->disk->stats;
	char *names[IMAGE_MAX_CHAIN + 1], *base;
	double pct;

	stream_get_status(c->job, &st);
	pct = st.length ? 100.0 * (double)st.offset / (double)st.length : 100.0;
	base = fetch_display_uri(st.base[0] ? st.base : "-");
	if (!base)
		b->err = -ENOMEM;
	pthread_rwlock_rdlock(&c->disk->chain_lock);
	control_layer_names(b, c->disk, names);
	cb_printf(b, "state: %s\n", stream_state_name(st.state));
	cb_u64(b, "offset", st.offset);
	cb_u64(b, "length", st.length);
	cb_printf(b, "percent: %.1f\n", pct);
	cb_u64(b, "speed_limit_bytes_per_s", st.speed);
	cb_u64(b, "rate_bytes_per_s", st.rate);
	cb_u64(b, "avg_rate_bytes_per_s", st.avg_rate);
	if (st.state == STREAM_RUNNING && st.rate > 0)
		cb_u64(b, "eta_s", ((st.length - st.offset) / st.rate));
	else
		cb_printf(b, "eta_s: %s\n", st.state == STREAM_COMPLETED ? "0" : "-");
	cb_printf(b, "elapsed_s: %.1f\n", st.elapsed);
	cb_u64(b, "resumed_from", st.resumed_from);
	cb_printf(b, "base: %s\n", base ? base : "-");
	cb_printf(b, "on_error: %s\n", st.on_error == STREAM_ON_ERROR_STOP ? "stop" : "report");
	cb_printf(b, "error: %s\n", st.error[0] ? st.error : "-");
	cb_printf(b, "overlay: %s\n", names[0] ? names[0] : "?");
	cb_printf(b, "format: %s\n", c->disk->top->drv->name);
	cb_printf(b, "backing: %s\n", names[1] ? names[1] : "-");
	control_render_chain(b, c->disk, names);
	control_render_mirrors(b, c->disk);
	cb_u64(b, "disk_size", c->disk->top->size);
	cb_printf(b, "copy_on_read: %s\n", c->disk->copy_on_read ? "on" : "off");
	cb_u64(b, "bytes_copied_by_job", atomic_load(&ds->stream_copied));
	cb_u64(b, "bytes_already_present", atomic_load(&ds->stream_present));
	cb_u64(b, "bytes_skipped_zero", atomic_load(&ds->stream_zero));
	cb_u64(b, "bytes_copied_on_read", atomic_load(&ds->cor_bytes));
	cb_u64(b, "bytes_not_copied_overlay_full", atomic_load(&ds->cor_skipped));
	cb_u64(b, "bytes_read_ahead", atomic_load(&ds->readahead_bytes));
	cb_u64(b, "readahead_hits", atomic_load(&ds->readahead_hits));
	cb_u64(b, "readahead_first_window", disk_ra_first_window(c->disk));
	cb_u64(b, "guest_bytes_read", atomic_load(&ds->guest_read));
	cb_u64(b, "guest_bytes_written", atomic_load(&ds->guest_written));
	pthread_rwlock_unlock(&c->disk->chain_lock);
	control_free_names(names);
	free(base);
	cb_u64(b, "network_bytes", disk_network_bytes(c->disk));
	cb_u64(b, "network_rate_bytes_per_s", st.net_rate);
	control_render_net(b);
	control_render_prefetch(b, c);
	cb_printf(b, "supervisor_pid: %d\n", c->supervisor_pid);
	cb_u64(b, "restarts", c->restarts);
	cb_printf(b, "last_restart: %lld\n", c->last_restart);
	cb_u64(b, "journal_bytes", c->disk->journal ? journal_used(c->disk->journal) : 0);
	cb_u64(b, "journal_replayed_records", atomic_load(&ds->journal_replayed));
	cb_u64(b, "journal_flushes", atomic_load(&ds->journal_flushes));
}

static void control_render_map(struct control_buf *b, struct disk *d)
{
	struct image *top = d->top;
	uint64_t off = 0, run_off = 0, run_len = 0;
	int run_depth = -3;
	enum extent_type run_type = EXT_UNALLOC;
	char *names[IMAGE_MAX_CHAIN + 1];

	pthread_rwlock_rdlock(&d->chain_lock);
	control_layer_names(b, d, names);
	cb_printf(b, "# offset length depth type file\n");
	while (off <= top->size && !b->err) {
		uint64_t pnum = 0;
		int depth = -3;
		enum extent_type type = EXT_UNALLOC;

		if (off < top->size &&
		    image_block_status(top, NULL, off, top->size - off, &pnum, &depth, &type) < 0) {
			b->err = -EIO;
			break;
		}
		if (type == EXT_COMPRESSED)
			type = EXT_DATA;
		if (off == top->size || depth != run_depth || type != run_type) {
			if (run_len) {
				const char *name = run_depth >= 0 && run_depth <= IMAGE_MAX_CHAIN
						       ? names[run_depth]
						       : NULL;
				const char *t = run_depth < 0	       ? "hole"
						: run_type == EXT_ZERO ? "zero"
								       : "data";
				cb_printf(b, "%llu %llu %d %s %s\n", (unsigned long long)run_off,
					  (unsigned long long)run_len, run_depth, t,
					  name ? name : "-");
			}
			run_off = off;
			run_len = 0;
			run_depth = depth;
			run_type = type;
		}
		if (off == top->size)
			break;
		run_len += pnum;
		off += pnum;
	}
	pthread_rwlock_unlock(&d->chain_lock);
	control_free_names(names);
}

/* ---- control/metrics: Prometheus text exposition format 0.0.4 ---- */

/* The HELP and TYPE lines of a metric; its samples follow. */
static void control_metric(struct control_buf *b, const char *name, const char *type,
			   const char *help)
{
	cb_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* One sample; labels is "" or "{k=\"v\"}" (fixed strings: no escaping). */
static void control_sample_u64(struct control_buf *b, const char *name, const char *labels,
			       uint64_t v)
{
	cb_printf(b, "%s%s %llu\n", name, labels, (unsigned long long)v);
}

static void control_sample(struct control_buf *b, const char *name, const char *labels, double v)
{
	if (isnan(v)) /* the format's spelling; printf's would be "nan" */
		cb_printf(b, "%s%s NaN\n", name, labels);
	else
		cb_printf(b, "%s%s %.9g\n", name, labels, v);
}

/* A metric with one sample per class. */
static void control_metric_classes(struct control_buf *b, const char *name, const char *type,
				   const char *help, const uint64_t *v)
{
	control_metric(b, name, type, help);
	control_sample_u64(b, name, "{class=\"guest\"}", v[FETCH_CLASS_GUEST]);
	control_sample_u64(b, name, "{class=\"job\"}", v[FETCH_CLASS_JOB]);
}

static void control_metric_u64(struct control_buf *b, const char *name, const char *type,
			       const char *help, uint64_t v)
{
	control_metric(b, name, type, help);
	control_sample_u64(b, name, "", v);
}

static void control_metric_f(struct control_buf *b, const char *name, const char *help, double v)
{
	control_metric(b, name, "gauge", help);
	control_sample(b, name, "", v);
}

static void control_render_metrics(struct control_buf *b, struct control_ctx *c)
{
	static const char *const lat = "streamfs_net_request_duration_seconds";
	struct disk_stats *ds = &c->disk->stats;
	struct fetch_net_stats n;
	struct stream_status st;
	char label[64];

	stream_get_status(c->job, &st);
	fetch_net_totals(&n);

	/* The stream job. */
	control_metric(b, "streamfs_stream_state", "gauge",
		       "State of the stream job: 1 for the current state, 0 for the others.");
	for (enum stream_state s = STREAM_IDLE; s <= STREAM_FAILED; s++) {
		snprintf(label, sizeof(label), "{state=\"%s\"}", stream_state_name(s));
		control_sample_u64(b, "streamfs_stream_state", label, st.state == s);
	}
	control_metric_u64(b, "streamfs_stream_offset_bytes", "gauge",
			   "Bytes of the disk the stream job has covered.", st.offset);
	control_metric_u64(b, "streamfs_stream_length_bytes", "gauge",
			   "Bytes of the disk the stream job covers in all.", st.length);
	control_metric_u64(b, "streamfs_stream_rate_bytes_per_second", "gauge",
			   "Recent copy rate of the stream job.", st.rate);
	control_metric_u64(b, "streamfs_stream_speed_limit_bytes_per_second", "gauge",
			   "Speed limit of the stream job (0: unlimited).", st.speed);
	control_metric_f(b, "streamfs_stream_elapsed_seconds", "Time the stream job has run.",
			 st.elapsed);

	/* The disk. */
	control_metric_u64(b, "streamfs_disk_size_bytes", "gauge", "Size of the guest disk.",
			   c->disk->top->size);
	control_metric_u64(b, "streamfs_stream_copied_bytes_total", "counter",
			   "Bytes copied into the overlay by the stream job and control/pull.",
			   atomic_load(&ds->stream_copied));
	control_metric_u64(b, "streamfs_copy_on_read_bytes_total", "counter",
			   "Bytes copied into the overlay by guest reads.",
			   atomic_load(&ds->cor_bytes));
	control_metric_u64(b, "streamfs_guest_read_bytes_total", "counter",
			   "Bytes read by the guest.", atomic_load(&ds->guest_read));
	control_metric_u64(b, "streamfs_guest_written_bytes_total", "counter",
			   "Bytes written by the guest.", atomic_load(&ds->guest_written));

	/* The network (every HTTP(S) backing of the process). */
	control_metric_classes(b, "streamfs_net_requests_in_flight", "gauge",
			       "HTTP requests on the network now, by class.", n.in_flight);
	control_metric_classes(b, "streamfs_net_requests_waiting", "gauge",
			       "Reads waiting for an HTTP connection now, by class.", n.waiting);
	control_metric_u64(b, "streamfs_net_connections", "gauge",
			   "HTTP connections open now, idle or busy.", n.connections);
	control_metric_classes(b, "streamfs_net_fetched_bytes_total", "counter",
			       "Bytes fetched over HTTP, by the class that read them.", n.bytes);
	control_metric_u64(b, "streamfs_net_requests_total", "counter",
			   "HTTP requests sent, retries included.", n.requests);
	control_metric_u64(b, "streamfs_net_retries_total", "counter",
			   "HTTP requests repeated after a transient failure.", n.retries);
	control_metric_u64(b, "streamfs_net_stalls_total", "counter",
			   "HTTP requests aborted for lack of progress.", n.stalls);
	control_metric_u64(b, "streamfs_net_errors_total", "counter",
			   "HTTP reads that failed after all retries.", n.errors);
	control_metric(b, lat, "summary",
		       "Duration of successful HTTP requests; quantiles over the last 256.");
	control_sample(b, lat, "{quantile=\"0.5\"}", n.latency_p50_s);
	control_sample(b, lat, "{quantile=\"0.99\"}", n.latency_p99_s);
	cb_printf(b, "%s_sum %.9g\n", lat, n.latency_sum_s);
	cb_printf(b, "%s_count %llu\n", lat, (unsigned long long)n.latency_count);
	control_metric_f(
	    b, "streamfs_net_rtt_seconds",
	    "Round-trip time to the server: least time to first byte of recent requests.", n.rtt_s);
	control_metric_f(b, "streamfs_net_rate_bytes_per_second",
			 "Bytes per second received over HTTP in the last 5 seconds.",
			 n.rate_bytes_per_s);
}

int control_render(struct control_ctx *c, enum control_id id, char **buf, size_t *len)
{
	struct control_buf b = {0};
	struct stream_status st;

	switch (id) {
	case CTL_STATUS:
		control_render_status(&b, c);
		break;
	case CTL_PROGRESS:
		stream_get_status(c->job, &st);
		cb_printf(&b, "%llu %llu %.1f%%\n", (unsigned long long)st.offset,
			  (unsigned long long)st.length,
			  st.length ? 100.0 * (double)st.offset / (double)st.length : 100.0);
		break;
	case CTL_SPEED:
		stream_get_status(c->job, &st);
		cb_printf(&b, "%llu\n", (unsigned long long)st.speed);
		break;
	case CTL_STREAM:
		stream_get_status(c->job, &st);
		cb_printf(&b, "%s\n", stream_state_name(st.state));
		break;
	case CTL_MAP:
		control_render_map(&b, c->disk);
		break;
	case CTL_METRICS:
		control_render_metrics(&b, c);
		break;
	case CTL_TRACE:
		if (c->prefetch)
			return prefetch_render_trace(c->prefetch, buf, len);
		break; /* no recorder: an empty file */
	default:
		cb_printf(&b, "%s", "");
		break;
	}
	if (b.err) {
		free(b.s);
		return b.err;
	}
	*buf = b.s;
	*len = b.len;
	return 0;
}

/* Copy one command line into a NUL-terminated buffer: a single trailing
 * newline is allowed, embedded NULs or newlines are not. */
static int control_line(const char *text, size_t len, char *out, size_t outlen)
{
	if (len > 0 && text[len - 1] == '\n')
		len--;
	if (len == 0 || len >= outlen)
		return -EINVAL;
	for (size_t i = 0; i < len; i++)
		if (text[i] == '\0' || text[i] == '\n' || text[i] == '\r')
			return -EINVAL;
	memcpy(out, text, len);
	out[len] = '\0';
	return 0;
}

int control_parse_speed(const char *text, size_t len, uint64_t *out)
{
	char line[64];
	char *s;

	if (control_line(text, len, line, sizeof(line)) < 0)
		return -EINVAL;
	for (s = line; *s == ' '; s++)
		;
	return sfs_parse_size(s, out);
}

/* Read one value of a "key=value" argument at *pp into out (outlen bytes),
 * leaving *pp at the blank or NUL after it. Two spellings:
 *   "..."  double-quoted: anything but '"' and '\\', which are written \" and \\;
 *   word   unquoted: up to the next blank; a backslash makes the next
 *          blank, '"' or '\\' literal.
 * Any other escape, an unterminated quote, a quote inside a word, text
 * right after the closing quote, an empty value or one that does not fit
 * is -EINVAL: a path is taken as written or not at all. */
static int control_parse_value(const char **pp, char *out, size_t outlen)
{
	const char *p = *pp;
	bool quoted = *p == '"';
	size_t n = 0;

	if (quoted)
		p++;
	for (;;) {
		char ch = *p;

		if (ch == '\0') {
			if (quoted)
				return -EINVAL; /* unterminated quote */
			break;
		}
		if (quoted && ch == '"') {
			p++;
			if (*p && *p != ' ' && *p != '\t')
				return -EINVAL; /* text glued to the closing quote */
			break;
		}
		if (!quoted && (ch == ' ' || ch == '\t'))
			break;
		if (!quoted && ch == '"')
			return -EINVAL;
		if (ch == '\\') {
			ch = *++p;
			if (ch != '"' && ch != '\\' && (quoted || (ch != ' ' && ch != '\t')))
				return -EINVAL; /* unknown escape, or a backslash at the end */
		}
		if (n + 1 >= outlen)
			return -EINVAL;
		out[n++] = ch;
		p++;
	}
	if (n == 0)
		return -EINVAL;
	out[n] = '\0';
	*pp = p;
	return 0;
}

int control_parse_stream(const char *text, size_t len, struct control_stream_cmd *out)
{
	char line[CONTROL_CMD_MAX], val[sizeof(out->base)];
	struct control_stream_cmd cmd;
	bool seen_base = false, seen_speed = false, seen_err = false;
	const char *p = line, *word;
	size_t wlen;

	memset(&cmd, 0, sizeof(cmd));
	if (control_line(text, len, line, sizeof(line)) < 0)
		return -EINVAL;
	p += strspn(p, " \t");
	word = p;
	wlen = strcspn(p, " \t");
	p += wlen;
	if (wlen == 5 && strncmp(word, "start", 5) == 0)
		cmd.action = CTL_STREAM_START;
	else if (wlen == 5 && strncmp(word, "pause", 5) == 0)
		cmd.action = CTL_STREAM_PAUSE;
	else if (wlen == 6 && strncmp(word, "resume", 6) == 0)
		cmd.action = CTL_STREAM_RESUME;
	else if ((wlen == 6 && strncmp(word, "cancel", 6) == 0) ||
		 (wlen == 5 && strncmp(word, "abort", 5) == 0))
		cmd.action = CTL_STREAM_CANCEL;
	else
		return -EINVAL;
	for (;;) {
		p += strspn(p, " \t");
		if (!*p)
			break;
		if (cmd.action != CTL_STREAM_START)
			return -EINVAL;
		/* The key is plain text; only the value may be quoted. */
		if (strncmp(p, "base=", 5) == 0 && !seen_base) {
			p += 5;
			if (control_parse_value(&p, cmd.base, sizeof(cmd.base)) < 0)
				return -EINVAL;
			seen_base = true;
		} else if (strncmp(p, "speed=", 6) == 0 && !seen_speed) {
			p += 6;
			if (control_parse_value(&p, val, sizeof(val)) < 0 ||
			    sfs_parse_size(val, &cmd.params.speed) < 0)
				return -EINVAL;
			cmd.params.speed_set = true;
			seen_speed = true;
		} else if (strncmp(p, "on-error=", 9) == 0 && !seen_err) {
			p += 9;
			if (control_parse_value(&p, val, sizeof(val)) < 0)
				return -EINVAL;
			if (strcmp(val, "report") == 0)
				cmd.params.on_error = STREAM_ON_ERROR_REPORT;
			else if (strcmp(val, "stop") == 0)
				cmd.params.on_error = STREAM_ON_ERROR_STOP;
			else
				return -EINVAL;
			seen_err = true;
		} else {
			return -EINVAL;
		}
	}
	*out = cmd;
	out->params.base = seen_base ? out->base : NULL;
	return 0;
}

/* A number: decimal, or 0x hex, with an optional K/M/G/T suffix. */
static int control_parse_num(const char *s, uint64_t *out)
{
	char *end;

	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		/* strtoull would accept a second "0x" and signs: digits only. */
		for (const char *q = s + 2; *q; q++)
			if (!isxdigit((unsigned char)*q))
				return -EINVAL;
		if (!s[2])
			return -EINVAL;
		errno = 0;
		*out = strtoull(s + 2, &end, 16);
		return errno || *end ? -EINVAL : 0;
	}
	return sfs_parse_size(s, out);
}

int control_parse_pull(const char *text, size_t len, uint64_t *off, uint64_t *plen)
{
	char line[128], *save = NULL, *a, *b;

	if (control_line(text, len, line, sizeof(line)) < 0)
		return -EINVAL;
	a = strtok_r(line, " \t", &save);
	b = a ? strtok_r(NULL, " \t", &save) : NULL;
	if (!a || !b || strtok_r(NULL, " \t", &save))
		return -EINVAL;
	if (control_parse_num(a, off) < 0 || control_parse_num(b, plen) < 0 || *plen == 0)
		return -EINVAL;
	return 0;
}

int control_command(struct control_ctx *c, enum control_id id, const char *text, size_t len)
{
	struct control_stream_cmd cmd;
	uint64_t v, off, plen;
	char line[16], esc[CONTROL_LOG_MAX];
	int r;

	switch (id) {
	case CTL_SPEED:
		if (control_parse_speed(text, len, &v) < 0)
			goto bad;
		return stream_set_speed(c->job, v);
	case CTL_ABORT:
		if (control_line(text, len, line, sizeof(line)) < 0 ||
		    (strcmp(line, "1") != 0 && strcmp(line, "cancel") != 0 &&
		     strcmp(line, "abort") != 0))
			goto bad;
		r = stream_cancel(c->job);
		if (r == -EINVAL) {
			sfs_warn("control/abort: no stream job is running");
			return -EBUSY;
		}
		return r;
	case CTL_PULL:
		if (control_parse_pull(text, len, &off, &plen) < 0)
			goto bad;
		if (!sfs_add_ok(off, plen, &v) || v > c->disk->top->size) {
			sfs_warn("control/pull: range is past the end of the disk");
			return -EINVAL;
		}
		return stream_pull(c->job, off, plen);
	case CTL_STREAM:
		if (control_parse_stream(text, len, &cmd) < 0)
			goto bad;
		switch (cmd.action) {
		case CTL_STREAM_START:
			return stream_start(c->job, &cmd.params);
		case CTL_STREAM_PAUSE:
			r = stream_pause(c->job);
			break;
		case CTL_STREAM_RESUME:
			r = stream_resume(c->job);
			break;
		case CTL_STREAM_CANCEL:
		default:
			r = stream_cancel(c->job);
			break;
		}
		if (r == -EINVAL) {
			sfs_warn("control/stream: '%s' does not apply in the job's current state",
				 sfs_escape(esc, sizeof(esc), text, len));
			return -EBUSY;
		}
		return r;
	default:
		return -EACCES;
	}
bad:
	/* The text is whatever a writer sent: escaped, so it cannot forge
	 * log lines, with its full length, so "pause\0resume" is seen whole. */
	sfs_warn("control/%s: invalid command '%s' (%zu bytes)", control_files[id].name,
		 sfs_escape(esc, sizeof(esc), text, len), len);
	return -EINVAL;
}
