/* streamfs: a unit-test helper shared by tests/test-*.c (after cmocka.h).
 *
 * test_capture: everything written to stderr (sfs_log's messages) while
 * fn(arg) runs, into log (size bytes, NUL-terminated), so a test can check
 * what a user would be told. */
#ifndef STREAMFS_TEST_CAPTURE_H
#define STREAMFS_TEST_CAPTURE_H

#include <stdio.h>
#include <unistd.h>

static inline void test_capture(void (*fn)(void *), void *arg, char *log, size_t size)
{
	FILE *tmp = tmpfile();
	int saved = dup(2);
	size_t n;

	assert_non_null(tmp);
	assert_true(saved >= 0);
	fflush(stderr);
	assert_true(dup2(fileno(tmp), 2) >= 0);
	fn(arg);
	fflush(stderr);
	dup2(saved, 2);
	close(saved);
	rewind(tmp);
	n = fread(log, 1, size - 1, tmp);
	log[n] = '\0';
	fclose(tmp);
}

#endif
