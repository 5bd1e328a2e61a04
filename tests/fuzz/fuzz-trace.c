/* libFuzzer harness: the boot trace parser, renderer, merge and recorder
 * (job/trace.c). Besides memory errors it checks their contracts on any
 * input the parser accepts: the trace is normalized (ranges non-empty,
 * cluster-aligned, within the size, disjoint, no range starting where the
 * one before it ends); rendering and parsing again gives the same trace;
 * merging it with itself, or alone, gives it back; merging it with its
 * reverse covers the same bytes and starts with its first range; and a
 * recorder fed its ranges in order renders the same trace.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "trace.h"
#include "util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void fuzz_trace_check_normal(const struct trace *t)
{
	if (!SFS_IS_POW2(t->cluster) || t->cluster < TRACE_CLUSTER_MIN || !t->validator)
		abort();
	for (size_t i = 0; i < t->n; i++) {
		uint64_t off = t->r[i].off, end = off + t->r[i].len;

		if (t->r[i].len == 0 || end < off || end > t->size || off % t->cluster ||
		    (end % t->cluster && end != t->size))
			abort();
		if (i && t->r[i - 1].off + t->r[i - 1].len == off)
			abort(); /* should have been joined */
	}
	/* Disjoint: sort a copy by offset, then neighbours must not overlap. */
	struct trace_range *s = malloc((t->n ? t->n : 1) * sizeof(*s));

	if (!s)
		return;
	if (t->n)
		memcpy(s, t->r, t->n * sizeof(*s));
	for (size_t i = 1; i < t->n; i++) { /* insertion sort: n is small here */
		struct trace_range x = s[i];
		size_t j = i;

		for (; j > 0 && s[j - 1].off > x.off; j--)
			s[j] = s[j - 1];
		s[j] = x;
	}
	for (size_t i = 1; i < t->n; i++)
		if (s[i - 1].off + s[i - 1].len > s[i].off)
			abort();
	free(s);
}

static bool fuzz_trace_equal(const struct trace *a, const struct trace *b)
{
	return a->size == b->size && a->cluster == b->cluster &&
	       strcmp(a->validator, b->validator) == 0 && a->n == b->n &&
	       (a->n == 0 || memcmp(a->r, b->r, a->n * sizeof(*a->r)) == 0);
}

static uint64_t fuzz_trace_bytes(const struct trace *t)
{
	uint64_t sum = 0;

	for (size_t i = 0; i < t->n; i++)
		sum += t->r[i].len;
	return sum;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct trace *t, *u = NULL, *m = NULL, rev;
	const struct trace *in[3];
	struct trace_rec *rec = NULL;
	char err[256], *buf = NULL;
	size_t len;
	int rc;

	sfs_log_level = -1;
	rc = trace_parse((const char *)data, size, &t, err, sizeof(err));
	if (rc) {
		/* Refused with a message, and nothing returned. */
		if (t || err[0] == '\0' || strnlen(err, sizeof(err)) == sizeof(err))
			abort();
		return 0;
	}
	fuzz_trace_check_normal(t);
	if (!trace_matches(t, t->size, t->validator) || trace_matches(t, t->size + 1, t->validator))
		abort();

	/* Render and parse again: the same trace. */
	if (trace_render(t, &buf, &len) != 0 || strlen(buf) != len)
		abort();
	if (trace_parse(buf, len, &u, err, sizeof(err)) != 0 || !fuzz_trace_equal(t, u))
		abort();
	trace_free(u);
	free(buf);

	/* Merged alone, or with itself twice: the same trace. */
	in[0] = in[1] = in[2] = t;
	for (size_t n = 1; n <= 3; n += 2) {
		if (trace_merge(in, n, &m, err, sizeof(err)) != 0 || !fuzz_trace_equal(t, m))
			abort();
		trace_free(m);
	}

	/* Merged with its reverse: the same bytes, t's first range first. */
	rev = *t;
	rev.r = malloc((t->n ? t->n : 1) * sizeof(*rev.r));
	if (rev.r) {
		for (size_t i = 0; i < t->n; i++)
			rev.r[i] = t->r[t->n - 1 - i];
		in[1] = &rev;
		if (trace_merge(in, 2, &m, err, sizeof(err)) != 0)
			abort();
		fuzz_trace_check_normal(m);
		if (fuzz_trace_bytes(m) != fuzz_trace_bytes(t) ||
		    (t->n && m->r[0].off != t->r[0].off))
			abort();
		trace_free(m);
		free(rev.r);
	}

	/* A recorder fed t's ranges in order records t (when the granule is
	 * the cluster and the disk small enough to note cluster by cluster
	 * quickly). */
	if (t->size / t->cluster <= (1u << 16) &&
	    trace_rec_new(t->size, t->cluster, t->n, &rec) == 0) {
		struct trace_rec_stats st;

		for (size_t i = 0; i < t->n; i++)
			trace_rec_note(rec, t->r[i].off, t->r[i].len);
		/* Repeats and reads past the end change nothing. */
		for (size_t i = 0; i < t->n; i++)
			trace_rec_note(rec, t->r[i].off, 1);
		trace_rec_note(rec, t->size, 4096);
		trace_rec_stats(rec, &st);
		if (st.ranges != t->n || st.dropped)
			abort();
		if (trace_rec_snapshot(rec, t->validator, &u) != 0 || !fuzz_trace_equal(t, u))
			abort();
		trace_free(u);
		trace_rec_free(rec);
	}
	trace_free(t);
	return 0;
}
