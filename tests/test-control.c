/* streamfs: unit tests for the control files (control/control.c): the strict
 * command parsers, the rendered status/progress/map files over a real disk
 * and stream job, and control_command() driving the job.
 *
 * Disks are in memory: a random raw "mem:base" under a qcow2 "mem:ovl"
 * (plus a qcow2 "mem:mid" for the three-level cases). Jobs that must stay
 * running long enough to be paused or hit with a second start run under a
 * speed limit; they are then sped up (speed 0) and waited for.
 */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "control.h"
#include "fetch.h"
#include "image.h"
#include "util.h"

#define CT_CS	4096u
#define CT_SIZE (256u * 1024)  /* fast jobs */
#define CT_BIG	(1024u * 1024) /* slow jobs: 16 chunks of 64 KiB at 64 KiB/s */
#define CT_OVL	"mem:ovl"
#define CT_BASE "mem:base"
#define CT_MID	"mem:mid"
#define CT_SLOW "65536"

/* ---- parsers ---- */

static int ct_stream(const char *s, struct control_stream_cmd *out)
{
	return control_parse_stream(s, strlen(s), out);
}

static void test_control_parse_stream_verbs(void **state)
{
	struct control_stream_cmd c;
	static const struct {
		const char *text;
		enum control_stream_action action;
	} ok[] = {
	    {"start", CTL_STREAM_START},   {"start\n", CTL_STREAM_START},
	    {"pause", CTL_STREAM_PAUSE},   {"pause\n", CTL_STREAM_PAUSE},
	    {"resume", CTL_STREAM_RESUME}, {"resume\n", CTL_STREAM_RESUME},
	    {"cancel", CTL_STREAM_CANCEL}, {"cancel\n", CTL_STREAM_CANCEL},
	};

	for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
		memset(&c, 0x5a, sizeof(c));
		assert_int_equal(ct_stream(ok[i].text, &c), 0);
		assert_int_equal(c.action, ok[i].action);
		assert_null(c.params.base);
		assert_false(c.params.speed_set);
		assert_int_equal(c.params.speed, 0);
		assert_int_equal(c.params.on_error, STREAM_ON_ERROR_REPORT);
	}
}

static void test_control_parse_stream_start_options(void **state)
{
	struct control_stream_cmd c;

	assert_int_equal(ct_stream("start base=X speed=20M on-error=stop", &c), 0);
	assert_int_equal(c.action, CTL_STREAM_START);
	assert_non_null(c.params.base);
	assert_ptr_equal(c.params.base, c.base);
	assert_string_equal(c.params.base, "X");
	assert_true(c.params.speed_set);
	assert_int_equal(c.params.speed, 20ull << 20);
	assert_int_equal(c.params.on_error, STREAM_ON_ERROR_STOP);

	/* Any order, trailing newline, a path as base, on-error=report. */
	assert_int_equal(
	    ct_stream("start on-error=report speed=1024 base=/var/lib/images/base.qcow2\n", &c), 0);
	assert_string_equal(c.params.base, "/var/lib/images/base.qcow2");
	assert_int_equal(c.params.speed, 1024);
	assert_int_equal(c.params.on_error, STREAM_ON_ERROR_REPORT);

	/* speed=0 is "unlimited", and it counts as given. */
	assert_int_equal(ct_stream("start speed=0", &c), 0);
	assert_true(c.params.speed_set);
	assert_int_equal(c.params.speed, 0);
	assert_null(c.params.base);
	assert_int_equal(ct_stream("start speed=5K", &c), 0);
	assert_int_equal(c.params.speed, 5 * 1024);
	assert_int_equal(ct_stream("start speed=2G", &c), 0);
	assert_int_equal(c.params.speed, 2ull << 30);

	/* A copy of the command is returned: base points into *out. */
	{
		char text[] = "start base=mem:base";
		assert_int_equal(control_parse_stream(text, strlen(text), &c), 0);
		memset(text, 'x', strlen(text));
		assert_string_equal(c.params.base, "mem:base");
	}
	/* The longest base that fits. */
	{
		char text[1100], want[1024];
		memset(want, 'b', 1023);
		want[1023] = '\0';
		snprintf(text, sizeof(text), "start base=%s", want);
		assert_int_equal(ct_stream(text, &c), 0);
		assert_string_equal(c.params.base, want);
	}
}

static void test_control_parse_stream_rejects(void **state)
{
	static const char *bad[] = {
	    "",
	    "\n",
	    " ",
	    "\n\n",
	    "stop",
	    "Start",
	    "begin",
	    "start foo=1",
	    "start base",
	    "start base=",
	    "start speed=",
	    "start speed=fast",
	    "start speed=10Q",
	    "start speed=-1",
	    "start speed=1.5M",
	    "start speed=99999999999999999999",
	    "start speed=20000000T",
	    "start on-error=ignore",
	    "start on-error=",
	    "start base=a base=b",
	    "start speed=1M speed=2M",
	    "start on-error=stop on-error=report",
	    "start start",
	    "pause now",
	    "pause 1",
	    "resume x",
	    "cancel please",
	    "cancel speed=1M",
	    "start\nstart",
	    "start\npause\n",
	    "pause\n\n",
	    "start\r\n",
	    "start\rpause",
	};
	struct control_stream_cmd c, sentinel;

	memset(&sentinel, 0xa5, sizeof(sentinel));
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		c = sentinel;
		if (ct_stream(bad[i], &c) != -EINVAL)
			fail_msg("accepted or wrong error for '%s'", bad[i]);
		/* All or nothing: *out untouched. */
		assert_memory_equal(&c, &sentinel, sizeof(c));
	}
	/* Embedded NUL, with the length covering it. */
	c = sentinel;
	assert_int_equal(control_parse_stream("start\0base=x", 12, &c), -EINVAL);
	assert_int_equal(control_parse_stream("pause\0", 6, &c), -EINVAL);
	assert_memory_equal(&c, &sentinel, sizeof(c));
	/* Zero length with a valid string behind it. */
	assert_int_equal(control_parse_stream("start", 0, &c), -EINVAL);
	/* Overlong: a base one byte too long, and a 10 KB line. */
	{
		char text[1100], *huge = malloc(10000);
		memset(text, 0, sizeof(text));
		memcpy(text, "start base=", 11);
		memset(text + 11, 'b', 1024);
		assert_int_equal(ct_stream(text, &c), -EINVAL);
		assert_non_null(huge);
		memset(huge, ' ', 9999);
		memcpy(huge, "start", 5);
		huge[9999] = '\0';
		assert_int_equal(control_parse_stream(huge, 9999, &c), -EINVAL);
		free(huge);
	}
	assert_memory_equal(&c, &sentinel, sizeof(c));
}

/* Quoted and escaped values: a base path with blanks, quotes and
 * backslashes can be written, and the key stays plain text. */
static void test_control_parse_stream_quoted_values(void **state)
{
	static const struct {
		const char *text, *base;
	} ok[] = {
	    {"start base=\"/srv/my images/base.qcow2\"", "/srv/my images/base.qcow2"},
	    {"start base=/srv/my\\ images/base.qcow2", "/srv/my images/base.qcow2"},
	    {"start base=\"a\\\"b\"", "a\"b"},
	    {"start base=\"a\\\\b\"", "a\\b"},
	    {"start base=a\\\\b", "a\\b"},
	    {"start base=a\\\"b", "a\"b"},
	    {"start base=a\\\tb", "a\tb"},
	    {"start base=\"x\"\n", "x"},
	    {"start base=\"x\" ", "x"},
	    {"start base=\"speed=1M on-error=stop\"", "speed=1M on-error=stop"},
	    {"start base=\"  \"", "  "},
	    {"start base=\"it's\"", "it's"},
	    {"start base=\"\\\\\"", "\\"},
	};
	struct control_stream_cmd c;

	for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
		memset(&c, 0x5a, sizeof(c));
		if (ct_stream(ok[i].text, &c) != 0)
			fail_msg("rejected '%s'", ok[i].text);
		assert_ptr_equal(c.params.base, c.base);
		assert_string_equal(c.params.base, ok[i].base);
		assert_false(c.params.speed_set);
	}
	/* Quoting next to the other options, in any order. */
	assert_int_equal(ct_stream("start speed=\"2M\" base=\"a b\" on-error=\"stop\"", &c), 0);
	assert_string_equal(c.params.base, "a b");
	assert_int_equal(c.params.speed, 2u << 20);
	assert_int_equal(c.params.on_error, STREAM_ON_ERROR_STOP);
	assert_int_equal(ct_stream("start base=\"a b\"\tspeed=1K", &c), 0);
	assert_string_equal(c.params.base, "a b");
	assert_int_equal(c.params.speed, 1024);
	/* The longest base that fits, with every byte escaped. */
	{
		char text[2200], want[1024];
		size_t n = (size_t)snprintf(text, sizeof(text), "start base=\"");
		for (size_t i = 0; i < 1023; i++) {
			want[i] = i % 2 ? '"' : '\\';
			text[n++] = '\\';
			text[n++] = want[i];
		}
		want[1023] = '\0';
		text[n++] = '"';
		text[n] = '\0';
		assert_int_equal(ct_stream(text, &c), 0);
		assert_string_equal(c.params.base, want);
		/* One more escaped byte no longer fits. */
		memmove(text + n - 1, "\\\\\"", 4);
		assert_int_equal(ct_stream(text, &c), -EINVAL);
	}
}

/* Hostile quoting: every malformed spelling is -EINVAL and leaves *out alone. */
static void test_control_parse_stream_quoting_rejects(void **state)
{
	static const char *bad[] = {
	    "start base=\"",		   /* unterminated */
	    "start base=\"a b",		   /* unterminated */
	    "start base=\"a b\n",	   /* unterminated before the newline */
	    "start base=\"a\\\"",	   /* the only quote is escaped */
	    "start base=\"\"",		   /* empty */
	    "start base=\"a\"b",	   /* text glued to the closing quote */
	    "start base=\"a\"\"b\"",	   /* two quoted strings glued */
	    "start base=\"a\"speed=1M",	   /* no blank before the next key */
	    "start base=a\"b\"",	   /* quote inside a word */
	    "start base=a\"",		   /* quote inside a word */
	    "start base=\"a\\nb\"",	   /* \n is not an escape */
	    "start base=\"a\\ b\"",	   /* nor is "\ " inside quotes */
	    "start base=\"a\\x41\"",	   /* nor \x */
	    "start base=a\\nb",		   /* unknown escape outside quotes */
	    "start base=a\\",		   /* backslash at the end */
	    "start base=\"a\\",		   /* backslash at the end, in quotes */
	    "start \"base\"=x",		   /* keys are not quoted */
	    "start base\\=x",		   /* nor escaped */
	    "\"start\"",		   /* nor verbs */
	    "start base=\"a\" base=\"b\"", /* twice */
	    "start speed=\"1M\"x",	   /* glued text after a quoted speed */
	    "start speed=\"\"",		   /* empty speed */
	    "start speed=\"1 M\"",	   /* a speed with a blank */
	    "start on-error=\"st op\"",
	    "pause base=\"x\"",
	    "start base=\"a\rb\"", /* CR is refused anywhere */
	};
	struct control_stream_cmd c, sentinel;

	memset(&sentinel, 0xa5, sizeof(sentinel));
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		c = sentinel;
		if (ct_stream(bad[i], &c) != -EINVAL)
			fail_msg("accepted or wrong error for '%s'", bad[i]);
		assert_memory_equal(&c, &sentinel, sizeof(c));
	}
	/* A NUL inside quotes ends nothing: the command is refused whole. */
	c = sentinel;
	assert_int_equal(control_parse_stream("start base=\"a\0b\"", 16, &c), -EINVAL);
	assert_memory_equal(&c, &sentinel, sizeof(c));
	/* A quoted base of 1024 bytes (one too many). */
	{
		char text[1100];
		memcpy(text, "start base=\"", 12);
		memset(text + 12, 'q', 1024);
		memcpy(text + 12 + 1024, "\"", 2);
		assert_int_equal(ct_stream(text, &c), -EINVAL);
		assert_memory_equal(&c, &sentinel, sizeof(c));
	}
}

/* sfs_escape: C-style escapes, whole escapes only, "..." when cut. */
static void test_util_escape(void **state)
{
	char buf[64], small[12];
	static const unsigned char all[] = {'a',  '\\', '\'', '"',  '\n', '\r',
					    '\t', 0,	0x1b, 0x7f, 0xe2};

	assert_string_equal(sfs_escape(buf, sizeof(buf), "pause", 5), "pause");
	assert_string_equal(sfs_escape(buf, sizeof(buf), "pause\0resume", 12), "pause\\0resume");
	assert_string_equal(sfs_escape(buf, sizeof(buf), "resume\n", 7), "resume\\n");
	assert_string_equal(sfs_escape(buf, sizeof(buf), all, sizeof(all)),
			    "a\\\\\\'\"\\n\\r\\t\\0\\x1b\\x7f\\xe2");
	assert_string_equal(sfs_escape(buf, sizeof(buf), "", 0), "");
	/* Exactly fits: 11 characters and the NUL. */
	assert_string_equal(sfs_escape(small, sizeof(small), "0123456789a", 11), "0123456789a");
	/* One more: cut, with "..." in the last 3 places. */
	assert_string_equal(sfs_escape(small, sizeof(small), "0123456789ab", 12), "01234567...");
	/* A cut never splits an escape. */
	assert_string_equal(sfs_escape(small, sizeof(small), "0123456\x01xyz", 11), "0123456...");
	assert_string_equal(sfs_escape(small, sizeof(small), "01234\x01xyzzy", 11), "01234...");
	assert_string_equal(sfs_escape(small, sizeof(small), "0123\x01xyzzy", 10), "0123\\x01...");
	/* Tiny buffers stay NUL-terminated. */
	assert_string_equal(sfs_escape(small, 1, "abc", 3), "");
	assert_string_equal(sfs_escape(small, 3, "abc", 3), "ab");
	assert_string_equal(sfs_escape(small, 4, "abc", 3), "abc");
	assert_string_equal(sfs_escape(small, 4, "abcd", 4), "...");
	assert_string_equal(sfs_escape(small, 3, "\n", 1), "\\n");
	assert_string_equal(sfs_escape(small, 2, "\n", 1), "");
	assert_string_equal(sfs_escape(small, 5, "\n\n", 2), "\\n\\n");
	assert_string_equal(sfs_escape(small, 4, "\n\n", 2), "...");
	/* size 0 writes nothing at all. */
	small[0] = 'Z';
	sfs_escape(small, 0, "abc", 3);
	assert_int_equal(small[0], 'Z');
}

/* Run control_command on text with stderr captured; returns the log. */
static char *ct_log_of(enum control_id id, const char *text, size_t len)
{
	struct control_ctx c = {0};
	char *log = calloc(1, 4096);
	FILE *tmp = tmpfile();
	int saved = dup(2);

	assert_non_null(log);
	assert_non_null(tmp);
	fflush(stderr);
	assert_true(dup2(fileno(tmp), 2) >= 0);
	/* Only bad commands: they are refused before the job is looked at. */
	assert_int_equal(control_command(&c, id, text, len), -EINVAL);
	fflush(stderr);
	dup2(saved, 2);
	close(saved);
	rewind(tmp);
	assert_true(fread(log, 1, 4095, tmp) > 0);
	fclose(tmp);
	return log;
}

/* A refused command is logged escaped and whole, on one line. */
static void test_control_command_log_is_escaped(void **state)
{
	int level = sfs_log_level;
	char *log, big[5000];

	sfs_log_level = SFS_LOG_WARN;
	log = ct_log_of(CTL_STREAM, "pause\0resume", 12);
	assert_string_equal(
	    log, "streamfs: control/stream: invalid command 'pause\\0resume' (12 bytes)\n");
	free(log);
	log = ct_log_of(CTL_STREAM, "resume\n\nstreamfs: forged\x1b[2J", 28);
	assert_string_equal(log, "streamfs: control/stream: invalid command "
				 "'resume\\n\\nstreamfs: forged\\x1b[2J' (28 bytes)\n");
	free(log);
	log = ct_log_of(CTL_ABORT, "y\rn", 3);
	assert_string_equal(log, "streamfs: control/abort: invalid command 'y\\rn' (3 bytes)\n");
	free(log);
	/* A long command is cut in the log but its length is the real one. */
	memset(big, '\n', sizeof(big));
	log = ct_log_of(CTL_SPEED, big, sizeof(big));
	assert_non_null(strstr(log, "\\n\\n...' (5000 bytes)\n"));
	assert_true(strlen(log) < 300);
	assert_ptr_equal(strchr(log, '\n'), log + strlen(log) - 1); /* one line */
	free(log);
	sfs_log_level = level;
}

static void test_control_parse_speed(void **state)
{
	static const struct {
		const char *text;
		uint64_t v;
	} ok[] = {
	    {"0", 0},
	    {"0\n", 0},
	    {"50M", 50ull << 20},
	    {"50M\n", 50ull << 20},
	    {"1024", 1024},
	    {"1K", 1024},
	    {"1k", 1024},
	    {"3G", 3ull << 30},
	    {"1T", 1ull << 40},
	    {"20MiB", 20ull << 20},
	    {"20MB", 20ull << 20},
	    {"18446744073709551615", UINT64_MAX},
	};
	static const char *bad[] = {
	    "",
	    "\n",
	    "fast",
	    "10Q",
	    "-1",
	    "+1",
	    "1.5M",
	    "5M 6M",
	    "5M\n6M",
	    "M",
	    "0x10",
	    "1e6",
	    "5MX",
	    "5 M",
	    "\r",
	    "1\r\n",
	    "18446744073709551616",
	    "16777216T",
	};
	uint64_t v;

	for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
		v = 12345;
		if (control_parse_speed(ok[i].text, strlen(ok[i].text), &v) != 0)
			fail_msg("rejected '%s'", ok[i].text);
		assert_int_equal(v, ok[i].v);
	}
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		if (control_parse_speed(bad[i], strlen(bad[i]), &v) != -EINVAL)
			fail_msg("accepted '%s'", bad[i]);
	}
	assert_int_equal(control_parse_speed("5\0", 2, &v), -EINVAL);
	assert_int_equal(control_parse_speed("5\0006", 3, &v), -EINVAL);
	{
		char longnum[200];
		memset(longnum, '0', sizeof(longnum) - 2);
		longnum[sizeof(longnum) - 2] = '1';
		longnum[sizeof(longnum) - 1] = '\0';
		assert_int_equal(control_parse_speed(longnum, strlen(longnum), &v), -EINVAL);
	}
}

static void test_control_parse_pull(void **state)
{
	static const struct {
		const char *text;
		uint64_t off, len;
	} ok[] = {
	    {"0 4096", 0, 4096},
	    {"0 4096\n", 0, 4096},
	    {"0x1000 0x2000", 0x1000, 0x2000},
	    {"0X10 16", 16, 16},
	    {"0xdeadBEEF 1", 0xdeadbeefull, 1},
	    {"4096 1M", 4096, 1u << 20},
	    {"1G 64K\n", 1ull << 30, 64u << 10},
	    {"  7 \t 9", 7, 9},
	};
	static const char *bad[] = {
	    "",		"\n",	    "1",      "1 ",	"1 2 3",
	    "0 0",	"0x10 0x0", "0x 5",   "0xZZ 1", "0x10Q 1",
	    "-1 5",	"5 -1",	    "abc 1",  "1 abc",	"0x1ffffffffffffffff 1",
	    "1 2\n3 4", "1 2\r",    "1 fast",
	};
	uint64_t off, len;

	for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
		off = len = 777;
		if (control_parse_pull(ok[i].text, strlen(ok[i].text), &off, &len) != 0)
			fail_msg("rejected '%s'", ok[i].text);
		assert_int_equal(off, ok[i].off);
		assert_int_equal(len, ok[i].len);
	}
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		if (control_parse_pull(bad[i], strlen(bad[i]), &off, &len) != -EINVAL)
			fail_msg("accepted '%s'", bad[i]);
	}
	assert_int_equal(control_parse_pull("0 4096\0", 7, &off, &len), -EINVAL);
	assert_int_equal(control_parse_pull("0\0 4096", 7, &off, &len), -EINVAL);
	{
		char text[300];
		memset(text, '1', sizeof(text) - 1);
		text[sizeof(text) - 1] = '\0';
		text[100] = ' ';
		assert_int_equal(control_parse_pull(text, strlen(text), &off, &len), -EINVAL);
	}
}

/* Regression (found by this test): the hex branch called strtoull(s + 2,
 * ..., 16), which accepts its own optional "0x", so "0x0x1000" parsed as
 * 0x1000 instead of being rejected (control.h: parsed all or nothing). */
static void test_control_parse_pull_rejects_double_hex_prefix(void **state)
{
	uint64_t off = 0, len = 0;

	assert_int_equal(control_parse_pull("0x0x1000 16", 11, &off, &len), -EINVAL);
	assert_int_equal(control_parse_pull("16 0x0X20", 9, &off, &len), -EINVAL);
}

/* ---- a real disk, job and event log ---- */

struct ct {
	struct control_ctx c;
	uint8_t *base; /* the guest's view when the test started */
	uint64_t size;
};

static uint8_t *ct_random(size_t len, uint32_t seed)
{
	uint8_t *b = malloc(len);
	uint32_t x = seed * 2654435761u + 7;

	assert_non_null(b);
	for (size_t i = 0; i < len; i++) {
		x ^= x << 13;
		x ^= x >> 17;
		x ^= x << 5;
		b[i] = (uint8_t)(x >> 9);
	}
	return b;
}

static void ct_create(const char *uri, const char *fmt, uint64_t size, const char *backing,
		      const char *backing_fmt)
{
	struct image_create_opts o = {
	    .size = size,
	    .cluster_size = CT_CS,
	    .backing_name = backing,
	    .backing_fmt = backing_fmt,
	};

	assert_int_equal(image_create(uri, fmt, &o), 0);
}

static void ct_open(struct ct *t, bool cor)
{
	struct image *top;

	assert_int_equal(image_open_chain(CT_OVL, NULL, IMAGE_RDWR, NULL, &top), 0);
	assert_int_equal(disk_new(top, cor, false, &t->c.disk), 0);
	t->c.events = events_new();
	assert_non_null(t->c.events);
	assert_int_equal(stream_new(t->c.disk, t->c.events, &t->c.job), 0);
}

/* base (raw, random) <- ovl (qcow2), size bytes. */
static void ct_setup2(struct ct *t, uint64_t size, bool cor)
{
	memset(t, 0, sizeof(*t));
	fetch_mem_reset();
	t->size = size;
	t->base = ct_random(size, 11);
	assert_int_equal(fetch_mem_put("base", t->base, size), 0);
	ct_create(CT_OVL, "qcow2", size, CT_BASE, "raw");
	ct_open(t, cor);
}

static void ct_close(struct ct *t)
{
	stream_free(t->c.job);
	assert_int_equal(disk_close(t->c.disk), 0);
	events_free(t->c.events);
	free(t->base);
}

static int ct_teardown(void **state)
{
	fetch_mem_reset();
	return 0;
}

static char *ct_render(struct ct *t, enum control_id id)
{
	char *buf = NULL, *s;
	size_t len = 0;

	assert_int_equal(control_render(&t->c, id, &buf, &len), 0);
	s = malloc(len + 1);
	assert_non_null(s);
	if (len)
		memcpy(s, buf, len);
	s[len] = '\0';
	assert_int_equal(strlen(s), len); /* no NULs in a text file */
	free(buf);
	return s;
}

static int ct_cmd(struct ct *t, enum control_id id, const char *text)
{
	return control_command(&t->c, id, text, strlen(text));
}

/* The value of "key: value" in a status text (malloc'd), failing if the
 * key is missing or present twice. */
static char *ct_key(const char *text, const char *key)
{
	size_t kl = strlen(key);
	const char *p = text, *found = NULL;

	while (*p) {
		const char *nl = strchr(p, '\n');
		assert_non_null(nl);
		if ((size_t)(nl - p) > kl + 1 && strncmp(p, key, kl) == 0 && p[kl] == ':' &&
		    p[kl + 1] == ' ') {
			if (found)
				fail_msg("status key '%s' appears twice", key);
			found = p + kl + 2;
		}
		p = nl + 1;
	}
	if (!found)
		fail_msg("status key '%s' is missing", key);
	{
		const char *nl = strchr(found, '\n');
		char *v = strndup(found, (size_t)(nl - found));
		assert_non_null(v);
		return v;
	}
}

static void ct_assert_key(const char *text, const char *key, const char *want)
{
	char *v = ct_key(text, key);

	if (strcmp(v, want) != 0)
		fail_msg("status %s: '%s', expected '%s'", key, v, want);
	free(v);
}

static uint64_t ct_key_u64(const char *text, const char *key)
{
	char *v = ct_key(text, key), *end;
	unsigned long long n;

	errno = 0;
	n = strtoull(v, &end, 10);
	if (errno || *end || !v[0])
		fail_msg("status %s: '%s' is not a number", key, v);
	free(v);
	return n;
}

static void ct_assert_key_u64(const char *text, const char *key, uint64_t want)
{
	uint64_t v = ct_key_u64(text, key);

	if (v != want)
		fail_msg("status %s: %llu, expected %llu", key, (unsigned long long)v,
			 (unsigned long long)want);
}

static const char *ct_status_keys[] = {
    "state",
    "offset",
    "length",
    "percent",
    "speed_limit_bytes_per_s",
    "rate_bytes_per_s",
    "avg_rate_bytes_per_s",
    "eta_s",
    "elapsed_s",
    "resumed_from",
    "base",
    "on_error",
    "error",
    "overlay",
    "format",
    "backing",
    "chain",
    "mirrors", /* mirror_<i> lines only with -o mirror: test-mirror.sh */
    "disk_size",
    "copy_on_read",
    "bytes_copied_by_job",
    "bytes_already_present",
    "bytes_skipped_zero",
    "bytes_copied_on_read",
    "bytes_not_copied_overlay_full",
    "guest_bytes_read",
    "guest_bytes_written",
    "network_bytes",
    "network_rate_bytes_per_s",
    "net_requests_in_flight",
    "net_requests_in_flight_guest",
    "net_requests_in_flight_job",
    "net_requests_waiting_guest",
    "net_requests_waiting_job",
    "net_connections",
    "net_bytes_guest",
    "net_bytes_job",
    "net_requests",
    "net_retries",
    "net_stalls",
    "net_errors",
    "net_latency_p50_ms",
    "net_latency_p99_ms",
    "net_rtt_ms",
    "net_rate_bytes_per_s",
    "bytes_read_ahead",
    "readahead_hits",
    "readahead_first_window",
    "trace_ranges",
    "trace_clusters_dropped",
    "prefetch",
    "prefetch_ranges_done",
    "prefetch_ranges_total",
    "prefetch_bytes_done",
    "prefetch_bytes_total",
    "prefetch_bytes_copied",
    "prefetch_guest_reads_served",
    "prefetch_error",
    "supervisor_pid",
    "restarts",
    "last_restart",
    "journal_bytes",
    "journal_replayed_records",
    "journal_flushes",
};

/* Every line is "key: value" with a documented key, each key once. */
static void ct_assert_status_shape(const char *text)
{
	const char *p = text;
	size_t lines = 0;

	assert_true(text[0] != '\0');
	assert_int_equal(text[strlen(text) - 1], '\n');
	for (size_t i = 0; i < sizeof(ct_status_keys) / sizeof(ct_status_keys[0]); i++)
		free(ct_key(text, ct_status_keys[i]));
	while (*p) {
		const char *nl = strchr(p, '\n'), *colon = strstr(p, ": ");
		bool known = false;

		assert_non_null(nl);
		if (!colon || colon > nl || colon == p || nl == colon + 2)
			fail_msg("status line '%.*s' is not 'key: value'", (int)(nl - p), p);
		for (size_t i = 0; i < sizeof(ct_status_keys) / sizeof(ct_status_keys[0]); i++)
			if (strlen(ct_status_keys[i]) == (size_t)(colon - p) &&
			    strncmp(p, ct_status_keys[i], (size_t)(colon - p)) == 0)
				known = true;
		if (!known)
			fail_msg("undocumented status key '%.*s'", (int)(colon - p), p);
		lines++;
		p = nl + 1;
	}
	assert_int_equal(lines, sizeof(ct_status_keys) / sizeof(ct_status_keys[0]));
}

/* One parsed line of control/map. */
struct ct_run {
	uint64_t off, len;
	int depth;
	char type[8];
	char file[64];
};

/* Parse control/map: the header, then runs that cover [0, size) exactly,
 * in order, without gaps, overlaps or empty runs, adjacent runs differing.
 * Returns the number of runs. */
static int ct_parse_map(const char *text, uint64_t size, struct ct_run *runs, int max)
{
	const char *p = text, *nl = strchr(text, '\n');
	uint64_t next = 0;
	int n = 0;

	assert_non_null(nl);
	assert_true(strncmp(text, "# offset length depth type file\n", 32) == 0);
	p = nl + 1;
	while (*p) {
		struct ct_run r;
		unsigned long long off, len;
		int used = 0;

		nl = strchr(p, '\n');
		assert_non_null(nl);
		assert_true(n < max);
		if (sscanf(p, "%llu %llu %d %7s %63s%n", &off, &len, &r.depth, r.type, r.file,
			   &used) != 5 ||
		    p + used != nl)
			fail_msg("bad map line '%.*s'", (int)(nl - p), p);
		r.off = off;
		r.len = len;
		if (r.off != next || r.len == 0)
			fail_msg("map run at %llu: expected offset %llu, length > 0", off,
				 (unsigned long long)next);
		if (strcmp(r.type, "data") && strcmp(r.type, "zero") && strcmp(r.type, "hole"))
			fail_msg("map type '%s'", r.type);
		if ((r.depth < 0) != (strcmp(r.type, "hole") == 0))
			fail_msg("map depth %d with type %s", r.depth, r.type);
		if ((r.depth < 0) != (strcmp(r.file, "-") == 0))
			fail_msg("map depth %d with file %s", r.depth, r.file);
		if (n > 0 && runs[n - 1].depth == r.depth && !strcmp(runs[n - 1].type, r.type))
			fail_msg("map runs at %llu and %llu are not merged",
				 (unsigned long long)runs[n - 1].off, off);
		next = r.off + r.len;
		runs[n++] = r;
		p = nl + 1;
	}
	assert_int_equal(next, size);
	return n;
}

static void ct_assert_run(const struct ct_run *r, uint64_t off, uint64_t len, int depth,
			  const char *type, const char *file)
{
	if (r->off != off || r->len != len || r->depth != depth || strcmp(r->type, type) ||
	    strcmp(r->file, file))
		fail_msg("map run '%llu %llu %d %s %s', expected '%llu %llu %d %s %s'",
			 (unsigned long long)r->off, (unsigned long long)r->len, r->depth, r->type,
			 r->file, (unsigned long long)off, (unsigned long long)len, depth, type,
			 file);
}

/* The guest's view through a fresh open of the overlay. */
static void ct_assert_reopen(const uint8_t *want, uint64_t size, const char *backing)
{
	struct image *top;
	uint8_t *b = malloc(size);

	assert_non_null(b);
	assert_int_equal(image_open_chain(CT_OVL, NULL, 0, NULL, &top), 0);
	if (backing) {
		assert_non_null(top->backing);
		assert_string_equal(top->backing->filename, backing);
	} else {
		assert_null(top->backing);
		assert_null(top->backing_name);
	}
	assert_int_equal(image_pread(top, b, size, 0), 0);
	assert_memory_equal(b, want, size);
	image_close_chain(top);
	free(b);
}

static void ct_assert_disk(struct ct *t, const uint8_t *want)
{
	uint8_t *b = malloc(t->size);

	assert_non_null(b);
	assert_int_equal(disk_read(t->c.disk, b, t->size, 0), 0);
	assert_memory_equal(b, want, t->size);
	free(b);
}

static enum stream_state ct_state(struct ct *t)
{
	struct stream_status st;

	stream_get_status(t->c.job, &st);
	return st.state;
}

static void ct_sleep_ms(int ms)
{
	struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};

	nanosleep(&ts, NULL);
}

/* Event names in order from cursor, until 'last' is seen (or a timeout). */
static void ct_assert_events(struct ct *t, uint64_t *cursor, const char *const *want, size_t n)
{
	size_t got = 0;
	char buf[EVENTS_LINE * 8];

	while (got < n) {
		size_t len = events_read(t->c.events, cursor, buf, sizeof(buf) - 1, 5000);
		char *p = buf;

		if (len == 0)
			fail_msg("timed out waiting for event '%s'", want[got]);
		buf[len] = '\0';
		while (*p) {
			char *nl = strchr(p, '\n'), ts[64], name[64];

			assert_non_null(nl);
			*nl = '\0';
			if (sscanf(p, "%63s %63s", ts, name) != 2)
				fail_msg("bad event line '%s'", p);
			if (got >= n)
				fail_msg("unexpected extra event '%s'", p);
			if (strcmp(name, want[got]) != 0)
				fail_msg("event %zu is '%s', expected '%s'", got, p, want[got]);
			got++;
			p = nl + 1;
		}
	}
}

/* ---- rendering ---- */

static void test_control_render_status_idle_and_counters(void **state)
{
	struct ct t;
	char *s, want_chain[128];
	uint8_t buf[100];

	ct_setup2(&t, CT_SIZE, true);
	s = ct_render(&t, CTL_STATUS);
	ct_assert_status_shape(s);
	ct_assert_key(s, "state", "idle");
	ct_assert_key_u64(s, "offset", 0);
	ct_assert_key_u64(s, "length", CT_SIZE);
	ct_assert_key(s, "percent", "0.0");
	ct_assert_key_u64(s, "speed_limit_bytes_per_s", 0);
	ct_assert_key_u64(s, "rate_bytes_per_s", 0);
	ct_assert_key(s, "eta_s", "-");
	ct_assert_key(s, "base", "-");
	ct_assert_key(s, "on_error", "report");
	ct_assert_key(s, "error", "-");
	ct_assert_key(s, "overlay", CT_OVL);
	ct_assert_key(s, "format", "qcow2");
	ct_assert_key(s, "backing", CT_BASE);
	snprintf(want_chain, sizeof(want_chain), "%s (qcow2) <- %s (raw)", CT_OVL, CT_BASE);
	ct_assert_key(s, "chain", want_chain);
	ct_assert_key_u64(s, "disk_size", CT_SIZE);
	ct_assert_key(s, "copy_on_read", "on");
	ct_assert_key_u64(s, "bytes_copied_by_job", 0);
	ct_assert_key_u64(s, "bytes_already_present", 0);
	ct_assert_key_u64(s, "bytes_skipped_zero", 0);
	ct_assert_key_u64(s, "bytes_copied_on_read", 0);
	ct_assert_key_u64(s, "guest_bytes_read", 0);
	ct_assert_key_u64(s, "guest_bytes_written", 0);
	ct_assert_key_u64(s, "network_bytes", 0);
	/* No network source: counters 0, measured figures unknown. */
	ct_assert_key_u64(s, "net_requests_in_flight", 0);
	ct_assert_key_u64(s, "net_connections", 0);
	ct_assert_key_u64(s, "net_bytes_guest", 0);
	ct_assert_key_u64(s, "net_bytes_job", 0);
	ct_assert_key_u64(s, "net_requests", 0);
	ct_assert_key_u64(s, "net_retries", 0);
	ct_assert_key_u64(s, "net_errors", 0);
	ct_assert_key(s, "net_latency_p50_ms", "-");
	ct_assert_key(s, "net_latency_p99_ms", "-");
	ct_assert_key(s, "net_rtt_ms", "-");
	ct_assert_key(s, "net_rate_bytes_per_s", "-");
	free(s);

	/* A guest read (copy-on-read of one cluster) and a write. */
	assert_int_equal(disk_read(t.c.disk, buf, 100, 3 * CT_CS + 5), 0);
	assert_memory_equal(buf, t.base + 3 * CT_CS + 5, 100);
	assert_int_equal(disk_write(t.c.disk, buf, 30, 7 * CT_CS), 0);
	assert_int_equal(ct_cmd(&t, CTL_SPEED, "20M\n"), 0);
	s = ct_render(&t, CTL_STATUS);
	ct_assert_status_shape(s);
	ct_assert_key_u64(s, "bytes_copied_on_read", CT_CS);
	ct_assert_key_u64(s, "guest_bytes_read", 100);
	ct_assert_key_u64(s, "guest_bytes_written", 30);
	ct_assert_key_u64(s, "speed_limit_bytes_per_s", 20u << 20);
	ct_assert_key(s, "state", "idle");
	free(s);
	s = ct_render(&t, CTL_SPEED);
	assert_string_equal(s, "20971520\n");
	free(s);
	s = ct_render(&t, CTL_STREAM);
	assert_string_equal(s, "idle\n");
	free(s);
	s = ct_render(&t, CTL_PROGRESS);
	assert_string_equal(s, "0 262144 0.0%\n");
	free(s);
	ct_close(&t);
}

/* ---- control/metrics: a strict check of the Prometheus text format ---- */

struct ct_family {
	char name[128], type[16];
	bool help;
};

static bool ct_prom_name(const char *p, size_t n, bool label)
{
	if (n == 0 || !(isalpha((unsigned char)p[0]) || p[0] == '_' || (!label && p[0] == ':')))
		return false;
	for (size_t i = 1; i < n; i++)
		if (!(isalnum((unsigned char)p[i]) || p[i] == '_' || (!label && p[i] == ':')))
			return false;
	return true;
}

/* A sample value: a float as strtod reads it whole, or NaN, +Inf, -Inf. */
static bool ct_prom_value(const char *v, double *out)
{
	char *end;

	if (!strcmp(v, "NaN") || !strcmp(v, "+Inf") || !strcmp(v, "-Inf")) {
		*out = v[0] == 'N' ? NAN : v[0] == '+' ? INFINITY : -INFINITY;
		return true;
	}
	if (!v[0] || isspace((unsigned char)v[0]) || strpbrk(v, "nNiI"))
		return false; /* strtod's "nan", "inf", "infinity" are not the format's */
	errno = 0;
	*out = strtod(v, &end);
	return !errno && *end == '\0';
}

/* Check {k="v",...} at p (up to n bytes, braces included). */
static bool ct_prom_labels(const char *p, size_t n)
{
	size_t i = 1;

	if (n < 2 || p[0] != '{' || p[n - 1] != '}')
		return false;
	if (n == 2)
		return false; /* "{}": legal but never what we mean to write */
	while (i < n - 1) {
		size_t k = i;

		while (i < n - 1 && p[i] != '=')
			i++;
		if (!ct_prom_name(p + k, i - k, true) || p[i] != '=' || p[i + 1] != '"')
			return false;
		for (i += 2; i < n - 1 && p[i] != '"'; i++)
			if (p[i] == '\\' && (p[++i] != '\\' && p[i] != '"' && p[i] != 'n'))
				return false;
		if (i >= n - 1)
			return false;
		i++;
		if (p[i] == ',')
			i++;
		else if (i != n - 1)
			return false;
	}
	return true;
}

/* Validate text as the Prometheus text exposition format 0.0.4, strictly:
 * only "# HELP" / "# TYPE" comments, each once per metric and both before
 * its samples; samples "name{labels} value" with no timestamp, grouped by
 * metric; counters named *_total with values >= 0; summaries as base
 * {quantile=...}, base_sum and base_count; no sample twice. Fails the test
 * with the line at fault; returns the number of samples. */
static int ct_prom_check(const char *text)
{
	struct ct_family fam[64];
	char seen[128][160];
	int nfam = 0, nseen = 0, cur = -1, samples = 0;
	const char *p = text;

	assert_true(text[0] && text[strlen(text) - 1] == '\n');
	while (*p) {
		const char *nl = strchr(p, '\n');
		char line[512], *sp;
		size_t len = (size_t)(nl - p);

		if (len == 0 || len >= sizeof(line))
			fail_msg("metrics: empty or overlong line at '%.40s'", p);
		memcpy(line, p, len);
		line[len] = '\0';
		p = nl + 1;
		if (line[0] == '#') {
			char kind[8], name[128], rest[400];
			int f;

			if (sscanf(line, "# %7s %127s %399[^\n]", kind, name, rest) != 3 ||
			    (strcmp(kind, "HELP") && strcmp(kind, "TYPE")) ||
			    !ct_prom_name(name, strlen(name), false))
				fail_msg("metrics: bad comment line '%s'", line);
			for (f = 0; f < nfam && strcmp(fam[f].name, name); f++)
				;
			if (f == nfam) {
				assert_true(nfam < 64);
				memset(&fam[nfam], 0, sizeof(fam[0]));
				snprintf(fam[nfam].name, sizeof(fam[0].name), "%s", name);
				nfam++;
			} else if (f != cur) {
				fail_msg("metrics: '%s' described in two places", name);
			}
			cur = f;
			if (!strcmp(kind, "HELP")) {
				if (fam[f].help || fam[f].type[0])
					fail_msg("metrics: HELP of %s repeated or after TYPE",
						 name);
				fam[f].help = true;
				continue;
			}
			if (fam[f].type[0] || !fam[f].help)
				fail_msg("metrics: TYPE of %s repeated or without HELP", name);
			if (strcmp(rest, "counter") && strcmp(rest, "gauge") &&
			    strcmp(rest, "summary"))
				fail_msg("metrics: %s has type '%s'", name, rest);
			if (!strcmp(rest, "counter") &&
			    (strlen(name) < 6 || strcmp(name + strlen(name) - 6, "_total")))
				fail_msg("metrics: counter %s does not end in _total", name);
			snprintf(fam[f].type, sizeof(fam[f].type), "%.15s", rest);
			continue;
		}
		/* A sample. */
		{
			size_t nlen = strcspn(line, "{ ");
			const char *labels = line + nlen, *value;
			size_t llen = 0, blen = nlen;
			double v;

			if (!ct_prom_name(line, nlen, false))
				fail_msg("metrics: bad metric name in '%s'", line);
			if (*labels == '{') {
				const char *close = strstr(labels, "} ");

				if (!close)
					fail_msg("metrics: bad labels in '%s'", line);
				llen = (size_t)(close - labels) + 1;
				if (!ct_prom_labels(labels, llen))
					fail_msg("metrics: bad labels in '%s'", line);
			}
			if (labels[llen] != ' ')
				fail_msg("metrics: no value in '%s'", line);
			value = labels + llen + 1;
			sp = strchr(value, ' ');
			if (sp)
				fail_msg("metrics: a timestamp or junk after the value in '%s'",
					 line);
			if (!ct_prom_value(value, &v))
				fail_msg("metrics: value '%s' is not a float in '%s'", value, line);
			if (cur < 0 || !fam[cur].type[0])
				fail_msg("metrics: sample '%s' before its HELP and TYPE", line);
			if (!strcmp(fam[cur].type, "summary")) {
				size_t fl = strlen(fam[cur].name);

				if (nlen > fl && !strncmp(line, fam[cur].name, fl) &&
				    (!strncmp(line + fl, "_count ", 7) ||
				     !strncmp(line + fl, "_sum ", 5)))
					blen = fl;
				else if (nlen == fl && !strstr(labels, "quantile=\""))
					fail_msg("metrics: summary sample without quantile '%s'",
						 line);
			}
			if (blen != strlen(fam[cur].name) || strncmp(line, fam[cur].name, blen))
				fail_msg("metrics: sample '%s' is not of %s (HELP/TYPE first)",
					 line, fam[cur].name);
			if (!strcmp(fam[cur].type, "counter") && !(v >= 0))
				fail_msg("metrics: counter sample '%s' is negative or NaN", line);
			for (int i = 0; i < nseen; i++)
				if ((size_t)(value - 1 - line) == strlen(seen[i]) &&
				    !strncmp(seen[i], line, (size_t)(value - 1 - line)))
					fail_msg("metrics: sample '%s' repeated", line);
			assert_true(nseen < 128);
			snprintf(seen[nseen++], sizeof(seen[0]), "%.*s", (int)(value - 1 - line),
				 line);
			samples++;
		}
	}
	for (int f = 0; f < nfam; f++)
		if (!fam[f].type[0])
			fail_msg("metrics: %s has no TYPE", fam[f].name);
	return samples;
}

/* The value of the sample "name{labels}" in a metrics text. */
static double ct_prom_get(const char *text, const char *sample)
{
	size_t n = strlen(sample);
	const char *p = text;
	double v;

	while ((p = strstr(p, sample))) {
		if ((p == text || p[-1] == '\n') && p[n] == ' ') {
			const char *nl = strchr(p, '\n');
			char val[64];

			snprintf(val, sizeof(val), "%.*s", (int)(nl - p - n - 1), p + n + 1);
			assert_true(ct_prom_value(val, &v));
			return v;
		}
		p += n;
	}
	fail_msg("metrics: no sample %s", sample);
	return NAN;
}

/* The checker itself: it refuses what it must. */
static void test_control_prom_checker_rejects(void **state)
{
	static const char *ok =
	    "# HELP a_total A.\n# TYPE a_total counter\na_total{class=\"x\"} 1\n"
	    "a_total{class=\"y\"} 2.5e3\n# HELP g G.\n# TYPE g gauge\ng NaN\n"
	    "# HELP d D.\n# TYPE d summary\nd{quantile=\"0.5\"} 0.1\nd_sum 3\nd_count 7\n";
	static const char *bad[] = {
	    "# TYPE a_total counter\na_total 1\n",	       /* no HELP */
	    "# HELP a_total A.\na_total 1\n",		       /* no TYPE */
	    "# HELP a A.\n# TYPE a counter\na 1\n",	       /* counter not _total */
	    "# HELP a A.\n# TYPE a gauge\na 1 1700000000\n",   /* timestamp */
	    "# HELP a A.\n# TYPE a gauge\na one\n",	       /* not a float */
	    "# HELP a A.\n# TYPE a gauge\na nan\n",	       /* printf's NaN */
	    "# HELP a A.\n# TYPE a gauge\n1a 1\n",	       /* bad name */
	    "# HELP a A.\n# TYPE a gauge\na{x=1} 1\n",	       /* unquoted label */
	    "# HELP a A.\n# TYPE a gauge\na 1\na 2\n",	       /* repeated */
	    "# HELP a A.\n# TYPE a gauge\nb 1\n",	       /* sample of another metric */
	    "# HELP a A.\n# TYPE a gauge\na 1\n# HELP a A.\n", /* described twice */
	    "# HELP a_total A.\n# TYPE a_total counter\na_total -1\n", /* negative counter */
	    "# HELP a A.\n# TYPE a gauge\n\na 1\n",		       /* empty line */
	    "# HELP a A.\n# TYPE a gauge\na 1",			       /* no final newline */
	};

	assert_int_equal(ct_prom_check(ok), 6);
	assert_true(isnan(ct_prom_get(ok, "g")));
	assert_true(ct_prom_get(ok, "a_total{class=\"y\"}") == 2500);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		/* Each must fail: run the check in a child, which exits 0 only
		 * when the checker accepted the text. */
		pid_t pid = fork();
		int st;

		assert_true(pid >= 0);
		if (pid == 0) {
			int fd = open("/dev/null", O_WRONLY);

			dup2(fd, 1);
			dup2(fd, 2);
			ct_prom_check(bad[i]);
			_exit(0);
		}
		assert_int_equal(waitpid(pid, &st, 0), pid);
		if (WIFEXITED(st) && WEXITSTATUS(st) == 0)
			fail_msg("the metrics checker accepted bad text %zu: '%s'", i, bad[i]);
	}
}

static void test_control_render_metrics_prometheus(void **state)
{
	struct ct t;
	uint8_t buf[100];
	char *m;

	ct_setup2(&t, CT_SIZE, true);
	m = ct_render(&t, CTL_METRICS);
	assert_true(ct_prom_check(m) > 20);
	assert_true(ct_prom_get(m, "streamfs_stream_state{state=\"idle\"}") == 1);
	assert_true(ct_prom_get(m, "streamfs_stream_state{state=\"running\"}") == 0);
	assert_true(ct_prom_get(m, "streamfs_disk_size_bytes") == CT_SIZE);
	assert_true(ct_prom_get(m, "streamfs_stream_length_bytes") == CT_SIZE);
	assert_true(ct_prom_get(m, "streamfs_net_fetched_bytes_total{class=\"guest\"}") == 0);
	assert_true(ct_prom_get(m, "streamfs_net_requests_in_flight{class=\"job\"}") == 0);
	assert_true(isnan(ct_prom_get(m, "streamfs_net_rtt_seconds")));
	assert_true(
	    isnan(ct_prom_get(m, "streamfs_net_request_duration_seconds{quantile=\"0.99\"}")));
	assert_true(ct_prom_get(m, "streamfs_net_request_duration_seconds_count") == 0);
	free(m);

	/* Counters follow the disk; a completed job is 1 in "completed". */
	assert_int_equal(disk_read(t.c.disk, buf, 100, 5), 0);
	assert_int_equal(ct_cmd(&t, CTL_STREAM, "start\n"), 0);
	assert_int_equal(stream_wait(t.c.job), STREAM_COMPLETED);
	m = ct_render(&t, CTL_METRICS);
	ct_prom_check(m);
	assert_true(ct_prom_get(m, "streamfs_guest_read_bytes_total") == 100);
	assert_true(ct_prom_get(m, "streamfs_copy_on_read_bytes_total") == CT_CS);
	assert_true(ct_prom_get(m, "streamfs_stream_copied_bytes_total") == CT_SIZE - CT_CS);
	assert_true(ct_prom_get(m, "streamfs_stream_state{state=\"completed\"}") == 1);
	assert_true(ct_prom_get(m, "streamfs_stream_state{state=\"idle\"}") == 0);
	assert_true(ct_prom_get(m, "streamfs_stream_offset_bytes") == CT_SIZE);
	free(m);
	ct_close(&t);
}

static void test_control_render_map_covers_disk(void **state)
{
	struct ct t;
	struct ct_run runs[32];
	uint8_t buf[CT_CS];
	char *s;
	int n;

	/* mid (qcow2, no backing): data in 2-3, zero cluster at 5, holes
	 * elsewhere. ovl writes cluster 0 and 3. */
	memset(&t, 0, sizeof(t));
	fetch_mem_reset();
	t.size = CT_SIZE;
	ct_create(CT_MID, "qcow2", CT_SIZE, NULL, NULL);
	{
		struct image *mid;
		struct disk *m;
		assert_int_equal(image_open_chain(CT_MID, NULL, IMAGE_RDWR, NULL, &mid), 0);
		assert_int_equal(disk_new(mid, false, false, &m), 0);
		memset(buf, 0x11, sizeof(buf));
		assert_int_equal(disk_write(m, buf, CT_CS, 2 * CT_CS), 0);
		assert_int_equal(disk_write(m, buf, CT_CS, 3 * CT_CS), 0);
		assert_int_equal(mid->drv->zero_clusters(mid, 5 * CT_CS, CT_CS), 0);
		assert_int_equal(disk_close(m), 0);
	}
	ct_create(CT_OVL, "qcow2", CT_SIZE, CT_MID, "qcow2");
	ct_open(&t, false);
	memset(buf, 0x22, sizeof(buf));
	assert_int_equal(disk_write(t.c.disk, buf, 10, 0), 0);
	assert_int_equal(disk_write(t.c.disk, buf, 10, 3 * CT_CS + 100), 0);

	s = ct_render(&t, CTL_MAP);
	n = ct_parse_map(s, CT_SIZE, runs, 32);
	assert_int_equal(n, 7);
	ct_assert_run(&runs[0], 0, CT_CS, 0, "data", CT_OVL);
	ct_assert_run(&runs[1], CT_CS, CT_CS, -1, "hole", "-");
	ct_assert_run(&runs[2], 2 * CT_CS, CT_CS, 1, "data", CT_MID);
	ct_assert_run(&runs[3], 3 * CT_CS, CT_CS, 0, "data", CT_OVL);
	ct_assert_run(&runs[4], 4 * CT_CS, CT_CS, -1, "hole", "-");
	ct_assert_run(&runs[5], 5 * CT_CS, CT_CS, 1, "zero", CT_MID);
	ct_assert_run(&runs[6], 6 * CT_CS, CT_SIZE - 6 * CT_CS, -1, "hole", "-");
	free(s);

	/* After a complete stream: mid's data is in the overlay, holes stay. */
	assert_int_equal(ct_cmd(&t, CTL_STREAM, "start\n"), 0);
	assert_int_equal(stream_wait(t.c.job), STREAM_COMPLETED);
	s = ct_render(&t, CTL_MAP);
	n = ct_parse_map(s, CT_SIZE, runs, 32);
	assert_int_equal(n, 4);
	ct_assert_run(&runs[0], 0, CT_CS, 0, "data", CT_OVL);
	ct_assert_run(&runs[1], CT_CS, CT_CS, -1, "hole", "-");
	ct_assert_run(&runs[2], 2 * CT_CS, 2 * CT_CS, 0, "data", CT_OVL);
	/* mid's zero cluster is a hole now that there is no backing. */
	ct_assert_run(&runs[3], 4 * CT_CS, CT_SIZE - 4 * CT_CS, -1, "hole", "-");
	free(s);
	s = ct_render(&t, CTL_STATUS);
	ct_assert_key(s, "backing", "-");
	ct_assert_key(s, "chain", CT_OVL " (qcow2)");
	ct_assert_key_u64(s, "bytes_copied_by_job", CT_CS);
	ct_assert_key_u64(s, "bytes_already_present", 2 * CT_CS);
	ct_assert_key_u64(s, "bytes_skipped_zero", CT_SIZE - 3 * CT_CS);
	free(s);
	ct_close(&t);
}

static void test_control_render_map_raw_backing_and_cor(void **state)
{
	struct ct t;
	struct ct_run runs[32];
	uint8_t buf[10];
	char *s;
	int n;

	ct_setup2(&t, CT_SIZE, true);
	s = ct_render(&t, CTL_MAP);
	n = ct_parse_map(s, CT_SIZE, runs, 32);
	assert_int_equal(n, 1);
	ct_assert_run(&runs[0], 0, CT_SIZE, 1, "data", CT_BASE);
	free(s);
	/* Copy-on-read of the last cluster and of cluster 1. */
	assert_int_equal(disk_read(t.c.disk, buf, 10, CT_SIZE - 10), 0);
	assert_int_equal(disk_read(t.c.disk, buf, 10, CT_CS), 0);
	s = ct_render(&t, CTL_MAP);
	n = ct_parse_map(s, CT_SIZE, runs, 32);
	assert_int_equal(n, 4);
	ct_assert_run(&runs[0], 0, CT_CS, 1, "data", CT_BASE);
	ct_assert_run(&runs[1], CT_CS, CT_CS, 0, "data", CT_OVL);
	ct_assert_run(&runs[2], 2 * CT_CS, CT_SIZE - 3 * CT_CS, 1, "data", CT_BASE);
	ct_assert_run(&runs[3], CT_SIZE - CT_CS, CT_CS, 0, "data", CT_OVL);
	free(s);
	ct_close(&t);
}

/* ---- commands ---- */

static void test_control_stream_start_completes(void **state)
{
	static const char *const want[] = {"started", "backing-changed", "completed"};
	uint64_t cursor;
	struct ct t;
	char *s;

	ct_setup2(&t, CT_SIZE, false);
	cursor = events_cursor(t.c.events);
	assert_int_equal(ct_cmd(&t, CTL_STREAM, "start\n"), 0);
	assert_int_equal(stream_wait(t.c.job), STREAM_COMPLETED);
	ct_assert_events(&t, &cursor, want, 3);
	assert_null(t.c.disk->top->backing);
	assert_null(t.c.disk->top->backing_name);
	s = ct_render(&t, CTL_STATUS);
	ct_assert_status_shape(s);
	ct_assert_key(s, "state", "completed");
	ct_assert_key_u64(s, "offset", CT_SIZE);
	ct_assert_key(s, "percent", "100.0");
	ct_assert_key(s, "eta_s", "0");
	ct_assert_key(s, "backing", "-");
	ct_assert_key(s, "error", "-");
	ct_assert_key_u64(s, "bytes_copied_by_job", CT_SIZE);
	ct_assert_key_u64(s, "bytes_already_present", 0);
	free(s);
	s = ct_render(&t, CTL_PROGRESS);
	assert_string_equal(s, "262144 262144 100.0%\n");
	free(s);
	s = ct_render(&t, CTL_STREAM);
	assert_string_equal(s, "completed\n");
	free(s);
	ct_assert_disk(&t, t.base);
	/* A finished job can be started again: nothing left to copy. */
	assert_int_equal(ct_cmd(&t, CTL_STREAM, "start"), 0);
	assert_int_equal(stream_wait(t.c.job), STREAM_COMPLETED);
	assert_null(t.c.disk->top->backing);
	{
		uint8_t *b = malloc(CT_SIZE);
		assert_non_null(b);
		memcpy(b, t.base, CT_SIZE);
		ct_close(&t);
		/* The base is gone: the overlay alone holds the disk. */
		ct_assert_reopen(b, CT_SIZE, NULL);
		free(b);
	}
}

static void test_control_stream_start_with_base(void **state)
{
	struct ct t;
	uint8_t *model, buf[3000];
	char *s;

	memset(&t, 0, sizeof(t));
	fetch_mem_reset();
	t.size = CT_SIZE;
	t.base = ct_random(CT_SIZE, 12);
	model = malloc(CT_SIZE);
	assert_non_null(model);
	memcpy(model, t.base, CT_SIZE);
	assert_int_equal(fetch_mem_put("base", t.base, CT_SIZE), 0);
	ct_create(CT_MID, "qcow2", CT_SIZE, CT_BASE, "raw");
	{
		struct image *mid;
		struct disk *m;
		assert_int_equal(image_open_chain(CT_MID, NULL, IMAGE_RDWR, NULL, &mid), 0);
		assert_int_equal(disk_new(mid, false, false, &m), 0);
		memset(buf, 0x33, sizeof(buf));
		assert_int_equal(disk_write(m, buf, sizeof(buf), 5 * CT_CS - 1000), 0);
		memcpy(model + 5 * CT_CS - 1000, buf, sizeof(buf));
		assert_int_equal(disk_close(m), 0);
	}
	ct_create(CT_OVL, "qcow2", CT_SIZE, CT_MID, "qcow2");
	ct_open(&t, false);
	/* Not a layer of the chain (the top is not one either). */
	assert_int_equal(ct_cmd(&t, CTL_STREAM, "start base=mem:nope"), -EINVAL);
	assert_int_equal(ct_cmd(&t, CTL_STREAM, "start base=" CT_OVL), -EINVAL);
	assert_int_equal(ct_state(&t), STREAM_IDLE);
	assert_int_equal(ct_cmd(&t, CTL_STREAM, "start base=" CT_BASE " on-error=stop\n"), 0);
	assert_int_equal(stream_wait(t.c.job), STREAM_COMPLETED);
	assert_non_null(t.c.disk->top->backing);
	assert_string_equal(t.c.disk->top->backing->filename, CT_BASE);
	assert_string_equal(t.c.disk->top->backing_name, CT_BASE);
	assert_null(t.c.disk->top->backing->backing);
	s = ct_render(&t, CTL_STATUS);
	ct_assert_key(s, "base", CT_BASE);
	ct_assert_key(s, "on_error", "stop");
	ct_assert_key(s, "backing", CT_BASE);
	ct_assert_key(s, "chain", CT_OVL " (qcow2) <- " CT_BASE " (raw)");
	/* Only mid's two clusters were copied. */
	ct_assert_key_u64(s, "bytes_copied_by_job", 2 * CT_CS);
	free(s);
	ct_assert_disk(&t, model);
	ct_close(&t);
	ct_assert_reopen(model, CT_SIZE, CT_BASE);
	free(model);
}

static void test_control_stream_busy_and_bad_commands(void **state)
{
	struct ct t;
	struct stream_status st;
	uint64_t cursor;
	char *before, *s;

	ct_setup2(&t, CT_BIG, false);
	/* Idle: the verbs that need a job are EBUSY, abort too. */
	assert_int_equal(ct_cmd(&t, CTL_STREAM, "pause"), -EBUSY);
	assert_int_equal(ct_cmd(&t, CTL_STREAM, "resume"), -EBUSY);
	assert_int_equal(ct_cmd(&t, CTL_STREAM, "cancel"), -EBUSY);
	assert_int_equal(ct_cmd(&t, CTL_ABORT, "1"), -EBUSY);
	/* Bad commands change nothing and post nothing. */
	cursor = events_cursor(t.c.events);
	before = ct_render(&t, CTL_STATUS);
	assert_int_equal(ct_cmd(&t, CTL_STREAM, "start speed=fast"), -EINVAL);
	assert_int_equal(ct_cmd(&t, CTL_STREAM, "begin"), -EINVAL);
	assert_int_equal(ct_cmd(&t, CTL_STREAM, "start speed=1M speed=1M"), -EINVAL);
	assert_int_equal(ct_cmd(&t, CTL_SPEED, "10Q"), -EINVAL);
	assert_int_equal(ct_cmd(&t, CTL_SPEED, "-1"), -EINVAL);
	assert_int_equal(ct_cmd(&t, CTL_ABORT, "yes"), -EINVAL);
	assert_int_equal(ct_cmd(&t, CTL_PULL, "0 0"), -EINVAL);
	assert_int_equal(ct_cmd(&t, CTL_PULL, "1M 1"), -EINVAL); /* past the end */
	assert_int_equal(ct_cmd(&t, CTL_STATUS, "start"), -EACCES);
	assert_int_equal(control_command(&t.c, CTL_STREAM, "start\0", 6), -EINVAL);
	s = ct_render(&t, CTL_STATUS);
	assert_string_equal(s, before);
	free(s);
	free(before);
	assert_int_equal(events_cursor(t.c.events), cursor);
	assert_int_equal(ct_state(&t), STREAM_IDLE);
	assert_int_equal(atomic_load(&t.c.disk->stats.stream_copied), 0);

	/* Running (slowly): a second start is EBUSY, so is resume. */
	assert_int_equal(ct_cmd(&t, CTL_STREAM, "start speed=" CT_SLOW), 0);
	assert_int_equal(ct_cmd(&t, CTL_STREAM, "start"), -EBUSY);
	assert_int_equal(ct_cmd(&t, CTL_STREAM, "start speed=0 base=" CT_BASE), -EBUSY);
	assert_int_equal(ct_cmd(&t, CTL_STREAM, "resume"), -EBUSY);
	/* A bad command while running changes nothing either. */
	assert_int_equal(ct_cmd(&t, CTL_STREAM, "pause please"), -EINVAL);
	assert_int_equal(ct_cmd(&t, CTL_SPEED, "fast"), -EINVAL);
	stream_get_status(t.c.job, &st);
	assert_int_equal(st.state, STREAM_RUNNING);
	assert_int_equal(st.speed, 65536);
	/* Finish quickly. */
	assert_int_equal(ct_cmd(&t, CTL_SPEED, "0"), 0);
	assert_int_equal(stream_wait(t.c.job), STREAM_COMPLETED);
	assert_null(t.c.disk->top->backing);
	ct_assert_disk(&t, t.base);
	ct_close(&t);
}

static void test_control_stream_pause_resume(void **state)
{
	static const char *const want[] = {"started", "paused", "resumed", "backing-changed",
					   "completed"};
	struct ct t;
	struct stream_status a, b;
	uint64_t cursor, copied_a;
	char *s;

	ct_setup2(&t, CT_BIG, false);
	cursor = events_cursor(t.c.events);
	assert_int_equal(ct_cmd(&t, CTL_STREAM, "start speed=" CT_SLOW "\n"), 0);
	assert_int_equal(ct_cmd(&t, CTL_STREAM, "pause\n"), 0);
	/* Paused: progress is frozen (qemu-iotests 030 test_stream_pause). */
	stream_get_status(t.c.job, &a);
	copied_a = atomic_load(&t.c.disk->stats.stream_copied);
	assert_int_equal(a.state, STREAM_PAUSED);
	assert_true(a.offset < CT_BIG);
	ct_sleep_ms(300);
	stream_get_status(t.c.job, &b);
	assert_int_equal(b.state, STREAM_PAUSED);
	assert_int_equal(b.offset, a.offset);
	assert_int_equal(atomic_load(&t.c.disk->stats.stream_copied), copied_a);
	s = ct_render(&t, CTL_STREAM);
	assert_string_equal(s, "paused\n");
	free(s);
	s = ct_render(&t, CTL_STATUS);
	ct_assert_key(s, "state", "paused");
	ct_assert_key(s, "eta_s", "-");
	ct_assert_key_u64(s, "rate_bytes_per_s", 0);
	free(s);
	/* Paused: pause again is EBUSY, a new start too. */
	assert_int_equal(ct_cmd(&t, CTL_STREAM, "pause"), -EBUSY);
	assert_int_equal(ct_cmd(&t, CTL_STREAM, "start"), -EBUSY);
	/* The guest keeps working while paused. */
	{
		uint8_t buf[64];
		memset(buf, 0x44, sizeof(buf));
		assert_int_equal(disk_write(t.c.disk, buf, sizeof(buf), CT_BIG - 64), 0);
		memcpy(t.base + CT_BIG - 64, buf, sizeof(buf));
	}
	assert_int_equal(ct_cmd(&t, CTL_STREAM, "resume\n"), 0);
	assert_int_equal(ct_state(&t), STREAM_RUNNING);
	assert_int_equal(ct_cmd(&t, CTL_SPEED, "0\n"), 0);
	assert_int_equal(stream_wait(t.c.job), STREAM_COMPLETED);
	ct_assert_events(&t, &cursor, want, 5);
	assert_null(t.c.disk->top->backing);
	/* Every byte is either copied by the job or was already there. */
	assert_int_equal(atomic_load(&t.c.disk->stats.stream_copied) +
			     atomic_load(&t.c.disk->stats.stream_present),
			 CT_BIG);
	ct_assert_disk(&t, t.base);
	{
		uint8_t *m = malloc(CT_BIG);
		assert_non_null(m);
		memcpy(m, t.base, CT_BIG);
		ct_close(&t);
		ct_assert_reopen(m, CT_BIG, NULL);
		free(m);
	}
}

static void test_control_stream_cancel_keeps_backing_and_restart_resumes(void **state)
{
	static const char *const want[] = {"started", "cancelled"};
	struct ct t;
	struct stream_status st;
	uint64_t cursor, copied;
	char *s;

	ct_setup2(&t, CT_BIG, false);
	cursor = events_cursor(t.c.events);
	assert_int_equal(ct_cmd(&t, CTL_STREAM, "start speed=" CT_SLOW), 0);
	assert_int_equal(ct_cmd(&t, CTL_STREAM, "cancel"), 0);
	assert_int_equal(stream_wait(t.c.job), STREAM_CANCELLED);
	ct_assert_events(&t, &cursor, want, 2);
	/* Cancel keeps what was copied and the backing reference. */
	assert_non_null(t.c.disk->top->backing);
	assert_string_equal(t.c.disk->top->backing_name, CT_BASE);
	copied = atomic_load(&t.c.disk->stats.stream_copied);
	assert_true(copied < CT_BIG);
	s = ct_render(&t, CTL_STATUS);
	ct_assert_key(s, "state", "cancelled");
	ct_assert_key(s, "backing", CT_BASE);
	free(s);
	ct_assert_disk(&t, t.base);
	/* No job any more: cancel, pause, resume, abort are EBUSY. */
	assert_int_equal(ct_cmd(&t, CTL_STREAM, "cancel"), -EBUSY);
	assert_int_equal(ct_cmd(&t, CTL_STREAM, "resume"), -EBUSY);
	assert_int_equal(ct_cmd(&t, CTL_ABORT, "1"), -EBUSY);

	/* Paused then cancelled through control/abort. */
	assert_int_equal(ct_cmd(&t, CTL_STREAM, "start"), 0);
	assert_int_equal(ct_cmd(&t, CTL_STREAM, "pause"), 0);
	assert_int_equal(ct_cmd(&t, CTL_ABORT, "1\n"), 0);
	assert_int_equal(stream_wait(t.c.job), STREAM_CANCELLED);
	assert_non_null(t.c.disk->top->backing);

	/* A restart resumes: what is in the overlay is not copied again. */
	assert_int_equal(ct_cmd(&t, CTL_STREAM, "start speed=0"), 0);
	assert_int_equal(stream_wait(t.c.job), STREAM_COMPLETED);
	stream_get_status(t.c.job, &st);
	assert_int_equal(st.state, STREAM_COMPLETED);
	assert_int_equal(atomic_load(&t.c.disk->stats.stream_copied), CT_BIG);
	assert_null(t.c.disk->top->backing);
	ct_assert_disk(&t, t.base);
	ct_close(&t);
}

static void test_control_stream_error_policies(void **state)
{
	static const char *const stop1[] = {"started", "error", "paused"};
	static const char *const stop2[] = {"resumed", "backing-changed", "completed"};
	static const char *const report[] = {"started", "failed"};
	struct ct t;
	uint64_t cursor;
	char *s, *e;

	/* on-error=report: the job fails, the backing stays. */
	ct_setup2(&t, CT_SIZE, false);
	cursor = events_cursor(t.c.events);
	assert_int_equal(fetch_mem_fail("base", FETCH_MEM_READ, 0, EIO), 0);
	assert_int_equal(ct_cmd(&t, CTL_STREAM, "start on-error=report"), 0);
	assert_int_equal(stream_wait(t.c.job), STREAM_FAILED);
	ct_assert_events(&t, &cursor, report, 2);
	s = ct_render(&t, CTL_STATUS);
	ct_assert_status_shape(s);
	ct_assert_key(s, "state", "failed");
	e = ct_key(s, "error");
	assert_non_null(strstr(e, "Input/output error"));
	free(e);
	ct_assert_key(s, "backing", CT_BASE);
	free(s);
	assert_non_null(t.c.disk->top->backing);

	/* on-error=stop: the job pauses at the failing offset; resume retries. */
	assert_int_equal(ct_cmd(&t, CTL_STREAM, "start on-error=stop"), 0);
	ct_assert_events(&t, &cursor, stop1, 3);
	assert_int_equal(ct_state(&t), STREAM_PAUSED);
	s = ct_render(&t, CTL_STATUS);
	ct_assert_key(s, "state", "paused");
	ct_assert_key(s, "on_error", "stop");
	e = ct_key(s, "error");
	assert_non_null(strstr(e, "Input/output error"));
	free(e);
	free(s);
	assert_int_equal(fetch_mem_fail("base", 0, 0, 0), 0);
	assert_int_equal(ct_cmd(&t, CTL_STREAM, "resume"), 0);
	assert_int_equal(stream_wait(t.c.job), STREAM_COMPLETED);
	ct_assert_events(&t, &cursor, stop2, 3);
	s = ct_render(&t, CTL_STATUS);
	ct_assert_key(s, "error", "-");
	ct_assert_key(s, "backing", "-");
	free(s);
	assert_null(t.c.disk->top->backing);
	ct_assert_disk(&t, t.base);
	ct_close(&t);
}

/* Unmount while a job runs: stream_free stops it promptly, and what it
 * copied is consistent (the overlay still reads the backing's bytes). */
static void test_control_stream_free_while_running(void **state)
{
	struct ct t;
	uint64_t t0;
	uint8_t *m;

	ct_setup2(&t, CT_BIG, false);
	assert_int_equal(ct_cmd(&t, CTL_STREAM, "start speed=" CT_SLOW), 0);
	assert_int_equal(ct_state(&t), STREAM_RUNNING);
	m = malloc(CT_BIG);
	assert_non_null(m);
	memcpy(m, t.base, CT_BIG);
	t0 = sfs_now_ns();
	ct_close(&t);
	assert_true(sfs_now_ns() - t0 < 3000000000ull);
	ct_assert_reopen(m, CT_BIG, CT_BASE);
	free(m);
}

static void test_control_pull_copies_range(void **state)
{
	struct ct t;
	uint8_t host[2 * CT_CS];
	struct extent ext;
	struct image *top;

	ct_setup2(&t, CT_SIZE, false);
	top = t.c.disk->top;
	assert_int_equal(ct_cmd(&t, CTL_PULL, "0x1000 0x2000\n"), 0);
	assert_int_equal(atomic_load(&t.c.disk->stats.stream_copied), 2 * CT_CS);
	assert_int_equal(top->drv->map(top, 0, CT_SIZE, &ext), 0);
	assert_int_equal(ext.type, EXT_UNALLOC);
	assert_int_equal(ext.len, CT_CS);
	assert_int_equal(top->drv->map(top, CT_CS, CT_SIZE - CT_CS, &ext), 0);
	assert_int_equal(ext.type, EXT_DATA);
	assert_int_equal(ext.len, 2 * CT_CS);
	assert_int_equal(fetch_pread(top->file, host, sizeof(host), ext.host_off), 0);
	assert_memory_equal(host, t.base + CT_CS, sizeof(host));
	/* An unaligned range pulls the clusters it touches. */
	assert_int_equal(ct_cmd(&t, CTL_PULL, "20000 100"), 0);
	assert_int_equal(top->drv->map(top, 4 * CT_CS, CT_CS, &ext), 0);
	assert_int_equal(ext.type, EXT_DATA);
	assert_int_equal(atomic_load(&t.c.disk->stats.stream_copied), 3 * CT_CS);
	/* The very end. */
	assert_int_equal(ct_cmd(&t, CTL_PULL, "262143 1"), 0);
	assert_int_equal(ct_cmd(&t, CTL_PULL, "262143 2"), -EINVAL);
	assert_int_equal(ct_cmd(&t, CTL_PULL, "0xffffffffffffffff 2"), -EINVAL);
	assert_int_equal(top->drv->map(top, CT_SIZE - CT_CS, CT_CS, &ext), 0);
	assert_int_equal(ext.type, EXT_DATA);
	/* Pull does not start the job or change the backing. */
	assert_int_equal(ct_state(&t), STREAM_IDLE);
	assert_non_null(top->backing);
	ct_assert_disk(&t, t.base);
	ct_close(&t);
}

static void test_control_lookup(void **state)
{
	static const char *names[] = {"status", "progress", "speed", "stream",	"abort",
				      "pull",	"events",   "map",   "metrics", "trace"};

	for (int i = 0; i < CTL_COUNT; i++) {
		assert_int_equal(control_lookup(names[i]), i);
		assert_string_equal(control_files[i].name, names[i]);
	}
	assert_int_equal(control_lookup("disk"), -ENOENT);
	assert_int_equal(control_lookup(""), -ENOENT);
	assert_int_equal(control_lookup("Status"), -ENOENT);
	/* Writable files are exactly the command files. */
	assert_int_equal(control_files[CTL_STATUS].mode & 0222, 0);
	assert_int_equal(control_files[CTL_MAP].mode & 0222, 0);
	assert_int_equal(control_files[CTL_METRICS].mode & 0777, 0444);
	assert_int_not_equal(control_files[CTL_STREAM].mode & 0200, 0);
	assert_int_not_equal(control_files[CTL_SPEED].mode & 0200, 0);
	assert_int_not_equal(control_files[CTL_PULL].mode & 0200, 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_control_parse_stream_verbs),
	    cmocka_unit_test(test_control_parse_stream_start_options),
	    cmocka_unit_test(test_control_parse_stream_rejects),
	    cmocka_unit_test(test_control_parse_stream_quoted_values),
	    cmocka_unit_test(test_control_parse_stream_quoting_rejects),
	    cmocka_unit_test(test_util_escape),
	    cmocka_unit_test(test_control_command_log_is_escaped),
	    cmocka_unit_test(test_control_parse_speed),
	    cmocka_unit_test(test_control_parse_pull),
	    cmocka_unit_test(test_control_parse_pull_rejects_double_hex_prefix),
	    cmocka_unit_test(test_control_lookup),
	    cmocka_unit_test_teardown(test_control_render_status_idle_and_counters, ct_teardown),
	    cmocka_unit_test(test_control_prom_checker_rejects),
	    cmocka_unit_test_teardown(test_control_render_metrics_prometheus, ct_teardown),
	    cmocka_unit_test_teardown(test_control_render_map_covers_disk, ct_teardown),
	    cmocka_unit_test_teardown(test_control_render_map_raw_backing_and_cor, ct_teardown),
	    cmocka_unit_test_teardown(test_control_stream_start_completes, ct_teardown),
	    cmocka_unit_test_teardown(test_control_stream_start_with_base, ct_teardown),
	    cmocka_unit_test_teardown(test_control_stream_busy_and_bad_commands, ct_teardown),
	    cmocka_unit_test_teardown(test_control_stream_pause_resume, ct_teardown),
	    cmocka_unit_test_teardown(test_control_stream_cancel_keeps_backing_and_restart_resumes,
				      ct_teardown),
	    cmocka_unit_test_teardown(test_control_stream_error_policies, ct_teardown),
	    cmocka_unit_test_teardown(test_control_stream_free_while_running, ct_teardown),
	    cmocka_unit_test_teardown(test_control_pull_copies_range, ct_teardown),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
