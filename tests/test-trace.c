/* streamfs: unit tests for boot traces (job/trace.c): the recorder (first
 * access order, adjacent clusters joined, repeats ignored, the image end,
 * the range limit, a coarser granule for huge disks, 8 threads at once),
 * the text format (record, render, parse round trip; validator escaping),
 * the parser against hostile input (huge and overflowing numbers, signs,
 * junk, out of range and unaligned ranges, wrong or missing header, CRLF,
 * long lines, NUL bytes, too many lines) and its normalization of
 * overlapping ranges, and merge (disjoint, overlapping, identical traces,
 * the relative byte position order, mismatched images).
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "trace.h"

#define TT_K 1024u
#define TT_C (64u * TT_K) /* the cluster of most tests */

/* Parse a NUL-terminated text; fail with the parser's message on error. */
static struct trace *tt_parse(const char *text)
{
	struct trace *t;
	char err[256];
	int rc = trace_parse(text, strlen(text), &t, err, sizeof(err));

	if (rc)
		fail_msg("trace_parse: %d: %s\n%s", rc, err, text);
	return t;
}

/* Parse a text that must be refused with a message containing want. */
static void tt_refuse(const char *text, size_t len, const char *want)
{
	struct trace *t = (struct trace *)1;
	char err[256];
	int rc = trace_parse(text, len, &t, err, sizeof(err));

	if (rc != -EINVAL)
		fail_msg("accepted (%d) a bad trace:\n%.*s", rc, (int)(len > 300 ? 300 : len),
			 text);
	assert_null(t);
	if (!strstr(err, want))
		fail_msg("message '%s' lacks '%s'", err, want);
}

/* Check t's ranges against the pairs want[0..2n). */
static void tt_ranges(const struct trace *t, const uint64_t *want, size_t n)
{
	if (t->n != n) {
		for (size_t i = 0; i < t->n; i++)
			print_message("  %" PRIu64 " %" PRIu64 "\n", t->r[i].off, t->r[i].len);
		fail_msg("%zu ranges, want %zu", t->n, n);
	}
	for (size_t i = 0; i < n; i++) {
		assert_int_equal(t->r[i].off, want[2 * i]);
		assert_int_equal(t->r[i].len, want[2 * i + 1]);
	}
}

/* The invariants of a normalized trace. */
static void tt_check_normal(const struct trace *t)
{
	for (size_t i = 0; i < t->n; i++) {
		uint64_t end = t->r[i].off + t->r[i].len;

		assert_true(t->r[i].len > 0);
		assert_true(end <= t->size && end > t->r[i].off);
		assert_int_equal(t->r[i].off % t->cluster, 0);
		assert_true(end % t->cluster == 0 || end == t->size);
		if (i)
			assert_true(t->r[i - 1].off + t->r[i - 1].len != t->r[i].off);
		for (size_t j = 0; j < i; j++)
			assert_true(end <= t->r[j].off || t->r[i].off >= t->r[j].off + t->r[j].len);
	}
}

static void tt_equal(const struct trace *a, const struct trace *b)
{
	assert_int_equal(a->size, b->size);
	assert_int_equal(a->cluster, b->cluster);
	assert_string_equal(a->validator, b->validator);
	assert_int_equal(a->n, b->n);
	assert_memory_equal(a->r, b->r, a->n * sizeof(*a->r));
}

/* Render t and parse it back: the same trace. */
static void tt_round_trip(const struct trace *t)
{
	struct trace *u;
	char *buf;
	size_t len;

	assert_int_equal(trace_render(t, &buf, &len), 0);
	assert_int_equal(strlen(buf), len);
	u = tt_parse(buf);
	tt_equal(t, u);
	trace_free(u);
	free(buf);
}

static void test_trace_record_render_parse_round_trip(void **state)
{
	struct trace_rec *rec;
	struct trace *t;
	char *buf;
	size_t len;
	/* 1 MiB + 1000 bytes: a partial last cluster. */
	uint64_t size = 16 * TT_C + 1000;

	assert_int_equal(trace_rec_new(size, TT_C, 0, &rec), 0);
	assert_int_equal(trace_rec_cluster(rec), TT_C);
	trace_rec_note(rec, 5 * TT_C + 10, 100); /* cluster 5 */
	trace_rec_note(rec, 0, 4096);		 /* 0 */
	trace_rec_note(rec, 16 * TT_C + 10, 10); /* the partial last one */
	trace_rec_note(rec, 9 * TT_C, 2 * TT_C); /* 9, 10 */
	trace_rec_note(rec, 5 * TT_C, 1);	 /* repeat */
	trace_rec_note(rec, 3 * TT_C - 1, 2);	 /* 2 and 3, straddling */
	assert_int_equal(trace_rec_render(rec, "\"etag-1\"", &buf, &len), 0);
	assert_int_equal(strlen(buf), len);
	assert_string_equal(buf,
			    "streamfs-trace 1 size=1049576 cluster=65536 validator=\"etag-1\"\n"
			    "327680 65536\n"
			    "0 65536\n"
			    "1048576 1000\n"
			    "589824 131072\n"
			    "131072 131072\n");
	t = tt_parse(buf);
	assert_true(trace_matches(t, size, "\"etag-1\""));
	assert_false(trace_matches(t, size + 1, "\"etag-1\""));
	assert_false(trace_matches(t, size, "\"etag-2\""));
	assert_false(trace_matches(t, size, NULL));
	tt_check_normal(t);
	tt_round_trip(t);
	trace_free(t);
	free(buf);
	trace_rec_free(rec);
}

static void test_trace_rec_joins_adjacent_and_ignores_repeats(void **state)
{
	struct trace_rec *rec;
	struct trace_rec_stats st;
	struct trace *t;
	static const uint64_t want[] = {0, 8 * TT_C, 20 * TT_C, TT_C, 19 * TT_C, TT_C};

	assert_int_equal(trace_rec_new(64 * TT_C, TT_C, 0, &rec), 0);
	/* A sequential read in 4 KiB requests: one range. */
	for (uint64_t off = 0; off < 8 * TT_C; off += 4096)
		trace_rec_note(rec, off, 4096);
	/* Re-reads and a read of nothing new change nothing. */
	trace_rec_note(rec, 0, 8 * TT_C);
	trace_rec_note(rec, TT_C, 0);
	trace_rec_note(rec, 64 * TT_C, TT_C); /* past the end */
	trace_rec_note(rec, UINT64_MAX, 100); /* way past, and off + len overflows */
	/* Backwards adjacency is a new range: first-access order. */
	trace_rec_note(rec, 20 * TT_C, 1);
	trace_rec_note(rec, 19 * TT_C, 1);
	trace_rec_stats(rec, &st);
	assert_int_equal(st.ranges, 3);
	assert_int_equal(st.clusters, 10);
	assert_int_equal(st.dropped, 0);
	assert_int_equal(trace_rec_snapshot(rec, NULL, &t), 0);
	assert_string_equal(t->validator, "");
	tt_ranges(t, want, 3);
	trace_free(t);
	/* A read running past the end is clamped, the rest noted. */
	trace_rec_note(rec, 63 * TT_C, UINT64_MAX);
	trace_rec_stats(rec, &st);
	assert_int_equal(st.clusters, 11);
	trace_rec_free(rec);
	trace_rec_note(NULL, 0, 1); /* a mount without a recorder */
}

struct tt_thread {
	struct trace_rec *rec;
	unsigned id;
};

#define TT_THREADS  8
#define TT_CLUSTERS 4096

static void *tt_noter(void *arg)
{
	struct tt_thread *a = arg;

	/* Every thread reads everything, each from its own starting point and
	 * in steps of 1 to 3 clusters, twice: many races on the same bits. */
	for (unsigned pass = 0; pass < 2; pass++) {
		for (unsigned i = 0; i < TT_CLUSTERS;) {
			unsigned c = (i + a->id * 509) % TT_CLUSTERS, n = 1 + (i + a->id) % 3;

			trace_rec_note(a->rec, (uint64_t)c * 4096, (uint64_t)n * 4096);
			i += n;
		}
	}
	return NULL;
}

static void test_trace_rec_threads_note_each_cluster_once(void **state)
{
	struct tt_thread th[TT_THREADS];
	pthread_t tid[TT_THREADS];
	struct trace_rec_stats st;
	struct trace_rec *rec;
	struct trace *t;
	uint64_t sum = 0;

	assert_int_equal(trace_rec_new((uint64_t)TT_CLUSTERS * 4096, 4096, 0, &rec), 0);
	for (unsigned i = 0; i < TT_THREADS; i++) {
		th[i] = (struct tt_thread){rec, i};
		assert_int_equal(pthread_create(&tid[i], NULL, tt_noter, &th[i]), 0);
	}
	/* Snapshots while the threads note: always a consistent trace. */
	for (int i = 0; i < 50; i++) {
		assert_int_equal(trace_rec_snapshot(rec, "v", &t), 0);
		tt_check_normal(t);
		trace_free(t);
	}
	for (unsigned i = 0; i < TT_THREADS; i++)
		pthread_join(tid[i], NULL);
	trace_rec_stats(rec, &st);
	assert_int_equal(st.clusters, TT_CLUSTERS);
	assert_int_equal(st.dropped, 0);
	assert_int_equal(trace_rec_snapshot(rec, "v", &t), 0);
	tt_check_normal(t);
	for (size_t i = 0; i < t->n; i++)
		sum += t->r[i].len;
	assert_int_equal(sum, (uint64_t)TT_CLUSTERS * 4096);
	assert_int_equal(t->n, st.ranges);
	tt_round_trip(t);
	trace_free(t);
	trace_rec_free(rec);
}

static void test_trace_rec_bounds(void **state)
{
	struct trace_rec *rec;
	struct trace_rec_stats st;
	struct trace *t;
	char *buf;
	size_t len;

	/* Cluster sizes the recorder refuses. */
	assert_int_equal(trace_rec_new(1 << 20, 0, 0, &rec), -EINVAL);
	assert_null(rec);
	assert_int_equal(trace_rec_new(1 << 20, 256, 0, &rec), -EINVAL);
	assert_int_equal(trace_rec_new(1 << 20, 3 * 4096, 0, &rec), -EINVAL);

	/* Three ranges at most; the last one still grows, new ones count as
	 * dropped, once each. */
	assert_int_equal(trace_rec_new(1 << 20, 4096, 3, &rec), 0);
	trace_rec_note(rec, 0, 1);
	trace_rec_note(rec, 8192, 1);
	trace_rec_note(rec, 20480, 1);
	trace_rec_note(rec, 40960, 8192); /* dropped: 2 clusters */
	trace_rec_note(rec, 40960, 8192); /* already counted */
	trace_rec_note(rec, 12288, 1);	  /* dropped: not adjacent to the last */
	trace_rec_stats(rec, &st);
	assert_int_equal(st.ranges, 3);
	assert_int_equal(st.dropped, 3);
	assert_int_equal(trace_rec_render(rec, "v", &buf, &len), 0);
	assert_non_null(strstr(buf, "\n# not recorded: 3 clusters (the limit of 3 ranges"));
	t = tt_parse(buf);
	trace_free(t);
	free(buf);
	trace_rec_free(rec);
	/* Once full, the last range still grows; a dropped cluster stays
	 * out (it is not noted again), so it never joins a range later. */
	assert_int_equal(trace_rec_new(1 << 20, 4096, 3, &rec), 0);
	trace_rec_note(rec, 0, 1);
	trace_rec_note(rec, 8192, 1);
	trace_rec_note(rec, 20480, 1);
	trace_rec_note(rec, 12288, 1);	 /* dropped */
	trace_rec_note(rec, 8192, 8192); /* nothing new */
	trace_rec_note(rec, 24576, 1);	 /* grows the last range */
	assert_int_equal(trace_rec_snapshot(rec, NULL, &t), 0);
	tt_ranges(t, (const uint64_t[]){0, 4096, 8192, 4096, 20480, 8192}, 3);
	trace_free(t);
	trace_rec_free(rec);

	/* A huge disk with small clusters gets a coarser granule, so its
	 * bitmap stays within TRACE_REC_MAX_CLUSTERS bits. */
	assert_int_equal(trace_rec_new(UINT64_C(1) << 50, 512, 0, &rec), 0);
	assert_int_equal(trace_rec_cluster(rec), (UINT64_C(1) << 50) / TRACE_REC_MAX_CLUSTERS);
	trace_rec_note(rec, (UINT64_C(1) << 50) - 1, 1);
	assert_int_equal(trace_rec_snapshot(rec, NULL, &t), 0);
	assert_int_equal(t->n, 1);
	assert_int_equal(t->r[0].off + t->r[0].len, UINT64_C(1) << 50);
	tt_round_trip(t);
	trace_free(t);
	trace_rec_free(rec);
	/* The largest size, and a size of 0. */
	assert_int_equal(trace_rec_new(UINT64_MAX, 1 << 16, 0, &rec), 0);
	trace_rec_note(rec, UINT64_MAX - 1, 100);
	assert_int_equal(trace_rec_snapshot(rec, NULL, &t), 0);
	assert_int_equal(t->n, 1);
	assert_int_equal(t->r[0].off + t->r[0].len, UINT64_MAX);
	tt_round_trip(t);
	trace_free(t);
	trace_rec_free(rec);
	assert_int_equal(trace_rec_new(0, 4096, 0, &rec), 0);
	trace_rec_note(rec, 0, 4096);
	assert_int_equal(trace_rec_snapshot(rec, NULL, &t), 0);
	assert_int_equal(t->n, 0);
	tt_round_trip(t);
	trace_free(t);
	trace_rec_free(rec);
}

static void test_trace_validator_is_escaped(void **state)
{
	/* What a hostile server could send as an ETag: spaces, a newline
	 * that would start a range line, '%', '=', 8-bit bytes. */
	static const char hostile[] = "W/\"x y\"\n0 4096\r\tsize=1 %41 \x7f\xff=";
	struct trace t0 = {1 << 20, 4096, (char *)hostile, 0, NULL}, *t;
	char *buf, long_v[TRACE_VALIDATOR_MAX + 2];
	size_t len;

	assert_int_equal(trace_render(&t0, &buf, &len), 0);
	assert_string_equal(buf,
			    "streamfs-trace 1 size=1048576 cluster=4096 "
			    "validator=W/\"x%20y\"%0A0%204096%0D%09size=1%20%2541%20%7F%FF=\n");
	t = tt_parse(buf);
	assert_string_equal(t->validator, hostile);
	assert_true(trace_matches(t, 1 << 20, hostile));
	trace_free(t);
	free(buf);
	/* Lower case hex is read too; the limit is on the decoded length. */
	t = tt_parse("streamfs-trace 1 size=0 cluster=512 validator=a%2fb%2F\n");
	assert_string_equal(t->validator, "a/b/");
	trace_free(t);
	memset(long_v, 'v', sizeof(long_v) - 1);
	long_v[TRACE_VALIDATOR_MAX] = '\0';
	t0.validator = long_v;
	assert_int_equal(trace_render(&t0, &buf, &len), 0);
	t = tt_parse(buf);
	assert_string_equal(t->validator, long_v);
	trace_free(t);
	free(buf);
	long_v[TRACE_VALIDATOR_MAX] = 'v';
	long_v[TRACE_VALIDATOR_MAX + 1] = '\0';
	assert_int_equal(trace_render(&t0, &buf, &len), -EINVAL);
	assert_null(buf);
}

static void test_trace_parse_accepts_comments_blanks_crlf(void **state)
{
	struct trace *t;
	static const uint64_t want[] = {65536, 131072, 0, 4096};

	t = tt_parse("streamfs-trace 1   validator=\tcluster=4096 size=200000 extra=ignored\r\n"
		     "# recorded by streamfs\r\n"
		     "\r\n"
		     "   \t\n"
		     "  65536\t 131072  \r\n"
		     "\t# indented comment\n"
		     "0 4096"); /* no final newline */
	assert_int_equal(t->size, 200000);
	assert_int_equal(t->cluster, 4096);
	assert_string_equal(t->validator, "");
	tt_ranges(t, want, 2);
	trace_free(t);
	/* A header alone is an empty trace. */
	t = tt_parse("streamfs-trace 1 size=0 cluster=512 validator=x");
	assert_int_equal(t->n, 0);
	trace_free(t);
	/* The last range may end at an unaligned image end. */
	t = tt_parse("streamfs-trace 1 size=5000 cluster=4096 validator=x\n4096 904\n");
	assert_int_equal(t->r[0].len, 904);
	trace_free(t);
}

static void test_trace_parse_refuses_bad_header(void **state)
{
	static const struct {
		const char *text, *want;
	} cases[] = {
	    {"", "empty trace"},
	    {"0 4096\n", "line 1: not a streamfs trace"},
	    {"# comment\nstreamfs-trace 1 size=0 cluster=512 validator=\n", "line 1: not"},
	    {"streamfs-trace\n", "line 1: not a streamfs trace"},
	    {"streamfs-tracex 1 size=0 cluster=512 validator=\n", "not a streamfs trace"},
	    {"STREAMFS-TRACE 1 size=0 cluster=512 validator=\n", "not a streamfs trace"},
	    {"streamfs-trace 2 size=0 cluster=512 validator=\n", "unsupported trace version '2'"},
	    {"streamfs-trace 0 size=0 cluster=512 validator=\n", "unsupported trace version"},
	    {"streamfs-trace -1 size=0 cluster=512 validator=\n", "unsupported trace version"},
	    {"streamfs-trace 18446744073709551617 size=0 cluster=512 validator=\n",
	     "unsupported trace version"},
	    {"streamfs-trace 1 cluster=512 validator=\n", "header without size="},
	    {"streamfs-trace 1 size=0 validator=\n", "header without cluster="},
	    {"streamfs-trace 1 size=0 cluster=512\n", "header without validator="},
	    {"streamfs-trace 1 size=0 size=0 cluster=512 validator=\n", "repeated size="},
	    {"streamfs-trace 1 size=0 cluster=512 cluster=512 validator=\n", "repeated cluster="},
	    {"streamfs-trace 1 size=0 cluster=512 validator= validator=\n", "repeated validator="},
	    {"streamfs-trace 1 size=-1 cluster=512 validator=\n", "bad size="},
	    {"streamfs-trace 1 size=+1 cluster=512 validator=\n", "bad size="},
	    {"streamfs-trace 1 size= cluster=512 validator=\n", "bad size="},
	    {"streamfs-trace 1 size=1G cluster=512 validator=\n", "bad size="},
	    {"streamfs-trace 1 size=18446744073709551616 cluster=512 validator=\n", "bad size="},
	    {"streamfs-trace 1 size=0 cluster=0 validator=\n", "bad cluster="},
	    {"streamfs-trace 1 size=0 cluster=256 validator=\n", "bad cluster="},
	    {"streamfs-trace 1 size=0 cluster=12288 validator=\n", "bad cluster="},
	    {"streamfs-trace 1 size=0 cluster=512 validator=a%\n", "bad validator="},
	    {"streamfs-trace 1 size=0 cluster=512 validator=a%4\n", "bad validator="},
	    {"streamfs-trace 1 size=0 cluster=512 validator=a%zz\n", "bad validator="},
	    {"streamfs-trace 1 size=0 cluster=512 validator=a%00b\n", "encoded NUL"},
	    {"streamfs-trace 1 size=0 cluster=512 validator=\x80\n", "must be %-encoded"},
	    {"streamfs-trace 1 size=0 cluster=512 validator=a\rb\n", "must be %-encoded"},
	    {"streamfs-trace 1 size=0 cluster=512 validator= junk\n", "not KEY=VALUE"},
	    {"streamfs-trace 1 size=0 cluster=512 validator= =x\n", "not KEY=VALUE"},
	    {"streamfs-trace 1 size=0 cluster=512 validator= Key=x\n", "bad header key"},
	    {"streamfs-trace 1 a=1 b=1 c=1 d=1 e=1 f=1 g=1 h=1 i=1 j=1 k=1 l=1 m=1 n=1\n",
	     "too many header fields"},
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		tt_refuse(cases[i].text, strlen(cases[i].text), cases[i].want);
}

#define TT_HDR "streamfs-trace 1 size=1000000 cluster=4096 validator=v\n"

static void test_trace_parse_refuses_bad_ranges(void **state)
{
	static const struct {
		const char *text, *want;
	} cases[] = {
	    {TT_HDR "0\n", "line 2: not a range"},
	    {TT_HDR "0 4096 8192\n", "line 2: not a range"},
	    {TT_HDR "0 4096 # trailing comment\n", "line 2: not a range"},
	    {TT_HDR "# ok\n-4096 4096\n", "line 3: not a range"},
	    {TT_HDR "4096 -4096\n", "line 2: not a range"},
	    {TT_HDR "+4096 4096\n", "line 2: not a range"},
	    {TT_HDR "0x1000 4096\n", "line 2: not a range"},
	    {TT_HDR "4096 4k\n", "line 2: not a range"},
	    {TT_HDR "junk\n", "line 2: not a range"},
	    {TT_HDR "0 4096\r\r\n", "line 2: not a range"},
	    {TT_HDR "0\v4096\n", "line 2: not a range"},
	    {TT_HDR "0 4096\n4096 0\n", "line 3: empty range"},
	    {TT_HDR "100 4096\n", "line 2: offset 100 is not a multiple of the cluster size 4096"},
	    {TT_HDR "0 100\n", "does not end on a cluster boundary"},
	    {TT_HDR "999424 4096\n", "line 2: range 999424+4096 ends past the image size 1000000"},
	    {TT_HDR "1003520 4096\n", "ends past the image size"},
	    {TT_HDR "0 18446744073709551615\n", "ends past the image size"},
	    /* off + len wraps around 2^64 to a small number */
	    {TT_HDR "18446744073709547520 8192\n", "ends past the image size"},
	    {TT_HDR "18446744073709551616 4096\n", "line 2: not a range"},
	    {TT_HDR "0 99999999999999999999999999999999\n", "line 2: not a range"},
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		tt_refuse(cases[i].text, strlen(cases[i].text), cases[i].want);
}

static void test_trace_parse_refuses_nul_and_long_lines(void **state)
{
	static const char nul_hdr[] = "streamfs-trace 1 size=0\0 cluster=512 validator=\n";
	static const char nul_range[] = TT_HDR "0 4096\n4096\0 4096\n";
	size_t n = TRACE_MAX_LINE + 64;
	char *text = malloc(n);
	struct trace *t;
	char err[256];

	tt_refuse(nul_hdr, sizeof(nul_hdr) - 1, "line 1: NUL byte");
	tt_refuse(nul_range, sizeof(nul_range) - 1, "line 3: NUL byte");
	/* A comment line of TRACE_MAX_LINE bytes with its newline is fine, one
	 * byte more is not, and neither is a header that long. */
	assert_non_null(text);
	memcpy(text, TT_HDR, strlen(TT_HDR));
	text[strlen(TT_HDR)] = '#';
	memset(text + strlen(TT_HDR) + 1, 'x', TRACE_MAX_LINE - 2);
	text[strlen(TT_HDR) + TRACE_MAX_LINE - 1] = '\n';
	assert_int_equal(trace_parse(text, strlen(TT_HDR) + TRACE_MAX_LINE, &t, err, sizeof(err)),
			 0);
	trace_free(t);
	text[strlen(TT_HDR) + TRACE_MAX_LINE - 1] = 'x';
	tt_refuse(text, strlen(TT_HDR) + TRACE_MAX_LINE, "line 2: longer than 4096 bytes");
	memset(text, ' ', n);
	memcpy(text, TT_HDR, strlen(TT_HDR) - 1);
	tt_refuse(text, n, "line 1: longer than");
	free(text);
	/* Text over the limit is refused before it is read. */
	text = calloc(1, (size_t)TRACE_MAX_TEXT + 1);
	assert_non_null(text);
	tt_refuse(text, (size_t)TRACE_MAX_TEXT + 1, "over the limit");
	free(text);
}

static void test_trace_parse_limits_range_count(void **state)
{
	size_t hl = strlen(TT_HDR), n = hl + ((size_t)TRACE_MAX_RANGES + 1) * 7;
	char *text = malloc(n);
	struct trace *t;
	char err[256];
	static const uint64_t want[] = {0, 8192};

	assert_non_null(text);
	memcpy(text, TT_HDR, hl);
	/* TRACE_MAX_RANGES + 1 lines naming the same two clusters: bounded
	 * by count, whatever they normalize to. */
	for (size_t i = 0; i <= TRACE_MAX_RANGES; i++)
		memcpy(text + hl + 7 * i, i % 2 ? "0 4096\n" : "0 8192\n", 7);
	tt_refuse(text, n, "line 1048578: more than 1048576 ranges");
	assert_int_equal(trace_parse(text, n - 7, &t, err, sizeof(err)), 0);
	tt_ranges(t, want, 1);
	trace_free(t);
	free(text);
}

static void test_trace_parse_normalizes_overlaps(void **state)
{
	struct trace *t;
	/* Duplicates, a range inside an earlier one, a later range covering
	 * earlier ones (split around them, pieces in its place), touching
	 * ranges joined. */
	static const uint64_t want[] = {
	    40960,
	    8192, /* 10..11 */
	    0,
	    4096, /* 0 */
	    81920,
	    8192, /* 20..21 */
	    /* clusters 0..29 less what came before, in offset order */
	    4096,
	    36864,
	    49152,
	    32768,
	    90112,
	    32768,
	};
	/* The same, then a range touching the last piece (joined) and a
	 * repeat (dropped). */
	static const uint64_t want2[] = {
	    40960, 8192, 0, 4096, 81920, 8192, 4096, 36864, 49152, 32768, 90112, 36864,
	};

	t = tt_parse(TT_HDR "40960 8192\n"
			    "40960 4096\n"
			    "0 4096\n"
			    "40960 8192\n"
			    "81920 8192\n"
			    "0 122880\n");
	tt_ranges(t, want, 6);
	tt_check_normal(t);
	tt_round_trip(t);
	trace_free(t);
	t = tt_parse(TT_HDR "40960 8192\n"
			    "40960 4096\n"
			    "0 4096\n"
			    "40960 8192\n"
			    "81920 8192\n"
			    "0 122880\n"
			    "122880 4096\n"
			    "0 4096\n");
	tt_ranges(t, want2, 6);
	tt_check_normal(t);
	trace_free(t);
	/* Consecutive touching ranges become one; out of order ones do not. */
	t = tt_parse(TT_HDR "0 4096\n4096 4096\n8192 4096\n20480 4096\n16384 4096\n");
	tt_ranges(t, (const uint64_t[]){0, 12288, 20480, 4096, 16384, 4096}, 3);
	trace_free(t);
}

/* Merge the texts; the result's ranges are checked by the caller. */
static struct trace *tt_merge(const char *const *texts, size_t n)
{
	struct trace *in[8], *out;
	char err[256];

	assert_true(n <= 8);
	for (size_t i = 0; i < n; i++)
		in[i] = tt_parse(texts[i]);
	if (trace_merge((const struct trace *const *)in, n, &out, err, sizeof(err)))
		fail_msg("trace_merge: %s", err);
	tt_check_normal(out);
	tt_round_trip(out);
	for (size_t i = 0; i < n; i++)
		trace_free(in[i]);
	return out;
}

static void test_trace_merge(void **state)
{
	static const char a[] = TT_HDR "0 4096\n40960 4096\n81920 4096\n122880 4096\n";
	struct trace *t, *u;

	/* One trace, or a trace with itself: the same trace. */
	t = tt_merge((const char *const[]){a}, 1);
	u = tt_parse(a);
	tt_equal(t, u);
	trace_free(t);
	t = tt_merge((const char *const[]){a, a, a}, 3);
	tt_equal(t, u);
	trace_free(t);
	trace_free(u);

	/* Disjoint: interleaved by relative byte position; a's ranges are at
	 * 0, 1/4, 2/4, 3/4. Ties go to the earlier input. */
	t = tt_merge((const char *const[]){a, TT_HDR "8192 8192\n16384 4096\n200704 8192\n"}, 2);
	/* b's first two lines touch, so b parses as 8192+12288 and
	 * 200704+8192: positions 0 and 12288/20480 = 0.6. */
	tt_ranges(t,
		  (const uint64_t[]){0, 4096, 8192, 12288, 40960, 4096, 81920, 4096, 200704, 8192,
				     122880, 4096},
		  6);
	trace_free(t);

	/* Overlapping: a byte keeps its earliest place. c reads a's last
	 * cluster first and a's first cluster last. */
	t = tt_merge((const char *const[]){a, TT_HDR "122880 8192\n0 4096\n"}, 2);
	/* a: 0 (0), 40960 (1/4), 81920 (2/4), 122880 (3/4); c: 122880+8192
	 * (0), 0 (2/3). 0 from a (tie, earlier input), then c's 122880..131072
	 * at 0, a's 40960, 81920; a's 122880 is taken; c's 0 is taken. */
	tt_ranges(t, (const uint64_t[]){0, 4096, 122880, 8192, 40960, 4096, 81920, 4096}, 4);
	trace_free(t);

	/* Different clusters over one image: the smaller one. */
	t = tt_merge((const char *const[]){"streamfs-trace 1 size=1000000 cluster=65536 "
					   "validator=v\n0 65536\n",
					   TT_HDR "0 4096\n"},
		     2);
	assert_int_equal(t->cluster, 4096);
	tt_ranges(t, (const uint64_t[]){0, 65536}, 1);
	trace_free(t);
}

static void test_trace_merge_refuses_other_images(void **state)
{
	struct trace *in[2], *out = (struct trace *)1;
	char err[256];

	in[0] = tt_parse(TT_HDR "0 4096\n");
	in[1] = tt_parse("streamfs-trace 1 size=1000000 cluster=4096 validator=w\n0 4096\n");
	assert_int_equal(trace_merge((const struct trace *const *)in, 2, &out, err, sizeof(err)),
			 -EINVAL);
	assert_null(out);
	assert_non_null(strstr(err, "trace 2 is of another image than trace 1 (validator"));
	trace_free(in[1]);
	in[1] = tt_parse("streamfs-trace 1 size=1000001 cluster=4096 validator=v\n0 4096\n");
	assert_int_equal(trace_merge((const struct trace *const *)in, 2, &out, err, sizeof(err)),
			 -EINVAL);
	assert_non_null(strstr(err, "(size differs)"));
	assert_int_equal(trace_merge((const struct trace *const *)in, 0, &out, err, sizeof(err)),
			 -EINVAL);
	trace_free(in[0]);
	trace_free(in[1]);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_trace_record_render_parse_round_trip),
	    cmocka_unit_test(test_trace_rec_joins_adjacent_and_ignores_repeats),
	    cmocka_unit_test(test_trace_rec_threads_note_each_cluster_once),
	    cmocka_unit_test(test_trace_rec_bounds),
	    cmocka_unit_test(test_trace_validator_is_escaped),
	    cmocka_unit_test(test_trace_parse_accepts_comments_blanks_crlf),
	    cmocka_unit_test(test_trace_parse_refuses_bad_header),
	    cmocka_unit_test(test_trace_parse_refuses_bad_ranges),
	    cmocka_unit_test(test_trace_parse_refuses_nul_and_long_lines),
	    cmocka_unit_test(test_trace_parse_limits_range_count),
	    cmocka_unit_test(test_trace_parse_normalizes_overlaps),
	    cmocka_unit_test(test_trace_merge),
	    cmocka_unit_test(test_trace_merge_refuses_other_images),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
