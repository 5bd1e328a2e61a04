/* streamfs: tests of the generic fetch layer (fetch/fetch.c): the scheme
 * table that picks a source, and the resolution of a backing name against
 * the URI of the image that names it. Nothing here touches the network:
 * http(s) URIs are only resolved, or refused before any connection.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fetch.h"
#include "util.h"
#include "test-capture.h"

/* ---- helpers ---- */

/* Resolve name against parent and check the result is want. */
static void test_resolves(const char *parent, const char *name, const char *want)
{
	char *r = NULL;

	assert_int_equal(fetch_resolve_uri(parent, name, &r), 0);
	assert_non_null(r);
	if (strcmp(r, want) != 0)
		fail_msg("'%s' + '%s' gave '%s', not '%s'", parent, name, r, want);
	free(r);
}

static uint64_t test_rand(void)
{
	static uint64_t x = 0x9e3779b97f4a7c15ULL;

	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return x;
}

/* ---- resolution against a local parent ---- */

static void test_resolve_path_parent(void **state)
{
	/* Relative to the parent's directory, joined as is (QEMU path_combine). */
	test_resolves("/img/dir/ovl.qcow2", "base.raw", "/img/dir/base.raw");
	test_resolves("/img/dir/ovl.qcow2", "sub/base.raw", "/img/dir/sub/base.raw");
	test_resolves("/img/dir/ovl.qcow2", "../base.raw", "/img/dir/../base.raw");
	test_resolves("rel/ovl.qcow2", "base.raw", "rel/base.raw");
	test_resolves("ovl.qcow2", "base.raw", "base.raw");
	test_resolves("/ovl.qcow2", "base.raw", "/base.raw");
	/* A colon in a file name is no scheme unless one streamfs knows. */
	test_resolves("/img/ovl.qcow2", "disk:1.raw", "/img/disk:1.raw");
	/* A parent's query-looking text is part of a file name. */
	test_resolves("/img/a?b/ovl", "base.raw", "/img/a?b/base.raw");
	/* Absolute names and names with a scheme are as is. */
	test_resolves("/img/dir/ovl.qcow2", "/abs/base.raw", "/abs/base.raw");
	test_resolves("/img/dir/ovl.qcow2", "file:///abs/base.raw", "file:///abs/base.raw");
	test_resolves("/img/dir/ovl.qcow2", "https://h/d/base.raw?sig=a/b",
		      "https://h/d/base.raw?sig=a/b");
	test_resolves("/img/dir/ovl.qcow2", "nbd://h/export", "nbd://h/export");
	/* file: and mem: parents are paths too. */
	test_resolves("file:///img/dir/ovl.qcow2", "base.raw", "file:///img/dir/base.raw");
	test_resolves("file:///img/dir/ovl.qcow2", "../b", "file:///img/dir/../b");
	test_resolves("mem:ovl", "base", "base");
	test_resolves("mem:d/ovl", "base", "mem:d/base");
	test_resolves("mem:ovl", "mem:base", "mem:base");
}

/* ---- resolution against a URL parent ---- */

static void test_resolve_url_parent(void **state)
{
	test_resolves("http://h/dir/img.qcow2", "base.raw", "http://h/dir/base.raw");
	test_resolves("https://h:8443/a/b/img", "sub/base.raw", "https://h:8443/a/b/sub/base.raw");
	/* Host only: the directory is "/". */
	test_resolves("http://h", "base.raw", "http://h/base.raw");
	test_resolves("http://h/", "base.raw", "http://h/base.raw");
	/* Dot segments are removed; never above the root. */
	test_resolves("http://h/dir/img", "../x", "http://h/x");
	test_resolves("http://h/dir/img", "./x", "http://h/dir/x");
	test_resolves("http://h/dir/img", "../../../x", "http://h/x");
	/* A name with its own query keeps it. */
	test_resolves("http://h/dir/img?t=1", "b.raw?sig=x/y", "http://h/dir/b.raw?sig=x/y");
	/* "a:b" is a path segment, not scheme "a". */
	test_resolves("http://h/dir/img", "disk:1.raw", "http://h/dir/disk:1.raw");
	/* A name that is itself a URL, or a file: URI, or absolute: as is
	 * (QEMU opens "/abs" as a local file below a URL too). */
	test_resolves("http://h/dir/img", "https://other/b.raw", "https://other/b.raw");
	test_resolves("http://h/dir/img", "HTTP://other/b.raw", "HTTP://other/b.raw");
	test_resolves("http://h/dir/img", "file:///abs/b.raw", "file:///abs/b.raw");
	test_resolves("http://h/dir/img", "/abs/b.raw", "/abs/b.raw");
	test_resolves("http://h/dir/img", "mem:b", "mem:b");
}

/* The bug: a '/' inside the parent's query or fragment was taken for the
 * last path separator ("http://h/dir/img.qcow2?sig=a/base.raw"). */
static void test_resolve_url_query_slash(void **state)
{
	test_resolves("http://h/dir/img.qcow2?sig=a/b", "base.raw", "http://h/dir/base.raw");
	test_resolves("https://h/dir/img.qcow2?X-Amz-Credential=AK%2F20240101/us/s3/aws4&t=1",
		      "base.raw", "https://h/dir/base.raw");
	test_resolves("http://h?q=1/2", "base.raw", "http://h/base.raw");
	test_resolves("http://h/dir/img.qcow2#frag/ment", "base.raw", "http://h/dir/base.raw");
	test_resolves("http://h/dir/img.qcow2?a=/b#c/d", "../x?e=/f", "http://h/x?e=/f");
}

/* Untrusted names (image headers) and parents never crash the resolver;
 * it answers a string or a clean -errno. */
static void test_resolve_hostile(void **state)
{
	static const char *const parents[] = {
	    "/img/t.qcow2",	"t.qcow2",	  "http://h", "https://h/d/x?q=/",
	    "file:///d/x",	"mem:x",	  "http://",  "http://[::1",
	    "http://h:99999/x", "http://u:p@h/x", "a:b"};
	size_t big = 100000;
	char *name = malloc(big + 1), *r;
	int rc;

	assert_non_null(name);
	sfs_log_level = -1; /* the refusals are expected */
	r = (char *)1;
	assert_int_equal(fetch_resolve_uri("/img/t.qcow2", "", &r), -EINVAL);
	assert_null(r);
	assert_int_equal(fetch_resolve_uri("http://h/x", "", &r), -EINVAL);
	assert_null(r);
	/* Very long names, relative and absolute. */
	memset(name, 'a', big);
	name[big] = '\0';
	for (size_t i = 0; i < sizeof(parents) / sizeof(parents[0]); i++) {
		rc = fetch_resolve_uri(parents[i], name, &r);
		assert_true(rc == 0 ? r != NULL : r == NULL);
		free(r);
		rc = fetch_resolve_uri(name, parents[i], &r);
		assert_true(rc == 0 ? r != NULL : r == NULL);
		free(r);
	}
	memcpy(name, "http://h/", 9);
	rc = fetch_resolve_uri("http://h/x", name, &r);
	assert_int_equal(rc, 0);
	assert_string_equal(r, name);
	free(r);
	/* NUL-free garbage of every byte value, and URL punctuation. */
	for (int round = 0; round < 3000; round++) {
		static const char punct[] = ":/?#[]@!$&'()*+,;=%. \\\t\x7f\xff";
		size_t len = 1 + test_rand() % 40;

		for (size_t i = 0; i < len; i++) {
			uint64_t x = test_rand();

			if (x % 3)
				name[i] = punct[(x >> 8) % (sizeof(punct) - 1)];
			else
				name[i] = (char)(1 + (x >> 8) % 255);
		}
		name[len] = '\0';
		for (size_t i = 0; i < sizeof(parents) / sizeof(parents[0]); i++) {
			rc = fetch_resolve_uri(parents[i], name, &r);
			assert_true(rc == 0 || rc == -EINVAL);
			assert_true(rc == 0 ? r != NULL : r == NULL);
			free(r);
			rc = fetch_resolve_uri(name, parents[i], &r);
			assert_true(rc == 0 || rc == -EINVAL);
			free(r);
		}
	}
	sfs_log_level = SFS_LOG_WARN;
	free(name);
}

/* ---- the scheme table ---- */

static void test_uri_is_path(void **state)
{
	static const char *const paths[] = {"/x",     "x",	"rel/x",  "",	       "disk:1.raw",
					    "1a://x", "-a://x", "/a://b", "./http://h"};
	static const char *const uris[] = {
	    "file:///x", "FILE:///x",	   "file:x",	"http://h/x", "HTTPS://h/x",
	    "mem:x",	 "nbd://h/export", "ftp://h/x", "json:{}",    "s3+x.y-z://b/k"};

	for (size_t i = 0; i < sizeof(paths) / sizeof(paths[0]); i++)
		if (!fetch_uri_is_path(paths[i]))
			fail_msg("'%s' should be a path", paths[i]);
	for (size_t i = 0; i < sizeof(uris) / sizeof(uris[0]); i++)
		if (fetch_uri_is_path(uris[i]))
			fail_msg("'%s' should be a URI", uris[i]);
}

static void test_open_unknown(void *arg)
{
	struct fetch_source *s = NULL;

	assert_int_equal(fetch_open("gopher://h:70/export", FETCH_RDONLY, &s), -EPROTONOSUPPORT);
	assert_int_equal(fetch_open("ftp://user:SECRET@h/x?t=SECRET", FETCH_RDONLY, &s),
			 -EPROTONOSUPPORT);
	assert_int_equal(fetch_open("json:{\"password\":\"SECRET\"}", FETCH_RDONLY, &s),
			 -EPROTONOSUPPORT);
	assert_null(s);
}

/* One clear message per unknown scheme, naming what is supported, and
 * never a secret of the URL. */
static void test_open_unsupported_scheme(void **state)
{
	char log[4096];

	test_capture(test_open_unknown, NULL, log, sizeof(log));
	assert_non_null(strstr(log, "streamfs: gopher://h:70/export: unsupported scheme 'gopher' "
				    "(streamfs reads file, http, https, nbd, nbds, nbd+unix and "
				    "nbds+unix backings)\n"));
	assert_non_null(strstr(log, "unsupported scheme 'ftp'"));
	assert_non_null(strstr(log, "json: pseudo-URLs are not supported"));
	assert_null(strstr(log, "SECRET"));
}

static void test_open_http_rw(void *arg)
{
	struct fetch_source *s = NULL;

	/* Refused by fetch_open before the source opens anything. */
	assert_int_equal(fetch_open("http://127.0.0.1:1/x", FETCH_RDWR, &s), -EROFS);
	assert_int_equal(fetch_open("HTTPS://127.0.0.1:1/x", FETCH_RDWR, &s), -EROFS);
	assert_null(s);
}

/* Each scheme reaches its source: a local file by path, file:// and
 * FILE://; a file whose name holds a colon; mem: and MEM:; http and https
 * go to the (read-only) HTTP source. */
static void test_open_scheme_table(void **state)
{
	char dir[] = "/tmp/streamfs-test-fetch-XXXXXX", path[128], uri[160], log[2048], cwd[4096];
	struct fetch_source *s;
	uint8_t buf[5];
	int fd;

	assert_non_null(mkdtemp(dir));
	snprintf(path, sizeof(path), "%s/disk:1.raw", dir);
	fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0600);
	assert_true(fd >= 0);
	assert_int_equal(write(fd, "hello", 5), 5);
	close(fd);

	assert_int_equal(fetch_open(path, FETCH_RDONLY, &s), 0);
	assert_int_equal(fetch_size(s), 5);
	assert_string_equal(s->ops->scheme, "file");
	fetch_close(s);
	snprintf(uri, sizeof(uri), "file://%s", path);
	assert_int_equal(fetch_open(uri, FETCH_RDONLY, &s), 0);
	assert_int_equal(fetch_pread(s, buf, 5, 0), 0);
	assert_memory_equal(buf, "hello", 5);
	fetch_close(s);
	snprintf(uri, sizeof(uri), "FILE://%s", path);
	assert_int_equal(fetch_open(uri, FETCH_RDONLY, &s), 0);
	fetch_close(s);
	/* "disk:1.raw" relative to the current directory is a file name. */
	assert_non_null(getcwd(cwd, sizeof(cwd)));
	assert_int_equal(chdir(dir), 0);
	assert_int_equal(fetch_open("disk:1.raw", FETCH_RDONLY, &s), 0);
	assert_int_equal(fetch_size(s), 5);
	fetch_close(s);
	assert_int_equal(chdir(cwd), 0);
	unlink(path);
	rmdir(dir);

	assert_int_equal(fetch_mem_put("m", "abc", 3), 0);
	assert_int_equal(fetch_open("mem:m", FETCH_RDONLY, &s), 0);
	assert_string_equal(s->ops->scheme, "mem");
	assert_int_equal(fetch_size(s), 3);
	fetch_close(s);
	assert_int_equal(fetch_open("MEM:m", FETCH_RDONLY, &s), 0);
	fetch_close(s);
	fetch_mem_reset();

	test_capture(test_open_http_rw, NULL, log, sizeof(log));
	assert_non_null(strstr(log, "http://127.0.0.1:1/x: http sources are read-only"));
	assert_non_null(strstr(log, "https://127.0.0.1:1/x: http sources are read-only"));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_resolve_path_parent),
	    cmocka_unit_test(test_resolve_url_parent),
	    cmocka_unit_test(test_resolve_url_query_slash),
	    cmocka_unit_test(test_resolve_hostile),
	    cmocka_unit_test(test_uri_is_path),
	    cmocka_unit_test(test_open_unsupported_scheme),
	    cmocka_unit_test(test_open_scheme_table),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
