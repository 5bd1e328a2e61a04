/* streamfs: boot traces: format, recorder, parser, merge (see trace.h for
 * the format and the merge order).
 *
 * NOTES ON THE THREAD MODEL. Only the recorder is shared. Its bitmap leaf
 * pointers and bitmap words are read without the lock (atomic loads: a
 * leaf pointer with acquire, so its zeroed words are seen; a word relaxed,
 * since a set bit only tells the reader to return) and written only with
 * rec->lock held (a leaf published with release, bits set with an atomic
 * or). The ranges and counters are protected by rec->lock. A note that
 * finds every cluster set returns without the lock: another thread has
 * appended them, or is appending them under the lock, which a snapshot
 * waits for.
 *
 * Normalization (parse and merge): each byte belongs to the earliest range
 * that mentions it. A sweep over the sorted range ends with a min-heap of
 * the ranges open at each point gives each stretch between two ends its
 * owner; the pieces sorted by owner, then offset, are the normalized list
 * once consecutive touching pieces are joined. O(n log n), about 80 bytes
 * per input range at the peak, so a hostile trace of TRACE_MAX_RANGES lines
 * costs some 80 MiB for a moment, and no more.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bitset.h"
#include "trace.h"
#include "util.h"

/* ---- traces: free, match, render ---- */

void trace_free(struct trace *t)
{
	if (!t)
		return;
	free(t->validator);
	free(t->r);
	free(t);
}

bool trace_matches(const struct trace *t, uint64_t size, const char *validator)
{
	return t->size == size && strcmp(t->validator, validator ? validator : "") == 0;
}

/* The validator as the header stores it: bytes 0x21..0x7e but '%' as they
 * are, the rest (space, controls, 8-bit) as %HH, so a hostile ETag can
 * neither end the line nor add a field. */
static void trace_put_validator(FILE *f, const char *v)
{
	for (const unsigned char *p = (const unsigned char *)v; *p; p++) {
		if (*p > 0x20 && *p < 0x7f && *p != '%')
			fputc(*p, f);
		else
			fprintf(f, "%%%02X", *p);
	}
}

/* Render t, with an optional comment line after the header. */
static int trace_render_with(const struct trace *t, const char *comment, char **buf, size_t *len)
{
	char *text = NULL;
	size_t n = 0;
	FILE *f;
	int ret = -ENOMEM;

	*buf = NULL;
	*len = 0;
	if (strlen(t->validator) > TRACE_VALIDATOR_MAX)
		return -EINVAL;
	f = open_memstream(&text, &n);
	if (!f)
		return -ENOMEM;
	fprintf(f, "%s %d size=%" PRIu64 " cluster=%" PRIu64 " validator=", TRACE_MAGIC,
		TRACE_VERSION, t->size, t->cluster);
	trace_put_validator(f, t->validator);
	fputc('\n', f);
	if (comment)
		fprintf(f, "# %s\n", comment);
	for (size_t i = 0; i < t->n; i++)
		fprintf(f, "%" PRIu64 " %" PRIu64 "\n", t->r[i].off, t->r[i].len);
	if (ferror(f)) {
		fclose(f);
		goto out;
	}
	if (fclose(f) != 0)
		goto out;
	*buf = text;
	*len = n;
	text = NULL;
	ret = 0;
out:
	free(text);
	return ret;
}

int trace_render(const struct trace *t, char **buf, size_t *len)
{
	return trace_render_with(t, NULL, buf, len);
}

/* ---- normalization ---- */

struct trace_event {
	uint64_t pos;
	size_t idx;
	bool start;
};

struct trace_piece {
	size_t owner; /* index of the earliest range covering it */
	uint64_t off, end;
};

static int trace_event_cmp(const void *a, const void *b)
{
	const struct trace_event *x = a, *y = b;

	return x->pos < y->pos ? -1 : x->pos > y->pos;
}

static int trace_piece_cmp(const void *a, const void *b)
{
	const struct trace_piece *x = a, *y = b;

	if (x->owner != y->owner)
		return x->owner < y->owner ? -1 : 1;
	return x->off < y->off ? -1 : x->off > y->off;
}

static void trace_heap_push(size_t *h, size_t *n, size_t v)
{
	size_t i = (*n)++;

	while (i > 0 && h[(i - 1) / 2] > v) {
		h[i] = h[(i - 1) / 2];
		i = (i - 1) / 2;
	}
	h[i] = v;
}

static void trace_heap_pop(size_t *h, size_t *n)
{
	size_t v = h[--(*n)], i = 0;

	for (;;) {
		size_t c = 2 * i + 1;

		if (c >= *n)
			break;
		if (c + 1 < *n && h[c + 1] < h[c])
			c++;
		if (h[c] >= v)
			break;
		h[i] = h[c];
		i = c;
	}
	if (*n)
		h[i] = v;
}

/* Normalize in[0..n) (in priority order, each len > 0, off + len not
 * overflowing) into a malloc'd *out of *nout disjoint ranges (see the
 * design note). in is not changed; *out may be NULL when *nout is 0. */
static int trace_normalize(const struct trace_range *in, size_t n, struct trace_range **out,
			   size_t *nout)
{
	struct trace_event *ev = NULL;
	struct trace_piece *pc = NULL;
	struct trace_range *r = NULL;
	size_t *heap = NULL, nheap = 0, npc = 0, nr = 0;
	bool *ended = NULL;
	int ret = -ENOMEM;

	*out = NULL;
	*nout = 0;
	if (n == 0)
		return 0;
	if (n > SIZE_MAX / 2)
		return -ENOMEM;
	ev = reallocarray(NULL, 2 * n, sizeof(*ev));
	pc = reallocarray(NULL, 2 * n, sizeof(*pc));
	heap = reallocarray(NULL, n, sizeof(*heap));
	ended = calloc(n, sizeof(*ended));
	if (!ev || !pc || !heap || !ended)
		goto out;
	for (size_t i = 0; i < n; i++) {
		ev[2 * i] = (struct trace_event){in[i].off, i, true};
		ev[2 * i + 1] = (struct trace_event){in[i].off + in[i].len, i, false};
	}
	qsort(ev, 2 * n, sizeof(*ev), trace_event_cmp);
	for (size_t k = 0; k < 2 * n;) {
		uint64_t x = ev[k].pos;

		for (; k < 2 * n && ev[k].pos == x; k++) {
			if (ev[k].start)
				trace_heap_push(heap, &nheap, ev[k].idx);
			else
				ended[ev[k].idx] = true;
		}
		while (nheap && ended[heap[0]])
			trace_heap_pop(heap, &nheap);
		if (!nheap)
			continue;
		/* An open range ends after x, so there is a next event. */
		if (npc && pc[npc - 1].owner == heap[0] && pc[npc - 1].end == x)
			pc[npc - 1].end = ev[k].pos;
		else
			pc[npc++] = (struct trace_piece){heap[0], x, ev[k].pos};
	}
	qsort(pc, npc, sizeof(*pc), trace_piece_cmp);
	r = reallocarray(NULL, npc, sizeof(*r));
	if (!r)
		goto out;
	for (size_t i = 0; i < npc; i++) {
		if (nr && r[nr - 1].off + r[nr - 1].len == pc[i].off)
			r[nr - 1].len += pc[i].end - pc[i].off;
		else
			r[nr++] = (struct trace_range){pc[i].off, pc[i].end - pc[i].off};
	}
	*out = r;
	*nout = nr;
	r = NULL;
	ret = 0;
out:
	free(ev);
	free(pc);
	free(heap);
	free(ended);
	free(r);
	return ret;
}

/* ---- parser ---- */

static void trace_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void trace_err(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	if (!err || !errlen)
		return;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

/* A token of a line: [p, p + n). */
struct trace_tok {
	const char *p;
	size_t n;
};

/* Split [p, p + n) at runs of spaces and tabs into at most max tokens.
 * Returns the number of tokens, or max + 1 if there are more. */
static size_t trace_split(const char *p, size_t n, struct trace_tok *tok, size_t max)
{
	size_t nt = 0, i = 0;

	while (i < n) {
		size_t s;

		while (i < n && (p[i] == ' ' || p[i] == '\t'))
			i++;
		if (i == n)
			break;
		if (nt == max)
			return max + 1;
		s = i;
		while (i < n && p[i] != ' ' && p[i] != '\t')
			i++;
		tok[nt++] = (struct trace_tok){p + s, i - s};
	}
	return nt;
}

/* A decimal number, digits only, overflow-checked. */
static bool trace_num(const char *p, size_t n, uint64_t *v)
{
	uint64_t x = 0;

	if (n == 0)
		return false;
	for (size_t i = 0; i < n; i++) {
		if (p[i] < '0' || p[i] > '9')
			return false;
		if (!sfs_mul_ok(x, 10, &x) || !sfs_add_ok(x, (uint64_t)(p[i] - '0'), &x))
			return false;
	}
	*v = x;
	return true;
}

static int trace_hex(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* Decode a %-encoded validator into a malloc'd string; NULL and a reason
 * in *why if it is malformed (why = NULL: out of memory). */
static char *trace_decode_validator(const char *p, size_t n, const char **why)
{
	char *v = malloc(n + 1);
	size_t o = 0;

	*why = NULL;
	if (!v)
		return NULL;
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)p[i];

		if (c == '%') {
			int hi = i + 2 < n ? trace_hex(p[i + 1]) : -1;
			int lo = i + 2 < n ? trace_hex(p[i + 2]) : -1;

			if (hi < 0 || lo < 0) {
				*why = "a '%' not followed by two hex digits";
				goto bad;
			}
			c = (unsigned char)(hi * 16 + lo);
			if (c == 0) {
				*why = "an encoded NUL byte";
				goto bad;
			}
			i += 2;
		} else if (c <= 0x20 || c >= 0x7f) {
			*why = "a byte that must be %-encoded";
			goto bad;
		}
		if (o == TRACE_VALIDATOR_MAX) {
			*why = "longer than the limit";
			goto bad;
		}
		v[o++] = (char)c;
	}
	v[o] = '\0';
	return v;
bad:
	free(v);
	return NULL;
}

/* Parse the header line into t. Returns 0, -EINVAL (message in err) or
 * -ENOMEM. */
static int trace_parse_header(const char *p, size_t n, struct trace *t, char *err, size_t errlen)
{
	struct trace_tok tok[16];
	size_t nt = trace_split(p, n, tok, 16);
	bool have_size = false, have_cluster = false;
	uint64_t version;

	if (nt < 2 || tok[0].n != strlen(TRACE_MAGIC) ||
	    memcmp(tok[0].p, TRACE_MAGIC, tok[0].n) != 0) {
		trace_err(err, errlen, "line 1: not a streamfs trace (no '%s N' header)",
			  TRACE_MAGIC);
		return -EINVAL;
	}
	if (!trace_num(tok[1].p, tok[1].n, &version) || version != TRACE_VERSION) {
		trace_err(err, errlen,
			  "line 1: unsupported trace version '%.*s' (this streamfs reads %d)",
			  (int)SFS_MIN(tok[1].n, 32), tok[1].p, TRACE_VERSION);
		return -EINVAL;
	}
	if (nt > 15) {
		trace_err(err, errlen, "line 1: too many header fields");
		return -EINVAL;
	}
	for (size_t i = 2; i < nt; i++) {
		const char *eq = memchr(tok[i].p, '=', tok[i].n);
		size_t kn = eq ? (size_t)(eq - tok[i].p) : 0, vn = eq ? tok[i].n - kn - 1 : 0;
		const char *k = tok[i].p, *v;
		uint64_t x;

		if (!eq || kn == 0) {
			trace_err(err, errlen, "line 1: header field %zu is not KEY=VALUE", i - 1);
			return -EINVAL;
		}
		v = eq + 1;
		for (size_t j = 0; j < kn; j++) {
			if (!((k[j] >= 'a' && k[j] <= 'z') || (k[j] >= '0' && k[j] <= '9') ||
			      k[j] == '_' || k[j] == '-')) {
				trace_err(err, errlen, "line 1: bad header key in field %zu",
					  i - 1);
				return -EINVAL;
			}
		}
		if (kn == 4 && memcmp(k, "size", 4) == 0) {
			if (have_size || !trace_num(v, vn, &x)) {
				trace_err(err, errlen,
					  "line 1: %s size=", have_size ? "repeated" : "bad");
				return -EINVAL;
			}
			t->size = x;
			have_size = true;
		} else if (kn == 7 && memcmp(k, "cluster", 7) == 0) {
			if (have_cluster || !trace_num(v, vn, &x) || !SFS_IS_POW2(x) ||
			    x < TRACE_CLUSTER_MIN) {
				trace_err(err, errlen,
					  "line 1: %s cluster= (a power of two, at least %u)",
					  have_cluster ? "repeated" : "bad", TRACE_CLUSTER_MIN);
				return -EINVAL;
			}
			t->cluster = x;
			have_cluster = true;
		} else if (kn == 9 && memcmp(k, "validator", 9) == 0) {
			const char *why;

			if (t->validator) {
				trace_err(err, errlen, "line 1: repeated validator=");
				return -EINVAL;
			}
			t->validator = trace_decode_validator(v, vn, &why);
			if (!t->validator) {
				if (!why)
					return -ENOMEM;
				trace_err(err, errlen, "line 1: bad validator=: %s", why);
				return -EINVAL;
			}
		}
		/* Other keys: information a later writer may add; ignored. */
	}
	if (!have_size || !have_cluster || !t->validator) {
		trace_err(err, errlen, "line 1: header without %s",
			  !have_size	  ? "size="
			  : !have_cluster ? "cluster="
					  : "validator=");
		return -EINVAL;
	}
	return 0;
}

/* Parse one range line against t's header; the line number for messages. */
static int trace_parse_range(const char *p, size_t n, size_t line, const struct trace *t,
			     struct trace_range *r, char *err, size_t errlen)
{
	struct trace_tok tok[2];
	uint64_t off, len, end;

	if (trace_split(p, n, tok, 2) != 2 || !trace_num(tok[0].p, tok[0].n, &off) ||
	    !trace_num(tok[1].p, tok[1].n, &len)) {
		trace_err(err, errlen,
			  "line %zu: not a range (OFFSET LENGTH in decimal bytes) or a comment",
			  line);
		return -EINVAL;
	}
	if (len == 0) {
		trace_err(err, errlen, "line %zu: empty range", line);
		return -EINVAL;
	}
	if (off % t->cluster) {
		trace_err(err, errlen,
			  "line %zu: offset %" PRIu64
			  " is not a multiple of the cluster size %" PRIu64,
			  line, off, t->cluster);
		return -EINVAL;
	}
	if (!sfs_add_ok(off, len, &end) || end > t->size) {
		trace_err(err, errlen,
			  "line %zu: range %" PRIu64 "+%" PRIu64
			  " ends past the image size %" PRIu64,
			  line, off, len, t->size);
		return -EINVAL;
	}
	if (end % t->cluster && end != t->size) {
		trace_err(err, errlen,
			  "line %zu: range %" PRIu64 "+%" PRIu64
			  " does not end on a cluster boundary or at the image end",
			  line, off, len);
		return -EINVAL;
	}
	*r = (struct trace_range){off, len};
	return 0;
}

int trace_parse(const char *text, size_t len, struct trace **out, char *err, size_t errlen)
{
	struct trace *t = NULL;
	struct trace_range *r = NULL, *norm;
	size_t n = 0, cap = 0, line = 0, pos = 0, nnorm;
	int ret = -EINVAL;

	*out = NULL;
	trace_err(err, errlen, "no error");
	if (len > TRACE_MAX_TEXT) {
		trace_err(err, errlen, "trace of %zu bytes, over the limit of %u", len,
			  TRACE_MAX_TEXT);
		return -EINVAL;
	}
	if (len && !text)
		return -EINVAL;
	t = calloc(1, sizeof(*t));
	if (!t)
		return -ENOMEM;
	while (pos < len) {
		const char *p = text + pos, *nl = memchr(p, '\n', len - pos);
		size_t ll = nl ? (size_t)(nl - p) : len - pos, i = 0;

		line++;
		pos += ll + (nl ? 1 : 0);
		if (ll + 1 > TRACE_MAX_LINE) {
			trace_err(err, errlen, "line %zu: longer than %u bytes", line,
				  TRACE_MAX_LINE);
			goto out;
		}
		if (memchr(p, '\0', ll)) {
			trace_err(err, errlen, "line %zu: NUL byte", line);
			goto out;
		}
		if (ll && p[ll - 1] == '\r')
			ll--;
		if (line == 1) {
			ret = trace_parse_header(p, ll, t, err, errlen);
			if (ret)
				goto out;
			ret = -EINVAL;
			continue;
		}
		while (i < ll && (p[i] == ' ' || p[i] == '\t'))
			i++;
		if (i == ll || p[i] == '#')
			continue;
		if (n == TRACE_MAX_RANGES) {
			trace_err(err, errlen, "line %zu: more than %u ranges", line,
				  TRACE_MAX_RANGES);
			goto out;
		}
		if (n == cap) {
			size_t ncap = cap ? SFS_MIN(2 * cap, (size_t)TRACE_MAX_RANGES) : 64;
			struct trace_range *nr = reallocarray(r, ncap, sizeof(*r));

			if (!nr) {
				ret = -ENOMEM;
				goto out;
			}
			r = nr;
			cap = ncap;
		}
		if (trace_parse_range(p, ll, line, t, &r[n], err, errlen))
			goto out;
		n++;
	}
	if (line == 0) {
		trace_err(err, errlen, "empty trace (no '%s N' header)", TRACE_MAGIC);
		goto out;
	}
	ret = trace_normalize(r, n, &norm, &nnorm);
	if (ret)
		goto out;
	t->r = norm;
	t->n = nnorm;
	*out = t;
	t = NULL;
	trace_err(err, errlen, "no error");
out:
	free(r);
	trace_free(t);
	return ret;
}

/* ---- merge ---- */

struct trace_item {
	struct trace_range r;
	uint64_t before; /* bytes listed before it in its trace */
	uint64_t total;	 /* bytes listed in its trace (> 0) */
	size_t k, i;	 /* its trace, its index there */
};

static int trace_item_cmp(const void *a, const void *b)
{
	const struct trace_item *x = a, *y = b;
	unsigned __int128 l = (unsigned __int128)x->before * y->total;
	unsigned __int128 r = (unsigned __int128)y->before * x->total;

	if (l != r)
		return l < r ? -1 : 1;
	if (x->k != y->k)
		return x->k < y->k ? -1 : 1;
	return x->i < y->i ? -1 : x->i > y->i;
}

int trace_merge(const struct trace *const *in, size_t n, struct trace **out, char *err,
		size_t errlen)
{
	struct trace_item *items = NULL;
	struct trace_range *r = NULL;
	struct trace *t = NULL;
	size_t total = 0, m = 0;
	int ret = -EINVAL;

	*out = NULL;
	if (n == 0) {
		trace_err(err, errlen, "nothing to merge");
		return -EINVAL;
	}
	for (size_t k = 0; k < n; k++) {
		if (!trace_matches(in[k], in[0]->size, in[0]->validator)) {
			trace_err(err, errlen,
				  "trace %zu is of another image than trace 1 (%s differs)", k + 1,
				  in[k]->size != in[0]->size ? "size" : "validator");
			return -EINVAL;
		}
		if (__builtin_add_overflow(total, in[k]->n, &total) || total > SIZE_MAX / 2)
			return -ENOMEM;
	}
	ret = -ENOMEM;
	t = calloc(1, sizeof(*t));
	items = reallocarray(NULL, total ? total : 1, sizeof(*items));
	r = reallocarray(NULL, total ? total : 1, sizeof(*r));
	if (!t || !items || !r)
		goto out;
	t->size = in[0]->size;
	t->cluster = in[0]->cluster;
	t->validator = strdup(in[0]->validator);
	if (!t->validator)
		goto out;
	for (size_t k = 0; k < n; k++) {
		uint64_t bytes = 0, before = 0;

		/* Disjoint ranges within size: the sum fits. */
		for (size_t i = 0; i < in[k]->n; i++)
			bytes += in[k]->r[i].len;
		for (size_t i = 0; i < in[k]->n; i++) {
			items[m++] = (struct trace_item){in[k]->r[i], before, bytes, k, i};
			before += in[k]->r[i].len;
		}
		t->cluster = SFS_MIN(t->cluster, in[k]->cluster);
	}
	qsort(items, m, sizeof(*items), trace_item_cmp);
	for (size_t i = 0; i < m; i++)
		r[i] = items[i].r;
	ret = trace_normalize(r, m, &t->r, &t->n);
	if (ret)
		goto out;
	if (t->n > TRACE_MAX_RANGES)
		t->n = TRACE_MAX_RANGES;
	*out = t;
	t = NULL;
out:
	free(items);
	free(r);
	trace_free(t);
	return ret;
}

/* ---- recorder ---- */

struct trace_rec {
	uint64_t size;	    /* bytes */
	uint64_t granule;   /* bytes, a power of two */
	unsigned shift;	    /* log2(granule) */
	uint64_t nclusters; /* granules in size */
	size_t nleaves;
	struct bitset **leaves; /* set once under lock; read lock-free */
	size_t max;		/* ranges kept at most */
	pthread_mutex_t lock;
	struct trace_range *r; /* in granules; protected by lock */
	size_t n, cap;	       /* protected by lock */
	uint64_t clusters;     /* protected by lock */
	uint64_t dropped;      /* protected by lock */
};

int trace_rec_new(uint64_t size, uint64_t cluster, size_t max_ranges, struct trace_rec **out)
{
	struct trace_rec *rec;

	*out = NULL;
	if (!SFS_IS_POW2(cluster) || cluster < TRACE_CLUSTER_MIN || cluster > (UINT64_C(1) << 62))
		return -EINVAL;
	rec = calloc(1, sizeof(*rec));
	if (!rec)
		return -ENOMEM;
	rec->size = size;
	rec->granule = cluster;
	while (size / rec->granule + (size % rec->granule != 0) > TRACE_REC_MAX_CLUSTERS)
		rec->granule <<= 1;
	rec->shift = (unsigned)__builtin_ctzll(rec->granule);
	rec->nclusters = size / rec->granule + (size % rec->granule != 0);
	rec->nleaves = rec->nclusters / TRACE_REC_LEAF_BITS + 1;
	rec->leaves = calloc(rec->nleaves, sizeof(*rec->leaves));
	if (!rec->leaves) {
		free(rec);
		return -ENOMEM;
	}
	rec->max = max_ranges && max_ranges < TRACE_MAX_RANGES ? max_ranges : TRACE_MAX_RANGES;
	pthread_mutex_init(&rec->lock, NULL);
	*out = rec;
	return 0;
}

void trace_rec_free(struct trace_rec *rec)
{
	if (!rec)
		return;
	for (size_t i = 0; i < rec->nleaves; i++) {
		if (rec->leaves[i])
			bitset_free(rec->leaves[i]);
		free(rec->leaves[i]);
	}
	free(rec->leaves);
	free(rec->r);
	pthread_mutex_destroy(&rec->lock);
	free(rec);
}

uint64_t trace_rec_cluster(const struct trace_rec *rec)
{
	return rec->granule;
}

/* Was cluster c noted? Lock-free. */
static bool trace_rec_seen(struct trace_rec *rec, uint64_t c)
{
	struct bitset *leaf =
	    __atomic_load_n(&rec->leaves[c / TRACE_REC_LEAF_BITS], __ATOMIC_ACQUIRE);
	uint64_t i = c % TRACE_REC_LEAF_BITS;

	return leaf && ((__atomic_load_n(&leaf->words[i / 64], __ATOMIC_RELAXED) >> (i % 64)) & 1);
}

/* Append cluster c (never noted before) to the ranges. Called with lock
 * held. */
static void trace_rec_append(struct trace_rec *rec, uint64_t c)
{
	struct trace_range *last = rec->n ? &rec->r[rec->n - 1] : NULL;

	if (last && last->off + last->len == c) {
		last->len++;
		rec->clusters++;
		return;
	}
	if (rec->n == rec->max) {
		rec->dropped++;
		return;
	}
	if (rec->n == rec->cap) {
		size_t ncap = rec->cap ? SFS_MIN(2 * rec->cap, rec->max) : SFS_MIN(256, rec->max);
		struct trace_range *nr = reallocarray(rec->r, ncap, sizeof(*nr));

		if (!nr) {
			rec->dropped++;
			return;
		}
		rec->r = nr;
		rec->cap = ncap;
	}
	rec->r[rec->n++] = (struct trace_range){c, 1};
	rec->clusters++;
}

void trace_rec_note(struct trace_rec *rec, uint64_t off, uint64_t len)
{
	uint64_t end, c, c1;

	if (!rec || len == 0 || off >= rec->size)
		return;
	if (!sfs_add_ok(off, len, &end) || end > rec->size)
		end = rec->size;
	c = off >> rec->shift;
	c1 = ((end - 1) >> rec->shift) + 1;
	/* The hot path: a read of clusters noted before. */
	while (c < c1 && trace_rec_seen(rec, c))
		c++;
	if (c == c1)
		return;
	pthread_mutex_lock(&rec->lock);
	for (; c < c1; c++) {
		struct bitset **slot = &rec->leaves[c / TRACE_REC_LEAF_BITS];
		struct bitset *leaf = *slot;
		uint64_t i = c % TRACE_REC_LEAF_BITS, bit = UINT64_C(1) << (i % 64);

		if (!leaf) {
			leaf = malloc(sizeof(*leaf));
			if (!leaf || bitset_init(leaf, TRACE_REC_LEAF_BITS)) {
				free(leaf);
				rec->dropped++;
				continue;
			}
			__atomic_store_n(slot, leaf, __ATOMIC_RELEASE);
		}
		if (__atomic_fetch_or(&leaf->words[i / 64], bit, __ATOMIC_RELAXED) & bit)
			continue;
		trace_rec_append(rec, c);
	}
	pthread_mutex_unlock(&rec->lock);
}

void trace_rec_stats(struct trace_rec *rec, struct trace_rec_stats *st)
{
	pthread_mutex_lock(&rec->lock);
	st->ranges = rec->n;
	st->clusters = rec->clusters;
	st->dropped = rec->dropped;
	pthread_mutex_unlock(&rec->lock);
}

/* Snapshot, and the dropped count at that moment. */
static int trace_rec_snap(struct trace_rec *rec, const char *validator, struct trace **out,
			  uint64_t *dropped)
{
	struct trace *t;
	int ret = -ENOMEM;

	*out = NULL;
	validator = validator ? validator : "";
	if (strlen(validator) > TRACE_VALIDATOR_MAX)
		return -EINVAL;
	t = calloc(1, sizeof(*t));
	if (!t)
		return -ENOMEM;
	t->size = rec->size;
	t->cluster = rec->granule;
	t->validator = strdup(validator);
	if (!t->validator)
		goto out;
	pthread_mutex_lock(&rec->lock);
	t->r = reallocarray(NULL, rec->n ? rec->n : 1, sizeof(*t->r));
	if (t->r) {
		/* Ranges in granules to bytes; the last granule may pass the end. */
		for (size_t i = 0; i < rec->n; i++) {
			uint64_t off = rec->r[i].off << rec->shift;
			uint64_t len = rec->r[i].len << rec->shift;

			t->r[i] = (struct trace_range){off, SFS_MIN(len, rec->size - off)};
		}
		t->n = rec->n;
		*dropped = rec->dropped;
	}
	pthread_mutex_unlock(&rec->lock);
	if (!t->r)
		goto out;
	*out = t;
	t = NULL;
	ret = 0;
out:
	trace_free(t);
	return ret;
}

int trace_rec_snapshot(struct trace_rec *rec, const char *validator, struct trace **out)
{
	uint64_t dropped;

	return trace_rec_snap(rec, validator, out, &dropped);
}

int trace_rec_render(struct trace_rec *rec, const char *validator, char **buf, size_t *len)
{
	struct trace *t;
	uint64_t dropped = 0;
	char comment[160];
	int ret;

	*buf = NULL;
	*len = 0;
	ret = trace_rec_snap(rec, validator, &t, &dropped);
	if (ret)
		return ret;
	snprintf(comment, sizeof(comment),
		 "not recorded: %" PRIu64 " clusters (the limit of %zu ranges was reached)",
		 dropped, rec->max);
	ret = trace_render_with(t, dropped ? comment : NULL, buf, len);
	trace_free(t);
	return ret;
}
