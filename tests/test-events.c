/* streamfs: unit tests for the job's event log (job/events.c) behind
 * control/events: per-open cursors, whole timestamped lines, blocking reads
 * woken by posts and by shutdown, timeouts, and the "lost N" line of a
 * reader that fell more than EVENTS_RING events behind.
 *
 * Threads that block are joined with a deadline (pthread_timedjoin_np), so
 * a missed wakeup fails the test instead of hanging it. Before the post or
 * shutdown that should wake them, the test waits until /proc shows every
 * reader asleep in its condition wait (te_wait_blocked), so a reader that
 * never blocks fails instead of passing.
 */
#include <ctype.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "events.h"
#include "util.h"

#define TE_BUF (EVENTS_LINE * (EVENTS_RING + 8))

static uint64_t te_now_ms(void)
{
	return sfs_now_ns() / 1000000ull;
}

static void te_sleep_ms(int ms)
{
	struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};

	nanosleep(&ts, NULL);
}

/* Join t within ms milliseconds or fail. */
static void te_join(pthread_t t, int ms)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_sec += ms / 1000;
	ts.tv_nsec += (long)(ms % 1000) * 1000000L;
	if (ts.tv_nsec >= 1000000000L) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000L;
	}
	if (pthread_timedjoin_np(t, NULL, &ts) != 0)
		fail_msg("a blocked reader was not woken within %d ms", ms);
}

/* Check one line "YYYY-MM-DDTHH:MM:SS.mmmZ NAME[ DETAIL]\n" and return
 * a pointer to NAME. */
static const char *te_check_line(const char *line, size_t len)
{
	static const char shape[] = "dddd-dd-ddTdd:dd:dd.dddZ ";

	assert_true(len > sizeof(shape));
	assert_true(len <= EVENTS_LINE);
	assert_int_equal(line[len - 1], '\n');
	assert_null(memchr(line, '\n', len - 1));
	for (size_t i = 0; i < sizeof(shape) - 1; i++) {
		if (shape[i] == 'd' ? !isdigit((unsigned char)line[i]) : line[i] != shape[i])
			fail_msg("bad timestamp in event line '%.*s'", (int)len, line);
	}
	return line + sizeof(shape) - 1;
}

/* Split buf[0..n) into lines; each must be whole and well formed. Stores
 * "NAME DETAIL" (timestamp stripped, no newline) into out[] (malloc'd). */
static size_t te_split(const char *buf, size_t n, char **out, size_t max)
{
	size_t count = 0, pos = 0;

	while (pos < n) {
		const char *nl = memchr(buf + pos, '\n', n - pos);
		const char *name;
		size_t len;

		if (!nl)
			fail_msg("events_read returned a partial line '%.*s'", (int)(n - pos),
				 buf + pos);
		len = (size_t)(nl - (buf + pos)) + 1;
		if (strncmp(buf + pos, "lost ", 5) == 0)
			name = buf + pos;
		else
			name = te_check_line(buf + pos, len);
		assert_true(count < max);
		out[count] = strndup(name, (size_t)(nl - name));
		assert_non_null(out[count]);
		count++;
		pos += len;
	}
	return count;
}

static void te_free_lines(char **lines, size_t n)
{
	for (size_t i = 0; i < n; i++)
		free(lines[i]);
}

static void test_events_line_format(void **state)
{
	struct events *ev = events_new();
	uint64_t c = events_cursor(ev);
	char buf[4 * EVENTS_LINE], *lines[8], big[2000];
	size_t n, k;

	assert_non_null(ev);
	events_post(ev, "started", "length=%d base=%s", 4096, "none");
	events_post(ev, "paused", "%s", "");
	events_post(ev, "error", "bad\nthing\rhere");
	n = events_read(ev, &c, buf, sizeof(buf), 0);
	k = te_split(buf, n, lines, 8);
	assert_int_equal(k, 3);
	assert_string_equal(lines[0], "started length=4096 base=none");
	assert_string_equal(lines[1], "paused"); /* no trailing space */
	assert_string_equal(lines[2], "error bad thing here");
	te_free_lines(lines, k);
	assert_int_equal(c, 3);

	/* A detail far longer than a line is cut, but stays one whole line,
	 * for every event name the job uses. */
	memset(big, 'x', sizeof(big) - 1);
	big[sizeof(big) - 1] = '\0';
	{
		static const char *names[] = {"started",   "paused", "resumed", "completed",
					      "cancelled", "failed", "error",	"backing-changed"};
		for (size_t i = 0; i < 8; i++) {
			events_post(ev, names[i], "base=%s", big);
			n = events_read(ev, &c, buf, sizeof(buf), 0);
			k = te_split(buf, n, lines, 8);
			assert_int_equal(k, 1);
			assert_true(strncmp(lines[0], names[i], strlen(names[i])) == 0);
			assert_true(strncmp(lines[0] + strlen(names[i]), " base=xxx", 9) == 0);
			te_free_lines(lines, k);
		}
	}
	events_free(ev);
}

static void test_events_cursor_per_reader(void **state)
{
	struct events *ev = events_new();
	char buf[4 * EVENTS_LINE], *lines[8];
	uint64_t a, b, late;
	size_t n, k;

	a = events_cursor(ev);
	b = events_cursor(ev);
	assert_int_equal(a, b);
	assert_false(events_ready(ev, a));
	events_post(ev, "one", "n=1");
	events_post(ev, "two", "n=2");
	late = events_cursor(ev); /* a reader opened now sees only later events */
	assert_int_equal(late, a + 2);
	events_post(ev, "three", "n=3");
	assert_true(events_ready(ev, a));
	assert_true(events_ready(ev, late));

	/* Reader a gets all three. */
	n = events_read(ev, &a, buf, sizeof(buf), 0);
	k = te_split(buf, n, lines, 8);
	assert_int_equal(k, 3);
	assert_string_equal(lines[0], "one n=1");
	assert_string_equal(lines[1], "two n=2");
	assert_string_equal(lines[2], "three n=3");
	te_free_lines(lines, k);
	assert_false(events_ready(ev, a));
	assert_int_equal(events_read(ev, &a, buf, sizeof(buf), 0), 0);

	/* Reader b is independent: it still gets them all, and with a buffer
	 * that holds exactly one line, one whole line at a time. */
	{
		size_t first;
		uint64_t probe = b;
		n = events_read(ev, &probe, buf, sizeof(buf), 0);
		first = (size_t)((char *)memchr(buf, '\n', n) - buf) + 1;
		n = events_read(ev, &b, buf, first, 0);
		assert_int_equal(n, first);
		assert_int_equal(b, 1);
		k = te_split(buf, n, lines, 8);
		assert_int_equal(k, 1);
		assert_string_equal(lines[0], "one n=1");
		te_free_lines(lines, k);
		/* A buffer of one line plus a few bytes still returns whole lines. */
		n = events_read(ev, &b, buf, first + 5, 0);
		k = te_split(buf, n, lines, 8);
		assert_int_equal(k, 1);
		assert_string_equal(lines[0], "two n=2");
		te_free_lines(lines, k);
	}
	/* The late reader only sees the third. */
	n = events_read(ev, &late, buf, sizeof(buf), 0);
	k = te_split(buf, n, lines, 8);
	assert_int_equal(k, 1);
	assert_string_equal(lines[0], "three n=3");
	te_free_lines(lines, k);
	n = events_read(ev, &b, buf, sizeof(buf), 0);
	k = te_split(buf, n, lines, 8);
	assert_int_equal(k, 1);
	assert_string_equal(lines[0], "three n=3");
	te_free_lines(lines, k);
	assert_int_equal(a, b);
	assert_int_equal(b, late);
	events_free(ev);
}

static void test_events_timeout_returns_zero(void **state)
{
	struct events *ev = events_new();
	char buf[EVENTS_LINE];
	uint64_t c = events_cursor(ev), t0, dt;

	t0 = te_now_ms();
	assert_int_equal(events_read(ev, &c, buf, sizeof(buf), 0), 0);
	assert_true(te_now_ms() - t0 < 100);
	t0 = te_now_ms();
	assert_int_equal(events_read(ev, &c, buf, sizeof(buf), 150), 0);
	dt = te_now_ms() - t0;
	if (dt < 140 || dt > 3000)
		fail_msg("a 150 ms timeout took %llu ms", (unsigned long long)dt);
	/* Over a second, to exercise the seconds part of the deadline. */
	t0 = te_now_ms();
	assert_int_equal(events_read(ev, &c, buf, sizeof(buf), 1050), 0);
	dt = te_now_ms() - t0;
	if (dt < 1040 || dt > 4000)
		fail_msg("a 1050 ms timeout took %llu ms", (unsigned long long)dt);
	assert_int_equal(c, events_cursor(ev));
	/* With an event pending, a timed read returns at once. */
	events_post(ev, "x", "y");
	t0 = te_now_ms();
	assert_true(events_read(ev, &c, buf, sizeof(buf), 5000) > 0);
	assert_true(te_now_ms() - t0 < 1000);
	events_free(ev);
}

struct te_reader {
	struct events *ev;
	uint64_t cursor;
	int timeout_ms;
	_Atomic pid_t tid; /* set before the read; 0 until then */
	_Atomic int returned;
	size_t n;
	char buf[4 * EVENTS_LINE];
};

static void *te_reader_thread(void *opaque)
{
	struct te_reader *r = opaque;

	atomic_store(&r->tid, (pid_t)syscall(SYS_gettid));
	r->n = events_read(r->ev, &r->cursor, r->buf, sizeof(r->buf), r->timeout_ms);
	atomic_store(&r->returned, 1);
	return NULL;
}

/* Is thread tid of this process asleep in a futex wait? Its state is S and
 * the system call it sits in is futex. */
static bool te_in_futex_wait(pid_t tid)
{
	char path[64], buf[512], *st;
	long nr = -1;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/self/task/%d/stat", (int)tid);
	f = fopen(path, "r");
	if (!f)
		return false;
	st = fgets(buf, sizeof(buf), f);
	fclose(f);
	st = st ? strrchr(buf, ')') : NULL; /* the name may hold spaces */
	if (!st || st[1] != ' ' || st[2] != 'S')
		return false;
	snprintf(path, sizeof(path), "/proc/self/task/%d/syscall", (int)tid);
	f = fopen(path, "r");
	if (!f)
		return false;
	if (fscanf(f, "%ld", &nr) != 1)
		nr = -1; /* "running" */
	fclose(f);
	return nr == SYS_futex;
}

/* Wait (up to 10 s, else fail) until all n readers are blocked at the same
 * time: each asleep in a futex wait inside events_read, none returned.
 * Readers contend only for ev's mutex, which its holder never keeps while
 * asleep; so when all of them sleep together, none holds it and each one
 * sleeps in the condition wait, past its check for events. */
static void te_wait_blocked(struct te_reader *r, int n)
{
	uint64_t t0 = te_now_ms();

	for (;;) {
		int blocked = 0;

		for (int i = 0; i < n; i++) {
			pid_t tid = atomic_load(&r[i].tid);

			if (atomic_load(&r[i].returned))
				fail_msg("reader %d returned before any post or shutdown", i);
			if (tid && te_in_futex_wait(tid))
				blocked++;
		}
		if (blocked == n)
			return;
		if (te_now_ms() - t0 > 10000)
			fail_msg("only %d of %d readers blocked within 10 s", blocked, n);
		te_sleep_ms(1);
	}
}

static void test_events_blocking_read_woken_by_post(void **state)
{
	struct events *ev = events_new();
	struct te_reader *r = calloc(2, sizeof(*r));
	pthread_t t[2];
	char *lines[4];
	size_t k;

	assert_non_null(r);
	for (int i = 0; i < 2; i++) {
		r[i].ev = ev;
		r[i].cursor = events_cursor(ev);
		/* One waits forever, one with a long timeout: both must wake. */
		r[i].timeout_ms = i == 0 ? -1 : 60000;
		assert_int_equal(pthread_create(&t[i], NULL, te_reader_thread, &r[i]), 0);
	}
	/* Both must be blocked before the post, and woken by it. */
	te_wait_blocked(r, 2);
	events_post(ev, "completed", "length=%d", 42);
	for (int i = 0; i < 2; i++) {
		te_join(t[i], 5000);
		k = te_split(r[i].buf, r[i].n, lines, 4);
		assert_int_equal(k, 1);
		assert_string_equal(lines[0], "completed length=42");
		te_free_lines(lines, k);
		assert_int_equal(r[i].cursor, events_cursor(ev));
	}
	free(r);
	events_free(ev);
}

static void test_events_overflow_lost_line(void **state)
{
	struct events *ev = events_new();
	char *buf = malloc(TE_BUF), **lines = calloc(EVENTS_RING + 8, sizeof(char *));
	uint64_t c0 = events_cursor(ev), c5 = 0, c10 = 0, csmall;
	const int total = EVENTS_RING + 10;
	size_t n, k;

	assert_non_null(buf);
	assert_non_null(lines);
	for (int i = 0; i < total; i++) {
		if (i == 5)
			c5 = events_cursor(ev);
		if (i == 10)
			c10 = events_cursor(ev);
		events_post(ev, "tick", "i=%d", i);
	}
	csmall = c0;

	/* 10 behind: "lost 10", then the oldest kept (i=10) to the newest. */
	n = events_read(ev, &c0, buf, TE_BUF, 0);
	k = te_split(buf, n, lines, EVENTS_RING + 8);
	assert_int_equal(k, EVENTS_RING + 1);
	assert_string_equal(lines[0], "lost 10");
	for (size_t i = 1; i < k; i++) {
		char want[32];
		snprintf(want, sizeof(want), "tick i=%zu", i + 9);
		assert_string_equal(lines[i], want);
	}
	te_free_lines(lines, k);
	assert_int_equal(c0, (uint64_t)total);

	/* 5 behind: "lost 5". */
	n = events_read(ev, &c5, buf, TE_BUF, 0);
	k = te_split(buf, n, lines, EVENTS_RING + 8);
	assert_int_equal(k, EVENTS_RING + 1);
	assert_string_equal(lines[0], "lost 5");
	assert_string_equal(lines[1], "tick i=10");
	te_free_lines(lines, k);

	/* Exactly EVENTS_RING behind: nothing lost. */
	n = events_read(ev, &c10, buf, TE_BUF, 0);
	k = te_split(buf, n, lines, EVENTS_RING + 8);
	assert_int_equal(k, EVENTS_RING);
	assert_string_equal(lines[0], "tick i=10");
	te_free_lines(lines, k);

	/* With a small buffer: "lost 10" and the lines that fit, then the
	 * rest on the next reads, in order, without another "lost". */
	{
		int next = 10;
		bool first = true;
		while (csmall < (uint64_t)total) {
			n = events_read(ev, &csmall, buf, 3 * EVENTS_LINE / 2, 0);
			assert_true(n > 0);
			k = te_split(buf, n, lines, EVENTS_RING + 8);
			for (size_t i = 0; i < k; i++) {
				char want[32];
				if (first) {
					assert_string_equal(lines[i], "lost 10");
					first = false;
					continue;
				}
				snprintf(want, sizeof(want), "tick i=%d", next++);
				assert_string_equal(lines[i], want);
			}
			te_free_lines(lines, k);
		}
		assert_int_equal(next, total);
	}
	free(lines);
	free(buf);
	events_free(ev);
}

static void test_events_shutdown_wakes_readers(void **state)
{
	struct events *ev = events_new();
	struct te_reader *r = calloc(3, sizeof(*r));
	pthread_t t[3];
	char buf[2 * EVENTS_LINE], *lines[4];
	uint64_t c, old;
	size_t n, k;

	assert_non_null(r);
	old = events_cursor(ev);
	events_post(ev, "started", "x");
	assert_false(events_is_shutdown(ev));
	for (int i = 0; i < 3; i++) {
		r[i].ev = ev;
		r[i].cursor = events_cursor(ev);
		r[i].timeout_ms = -1;
		assert_int_equal(pthread_create(&t[i], NULL, te_reader_thread, &r[i]), 0);
	}
	te_wait_blocked(r, 3);
	events_shutdown(ev);
	for (int i = 0; i < 3; i++) {
		te_join(t[i], 5000);
		assert_int_equal(r[i].n, 0);
		assert_int_equal(r[i].cursor, events_cursor(ev));
	}
	assert_true(events_is_shutdown(ev));
	/* After shutdown nothing blocks, and poll reports readable (EOF). */
	c = events_cursor(ev);
	assert_true(events_ready(ev, c));
	assert_int_equal(events_read(ev, &c, buf, sizeof(buf), -1), 0);
	/* Events already logged are still delivered. */
	n = events_read(ev, &old, buf, sizeof(buf), -1);
	k = te_split(buf, n, lines, 4);
	assert_int_equal(k, 1);
	assert_string_equal(lines[0], "started x");
	te_free_lines(lines, k);
	free(r);
	events_free(ev);
}

struct te_notify {
	_Atomic int calls;
	void *opaque_seen;
};

static void te_notify_fn(void *opaque)
{
	struct te_notify *nf = opaque;

	atomic_fetch_add(&nf->calls, 1);
	nf->opaque_seen = opaque;
}

static void test_events_notify_called_per_post(void **state)
{
	struct events *ev = events_new();
	struct te_notify nf = {0};
	uint64_t c = events_cursor(ev);
	char buf[EVENTS_LINE];

	events_post(ev, "before", "x");
	events_set_notify(ev, te_notify_fn, &nf);
	events_post(ev, "a", "1");
	events_post(ev, "b", "2");
	assert_int_equal(atomic_load(&nf.calls), 2);
	assert_ptr_equal(nf.opaque_seen, &nf);
	/* The event is readable by the time the notification runs. */
	assert_true(events_ready(ev, c + 2));
	events_set_notify(ev, NULL, NULL);
	events_post(ev, "c", "3");
	assert_int_equal(atomic_load(&nf.calls), 2);
	assert_true(events_read(ev, &c, buf, sizeof(buf), 0) > 0);
	events_free(ev);
}

#define TE_POSTERS 4
#define TE_PER	   50 /* TE_POSTERS * TE_PER < EVENTS_RING: nothing is lost */

struct te_poster {
	struct events *ev;
	int id;
};

static void *te_poster_thread(void *opaque)
{
	struct te_poster *p = opaque;

	for (int i = 0; i < TE_PER; i++)
		events_post(p->ev, "tick", "thread=%d seq=%d", p->id, i);
	return NULL;
}

static void test_events_concurrent_posts_one_line_each(void **state)
{
	struct events *ev = events_new();
	struct te_poster p[TE_POSTERS];
	pthread_t t[TE_POSTERS];
	int next[TE_POSTERS] = {0}, got = 0;
	uint64_t c = events_cursor(ev), t0 = te_now_ms();
	char *buf = malloc(TE_BUF), *lines[EVENTS_RING + 8];

	assert_non_null(buf);
	for (int i = 0; i < TE_POSTERS; i++) {
		p[i] = (struct te_poster){.ev = ev, .id = i};
		assert_int_equal(pthread_create(&t[i], NULL, te_poster_thread, &p[i]), 0);
	}
	/* Read while they post, in pieces of a few lines. */
	while (got < TE_POSTERS * TE_PER) {
		size_t n = events_read(ev, &c, buf, 3 * EVENTS_LINE, 1000), k;

		if (n == 0 && te_now_ms() - t0 > 10000)
			fail_msg("only %d of %d events arrived", got, TE_POSTERS * TE_PER);
		k = te_split(buf, n, lines, EVENTS_RING + 8);
		for (size_t i = 0; i < k; i++) {
			int id, seq;
			if (sscanf(lines[i], "tick thread=%d seq=%d", &id, &seq) != 2 || id < 0 ||
			    id >= TE_POSTERS)
				fail_msg("bad event '%s'", lines[i]);
			/* Each poster's events arrive once, in its order. */
			assert_int_equal(seq, next[id]);
			next[id]++;
			got++;
		}
		te_free_lines(lines, k);
	}
	for (int i = 0; i < TE_POSTERS; i++) {
		pthread_join(t[i], NULL);
		assert_int_equal(next[i], TE_PER);
	}
	assert_int_equal(events_read(ev, &c, buf, TE_BUF, 0), 0);
	free(buf);
	events_free(ev);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_events_line_format),
	    cmocka_unit_test(test_events_cursor_per_reader),
	    cmocka_unit_test(test_events_timeout_returns_zero),
	    cmocka_unit_test(test_events_blocking_read_woken_by_post),
	    cmocka_unit_test(test_events_overflow_lost_line),
	    cmocka_unit_test(test_events_shutdown_wakes_readers),
	    cmocka_unit_test(test_events_notify_called_per_post),
	    cmocka_unit_test(test_events_concurrent_posts_one_line_each),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
